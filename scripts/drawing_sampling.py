#!/usr/bin/env python
"""How chapter 13 samples its drawings: classifier-free guidance and temperature, chosen on val captions.

    python scripts/drawing_sampling.py             # both rows (about 2.5 minutes each on one CPU thread)
    python scripts/drawing_sampling.py --rows 1    # janus only (merged into the results file)

Each row takes one shipped drawing model (`imagegen.pretrained_drawing_model`) and draws the
captions of 1,000 *val* scenes (never test) once at every guidance s in GUIDANCE and every
temperature in TEMPERATURES, seeded, and the judge scores each drawing. `imagegen.EVAL`, the
setting the chapter, `drawing_seeds.py` and the `draw` command use, is the one with the
highest colour-and-shape accuracy averaged over the two models; chapter 13 checks that it is.
The results go to data/results/drawing_sampling.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)

from mllm_scratch.imagegen import METHODS, drawing_accuracy, held_out_captions, pretrained_drawing_model  # noqa: E402
from mllm_scratch.judge import pretrained_judge  # noqa: E402
from mllm_scratch.vq import pretrained_vqvae  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "drawing_sampling.json"
GUIDANCE = (1.0, 1.5, 2.0, 3.0)
TEMPERATURES = (0.3, 0.5, 0.7, 1.0)
VAL_SIZE = 1000


def run(i: int) -> dict:
    method = METHODS[i]

    def compute() -> dict:
        vqvae, judge, model = pretrained_vqvae(), pretrained_judge(), pretrained_drawing_model(method)
        captions, specs, _, _ = held_out_captions("val", VAL_SIZE)
        grid = []
        for guidance in GUIDANCE:
            for temperature in TEMPERATURES:
                acc, _ = drawing_accuracy(model, vqvae, judge, captions, specs, guidance=guidance,
                                          temperature=temperature, seed=0)
                grid.append({"guidance": guidance, "temperature": temperature,
                             "colour_shape": round(acc["colour_shape"], 4), "all": round(acc["all"], 4)})
        return {"grid": grid}

    return search_rows.timed_row(i, {"method": method}, compute)


def table(rows: list[dict]) -> str:
    lines = ["colour and shape right on val captions, by guidance (rows) and temperature (columns)"]
    for r in sorted(rows, key=lambda r: r["row"]):
        lines.append(f"{r['method']:6s} " + "".join(f"{'t ' + str(t):>8s}" for t in TEMPERATURES))
        for g in GUIDANCE:
            cells = {c["temperature"]: c["colour_shape"] for c in r["grid"] if c["guidance"] == g}
            lines.append(f"  s {g:<4} " + "".join(f"{cells[t]:8.3f}" for t in TEMPERATURES))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, list(METHODS), run, RESULTS,
        header=lambda: {"what": "chapter 13's sampling settings on val captions (scripts/drawing_sampling.py)",
                        "val_size": VAL_SIZE, "guidance": GUIDANCE, "temperatures": TEMPERATURES},
        table=table,
    )


if __name__ == "__main__":
    sys.exit(main())
