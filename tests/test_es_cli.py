"""``herald projections status`` and ``herald projections rebuild`` on the bank example."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def herald(*args: str, data: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BANK_DATA": str(data), "COLUMNS": "200"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return subprocess.run(
        [str(Path(sys.executable).parent / "herald"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_status_and_rebuild(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    day = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "bank_account.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert day.returncode == 0, day.stderr
    status = herald("projections", "status", "--app", "examples.bank_account:app", data=tmp_path)
    assert status.returncode == 0, status.stderr
    rows = [
        line for line in status.stdout.splitlines() if "balances" in line or "statement" in line
    ]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("│ ").split("│")]
        assert cells[1:] == ["6", "6", "0"]  # position, head, lag
    rebuilt = herald(
        "projections", "rebuild", "balances", "--app", "examples.bank_account:app", data=tmp_path
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "rebuilt balances: 6 events replayed" in rebuilt.stdout
    unknown = herald(
        "projections", "rebuild", "nope", "--app", "examples.bank_account:app", data=tmp_path
    )
    assert unknown.returncode == 2
    assert "no projection 'nope'" in unknown.stderr and "balances, statement" in unknown.stderr
