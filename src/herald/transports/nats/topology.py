"""Where a topic lives on JetStream: its stream and subject, and each group's durable consumer.

Part of :mod:`herald.transports.nats.transport` (whose docstring gives the mapping); apart so
the rules for existing streams read in one place.

* A topic's **home** is Herald's own stream ``stream_name(topic)`` when it exists. Otherwise
  Herald creates it, capturing the topic's subject — unless a stream made by someone else
  captures that subject already (the server refuses overlapping streams): then that stream is
  the home, used as it is, and Herald's publishes to the topic go into it.
* A group with a ``bind`` pattern lives in the stream that captures the whole pattern: an
  existing one, or Herald's stream of the topic, created with the pattern as its subject, or
  widened to it (its other groups are first narrowed to the topic's subject, so they never see
  what the pattern adds). The pattern must match the topic's own subject: a consumer of NATS
  2.9 filters on one subject, and what Herald publishes to the topic (a replayed dead letter)
  has to reach the group.
* A group's consumer on Herald's own stream is named after the group (no filter while the
  stream captures only the topic's subject); on any other stream it is
  ``<topic>:<group>`` (``.`` -> ``~``; ``:`` occurs in no Herald name), filtered on the
  pattern or the topic's subject, so groups of several topics can share one stream.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar

import nats.js.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.manager import JetStreamManager

from herald.transports.base import Start, TransportError, validate_name
from herald.transports.nats.options import NatsOptions
from herald.transports.nats.wire import (
    consumer_name,
    stream_name,
    subject_covers,
    subject_for,
)

__all__ = ["Home", "Topology"]

log = logging.getLogger("herald.transports.nats")

T = TypeVar("T")

# err_codes of the JetStream API
_CONSUMER_EXISTS = 10013
_CONSUMER_NAME_EXISTS = 10148
_SUBJECTS_OVERLAP = 10065


class Api(Protocol):
    """The transport's JetStream API caller (retries while the server is unreachable)."""

    async def __call__(self, what: str, call: Callable[[], Awaitable[T]]) -> T: ...


@dataclass(frozen=True, slots=True)
class Home:
    """The stream a topic (or one bound group of it) reads and publishes through."""

    stream: str
    #: the topic's own subject: where Herald publishes it
    subject: str
    #: Herald's stream of this topic (``stream_name(topic)``), not someone else's
    own: bool
    #: the stream's subjects, as last seen
    subjects: tuple[str, ...]


