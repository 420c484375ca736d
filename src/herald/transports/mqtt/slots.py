"""The MQTT transport's member slots (see *Groups* in :mod:`herald.transports.mqtt.transport`).

The stable client id of each consumer session of a group, and the ``flock``-held slot files
that give a consumer its lowest free session on this host and journal what it handed out.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Sequence

__all__ = ["Slot", "acquire_slot", "client_id"]

#: Journal size (bytes) past which it is rewritten with only the outstanding entries.
_JOURNAL_REWRITE = 1 << 20


def client_id(
    prefix: str, topic: str, group: str, member: str, slot: int, *, bind: Sequence[str] = ()
) -> str:
    """The stable MQTT client id of member ``member``'s ``slot``-th consumer of a group.

    Stable so that a restarted consumer resumes the persistent session (and with it the
    messages queued or left unacked there); hashed so any topic/group length fits. The
    group's ``bind`` filters are part of it: a session keeps its subscriptions, so other
    filters need another session.
    """
    key = "\0".join([prefix, topic, group, *(["bind", *bind] if bind else [])])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"herald-{digest}-{member}-{slot}"


class Slot:
    """A consumer slot of a group on this host, held with an exclusive ``flock``.

    The lock file doubles as a journal of the message ids (and attempts) handed to the
    application and not yet acked. The OS drops the lock when the holding process dies (even
    by SIGKILL), so the next consumer of the group on this host takes the slot, resumes its
    MQTT session, and reads the journal to tell redelivered messages that really were handed
    out (attempt + 1) from ones that were only prefetched (same attempt).
    """

    def __init__(self, index: int, fd: int, previous: dict[str, int]) -> None:
        self.index = index
        self._fd = fd
        #: message id -> attempt handed out by an earlier owner of this slot (or by us)
        self.handed_out = previous
        self._written = 0

    def record(self, entries: list[tuple[str, int]]) -> None:
        """Note deliveries handed to the application (one append, no fsync: the journal must
        outlive the process, not the machine)."""
        for mid, attempt in entries:
            self.handed_out[mid] = attempt
        self._written += os.write(self._fd, "".join(f"{m} {a}\n" for m, a in entries).encode())

    def settled(self, message_id: str) -> None:
        """``message_id`` was acked or given back: it no longer counts as handed out."""
        self.handed_out.pop(message_id, None)
        if not self.handed_out:
            if self._written:
                os.ftruncate(self._fd, 0)
                self._written = 0
        elif self._written > _JOURNAL_REWRITE:
            # entries that never come back (acked just before a crash) would grow it forever
            os.ftruncate(self._fd, 0)
            self._written = 0
            self.record(list(self.handed_out.items()))

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # drops the flock
            self._fd = -1


def _slot_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = os.path.join(base, f"herald-mqtt-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def acquire_slot(base_id: str, limit: int = 1024) -> Slot:
    """Take the lowest free slot for the client ids starting with ``base_id`` on this host."""
    directory = _slot_dir()
    for index in range(limit):
        fd = os.open(
            os.path.join(directory, f"{base_id}-{index}.slot"), os.O_RDWR | os.O_CREAT | os.O_APPEND
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        previous: dict[str, int] = {}
        with os.fdopen(os.dup(fd), "rb") as f:
            for line in f.read().decode(errors="replace").splitlines():
                mid, _, attempt = line.partition(" ")
                if attempt.isdigit():
                    previous[mid] = int(attempt)
        os.ftruncate(fd, 0)
        slot = Slot(index, fd, {})
        if previous:  # keep what the previous owner left until its redeliveries are matched
            slot.record(list(previous.items()))
        return slot
    raise RuntimeError(f"more than {limit} consumers of one group in use on this host")
