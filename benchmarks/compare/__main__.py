"""Run the Herald / raw client / FastStream comparison in one go.

    python -m benchmarks.compare [redis rabbitmq kafka nats] [--n 100000] [--rate 2000]
                                 [--seconds 5] [--skip-faststream]

For each transport: end-to-end throughput with ack for N ~100-byte JSON messages, and p50/p99
latency at a fixed publish rate. Prints one table and Herald's ratios against the raw client.
A transport whose module or server is missing is reported, not silently dropped.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
from collections.abc import Awaitable, Callable
from types import ModuleType

import anyio

from benchmarks.compare import common

TRANSPORTS = ("redis", "rabbitmq", "kafka", "nats")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(fn: Callable[..., Awaitable[object]], *args: object) -> object:
    return anyio.run(fn, *args)


def measure(mod: ModuleType, args: argparse.Namespace) -> dict[str, tuple[float, float, float]]:
    url = mod.DEFAULT_URL
    sides: dict[str, tuple[Callable[..., Awaitable[float]], Callable[..., Awaitable[list[float]]]]]
    sides = {
        "raw": (mod.raw_throughput, mod.raw_latency),
        "herald": (common.herald_throughput, common.herald_latency),
    }
    if not args.skip_faststream:
        sides["faststream"] = (mod.faststream_throughput, mod.faststream_latency)
    out: dict[str, tuple[float, float, float]] = {}
    for side, (throughput, latency) in sides.items():
        rate = statistics.median(
            float(run(throughput, url, args.n))
            for _ in range(args.repeat)  # type: ignore[arg-type]
        )
        lat = run(latency, url, args.rate, args.seconds)
        assert isinstance(lat, list)
        out[side] = (rate, percentile(lat, 0.5) * 1000, percentile(lat, 0.99) * 1000)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("transports", nargs="*", default=list(TRANSPORTS))
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--rate", type=float, default=2000)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--repeat", type=int, default=3, help="throughput runs per side (median)")
    p.add_argument("--skip-faststream", action="store_true")
    args = p.parse_args()
    print(
        f"N={args.n:,} ~100-byte JSON messages end to end with ack (median of {args.repeat}); "
        f"latency at {args.rate:,.0f} msgs/s for {args.seconds:g}s"
    )
    print(f"{'transport':10} {'side':11} {'msgs/s':>10} {'vs raw':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for name in args.transports:
        try:
            mod = importlib.import_module(f"benchmarks.compare.{name}")
            results = measure(mod, args)
        except Exception as e:  # report and go on: one broken engine must not hide the rest
            print(f"{name:10} not measured: {type(e).__name__}: {e}")
            continue
        raw = results["raw"][0]
        for side, (rate, p50, p99) in results.items():
            print(f"{name:10} {side:11} {rate:>10,.0f} {rate / raw:>6.2f}x {p50:>8.2f} {p99:>8.2f}")
        p99_ratio = results["herald"][2] / results["raw"][2]
        print(f"{name:10} herald p99 / raw p99 = {p99_ratio:.2f}")


if __name__ == "__main__":
    main()
