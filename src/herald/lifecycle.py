"""An App's lifecycle: start, stop, serve and run, owned by a supervisor task of its own.

``start()`` launches one *supervisor* task per run and waits until it reports the consumers
started. The supervisor does everything that holds resources, in this order, all in that one
task: connect the transport, build the group consumers, open their inbox stores, run the
startup hooks, start every consumer in an anyio task group, wait for a stop request, stop the
consumers gracefully (``shutdown_timeout``), run the shutdown hooks, close the stores and the
transport. Because the task group and every connection live in the supervisor, ``stop()`` may
be called from any task of the event loop, not only from the one that called ``start()``, and
a transport's per-task state (cancel scopes, background readers) is opened and closed in the
same task.

Structured concurrency still holds inside: no loose tasks but the supervisor, which ``stop()``
(or the loop's shutdown) always waits for. A consumer that crashes cancels the others; the
supervisor then closes everything, logs the error at once and ``stop()`` raises it, and
``serve()`` ends as soon as it happens.

A stop requested while the app is still starting (``stop()`` from another task, a signal under
``serve()``, or the caller of ``start()`` being cancelled) cancels the start-up where it is:
a connect retrying an unreachable broker, a consumer waiting for a group assignment. Nothing
is left open; ``start()`` raises :class:`StartAborted` (or the caller's cancellation).

An App can be started again after it stopped: each run gets a new supervisor, and transports
reconnect after ``close()``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from herald.consumer import GroupConsumer
from herald.inbox import InboxStore
from herald.middleware.dedupe import Dedupe
from herald.transports.base import Transport

__all__ = ["Lifecycle", "StartAborted", "stop_signals_abort_start"]

log = logging.getLogger("herald")

Hook = Callable[[], Awaitable[None]]


class StartAborted(RuntimeError):
    """``stop()`` was called (or a stop signal arrived) before ``start()`` finished."""


class Owner(Protocol):
    """What the lifecycle reads of the App it runs."""

    @property
    def name(self) -> str: ...

    @property
    def transport(self) -> Transport: ...

    @property
    def shutdown_timeout(self) -> float: ...


class Loop(Protocol):
    """What the lifecycle runs: a group consumer, or one of the App's own loops."""

    async def run(self, *, task_status: TaskStatus[None] = ...) -> None: ...

    def stop(self) -> None: ...


