"""Dead letters: where a message goes when handling it cannot succeed.

Each group has its own dead-letter topic, ``<topic>.<group>.dlq``, so replaying a dead letter
concerns only the group that failed it. A dead letter keeps the original payload byte for byte
and the original headers, and adds headers prefixed ``dlq.`` that say why. Messages of a type
no handler of a group takes go to ``<topic>.<group>.skipped`` with ``App(unhandled="skip")``.
Both kinds are read by the dead-letter tooling (:mod:`herald.dlq`) in a group of its own per
topic, :func:`tool_group`.
"""

from __future__ import annotations

import hashlib
import traceback

from herald.message import Message, new_id, utc_now_rfc3339

__all__ = [
    "DLQ_PREFIX",
    "REPLAY_GROUP",
    "TOOL_GROUP",
    "dead_letter",
    "dead_letter_topic",
    "is_dead_letter_topic",
    "skipped",
    "skipped_topic",
    "tool_group",
]

DLQ_PREFIX = "dlq."
#: Header on a replayed dead letter naming the group that failed it: only that group handles
#: the replay; the topic's other groups ack and skip it.
REPLAY_GROUP = "replay_group"
#: How the names of the dead-letter tooling's groups begin: the tooling (:mod:`herald.dlq`)
#: reads each dead-letter topic in a group of its own, :func:`tool_group`, which a consumer
#: joins on its dead-letter topics where the engine cannot replay.
TOOL_GROUP = "herald.dlq"
_TRACEBACK_LIMIT = 4000  # characters; headers must stay small enough for every broker


def dead_letter_topic(topic: str, group: str) -> str:
    """The dead-letter topic of ``group`` on ``topic``."""
    return f"{topic}.{group}.dlq"


def dead_letter(
    message: Message,
    *,
    group: str,
    handler: str,
    reason: str,
    error: BaseException | None,
    attempts: int,
    first_failure_at: str | None = None,
) -> Message:
    """Build the dead letter for ``message`` (a new id; the original id is kept in a header)."""
    now = utc_now_rfc3339()
    headers = dict(message.headers)
    headers.update(
        {
            "dlq.reason": reason,
            "dlq.original_id": message.id,
            "dlq.original_topic": message.topic,
            "dlq.group": group,
            "dlq.handler": handler,
            "dlq.attempts": str(attempts),
            "dlq.first_failure_at": first_failure_at or now,
            "dlq.last_failure_at": now,
        }
    )
    if error is not None:
        tb = "".join(traceback.format_exception(error))
        if len(tb) > _TRACEBACK_LIMIT:
            tb = "…" + tb[-_TRACEBACK_LIMIT:]  # the end of a traceback is the useful part
        headers["dlq.error_type"] = f"{type(error).__module__}.{type(error).__qualname__}"
        headers["dlq.error"] = str(error)[:1000]
        headers["dlq.traceback"] = tb
    return Message(
        id=new_id(),
        topic=dead_letter_topic(message.topic, group),
        payload=message.payload,
        key=message.key,
        type=message.type,
        headers=headers,
    )


def skipped_topic(topic: str, group: str) -> str:
    """Where ``App(unhandled="skip")`` puts messages of a type no handler of ``group`` takes."""
    return f"{topic}.{group}.skipped"


def is_dead_letter_topic(topic: str) -> bool:
    """Whether ``topic`` is named like a dead-letter (``<topic>.<group>.dlq``) or skipped
    (``<topic>.<group>.skipped``) topic: the topics the dead-letter tooling works on."""
    base, dot, suffix = topic.rpartition(".")
    return bool(dot) and suffix in ("dlq", "skipped") and "." in base.strip(".")


def tool_group(topic: str) -> str:
    """The group the dead-letter tooling reads ``topic`` with: ``herald.dlq.`` and a digest
    of the topic's name, one per topic.

    Per topic because on Kafka a group is one consumer group across every topic it reads: a
    single tooling group would tie every dead-letter topic's rebalances together. A digest
    rather than the name itself keeps the names the engines derive from it (a Kafka retry topic
    ``<topic>.<group>.retry``, a RabbitMQ queue ``<topic>:<group>``) within their length
    limits, and it starts ``herald.dlq.`` so it is easy to tell from an application's groups.
    """
    digest = hashlib.blake2b(topic.encode(), digest_size=6).hexdigest()
    return f"{TOOL_GROUP}.{digest}"


def skipped(message: Message, group: str) -> Message:
    """A copy of ``message`` for the skipped topic, saying which group did not handle it."""
    headers = dict(message.headers)
    headers["skipped.original_id"] = message.id
    headers["skipped.original_topic"] = message.topic
    headers["skipped.group"] = group
    return Message(
        id=new_id(),
        topic=skipped_topic(message.topic, group),
        payload=message.payload,
        key=message.key,
        type=message.type,
        headers=headers,
    )
