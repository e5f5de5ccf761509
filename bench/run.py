"""`make bench`: run every benchmark module in bench/ and print their tables.

A benchmark module is a `bench/*_bench.py` file with a `main(argv) -> int` that takes
`--quick`, `--keep` and `--repeat N`, prints its own tables (ours next to the baselines it names,
measured in the same run) and writes JSON to bench/out/. They are found by that name pattern:
`api_bench.py`, `clone_bench.py` (bench/clone.py: host-assisted and snapshot clones against
`cp --sparse=always` and `qemu-img convert`), `controller_bench.py`, `import_bench.py`
(`cdi-importer` against nbdkit-curl + qemu-img and against local conversion) and
`upload_bench.py` (bench/upload.py).

Usage: `.venv/bin/python bench/run.py [--quick] [--keep] [--repeat N] [--only MODULE,...]`.
Exit status 0 unless a benchmark errored: a missed target is reported, it does not fail the run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def discover() -> list[str]:
    """Module names of the benchmarks, in a stable order."""
    return sorted(path.stem for path in BENCH_DIR.glob("*_bench.py"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images, for a smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement [2]")
    parser.add_argument("--only", default="", help="comma-separated module names (e.g. import)")
    args = parser.parse_args(argv)
    names = discover()
    if args.only:
        wanted = {n.strip().removesuffix("_bench") for n in args.only.split(",") if n.strip()}
        names = [n for n in names if n.removesuffix("_bench") in wanted]
    if not names:
        print("no benchmark modules selected", file=sys.stderr)
        return 2
    forward = [f"--repeat={args.repeat}"]
    if args.quick:
        forward.append("--quick")
    if args.keep:
        forward.append("--keep")
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    status = 0
    for name in names:
        print(f"=== {name} {' '.join(forward)}", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(name)
        try:
            rc = int(module.main(forward))
        except Exception as err:  # one broken benchmark must not hide the others' tables
            print(f"{name}: {type(err).__name__}: {err}", file=sys.stderr)
            rc = 1
        print(f"=== {name}: exit {rc} after {time.perf_counter() - start:.0f} s\n", flush=True)
        status = max(status, rc)
    return status


if __name__ == "__main__":
    sys.exit(main())
