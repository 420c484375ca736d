"""A ``herald run MODULE:APP`` worker in a subprocess, for tests that use the CLI as a user does.

Its stdout and stderr go to files (read while it runs, so a test can wait for a line); Python
output is unbuffered so handler prints show up at once. Every wait is bounded. The worker
imports this checkout's ``src/`` whatever its working directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

HERALD = Path(sys.executable).with_name("herald")
#: this checkout's package, first on the path whatever the worker's working directory
SRC = Path(__file__).resolve().parents[1] / "src"
#: what ``herald run`` logs once every consumer of the app has started
STARTED = "started on"


def checkout_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``extra``, with this checkout's ``src/`` first on the
    path of a Python subprocess."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    return env


class Worker:
    """A running ``herald run`` process."""

    def __init__(self, proc: subprocess.Popen[bytes], out: Path, err: Path) -> None:
        self.proc = proc
        self._out = out
        self._err = err

    @property
    def stdout(self) -> str:
        return self._out.read_text(encoding="utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self._err.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, text: str, *, stream: str = "stdout", timeout: float = 30.0) -> None:
        """Wait until ``text`` appears in ``stream``; fail with both streams if it does not,
        or if the worker exits first."""
        deadline = time.monotonic() + timeout
        while text not in (self.stdout if stream == "stdout" else self.stderr):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{text!r} not in the worker's {stream} (exit code {self.proc.poll()})\n"
                    f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
                )
            time.sleep(0.05)

    def wait_started(self, timeout: float = 30.0) -> None:
        self.wait_for(STARTED, stream="stderr", timeout=timeout)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig`` and return the exit code (fail if it takes over ``timeout`` s)."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the worker did not exit within {timeout:g}s of {sig.name}\n"
                f"--- stderr\n{self.stderr}"
            ) from None


@contextmanager
def herald_run(
    target: str, cwd: Path, logs: Path, env: Mapping[str, str] | None = None
) -> Iterator[Worker]:
    """Start ``herald run target`` in ``cwd`` (output files in ``logs``); kill it on exit if
    the test left it running."""
    out, err = logs / "worker.out", logs / "worker.err"
    full_env = checkout_env({"PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8", **(env or {})})
    with out.open("wb") as out_file, err.open("wb") as err_file:
        proc = subprocess.Popen(
            [str(HERALD), "run", target],
            cwd=cwd,
            env=full_env,
            stdout=out_file,
            stderr=err_file,
        )
    try:
        yield Worker(proc, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
