"""The command line both search scripts share: pick rows, run them, merge them into a results file.

    main(argv, doc, names, run, default_out, header, table)
    timed_row(index, labels, compute)   # one row, set up and timed the same way in every script

Rows already in the results file are kept, so `--rows 2 3` re-runs two rows and leaves the
others; a file whose header (what it measures, the recipe) differs from the script's is refused
rather than merged. The file is rewritten after every row through `checkpoints.atomic_write`, so an
interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the package, from a checkout

from mllm_scratch.checkpoints import atomic_write  # noqa: E402
from mllm_scratch.runtime import setup_notebook, versions  # noqa: E402


def timed_row(index: int, labels: dict, compute: Callable[[], dict]) -> dict:
    """One results row: set up as a notebook runs (seed 0, one thread, deterministic, CPU), run
    `compute()`, and return {"row": index, **labels, **its result, "seconds": its wall time}."""
    setup_notebook(seed=0, threads=1, deterministic=True, device="cpu")
    start = time.perf_counter()
    result = compute()
    return {"row": index, **labels, **result, "seconds": round(time.perf_counter() - start, 1)}


def main(
    argv: list[str] | None,
    doc: str,
    names: Sequence[str],
    run: Callable[[int], dict],
    default_out: Path,
    header: Callable[[], dict],
    table: Callable[[list[dict]], str],
    summary: Callable[[dict], str] = lambda r: "",
) -> int:
    """Run the chosen rows (`run(i)` returns row i's result with its "seconds"), saving `header()` + the rows after each."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", help=f"row indexes, 0..{len(names) - 1} (default: all)")
    parser.add_argument("--out", type=Path, default=default_out, help="results file (rows already there are kept)")
    args = parser.parse_args(argv)
    rows = list(range(len(names))) if not args.rows else args.rows
    bad = [r for r in rows if not 0 <= r < len(names)]
    if bad:
        parser.error(f"no row {bad}: expected indexes 0..{len(names) - 1}")
    saved = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    changed = sorted(k for k, v in header().items() if saved["rows"] and saved.get(k) != v)
    if changed:  # rows of another recipe must never be merged with, and labelled as, this one's
        parser.error(f"{args.out} holds rows made with another {', '.join(changed)}: run every row into a new "
                     f"file (--out), or delete it first")
    results = {r["row"]: r for r in saved["rows"]}
    for i in rows:
        results[i] = run(i)
        print(f"row {i} ({names[i]}){summary(results[i])} in {results[i]['seconds']:.0f} s", flush=True)
        out = {**header(), "torch": versions()["torch"], "rows": [results[k] for k in sorted(results)]}
        text = (json.dumps(out, indent=1) + "\n").encode()
        atomic_write(args.out, lambda f, text=text: f.write(text))
    print(table(list(results.values())))
    return 0


def seeds_main(argv: list[str] | None, doc: str, seeds: Sequence[int], run: Callable[[int], dict], default_out: Path,
               what: str, recipe: dict, table: Callable[[list[dict]], str], shipped: bool = False) -> int:
    """`main` for a recipe trained on `seeds` and scored on 1,000 questions per skill (row 0 the shipped model if
    `shipped`): the header names the recipe, and each row's summary is its test accuracy per skill."""
    return main(
        argv, doc, [f"seed {s}" + (" (the shipped model)" if shipped and s == 0 else "") for s in seeds], run,
        default_out, header=lambda: {"what": what, "recipe": recipe, "questions_per_skill": 1000}, table=table,
        summary=lambda r: " test " + ", ".join(f"{k} {v:.2f}" for k, v in r["test"]["accuracy"].items()),
    )
