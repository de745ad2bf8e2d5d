#!/usr/bin/env python
"""The whole test suite's wall time, notebooks included, against the book's budget.

    python benchmarks/suite_time.py              # runs `python book.py test --no-setup` once
    python benchmarks/suite_time.py --workers 2  # as CI runs it on a 2-core machine
    python benchmarks/suite_time.py --quick      # the unit tests only (seconds, not minutes)

Runs the README's test command exactly (pytest -n <workers> --dist loadfile, one thread per
worker, CPU only), asks pytest for every item's duration, and prints: the wall time as a
fraction of the 20-minute budget (and of the 10-minute aim), each notebook's time, and the
unit tests' total. A notebook is one pytest file, so it runs on one worker from start to end:
the slowest notebook is a floor under the wall time however many cores there are.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S, AIM_S = 20 * 60, 10 * 60
DURATION = re.compile(r"^\s*([\d.]+)s (call|setup|teardown)\s+(\S+?)::")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, help="parallel test workers (default: one per CPU core)")
    parser.add_argument("--quick", action="store_true", help="time the unit tests (tests/) only, not the notebooks")
    args = parser.parse_args()

    cmd = [sys.executable, "book.py", "test", "--no-setup"]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    cmd += ["--", "--durations=0", "--durations-min=0", "-q", "-p", "no:cacheprovider"]
    if args.quick:
        cmd.append("tests")
    print("running:", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start

    per_file: dict[str, float] = defaultdict(float)
    for line in run.stdout.splitlines():
        match = DURATION.match(line)
        if match:
            per_file[match.group(3)] += float(match.group(1))
    summary = [line for line in run.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    print(summary[-1] if summary else run.stdout[-2000:])
    notebooks = {f: s for f, s in per_file.items() if f.endswith(".ipynb")}
    units = sum(s for f, s in per_file.items() if not f.endswith(".ipynb"))
    print(f"\nwall time {wall / 60:.1f} min = {wall / BUDGET_S:.2f} of the 20-min budget, {wall / AIM_S:.2f} of the 10-min aim")
    print(f"\n{'file':45s} {'seconds':>8s}")
    for name, seconds in sorted(notebooks.items()):
        print(f"{name:45s} {seconds:8.1f}")
    print(f"{'unit tests (' + str(len(per_file) - len(notebooks)) + ' files)':45s} {units:8.1f}")
    total = units + sum(notebooks.values())
    print(f"{'sum over files (CPU-seconds of test work)':45s} {total:8.1f}")
    print(f"parallel speed-up: sum / wall = {total / wall:.2f}")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