class Topology:
    """Finds or makes the homes of topics and the consumers of groups, on one connection."""

    def __init__(
        self,
        jsm: JetStreamManager,
        api: Api,
        request: Callable[[str, bytes], Awaitable[bytes]],
        options: NatsOptions,
        url: str,
    ) -> None:
        self._jsm = jsm
        self._api = api
        self._request = request
        self._o = options
        self._url = url
        #: topic -> its home (without bind), for publishing
        self._homes: dict[str, Home] = {}

    def forget(self, topic: str | None = None, streams: Collection[str] = ()) -> None:
        """Drop what is known of ``topic`` and of topics homed in ``streams``."""
        if topic is not None:
            self._homes.pop(topic, None)
        for t, home in list(self._homes.items()):
            if home.stream in streams:
                del self._homes[t]

    # --- homes ------------------------------------------------------------------------------

    async def home(self, topic: str) -> Home:
        """The home of ``topic``, creating Herald's stream for it if no stream has it."""
        known = self._homes.get(topic)
        if known is not None:
            return known
        validate_name("topic", topic)
        name, subject = stream_name(topic), subject_for(topic)
        home = await self._own(name, subject)
        if home is None:
            try:
                home = await self._create(name, subject, subject)
            except _Overlap:
                home = await self._covering(subject, subject, name)
                if home is None:
                    raise TransportError(
                        f"NATS {self._url}: subject {subject!r} of topic {topic!r} is captured "
                        "in part by other streams; Herald needs one stream to capture it"
                    ) from None
        self._homes[topic] = home
        return home

    async def bound_home(self, topic: str, pattern: str) -> Home:
        """The stream a group of ``topic`` bound to ``pattern`` reads (see the module docs)."""
        validate_name("topic", topic)
        subject = subject_for(topic)
        if not subject_covers(pattern, subject):
            raise ValueError(
                f"bind pattern {pattern!r} does not match topic {topic!r}'s own subject "
                f"{subject!r}: a NATS consumer filters on one subject, and what Herald publishes "
                "to the topic (a replayed dead letter) must still reach the group; name the "
                "topic after a subject the pattern matches (e.g. topic 'sensors.all' with "
                "bind='sensors.*')"
            )
        own = stream_name(topic)
        home = await self._covering(pattern, subject, own)
        if home is not None:
            return home
        overlapping = await self._overlapping(pattern)
        if not overlapping:
            try:
                return await self._create(own, subject, pattern)
            except _Overlap:  # created meanwhile
                home = await self._covering(pattern, subject, own)
                if home is not None:
                    return home
                overlapping = await self._overlapping(pattern)
        if overlapping == [own]:
            return await self._widen(own, subject, pattern)
        raise TransportError(
            f"NATS {self._url}: subjects matching bind pattern {pattern!r} are captured in part "
            f"by streams {sorted(overlapping)!r}; bind a pattern that one stream captures whole"
        )

    async def _own(self, name: str, subject: str) -> Home | None:
        jsm = self._jsm
        try:
            info = await self._api(f"look up stream {name!r}", lambda: jsm.stream_info(name))
        except nats.js.errors.NotFoundError:
            return None
        except nats.js.errors.APIError as e:
            raise TransportError(f"NATS {self._url}: stream {name!r}: {e}") from None
        return Home(name, subject, True, tuple(info.config.subjects or ()))

    async def _create(self, name: str, subject: str, captures: str) -> Home:
        """Create Herald's stream ``name`` capturing ``captures``; :class:`_Overlap` if
        another stream captures some of it. Created meanwhile by another process: that one."""
        o = self._o
        config = StreamConfig(
            name=name,
            subjects=[captures],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE if o.storage == "file" else StorageType.MEMORY,
            discard=DiscardPolicy.OLD,
            max_age=o.max_age,
            max_bytes=o.max_bytes,
            max_msgs=o.max_msgs,
            duplicate_window=o.duplicate_window,
            num_replicas=o.replicas,
        )
        jsm = self._jsm
        try:
            await self._api(f"create stream {name!r}", lambda: jsm.add_stream(config))
        except nats.js.errors.APIError as e:
            if e.err_code == _SUBJECTS_OVERLAP:
                raise _Overlap() from None
            # created meanwhile by another process with other limits: use it as it is
            home = await self._own(name, subject)
            if home is None:
                raise TransportError(
                    f"NATS {self._url}: cannot create stream {name!r}: {e}"
                ) from None
            return home
        return Home(name, subject, True, (captures,))

    async def _overlapping(self, pattern: str) -> list[str]:
        """Names of the streams whose subjects overlap ``pattern``."""
        body = json.dumps({"subject": pattern}).encode()
        data = await self._api(
            f"look up streams of {pattern!r}",
            lambda: self._request("$JS.API.STREAM.NAMES", body),
        )
        page = json.loads(data)
        if "error" in page:
            raise TransportError(f"NATS {self._url}: list streams: {page['error']}")
        return list(page.get("streams") or [])

    async def _covering(self, pattern: str, subject: str, own: str) -> Home | None:
        """The stream capturing everything ``pattern`` matches, if there is one (only one can:
        streams may not overlap)."""
        jsm = self._jsm
        for name in await self._overlapping(pattern):
            try:
                info = await self._api(f"look up stream {name!r}", partial(jsm.stream_info, name))
            except nats.js.errors.NotFoundError:
                continue
            subjects = tuple(info.config.subjects or ())
            if any(subject_covers(s, pattern) for s in subjects):
                return Home(name, subject, name == own, subjects)
        return None

    async def _widen(self, own: str, subject: str, pattern: str) -> Home:
        """Make Herald's stream ``own`` capture ``pattern``; its consumers that filter on
        nothing are narrowed to the topic's subject first, so they get no more than before."""
        jsm = self._jsm
        for info in await self._api(f"list groups of {own!r}", lambda: jsm.consumers_info(own)):
            if not info.config.filter_subject:
                info.config.filter_subject = subject
                await self._api(
                    f"narrow group {info.name!r}", partial(jsm.add_consumer, own, info.config)
                )
        stream = await self._api(f"look up stream {own!r}", lambda: jsm.stream_info(own))
        cfg_s = stream.config
        subjects = [s for s in cfg_s.subjects or () if not subject_covers(pattern, s)] + [pattern]
        cfg_s.subjects = subjects
        try:
            await self._api(f"widen stream {own!r}", lambda: jsm.update_stream(cfg_s))
        except nats.js.errors.APIError as e:
            raise TransportError(
                f"NATS {self._url}: cannot make stream {own!r} capture {pattern!r}: {e}"
            ) from None
        log.info("NATS: stream %r now captures %r", own, subjects)
        self.forget(streams={own})
        return Home(own, subject, True, tuple(subjects))

    # --- consumers --------------------------------------------------------------------------

    async def consumer(
        self, home: Home, topic: str, group: str, start: Start, pattern: str | None
    ) -> str:
        """Ensure the durable consumer of ``group`` exists in ``home``; return its name."""
        jsm = self._jsm
        o = self._o
        stream = home.stream
        if home.own:
            name = consumer_name(group)
            alone = home.subjects == (home.subject,)
        else:
            name = f"{consumer_name(topic)}:{consumer_name(group)}"
            alone = False
        wanted = pattern or (None if alone else home.subject)
        try:
            info = await self._api(
                f"look up group {group!r}", lambda: jsm.consumer_info(stream, name)
            )
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None:
            cfg = info.config
            current = cfg.filter_subject or None
            # alone, unfiltered and filtered on the topic's subject are the same: leave it
            target = current if wanted is None else wanted
            if (cfg.ack_wait, cfg.max_ack_pending, current) != (
                o.ack_wait,
                o.max_ack_pending,
                target,
            ):
                cfg.ack_wait, cfg.max_ack_pending = o.ack_wait, o.max_ack_pending
                cfg.filter_subject = target
                try:
                    await self._api(
                        f"update group {group!r}", lambda: jsm.add_consumer(stream, cfg)
                    )
                except nats.js.errors.APIError as e:
                    if target != current:
                        raise TransportError(
                            f"NATS {self._url}: cannot change group {group!r} to filter on "
                            f"{target!r}: {e}"
                        ) from None
                    log.warning("NATS: could not update ack_wait of group %r: %s", group, e)
            return name
        config = ConsumerConfig(
            durable_name=name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL if start == "earliest" else DeliverPolicy.NEW,
            ack_wait=o.ack_wait,
            max_deliver=-1,
            max_ack_pending=o.max_ack_pending,
            filter_subject=wanted,
        )
        try:
            await self._api(f"create group {group!r}", lambda: jsm.add_consumer(stream, config))
        except nats.js.errors.APIError as e:
            # joined meanwhile by another member: its configuration wins
            if e.err_code not in (_CONSUMER_EXISTS, _CONSUMER_NAME_EXISTS):
                raise TransportError(
                    f"NATS {self._url}: cannot create group {group!r}: {e}"
                ) from None
        return name


class _Overlap(Exception):
    """The server refused a stream: another stream captures some of its subjects."""
