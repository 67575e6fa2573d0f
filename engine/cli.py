"""Command-line entry point: ``rlhf-engine {env,bench}``. Training commands arrive with the trainer."""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path


def _env(_args: argparse.Namespace) -> int:
    import kernels

    print(json.dumps(kernels.backend_report(), indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / "bench" / "bench_kernels.py"
    if not script.exists():
        print(f"error: {script} not found (the benchmarks ship with the source checkout, not the wheel)")
        return 2
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the sub-command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="rlhf-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print the active kernel backends, versions and device").set_defaults(fn=_env)
    bench = sub.add_parser("bench", help="run bench/bench_kernels.py (arguments are passed through)")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(fn=_bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
