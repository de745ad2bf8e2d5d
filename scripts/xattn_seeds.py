#!/usr/bin/env python
"""Chapter 07's recipe on three seeds: accuracy per skill, and how often each yes/no answer is given.

    python scripts/xattn_seeds.py              # every row (seed 0: the shipped model; the others about 20 minutes each)
    python scripts/xattn_seeds.py --rows 1 2   # some rows only (merged into the results file)

Each row is `XAttnRecipe(seed=s)`: the new weights' first values and the order of the batches
(seed 0 is the shipped checkpoint, which `build_checkpoints.py xattn` trains with this very
recipe). A trained row is rounded to float16, as the shipped file is stored. Each row answers
1,000 *test* and 1,000 *compositional* questions per skill (every compositional scene holds a
colour-shape pair no training scene has), and records, for the two yes/no skills, how often
the model says "yes" (the truth is "yes" about half the time). The results go to
data/results/xattn_seeds.json, which chapter 07 prints and checks on every seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)

from mllm_scratch.shapeworld import HELD_OUT, SKILLS, VQADataset, asked_pair  # noqa: E402
from mllm_scratch.xattn import XAttnRecipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "xattn_seeds.json"
SEEDS = (0, 1, 2)
PER_SKILL = 1000
YES_NO = ("spatial", "existence")


def answers(model, tokenizer, split: str, config=None) -> dict:
    """{"accuracy": per skill and "all", "yes_ratio": per yes/no skill, "truth_yes": the same for the truth}.

    `config` (a ShapeWorldConfig; default the book's 32 px scenes) draws the questions' scenes."""
    from mllm_scratch.shapeworld import final_answer
    from mllm_scratch.vlm import ANSWER_TOKENS, stack_dataset

    data = VQADataset(split, PER_SKILL * len(SKILLS), config)  # skills take turns: PER_SKILL of each
    images, rest = stack_dataset(data)
    guesses = [final_answer(g) for g in model.generate(tokenizer, images, [r[0] for r in rest],
                                                       max_new_tokens=ANSWER_TOKENS)]  # a grounded reply's yes/no
    right: dict[str, list[bool]] = {}
    said: dict[str, list[bool]] = {}
    truth: dict[str, list[bool]] = {}
    for (question, answer, skill), guess in zip(rest, guesses):
        right.setdefault(skill, []).append(guess == answer)
        if skill in YES_NO:
            said.setdefault(skill, []).append(guess == "yes")
            truth.setdefault(skill, []).append(answer == "yes")
    accuracy = {k: round(sum(v) / len(v), 4) for k, v in right.items()}
    accuracy["all"] = round(sum(sum(v) for v in right.values()) / len(guesses), 4)
    held = {}  # colour and shape questions about a held-out pair's object (the compositional split's)
    by_pair: dict[str, dict[str, list[bool]]] = {}  # the same questions by the pair asked about ("seen": any other)
    for (question, answer, skill), guess in zip(rest, guesses):
        if skill in ("colour", "shape"):
            pair = asked_pair(question, answer)
            if pair in HELD_OUT:
                held.setdefault(skill, []).append(guess == answer)
            name = " ".join(pair) if pair in HELD_OUT else "seen"
            by_pair.setdefault(skill, {}).setdefault(name, []).append(guess == answer)
    return {"accuracy": accuracy,
            "yes_ratio": {k: round(sum(v) / len(v), 4) for k, v in said.items()},
            "truth_yes": {k: round(sum(v) / len(v), 4) for k, v in truth.items()},
            "held_out": {k: round(sum(v) / len(v), 4) for k, v in held.items()},
            "held_out_questions": {k: len(v) for k, v in held.items()},
            "by_pair": {k: {p: round(sum(v) / len(v), 4) for p, v in sorted(d.items())} for k, d in by_pair.items()},
            "by_pair_questions": {k: {p: len(v) for p, v in sorted(d.items())} for k, d in by_pair.items()}}


def run(i: int) -> dict:
    seed = SEEDS[i]

    def compute() -> dict:
        import torch

        from mllm_scratch.checkpoints import round_to_dtype
        from mllm_scratch.tokenizer import load_tokenizer
        from mllm_scratch.xattn import _trained_parts, fit_xattn, load_xattn

        tokenizer = load_tokenizer()
        if seed == 0:
            model = load_xattn()
        else:
            model, _ = fit_xattn(XAttnRecipe(seed=seed), tokenizer, log_every=500, progress=False, device="cpu")
            round_to_dtype(_trained_parts(model), torch.float16)  # as the shipped file holds it
        return {split: answers(model, tokenizer, split) for split in ("test", "compositional")}

    return search_rows.timed_row(i, {"seed": seed}, compute)


def table(rows: list[dict]) -> str:
    lines = [f"seed  split          {' '.join(f'{s:>9s}' for s in SKILLS)}  yes-ratio (spatial, existence)"
             "  held-out pairs (colour, shape)"]
    for r in sorted(rows, key=lambda r: r["row"]):
        for split in ("test", "compositional"):
            acc, yes, held = r[split]["accuracy"], r[split]["yes_ratio"], r[split].get("held_out", {})
            lines.append(f"{r['seed']:4d}  {split:13s} {' '.join(f'{acc[s]:9.3f}' for s in SKILLS)}  "
                         f"{yes['spatial']:.2f}, {yes['existence']:.2f}"
                         + (f"                    {held['colour']:.3f}, {held['shape']:.3f}" if held else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"seed {s}" + (" (the shipped model)" if s == 0 else "") for s in SEEDS], run, RESULTS,
        header=lambda: {"what": "chapter 07's recipe on three seeds (scripts/xattn_seeds.py)",
                        "recipe": XAttnRecipe().to_dict(), "questions_per_skill": PER_SKILL},
        table=table,
        summary=lambda r: " test " + ", ".join(f"{k} {v:.2f}" for k, v in r["test"]["accuracy"].items()),
    )


if __name__ == "__main__":
    sys.exit(main())
