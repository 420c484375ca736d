"""Fan-out: one ``UserRegistered`` event, three independent services.

Each handler subscribes to ``users`` in its own consumer group, so every group gets its own copy
of every event. The welcome e-mail, the audit log and the coupon service never compete for
messages, and a slow or failing one holds back none of the others. The coupon handler's return
value is published to ``coupons`` by ``@app.publisher``, and the e-mail service sends it on.

Run it as a script: it registers three users, waits until every handler saw them, and exits::

    python examples/user_registration.py                  # in-process bus (memory://)
    HERALD_BROKER=sqlite:///users.db python examples/user_registration.py

or as a long-running worker on a broker other processes reach, fed from another terminal::

    HERALD_BROKER=sqlite:///users.db herald run examples.user_registration:app
    herald publish --broker sqlite:///users.db --type UserRegistered users \
        '{"user_id": "u4", "name": "Ana", "email": "ana@example.com", "country": "PT"}'
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import anyio
import msgspec
import pydantic

from herald import App, Context


class UserRegistered(pydantic.BaseModel):
    user_id: str
    name: str
    email: str
    country: str


class CouponIssued(msgspec.Struct, frozen=True):
    user_id: str
    email: str
    code: str
    percent_off: int


# read at import, so `herald run examples.user_registration:app` builds the same app
BROKER = os.environ.get("HERALD_BROKER", "memory://")
app = App("accounts", broker=BROKER)
handled: Counter[str] = Counter()  # users seen per handler, to know when we are done


@app.subscriber("users", group="emails")
async def send_welcome_email(user: UserRegistered) -> None:
    print(f"[emails]  welcome e-mail to {user.email}: 'Welcome aboard, {user.name}!'")
    handled["welcome e-mail"] += 1


@app.subscriber("users", group="audit")
async def write_audit_log(user: UserRegistered, ctx: Context) -> None:
    print(f"[audit]   {user.user_id} registered from {user.country}, message {ctx.message.id}")
    handled["audit log"] += 1


@app.subscriber("users", group="coupons")
@app.publisher("coupons")
async def issue_coupon(user: UserRegistered) -> CouponIssued:
    percent = 20 if user.country == "BR" else 10
    code = f"WELCOME-{user.user_id.upper()}"
    print(f"[coupons] {code}: {percent}% off for {user.user_id}")
    handled["coupon"] += 1
    return CouponIssued(user.user_id, user.email, code, percent)


@app.subscriber("coupons", group="emails")
async def send_coupon_email(coupon: CouponIssued) -> None:
    print(f"[emails]  coupon {coupon.code} sent to {coupon.email}")
    handled["coupon e-mail"] += 1


USERS = [
    UserRegistered(user_id="u1", name="Ada", email="ada@example.com", country="GB"),
    UserRegistered(user_id="u2", name="Grace", email="grace@example.com", country="US"),
    UserRegistered(user_id="u3", name="Luíza", email="luiza@example.com.br", country="BR"),
]


HANDLERS = ("welcome e-mail", "audit log", "coupon", "coupon e-mail")


def all_handled() -> bool:
    return all(handled[h] == len(USERS) for h in HANDLERS)


async def main() -> int:
    async with app:
        for user in USERS:
            await app.publish("users", user, key=user.user_id)
        with anyio.move_on_after(10):  # a bounded wait: never hang
            while not all_handled():
                await anyio.sleep(0.01)
    print(f"{len(USERS)} users registered on {BROKER}; each handler saw: {dict(handled)}")
    return 0 if all_handled() else 1


if __name__ == "__main__":
    sys.exit(anyio.run(main))
