#!/usr/bin/env python
"""Do chapter 04's readings of its GPT hold on other seeds? Where the loss sits, and what the samples look like.

    python scripts/ch04_seeds.py             # seeds 0, 1 and 2 (a few minutes on one CPU thread)
    python scripts/ch04_seeds.py --rows 1    # one seed only (merged into the results file)

Chapter 04 pretrains its GPT once (seed 0) and reads it: the loss on each kind of token
(scene words, copied words, grammar) and on each new object's size, colour and shape and
each relation, and the share of grammatical and coherent samples at five sampling settings.
Each row here pretrains the GPT with `PretrainRecipe(seed=s)` (its first weights and the
order of the batches), on one thread with deterministic kernels, and records the same
numbers, measured the way the chapter measures them:

- the per-token loss over the whole val stream, in the windows `evaluate_lm` uses, labelled
  by `token_kinds` (the chapter's rule: scene words, the three words of a repeated object
  after "the", and grammar);
- 40 samples per setting from `generate` with a generator seeded 1, checked by `check`
  (the chapter's small ShapeWorld grammar), and their sentences that start with "the":
  how many, and how many of them name the previous sentence's last object.

The results go to data/results/ch04_seeds.json (with the PyTorch version); the chapter
prints the rows and checks its assertions on every seed.
"""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import search_rows  # noqa: E402  (scripts/, next to this file)

from mllm_scratch.shapeworld import COLOURS, NUMBER_WORDS, SHAPES, SIZES  # noqa: E402

RESULTS = ROOT / "data" / "results" / "ch04_seeds.json"
SEEDS = (0, 1, 2)
SETTINGS = ((0.0, None), (0.7, None), (1.0, None), (2.0, None), (2.0, 5))  # (temperature, top_k), as in the chapter
SAMPLES = 40
RELATIONS = ("left", "right", "above", "below")
SCENE_WORDS = {" " + w for w in (*COLOURS, *SHAPES, *SIZES, *RELATIONS)}
WORDS = {"size": SIZES, "colour": COLOURS, "shape": SHAPES, "relation": RELATIONS}


def token_kinds(pieces: list[str]) -> list[str]:
    """'scene', 'copied' or 'grammar' for each token piece of a packed stream (chapter 04's rule)."""
    kinds, copying, spelling = [], 0, False
    for i, p in enumerate(pieces):
        prev = pieces[i - 1] if i else ""
        if copying:
            kind, copying = "copied", copying - 1
        elif spelling:
            kind, spelling = ("grammar", False) if p == "." else ("scene", True)
        elif (p in SCENE_WORDS or p == "<|endoftext|>" or (prev == "there" and p in (" is", " are"))
              or (prev == " are" and p.strip() in NUMBER_WORDS)):
            kind = "scene"
        else:
            kind = "grammar"
        if p == " the" and pieces[i + 1 : i + 2] and pieces[i + 1].strip() in SIZES:
            copying = 3
        spelling = spelling or p == " says"
        kinds.append(kind)
    return kinds


OBJ = f"(?:{'|'.join(SIZES)}) (?:{'|'.join(COLOURS)}) (?:{'|'.join(SHAPES)})"
REL = "(?:left of|right of|above|below)"
ONE = re.compile(rf"there is one object\. it is a ({OBJ})\.")
COUNT = re.compile(r"there are (\w+) objects\.")
PAIR = re.compile(rf" (a|the) ({OBJ}) is {REL} a ({OBJ})\.")
TEXT = re.compile(r" the text says [a-z0-9]{1,3}\.$")


def check(text: str) -> tuple[bool, bool]:
    """(grammatical, coherent) for a sampled description (chapter 04's grammar)."""
    text = TEXT.sub("", text)
    if ONE.fullmatch(text):
        return True, True
    head = COUNT.match(text)
    if head is None or head.group(1) not in NUMBER_WORDS:
        return False, False
    rest, previous, objects, coherent = text[head.end():], None, 1, True
    while rest:
        m = PAIR.match(rest)
        if m is None or (m.group(1) == "a") != (previous is None):
            return False, False
        coherent &= previous is None or m.group(2) == previous
        previous, objects, rest = m.group(3), objects + 1, rest[m.end():]
    grammatical = previous is not None and objects == NUMBER_WORDS.index(head.group(1))
    return grammatical, grammatical and coherent


def chapter04(seed: int) -> dict:
    import torch
    from torch import nn

    from mllm_scratch.gpt import PretrainRecipe, generate, pretrain_gpt, text_datasets
    from mllm_scratch.text import perplexity
    from mllm_scratch.tokenizer import load_tokenizer

    tok = load_tokenizer()
    recipe = replace(PretrainRecipe(), seed=seed)
    _, val_set = text_datasets(recipe, tok)
    model, history = pretrain_gpt(recipe, tok, log_every=0, progress=False)

    x = val_set.stream[:-1].view(-1, val_set.seq_len)  # (num_windows, seq_len)
    y = val_set.stream[1:].view(-1, val_set.seq_len)
    with torch.no_grad():
        token_loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
    pieces = [tok.token_str(i) for i in val_set.stream.tolist()]
    kinds, targets = token_kinds(pieces)[1:], pieces[1:]
    by_kind = {k: round(token_loss[torch.tensor([q == k for q in kinds])].mean().item(), 4)
               for k in ("scene", "copied", "grammar")}
    by_word = {}
    for name, words in WORDS.items():
        mask = torch.tensor([k == "scene" and p.strip() in words for k, p in zip(kinds, targets)])
        by_word[name] = round(token_loss[mask].mean().item(), 4)

    samples = {}
    prompt = torch.tensor([tok.eot_id])
    for temperature, top_k in SETTINGS:
        gen = torch.Generator().manual_seed(1)
        texts = []
        for _ in range(SAMPLES):
            ids = generate(model, prompt, 60, temperature, top_k, eos_id=tok.eot_id, generator=gen)
            texts.append(tok.decode(ids[1:].tolist()).replace("<|endoftext|>", ""))
        grammatical, coherent = (sum(flags) / len(texts) for flags in zip(*map(check, texts)))
        chained = [m.groups() for text in texts for m in re.finditer(rf"({OBJ})\. the ({OBJ}) is", text)]
        samples[f"T={temperature} top_k={top_k}"] = {"grammatical": round(grammatical, 4), "coherent": round(coherent, 4),
                                                     "distinct": len(set(texts)), "chained": len(chained),
                                                     "chained_copies": sum(a == b for a, b in chained)}
    return {"val_perplexity": round(perplexity(history.final_eval["val_loss"]), 4), "by_kind": by_kind,
            "by_word": by_word, "samples": samples}


def run(index: int) -> dict:
    seed = SEEDS[index]
    return search_rows.timed_row(index, {"seed": seed}, lambda: chapter04(seed))


def table(rows: list[dict]) -> str:
    return "\n".join(f"seed {r['seed']}: {({k: v for k, v in r.items() if k not in ('row', 'seed', 'seconds')})}"
                     for r in sorted(rows, key=lambda r: r["row"]))


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"seed {s}" for s in SEEDS], run, RESULTS,
        header=lambda: {"what": "chapter 04's GPT read on seeds 0, 1, 2: loss by kind of token, samples (scripts/ch04_seeds.py)",
                        "samples_per_setting": SAMPLES},
        table=table,
    )


if __name__ == "__main__":
    sys.exit(main())
