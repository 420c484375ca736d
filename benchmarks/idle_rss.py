"""Idle worker memory: RSS of a `herald run` worker with three groups on SQLite, doing nothing.

Target: under 60 MB. Run: `python benchmarks/idle_rss.py` (prints the figure; exits 0).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SERVICE = textwrap.dedent(
    """
    import pydantic
    from herald import App, Context

    class OrderPlaced(pydantic.BaseModel):
        order_id: str

    app = App("idle", broker="sqlite:///{db}")

    @app.subscriber("orders", group="inventory")
    async def reserve(e: OrderPlaced, ctx: Context) -> None: ...

    @app.subscriber("orders", group="billing")
    async def charge(e: OrderPlaced) -> None: ...

    @app.subscriber("payments", group="shipping")
    async def ship(e: dict) -> None: ...
    """
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "idle_service.py").write_text(SERVICE.format(db=Path(tmp, "idle.db")))
        herald = Path(sys.executable).with_name("herald")
        proc = subprocess.Popen([str(herald), "run", "idle_service:app"], cwd=tmp)
        try:
            time.sleep(4)  # start-up, subscriptions, a few idle polls
            if proc.poll() is not None:
                print(f"worker exited early with {proc.returncode}")
                return 1
            samples = []
            for _ in range(5):
                samples.append(rss_mb(proc.pid))
                time.sleep(0.5)
            print(f"idle worker RSS: {max(samples):.1f} MB (3 groups, sqlite, target < 60 MB)")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
