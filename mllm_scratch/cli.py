"""The book's command line: train a tiny VLM, then caption images and answer questions about them.

    python -m mllm_scratch train-vlm --out vlm.pt              # a few minutes on a CPU
    python -m mllm_scratch train-vlm --preset gpu --out vlm.pt # a longer run, on the GPU if there is one
    python -m mllm_scratch caption IMAGE --checkpoint vlm.pt
    python -m mllm_scratch ask IMAGE "what colour is the circle?" --checkpoint vlm.pt

Any image file Pillow opens is read and resized to the model's input size. Without
--checkpoint, caption and ask use the book's shipped VLM (data/checkpoints/vlm.pt).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

# Budgets (and batch sizes) per preset; every other field is VLMRecipe's default, the notebook's recipe.
PRESETS: dict[str, dict] = {
    "cpu": dict(stage1_steps=100, stage2_steps=400),  # a few minutes on a laptop CPU
    "book": {},  # exactly VLMRecipe(): the shipped checkpoint's recipe
    "gpu": dict(batch_size=128, caption_pairs=20_000, qa_pairs=100_000, stage1_steps=300, stage2_steps=3000,
                stage2_lr=1e-3, stage2_lm_lr=3e-4),
}
_OVERRIDES = ("encoder", "projector", "caption_pairs", "qa_pairs", "batch_size", "stage1_steps", "stage2_steps",
              "stage1_lr", "stage2_lr", "stage2_lm_lr", "seed")


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def _recipe(args: argparse.Namespace):
    from mllm_scratch.vlm import VLMRecipe

    recipe = replace(VLMRecipe(), **PRESETS[args.preset])
    overrides = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
    if args.train_encoder:
        overrides["train_encoder"] = True
    return replace(recipe, **overrides)


def cmd_train_vlm(args: argparse.Namespace) -> int:
    import torch

    from mllm_scratch.runtime import choose_device, seed_everything
    from mllm_scratch.shapeworld import VQADataset
    from mllm_scratch.tokenizer import load_tokenizer
    from mllm_scratch.vlm import build_vlm, save_vlm, train_stage, vqa_accuracy

    out = Path(args.out)
    if out.suffix != ".pt":
        raise CLIError(f"--out {out} should end in .pt (its manifest is written beside it as {out.with_suffix('.json').name})")
    recipe = _recipe(args)
    device = choose_device(args.device)
    seed_everything(recipe.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer()
    print(f"train-vlm: encoder {recipe.encoder}, projector {recipe.projector}, stage 1 {recipe.stage1_steps} steps "
          f"(projector, captions), stage 2 {recipe.stage2_steps} steps (projector + LM, questions), "
          f"batch {recipe.batch_size}, on {device}")
    model = build_vlm(recipe, tokenizer)
    metrics: dict = {}
    for stage in (1, 2):
        history = train_stage(model, recipe, stage, tokenizer, log_every=0, progress=not args.no_progress, device=device)
        metrics[f"stage{stage}_loss"] = round(history.loss[-1], 4)
        print(f"stage {stage}: loss {history.loss[-1]:.4f} after {history.steps[-1]} steps ({history.seconds:.0f} s)")
    if args.eval:
        acc = vqa_accuracy(model, tokenizer, VQADataset("test", args.eval, recipe.scene_config()))
        metrics["test_vqa"] = {k: round(v, 4) for k, v in acc.items()}
        print("test VQA accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    model.to("cpu")
    save_vlm(out, model, recipe=recipe.to_dict(), metrics=metrics)
    print(f"wrote {out} and {out.with_suffix('.json').name}")
    return 0


def _load(args: argparse.Namespace):
    """The checkpoint (or the shipped VLM) and the image, resized to the model's input size."""
    from mllm_scratch.images import load_image
    from mllm_scratch.vlm import load_vlm

    if not Path(args.image).is_file():
        raise CLIError(f"image file {str(args.image)!r} does not exist (or is not a file)")
    model = load_vlm(args.checkpoint)  # CheckpointError names the file and how to rebuild it
    size = model.config.vision.image_size
    try:
        image = load_image(args.image, size)  # (3, size, size) in [0, 1]
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from None
    except OSError as err:  # unreadable: a directory, permissions, a truncated file
        raise CLIError(f"cannot read image {str(args.image)!r}: {err}") from None
    return model, image[None]


