"""``python -m herald.demo [--broker URL] [--orders N] [--seed N]``"""

from __future__ import annotations

import argparse
import sys

from herald.demo.run import run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m herald.demo", description="Herald's international order flow demo."
    )
    parser.add_argument("--broker", help="broker URL (default: a temporary SQLite file)")
    parser.add_argument("--orders", type=int, default=100, help="orders to place (default 100)")
    parser.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    args = parser.parse_args(argv)
    return run_demo(args.broker, orders=args.orders, seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
