"""Subprocess consumer used by the conformance suite's crash test.

Run as ``python -m herald.testing._worker URL TOPIC GROUP FETCH ACK``: joins ``GROUP`` on
``TOPIC``, fetches ``FETCH`` deliveries, acks the first ``ACK`` of them, prints one JSON line
``{"fetched": [...], "acked": [...]}`` to stdout and then waits forever without acking the rest,
holding its connection open until the parent kills it (SIGKILL: no cleanup runs).
"""

from __future__ import annotations

import json
import sys

import anyio

from herald.transports import Delivery, open_transport


async def _main(url: str, topic: str, group: str, want: int, ack: int) -> int:
    transport = open_transport(url)
    await transport.connect()
    sub = await transport.subscribe(topic, group, start="earliest")
    fetched: list[Delivery] = []
    with anyio.move_on_after(30):
        while len(fetched) < want:
            fetched += await sub.fetch(want - len(fetched), 0.5)
    if len(fetched) < want:
        print(json.dumps({"error": f"fetched only {len(fetched)} of {want}"}), flush=True)
        return 2
    acked = fetched[:ack]
    if acked:
        await sub.ack(acked)
    report = {
        "fetched": [d.message.id for d in fetched],
        "attempts": [d.attempt for d in fetched],
        "acked": [d.message.id for d in acked],
    }
    print(json.dumps(report), flush=True)
    await anyio.sleep_forever()
    return 0  # pragma: no cover - killed before


def main(argv: list[str]) -> int:
    """Entry point; ``argv`` is ``[URL, TOPIC, GROUP, FETCH, ACK]``."""
    url, topic, group, want, ack = argv
    return anyio.run(_main, url, topic, group, int(want), int(ack))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