def cmd_caption(args: argparse.Namespace) -> int:
    from mllm_scratch.tokenizer import load_tokenizer

    model, image = _load(args)
    print(model.generate(load_tokenizer(), image, [""], max_new_tokens=args.max_new_tokens)[0])
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from mllm_scratch.tokenizer import load_tokenizer

    question = args.question.strip().lower()  # ShapeWorld text is lowercase
    if not question:
        raise CLIError("the question is empty: ask something, e.g. \"what colour is the circle?\"")
    model, image = _load(args)
    print(model.generate(load_tokenizer(), image, [question], max_new_tokens=args.max_new_tokens)[0])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mllm_scratch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train-vlm", help="train a tiny unified VLM (chapter 06) and save it",
                       description="Train a unified VLM in LLaVA's two stages (projector on captions, then projector "
                       "+ LM on questions) and write the checkpoint atomically to --out. Uses the GPU when present.")
    t.add_argument("--out", default="vlm.pt", help="checkpoint to write, NAME.pt (+ NAME.json); default vlm.pt")
    t.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: a few minutes on a CPU (default); book: the shipped checkpoint's recipe; gpu: longer, bigger batches")
    t.add_argument("--encoder", choices=("clip", "vit", "patches"),
                   help="image tower: clip (chapter 05's, pretrained; default), vit (random), patches (Fuyu: none)")
    t.add_argument("--projector", choices=("linear", "mlp"), help="the connector (default mlp)")
    for name, kind, text in (("caption-pairs", int, "stage-1 captions"), ("qa-pairs", int, "stage-2 questions"),
                             ("batch-size", int, "examples per step"), ("stage1-steps", int, "stage-1 steps"),
                             ("stage2-steps", int, "stage-2 steps"), ("stage1-lr", float, "stage-1 learning rate"),
                             ("stage2-lr", float, "stage-2 rate of the projector"),
                             ("stage2-lm-lr", float, "stage-2 rate of the pretrained LM"), ("seed", int, "random seed")):
        t.add_argument(f"--{name}", type=kind, help=f"{text} (overrides the preset)")
    t.add_argument("--train-encoder", action="store_true", help="also train the image tower in stage 2")
    t.add_argument("--eval", type=int, default=300, help="test questions to score after training (0: none; default 300)")
    t.add_argument("--device", help="cuda, mps or cpu (default: the GPU if there is one; $MLLM_DEVICE overrides)")
    t.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(run=cmd_train_vlm)

    for name, helptext in (("caption", "describe an image in one sentence"), ("ask", "answer a question about an image")):
        p = sub.add_parser(name, help=helptext, description=f"{helptext[0].upper()}{helptext[1:]} with a trained VLM. "
                           "Any image file Pillow opens; it is resized to the model's input size (32 px by default).")
        p.add_argument("image", help="an image file (PNG, JPEG, ...)")
        if name == "ask":
            p.add_argument("question", help='e.g. "what colour is the circle?" or "how many objects are there?"')
        p.add_argument("--checkpoint", default=None,
                       help="a checkpoint from train-vlm (default: the shipped data/checkpoints/vlm.pt)")
        p.add_argument("--max-new-tokens", type=int, default=32 if name == "caption" else 4, help="longest reply in tokens")
        p.set_defaults(run=cmd_caption if name == "caption" else cmd_ask)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m mllm_scratch`: returns the exit status (2 with a one-line message on bad input)."""
    from mllm_scratch.checkpoints import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (CLIError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


__all__ = ["PRESETS", "build_parser", "main"]
