#!/usr/bin/env python
"""Does chapter 09's motion result hold on other seeds? The runs the chapter prints and checks.

    python scripts/seed_check.py             # every row (about 35 minutes on one CPU thread)
    python scripts/seed_check.py --rows 0 1  # some rows only (merged into the results file)

A training outcome that holds for one seed may be luck: another seed, or another CPU (whose
rounding sends the same seed down another path), can flip it. Each row here trains on one
thread with deterministic kernels, for one seed:

- **probe rows** (seeds 0, 1, 2 x the four resamplers of chapter 09's section 7): a fresh
  resampler plus a linear readout trained on direction labels from the first two sampled
  frames (`video.direction_probe`), scored on 400 test clips every 100 steps up to 1,600;
- **recipe rows** (seeds 0, 1, 2): the video model and its single-frame baseline trained
  with `video_recipes()`, that seed (both stages), and scored on 2,000 test clips (500 per
  skill), as chapter 09 scores the shipped models.

The results go to data/results/seed_check.json (with the PyTorch version), which chapter 09
prints; its assertions are checked on every seed in the file.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import search_rows  # noqa: E402  (scripts/, next to this file)

from mllm_scratch.video import PROBE_VARIANTS  # noqa: E402

RESULTS = ROOT / "data" / "results" / "seed_check.json"
SEEDS = (0, 1, 2)
PROBE_STEPS, PROBE_EVERY, PROBE_LR = 1600, 100, 1e-3
TEST_CLIPS = 2000
VARIANTS = tuple(PROBE_VARIANTS)  # the chapter's four resamplers, in its order
ROWS: list[tuple[str, str, int]] = [("probe", v, s) for s in SEEDS for v in VARIANTS] + \
    [("recipe", "video and single_frame", s) for s in SEEDS]
_features: dict = {}


def probe_row(variant: str, seed: int) -> dict:
    from mllm_scratch.clip import pretrained_image_tower
    from mllm_scratch.video import direction_features, direction_probe

    if not _features:
        tower = pretrained_image_tower()
        _features["train"], _features["test"] = direction_features(tower, "train", 1500), direction_features(tower, "test", 400)
    spatial_pos, motion = PROBE_VARIANTS[variant]
    curve = direction_probe(_features["train"], _features["test"], spatial_pos=spatial_pos, motion=motion,
                            steps=PROBE_STEPS, lr=PROBE_LR, seed=seed, eval_every=PROBE_EVERY)
    return {"test_direction": {str(k): round(v, 4) for k, v in curve.items()}, "lr": PROBE_LR}


def recipe_row(seed: int) -> dict:
    from mllm_scratch.clip import pretrained_image_tower
    from mllm_scratch.gpt import pretrained_gpt
    from mllm_scratch.tokenizer import load_tokenizer
    from mllm_scratch.video import build_video_model, train_video_model, video_accuracy, video_data, video_recipes

    tokenizer, tower, lm = load_tokenizer(), pretrained_image_tower(), pretrained_gpt()
    out = {}
    for name in ("video", "single_frame"):
        recipe = replace(video_recipes()[name], seed=seed)
        model = build_video_model(recipe, tokenizer, tower=tower, lm=lm)
        train_video_model(model, recipe, tokenizer, log_every=0, progress=False, device="cpu", cache_features=True)
        out[name] = {k: round(v, 4) for k, v in video_accuracy(model, tokenizer, video_data("test", TEST_CLIPS, recipe)).items()}
    return {"test": out, "test_clips": TEST_CLIPS}


def run(index: int) -> dict:
    kind, name, seed = ROWS[index]
    compute = (lambda: probe_row(name, seed)) if kind == "probe" else (lambda: recipe_row(seed))
    return search_rows.timed_row(index, {"kind": kind, "name": name, "seed": seed}, compute)


def summary(row: dict) -> str:
    if row["kind"] == "probe":
        curve = row["test_direction"]
        return f": direction {curve['800']:.2f} at 800 steps, {curve[str(PROBE_STEPS)]:.2f} at {PROBE_STEPS}"
    return ": " + "; ".join(f"{k} all {v['all']:.2f}" for k, v in row["test"].items())


def table(rows: list[dict]) -> str:
    lines = [f"{'probe':26s} {'seed':>4}  test direction at 400 / 800 / 1200 / 1600 steps"]
    for r in sorted((r for r in rows if r["kind"] == "probe"), key=lambda r: (VARIANTS.index(r["name"]), r["seed"])):
        c = r["test_direction"]
        lines.append(f"{r['name']:26s} {r['seed']:4d}  " + " / ".join(f"{c[str(s)]:.2f}" for s in (400, 800, 1200, 1600)))
    for r in sorted((r for r in rows if r["kind"] == "recipe"), key=lambda r: r["seed"]):
        for name, acc in r["test"].items():
            lines.append(f"{name:26s} {r['seed']:4d}  " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    return "\n".join(lines)


def header() -> dict:
    return {"what": "chapter 09's asserted training outcomes, one row per seed (scripts/seed_check.py)",
            "probe": {"steps": PROBE_STEPS, "eval_every": PROBE_EVERY, "lr": PROBE_LR, "train_clips": 1500,
                      "test_clips": 400}}


if __name__ == "__main__":
    sys.exit(search_rows.main(None, __doc__, [f"{k} {n} seed {s}" for k, n, s in ROWS], run, RESULTS, header, table,
                              summary))