class Lifecycle:
    """Starts, supervises and stops one App's consumers; see the module docstring.

    :param owner: the App (its name, transport and ``shutdown_timeout``, read when used).
    :param build: makes the group consumers of one run, after the transport is connected.
    :param startup: hooks run after connecting, before the consumers start.
    :param shutdown: hooks run after the consumers stopped, before disconnecting (only when
        every startup hook ran).
    :param loops: makes the App's own background loops of one run (the scheduler), started
        after the consumers and stopped with them; each has ``run(task_status=)`` and ``stop()``
        like a consumer.
    """

    def __init__(
        self,
        owner: Owner,
        build: Callable[[], list[GroupConsumer]],
        startup: Sequence[Hook],
        shutdown: Sequence[Hook],
        loops: Callable[[], list[Loop]] = list,
    ) -> None:
        self._owner = owner
        self._loops = loops
        self._build = build
        self._startup = startup
        self._shutdown = shutdown
        self._consumers: list[GroupConsumer] = []
        self._stores: list[InboxStore] = []
        self._run: _Run | None = None

    @property
    def active(self) -> bool:
        """Started and not yet stopped (``stop()`` has not returned)."""
        return self._run is not None

    @property
    def consumers(self) -> list[GroupConsumer]:
        return list(self._consumers)

    # --- start / stop ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Launch the supervisor and wait until every consumer has started. Raises what made
        the start-up fail (after closing what it opened), or :class:`StartAborted` if a stop
        was requested meanwhile; a cancelled caller cancels the start-up too."""
        if self._run is not None:
            raise RuntimeError(f"app {self._owner.name!r} is already running")
        run = self._run = _Run()
        # a task of its own, not one of the caller's task group: stop() may come from anywhere
        run.task = asyncio.get_running_loop().create_task(
            self._supervise(run), name=f"herald app {self._owner.name}"
        )
        try:
            await run.ready.wait()
        except anyio.get_cancelled_exc_class():
            await _cancel_and_wait(run)
            self._forget(run)
            raise
        if run.serving:
            return
        # start-up failed or was aborted; the supervisor has closed everything already
        self._forget(run)
        if run.error is not None:
            raise run.error
        raise StartAborted(f"app {self._owner.name!r} was stopped while starting")

    def request_stop(self) -> None:
        """Ask the running app to stop, without waiting: a graceful shutdown once started,
        an immediate cancellation of the start-up before that."""
        run = self._run
        if run is None:
            return
        if run.serving:
            run.stopping.set()
        else:
            run.scope.cancel()

    async def stop(self) -> None:
        """Stop gracefully and wait until everything is closed; raise what made a running app
        fail (a crashed consumer, a failing shutdown hook or close). Idempotent. If the caller
        is cancelled meanwhile, running handlers are cut off (their messages come back)."""
        run = self._run
        if run is None:
            return
        self.request_stop()
        try:
            await run.done.wait()
        except anyio.get_cancelled_exc_class():
            await _cancel_and_wait(run)
            self._forget(run)
            raise
        self._forget(run)
        if run.serving and run.error is not None:
            error, run.error = run.error, None  # raised once, by the first stop() to see it
            raise error

    def _forget(self, run: _Run) -> None:
        if self._run is run:
            self._run = None

    # --- the supervisor -------------------------------------------------------------------------

    async def _supervise(self, run: _Run) -> None:
        owner = self._owner
        hooks_ran = False
        log.info("%s starting on %s", owner.name, owner.transport.url)
        try:
            with run.scope:
                await owner.transport.connect()
                self._consumers = self._build()
                await self._open_stores()
                for hook in self._startup:
                    await hook()
                hooks_ran = True
                await self._consume(run)
        except Exception as e:
            run.error = _unwrap(e)
            if run.serving:
                log.error(
                    "%s: %s: %s; stopping the app",
                    owner.name,
                    type(run.error).__name__,
                    run.error,
                    exc_info=run.error,
                )
        finally:
            with anyio.CancelScope(shield=True):
                error = await self._close(hooks_ran)
            if run.error is None:
                run.error = error
            if run.serving:
                log.info("%s stopped", owner.name)
            run.stopping.set()
            run.ready.set()
            run.done.set()

    async def _consume(self, run: _Run) -> None:
        """Run the consumers until a stop request, then stop them within the grace period."""
        owner = self._owner
        with anyio.CancelScope() as grace:
            async with anyio.create_task_group() as tg:
                loops: list[Loop] = [*self._consumers, *self._loops()]
                for loop in loops:
                    await tg.start(loop.run)
                run.serving = True
                run.ready.set()
                log.info(
                    "%s started on %s with %d group(s)",
                    owner.name,
                    owner.transport.url,
                    len(self._consumers),
                )
                await run.stopping.wait()
                for loop in loops:
                    loop.stop()
                # running handlers finish; past the grace period the task group is cancelled
                grace.deadline = anyio.current_time() + owner.shutdown_timeout
        if grace.cancelled_caught:
            log.warning(
                "%s: handlers still running after %.1fs; cancelling them (their messages "
                "will be redelivered)",
                owner.name,
                owner.shutdown_timeout,
            )

    async def _open_stores(self) -> None:
        # inbox stores can serve several groups: opened and closed once each
        for consumer in self._consumers:
            for m in consumer.chain:
                if isinstance(m, Dedupe) and all(m.store is not s for s in self._stores):
                    self._stores.append(m.store)
                    await m.store.open()

    async def _close(self, hooks_ran: bool) -> BaseException | None:
        """Shutdown hooks (if the startup hooks ran), inbox stores, transport: each is tried
        whatever the others did; return the first error."""
        errors: list[BaseException] = []
        if hooks_ran:
            for hook in self._shutdown:
                try:
                    await hook()
                except Exception as e:
                    errors.append(e)
        stores, self._stores = self._stores, []
        for store in stores:
            try:
                await store.close()
            except Exception as e:
                errors.append(e)
        try:
            await self._owner.transport.close()
        except Exception as e:
            errors.append(e)
        self._consumers = []
        return errors[0] if errors else None

    # --- serve ----------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Start, run until SIGINT/SIGTERM (or until a consumer fails), stop. A signal while
        starting stops at once: the start-up is abandoned, nothing is raised."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            received: list[str] = []

            async def on_signal() -> None:
                async for signum in signals:
                    received.append(signal.Signals(signum).name)
                    run = self._run
                    if run is not None and run.serving:
                        log.info("%s: received %s, shutting down", self._owner.name, received[0])
                    self.request_stop()
                    return

            failed: list[Exception] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(on_signal)
                try:
                    await self._serve(received)
                except Exception as e:  # raised below as itself, not in the group's group
                    failed.append(e)
                finally:
                    tg.cancel_scope.cancel()
            if failed:
                raise failed[0]

    async def _serve(self, received: list[str]) -> None:
        try:
            await self.start()
        except StartAborted:
            if not received:
                raise
            log.info("%s: received %s while starting; stopped", self._owner.name, received[0])
            return
        run = self._run
        assert run is not None
        # Everything alive now (modules, handlers, connections) lives as long as the worker:
        # keep it out of the cyclic GC's passes, which otherwise rescan it for every burst of
        # message garbage (20-30% of throughput on the in-process bus).
        gc.freeze()
        await run.stopping.wait()  # a signal, or the supervisor ended on its own
        await self.stop()


@contextmanager
def stop_signals_abort_start() -> Iterator[None]:
    """While a worker process is still importing its app and setting up (before
    :meth:`Lifecycle.serve` takes SIGINT/SIGTERM over), make those signals raise
    :class:`StartAborted` instead of killing the process, so the caller exits cleanly."""

    def abort(signum: int, frame: object) -> None:
        raise StartAborted(f"received {signal.Signals(signum).name} while starting")

    previous = {s: signal.signal(s, abort) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class _Run:
    """The state of one run: from ``start()`` until the supervisor has closed everything."""

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        #: the supervisor's outer scope: cancelled to abandon the start-up (or, by a cancelled
        #: stop(), to cut running handlers off)
        self.scope = anyio.CancelScope()
        self.ready = anyio.Event()  # start-up over: serving, failed or aborted
        self.stopping = anyio.Event()  # stop requested, or the supervisor is ending
        self.done = anyio.Event()  # everything closed
        self.serving = False  # every consumer started
        self.error: BaseException | None = None


async def _cancel_and_wait(run: _Run) -> None:
    run.scope.cancel()
    with anyio.CancelScope(shield=True):
        await run.done.wait()


def _unwrap(error: Exception) -> Exception:
    """A task group's error is reported as its first cause: when one loop fails the others
    are cancelled, and loops on one broken transport (a consumer and the scheduler) often fail
    together with the same cause, so the first is the one reported."""
    while isinstance(error, ExceptionGroup) and error.exceptions:
        first = error.exceptions[0]
        if not isinstance(first, Exception):
            break
        error = first
    return error
