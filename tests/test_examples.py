"""Every example is a program that runs and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    env.pop("HERALD_BROKER", None)
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize("broker", ["memory", "sqlite"])
def test_user_registration_fans_out(broker: str, tmp_path: Path) -> None:
    args = [f"sqlite:///{tmp_path / 'users.db'}"] if broker == "sqlite" else []
    proc = run_example("user_registration.py", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for user in ("ada@example.com", "grace@example.com", "luiza@example.com.br"):
        assert f"welcome e-mail to {user}" in out
    assert out.count("[audit]") == 3
    assert "WELCOME-U3: 20% off for u3" in out
    assert "coupon WELCOME-U1 sent to ada@example.com" in out
    assert "3 users registered" in out


def test_user_registration_reads_the_broker_from_the_environment(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "HERALD_BROKER": url}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "user_registration.py")],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"3 users registered on {url}" in proc.stdout
    assert (tmp_path / "env.db").exists()


def test_iot_alerts_pages_only_critical_alerts() -> None:
    proc = run_example("iot_alerts.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    alerts = [line for line in lines if line.startswith("ALERT")]
    pages = [line for line in lines if line.startswith("PAGE")]
    assert alerts and pages
    assert len(pages) == sum("[critical]" in line for line in alerts)
    assert "120 readings checked" in lines[-1]
    assert f"{len(pages)} paged" in lines[-1]


def test_bank_account_event_sourcing(tmp_path: Path) -> None:
    proc = run_example("bank_account.py", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "deposit 100 -> balance 100" in out
    assert "withdraw 500 -> rejected: insufficient funds: balance 120, asked 500" in out
    assert "conflict: stream 'acc-" in out and "expected 4" in out
    assert "resolved: clerk B's withdrawal applied on version 5, balance 105" in out
    assert "read model: balance 105" in out
    assert out.count("+100") == 1 and "-20" in out  # the statement, each movement once
    assert "as of yesterday: balance 100 (version 2)" in out
    assert "today: balance 105 (version 6)" in out
    assert (tmp_path / "bank.db").exists() and (tmp_path / "bank_read.db").exists()


def test_bank_account_runs_under_herald_run(tmp_path: Path) -> None:
    import signal
    import time

    herald = Path(sys.executable).parent / "herald"
    env = {**os.environ, "BANK_DATA": str(tmp_path), "PYTHONIOENCODING": "utf-8"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(EXAMPLES.parent / "src"), str(EXAMPLES.parent), env.get("PYTHONPATH", "")]
    )
    worker = subprocess.Popen(
        [str(herald), "run", "examples.bank_account:app"],
        cwd=EXAMPLES.parent,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "bank_read.db").exists():  # projections open at start
            assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.1)
        time.sleep(0.5)
        # the scripted day, with this worker competing for the commands
        proc = run_example("bank_account.py", str(tmp_path))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "read model: balance 105" in proc.stdout
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "bank started" in err
