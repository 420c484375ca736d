"""The README's 30-second example, saved as ``shop.py``, runs as printed: as a script, and as a
worker under ``herald run shop:app`` fed by another process."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from .worker import HERALD, checkout_env, herald_run

README = Path(__file__).resolve().parents[1] / "README.md"


def save_quickstart(directory: Path) -> Path:
    text = README.read_text()
    code = text.split("## 30 seconds", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    script = directory / "shop.py"
    script.write_text(code)
    return script


def test_readme_quickstart_runs(tmp_path: Path) -> None:
    script = save_quickstart(tmp_path)
    env = checkout_env()
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "inventory: reserving stock for o-1" in done.stdout
    assert "billing: charging 42.0 for o-1" in done.stdout
    assert (tmp_path / "shop.db").exists()  # the embedded broker is the default


def test_readme_quickstart_under_herald_run(tmp_path: Path) -> None:
    """The worker, fed by the README's own ``herald publish`` command."""
    save_quickstart(tmp_path)
    text = README.read_text().split("## 30 seconds", 1)[1]
    feed = text.split("```bash", 1)[1].split("```", 1)[0].strip()
    assert feed.startswith("herald publish ")
    env = checkout_env()
    with herald_run("shop:app", tmp_path, tmp_path) as worker:
        worker.wait_started()
        done = subprocess.run(
            [str(HERALD), *shlex.split(feed)[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        worker.wait_for("inventory: reserving stock for o-2")
        worker.wait_for("billing: charging 5.0 for o-2")
        assert worker.stop() == 0, worker.stderr
    assert "o-1" not in worker.stdout  # importing the module published nothing
