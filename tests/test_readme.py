"""The README's 30-second example runs as printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(tmp_path: Path) -> None:
    text = README.read_text()
    code = text.split("## 30 seconds", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "inventory: reserving stock for o-1" in done.stdout
    assert "billing: charging 42.0 for o-1" in done.stdout
    assert (tmp_path / "shop.db").exists()  # the embedded broker is the default
