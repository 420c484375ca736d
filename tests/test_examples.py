"""Every example runs both ways: as a script (it runs to completion and exits 0) and as a worker
under ``herald run examples.NAME:app`` (it starts, handles what another process publishes,
and exits 0 on SIGTERM)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .worker import HERALD, checkout_env, herald_run

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(
    name: str, *args: str, broker: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = checkout_env({"PYTHONIOENCODING": "utf-8"})
    env.pop("HERALD_BROKER", None)
    if broker is not None:
        env["HERALD_BROKER"] = broker
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=60,
    )


def herald_publish(url: str, type_: str, topic: str, payload: str, *key: str) -> None:
    """Feed a worker the way the example's docstring says: ``herald publish``."""
    env = checkout_env()
    args = ["publish", "--broker", url, "--type", type_, *(("--key", *key) if key else ()), topic]
    done = subprocess.run(
        [str(HERALD), *args, payload], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


# --- as scripts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["memory", "sqlite"])
def test_user_registration_fans_out(broker: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'users.db'}" if broker == "sqlite" else None
    proc = run_example("user_registration.py", broker=url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for user in ("ada@example.com", "grace@example.com", "luiza@example.com.br"):
        assert f"welcome e-mail to {user}" in out
    assert out.count("[audit]") == 3
    assert "WELCOME-U3: 20% off for u3" in out
    assert "coupon WELCOME-U1 sent to ada@example.com" in out
    assert f"3 users registered on {url or 'memory://'}" in out
    if url is not None:
        assert (tmp_path / "users.db").exists()


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


# --- under herald run ---------------------------------------------------------------------------


def test_user_registration_as_a_worker(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'users.db'}"
    with herald_run(
        "examples.user_registration:app", ROOT, tmp_path, {"HERALD_BROKER": url}
    ) as worker:
        worker.wait_started()
        user = '{"user_id": "u9", "name": "Ana", "email": "ana@example.com", "country": "PT"}'
        herald_publish(url, "UserRegistered", "users", user)
        worker.wait_for("coupon WELCOME-U9 sent to ana@example.com")
        assert worker.stop() == 0, worker.stderr
    out = worker.stdout
    assert "[emails]  welcome e-mail to ana@example.com" in out
    assert "[audit]   u9 registered from PT" in out
    assert "received SIGTERM" in worker.stderr


def test_iot_alerts_as_a_worker(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'iot.db'}"
    with herald_run("examples.iot_alerts:app", ROOT, tmp_path, {"HERALD_BROKER": url}) as worker:
        worker.wait_started()
        reading = '{"sensor_id": "srv-9", "zone": "server-room", "celsius": 41.5}'
        herald_publish(url, "Reading", "readings", reading, "srv-9")
        worker.wait_for("PAGE  on-call engineer: server-room/srv-9 is at 41.5 °C")
        assert worker.stop() == 0, worker.stderr
    assert "ALERT [critical] server-room/srv-9: 41.5 °C" in worker.stdout
