"""What the ``herald`` commands share: the broker option and its rule, errors, running async
work, and the JSON form of a message.

The broker rule: every command that reads or writes your messages (``publish``, ``tail``,
``topics``, ``groups``, ``dlq ...``) takes ``--broker URL`` or, when it is not given, the
``HERALD_BROKER`` environment variable; with neither it stops with an error. There is no
default: an App's own default is a file named after the app (``sqlite:///<name>.db``), which
no command can guess, and a guessed default would silently write to, or create, a database
that nobody reads. ``demo`` and ``bench`` make their own throw-away data and keep their own
defaults.
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import anyio
import msgspec
import typer
from rich.console import Console

from herald.message import Message
from herald.transports import TransportError

__all__ = [
    "BROKER_ENV",
    "BrokerOpt",
    "JsonOpt",
    "err",
    "fail",
    "message_json",
    "name_values",
    "need_broker",
    "print_json",
    "run",
    "stdout_closed",
]

T = TypeVar("T")

#: The environment variable a command reads the broker URL from when ``--broker`` is not given.
BROKER_ENV = "HERALD_BROKER"

err = Console(stderr=True)

BrokerOpt = Annotated[
    str | None,
    typer.Option(
        "--broker",
        metavar="URL",
        envvar=BROKER_ENV,
        show_envvar=True,
        help=(
            "Broker URL, e.g. sqlite:///shop.db (the default broker of App('shop')) or "
            f"redis://localhost:6379/0. Required: this option or ${BROKER_ENV}; there is no "
            "default, so nothing is read from or written to a broker you did not name."
        ),
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr and return the exit to raise (2: bad input)."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def need_broker(url: str | None) -> str:
    """``url`` (from ``--broker`` or the environment), or the error that says how to give one."""
    if not url:
        raise fail(
            f"no broker given: pass --broker URL or set {BROKER_ENV} (an App's own default is "
            "sqlite:///<app name>.db)"
        )
    return url


def name_values(option: str, items: list[str] | None) -> dict[str, str]:
    """The ``NAME=VALUE`` items of a repeatable option as a dict (bad input exits 2)."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise fail(f"{option} takes NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def run(work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work`` on an event loop; bad input exits 2, a broker failure 1, one line each
    (also when it comes out of a task group, wrapped in an exception group)."""
    try:
        return anyio.run(work)
    except BaseException as e:
        cause = e
        while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
            cause = cause.exceptions[0]
        if isinstance(cause, ValueError | ImportError):
            raise fail(str(cause)) from e
        if isinstance(cause, TransportError):
            raise fail(str(cause), 1) from e
        raise


def message_json(m: Message) -> dict[str, Any]:
    """The JSON form of a message: the envelope, with ``payload`` as text when it is UTF-8 and
    ``payload_base64`` otherwise."""
    out: dict[str, Any] = {
        "id": m.id,
        "topic": m.topic,
        "key": m.key,
        "type": m.type,
        "headers": m.headers,
    }
    try:
        out["payload"] = m.payload.decode("utf-8")
    except UnicodeDecodeError:
        out["payload_base64"] = base64.b64encode(m.payload).decode("ascii")
    return out


def print_json(value: Any) -> None:
    """Write ``value`` as one line of JSON to stdout and flush it (a pipe sees it at once)."""
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
    sys.stdout.flush()


def stdout_closed() -> None:
    """The reader of stdout went away (``| head``): point stdout at /dev/null so the
    interpreter's last flush does not fail too."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
