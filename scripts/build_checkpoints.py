#!/usr/bin/env python
"""Train the book's shipped checkpoints and write them to data/checkpoints/.

    python scripts/build_checkpoints.py gpt            # chapter 04's pretrained GPT
    python scripts/build_checkpoints.py all            # every registered target, in order
    python scripts/build_checkpoints.py --list         # what can be built
    python scripts/build_checkpoints.py --verify       # load every shipped checkpoint through its loader
    python scripts/build_checkpoints.py gpt --out DIR  # write DIR/gpt.pt + DIR/gpt.json instead

Each target trains with exactly the recipe its chapter uses, on one CPU thread with
fixed seeds and deterministic kernels, so a rebuild on the same machine and PyTorch
reproduces the weights bit for bit (another CPU or PyTorch may differ in the last
bits: the manifest records the PyTorch version, and the chapters compare metrics, not
bytes). A later chapter adds its model with one decorated function:

    @target("clip", "chapter 05's CLIP", loader="mllm_scratch.clip:pretrained_clip")
    def build_clip(out: Path) -> dict: ...   # train, save_checkpoint(out / "clip.pt", ...), return the manifest
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so the script runs from a checkout without installing the package


from mllm_scratch.checkpoints import DEFAULT_DIR, save_checkpoint  # noqa: E402
from mllm_scratch.runtime import setup_notebook  # noqa: E402
from mllm_scratch.vit import config_dict  # noqa: E402


@dataclass(frozen=True)
class Target:
    """One shipped checkpoint: how to build it into a directory, and the loader that verifies it."""

    name: str
    description: str
    build: Callable[[Path], dict]
    loader: str  # "module:function", called as function(path) to verify a build
    files: tuple[str, ...] = ()  # the files it writes, when not just <name>.pt


TARGETS: dict[str, Target] = {}


def target(name: str, description: str, loader: str, files: tuple[str, ...] = ()) -> Callable[[Callable[[Path], dict]], Callable[[Path], dict]]:
    """Register `build(out_dir) -> manifest` as the target `name` (writing `files`, default <name>.pt)."""

    def register(build: Callable[[Path], dict]) -> Callable[[Path], dict]:
        if name in TARGETS or name == "all":
            raise ValueError(f"checkpoint target {name!r} is registered twice (or is reserved)")
        TARGETS[name] = Target(name, description, build, loader, files)
        return build

    return register


def load_with(t: Target, path: Path):
    module, func = t.loader.split(":")
    return getattr(importlib.import_module(module), func)(path)


# ----------------------------------------------------------------------------------
# Targets


@target("gpt", "chapter 04's GPT pretrained on ShapeWorld descriptions", loader="mllm_scratch.gpt:pretrained_gpt")
def build_gpt(out: Path) -> dict:
    from mllm_scratch.gpt import PretrainRecipe

    return _build_gpt(out, PretrainRecipe(), "gpt", "PretrainRecipe()", "mllm_scratch.gpt.pretrained_gpt")


@target("gpt_qa", "chapter 07's frozen LM: the GPT pretrained on descriptions followed by questions and answers",
        loader="mllm_scratch.gpt:pretrained_gpt_qa")
def build_gpt_qa(out: Path) -> dict:
    import torch

    from mllm_scratch.gpt import QA_RECIPE

    return _build_gpt(out, QA_RECIPE, "gpt_qa", "QA_RECIPE", "mllm_scratch.gpt.pretrained_gpt_qa", dtype=torch.float16)


def _build_gpt(out: Path, recipe, name: str, recipe_name: str, loader: str, dtype=None) -> dict:
    import torch

    from mllm_scratch.checkpoints import round_to_dtype
    from mllm_scratch.gpt import evaluate_lm, pretrain_gpt, text_datasets, tokenizer_sha256
    from mllm_scratch.text import unigram_cross_entropy
    from mllm_scratch.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    model, history = pretrain_gpt(recipe, tokenizer, log_every=50, progress=False, device="cpu")
    if dtype is not None:
        round_to_dtype(model, dtype)  # score the weights the file will hold
    train_set, val_set = text_datasets(recipe, tokenizer)
    val_loss = evaluate_lm(model, val_set)
    unigram = unigram_cross_entropy(train_set.targets, val_set.targets, tokenizer.vocab_size)
    metrics = {
        "val_loss": round(val_loss, 4),
        "val_perplexity": round(math.exp(val_loss), 4),
        "unigram_perplexity": round(math.exp(unigram), 4),
        "final_train_loss": round(history.loss[-1], 4),
        "train_seconds": round(history.seconds, 1),
    }
    print(f"{name}: val perplexity {metrics['val_perplexity']:.3f} (unigram baseline {metrics['unigram_perplexity']:.2f})")
    return save_checkpoint(
        out / f"{name}.pt",
        model,
        config_dict(recipe.model),
        name=name,
        recipe=config_dict(recipe),
        metrics=metrics,
        dtype=dtype or torch.float32,
        extra={
            "trained_by": f"mllm_scratch.gpt.pretrain_gpt({recipe_name}) on one CPU thread, deterministic",
            "tokenizer_sha256": tokenizer_sha256(tokenizer),  # the one trained with, not a later file
            "loader": loader,
        },
    )


@target("clip", "chapter 05's CLIP (zero-shot classification and retrieval)", loader="mllm_scratch.clip:pretrained_clip")
def build_clip(out: Path) -> dict:
    from mllm_scratch.clip import build_checkpoint

    return build_checkpoint(out)


@target("tower", "the book's image tower: chapter 05's CLIP trained on crowded scenes with a dense head beside InfoNCE "
        "(its ViT is the image tower of chapters 06-09)", loader="mllm_scratch.clip:pretrained_tower")
def build_tower(out: Path) -> dict:
    from mllm_scratch.clip import build_tower_checkpoint

    return build_tower_checkpoint(out)


@target("vlm", "chapter 06's unified VLM (CLIP tower + MLP projector + GPT, two stages)", loader="mllm_scratch.vlm:load_vlm")
def build_vlm(out: Path) -> dict:
    from mllm_scratch.vlm import build_checkpoint

    return build_checkpoint(out)


@target("tiled_vlm", "chapter 10's tiled VLM (chapter 06's model + a reading tower on 2 x 2 tiles of 64 px scenes)",
        loader="mllm_scratch.tiling:load_tiled_vlm")
def build_tiled_vlm(out: Path) -> dict:
    from mllm_scratch.tiling import build_tiled_checkpoint

    return build_tiled_checkpoint(out)


@target("chat_vlm", "chapter 12's chat model (chapter 06's model instruction-tuned on dialogues and two-image questions)",
        loader="mllm_scratch.chat:load_chat_vlm")
def build_chat_vlm(out: Path) -> dict:
    from mllm_scratch.chat import build_chat_checkpoint

    return build_chat_checkpoint(out)


@target("xattn", "chapter 07's cross-attention VLM (gated blocks on the frozen GPT; tower + xattn only)",
        loader="mllm_scratch.xattn:load_xattn")
def build_xattn(out: Path) -> dict:
    from mllm_scratch.xattn import build_checkpoint

    return build_checkpoint(out)


@target("methods", "chapter 08's three methods on one budget: unified (A), cross-attention (B), hybrid (H)",
        loader="mllm_scratch.hybrid:load_methods", files=("methods_unified.pt", "methods_cross.pt", "methods_hybrid.pt"))
def build_methods(out: Path) -> dict:
    from mllm_scratch.hybrid import build_checkpoints

    manifests = build_checkpoints(out)
    from mllm_scratch.hybrid import checkpoint_path

    return {"bytes": sum(m["bytes"] for m in manifests.values()), "sha256": manifests["unified"]["sha256"],
            "files": [checkpoint_path(m, out).name for m in manifests]}


@target("methods_fuyu", "chapter 08's fourth model on the methods' budget: Fuyu (method A with no image tower)",
        loader="mllm_scratch.hybrid:load_method")
def build_methods_fuyu(out: Path) -> dict:
    from mllm_scratch.hybrid import FUYU, build_checkpoints

    return build_checkpoints(out, methods=(FUYU,))[FUYU]  # writes methods_fuyu.pt; the three files stay as they are


@target("video", "chapter 09's video QA models (Perceiver Resampler + cross-attention / unified decoders, single-frame baseline)",
        loader="mllm_scratch.video:load_video_models")
def build_video(out: Path) -> dict:
    from mllm_scratch.video import build_checkpoint

    return build_checkpoint(out)


@target("vqvae", "chapter 13's VQ-VAE image tokenizer (a 32 px scene <-> 4 x 4 codes)", loader="mllm_scratch.vq:pretrained_vqvae")
def build_vqvae(out: Path) -> dict:
    from mllm_scratch.vq import build_checkpoint

    return build_checkpoint(out)


@target("judge", "chapter 13's judge: a detector of colour, shape, size and place trained on real scenes",
        loader="mllm_scratch.judge:pretrained_judge")
def build_judge(out: Path) -> dict:
    from mllm_scratch.judge import build_checkpoint

    return build_checkpoint(out)


@target("draw", "chapter 13's drawing models: Emu3-style (codes in, codes out) and Janus-style (tower in, codes out)",
        loader="mllm_scratch.imagegen:pretrained_drawing_models", files=("draw_emu3.pt", "draw_janus.pt"))
def build_draw(out: Path) -> dict:
    from mllm_scratch.imagegen import METHODS, build_checkpoint

    manifests = {m: build_checkpoint(out, m) for m in METHODS}
    return {"bytes": sum(m["bytes"] for m in manifests.values()), "sha256": manifests["emu3"]["sha256"],
            "files": [f"draw_{m}.pt" for m in manifests]}


# ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help=f"what to build: {', '.join(TARGETS)} or all")
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"output directory (default: {DEFAULT_DIR.relative_to(ROOT)})")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--verify", action="store_true", help="load each target's checkpoint in --out through its loader")
    args = parser.parse_args(argv)

    if args.list:
        for t in TARGETS.values():
            print(f"{t.name:12s} {t.description}")
        return 0
    names = list(TARGETS) if args.targets == ["all"] or (args.verify and not args.targets) else args.targets
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        parser.error(f"unknown target(s) {unknown}: expected some of {list(TARGETS)} or all" if unknown else "name a target (or all)")
    for name in names:
        t = TARGETS[name]
        path = args.out / f"{name}.pt"
        if args.verify:
            load_with(t, path)
            print(f"{name}: {', '.join(str(args.out / f) for f in t.files or (path.name,))} verified")
            continue
        # The recipe's conditions: one thread, fixed seeds, deterministic kernels, CPU.
        setup_notebook(seed=0, threads=1, deterministic=True, device="cpu")
        start = time.perf_counter()
        manifest = t.build(args.out)
        load_with(t, path)  # what we ship must load through the loader the chapters use
        wrote = manifest.get("files", [path.name])  # a target may write several files (methods: one per method)
        print(f"{name}: wrote {', '.join(str(args.out / f) for f in wrote)} ({manifest['bytes'] / 2**20:.2f} MiB, sha256 {manifest['sha256'][:16]}...) "
              f"in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
