#!/usr/bin/env python
"""Training throughput of each of the book's models, side by side in one run.

    python benchmarks/training_throughput.py --quick            # CPU: eager only, a few minutes
    python benchmarks/training_throughput.py --compile          # also torch.compile (slow to compile on CPU)
    python benchmarks/training_throughput.py --device cuda --preset gpu   # on a GPU: bf16, fused AdamW, MFU
    python benchmarks/training_throughput.py --quick --no-transformers    # the book's models only

Each model is the book's default shape with random weights (speed does not depend on the
weights) and trains through the package's own loop, `mllm_scratch.train.train`, exactly as
the chapters call it: AdamW (fused on a GPU), gradient clipping, bf16 autocast on a GPU,
one host-device sync per `record_every` steps. One batch is made once, in pinned memory on a
GPU, and fed again every step, so the data pipeline is not measured here (ShapeWorld's own
speed is `benchmarks/shapeworld_speed.py`); the copy to the device is.

The limit: the script times a large `torch.mm` (float32 on a CPU, bf16 on a GPU) on the same
threads, warm-up first, in a burst of repeats before the models and another after each model, and
keeps the best product (a burst that lands in a busy moment of a shared machine would otherwise
inflate every utilisation; the table is printed once all are measured). That measured
matmul peak is the ceiling the models work against: their FLOPs are nearly all matrix products,
and a training step adds norms, softmax, the optimizer and Python around them.

Columns: model FLOPs per example (forward + backward, counted by `torch.utils.flop_counter`);
examples/s after a warm-up; the ratio of compiled to eager (above 1: compile helps); the
achieved model GFLOP/s (examples/s x FLOPs per example: how well each model keeps the
hardware busy, comparable across models); "mm MFU", the model FLOPs utilisation against the
measured matmul peak (on a CPU, the only peak there is); and on a GPU "MFU" against the card's
dense bf16 peak from its data sheet.

Then, if `transformers` is installed, the book's GPT, ViT and CLIP race the Hugging Face
implementations (GPT2LMHeadModel, ViTForImageClassification, CLIPModel) built at the same tiny
configs (width, depth, heads, MLP size, sequence length, image and patch size, vocabulary; the
book's exact GELU; no dropout; `attn_implementation="sdpa"`, the fused attention the book's
modules call too; `use_cache=False` for GPT-2, as in training). Each model gets a `loss_fn`
and trains on the same batch through the same `train` call (same TrainConfig, AdamW, gradient
clipping), in eager mode, the two timed in alternation; book/HF is the ratio of the best runs
(another process can only slow a run down), and the median and range of the rounds' own ratios
show how much the machine's load moved it. Above 1: the book's model is faster.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from mllm_scratch.clip import CLIP, CLIPConfig, batch_loss, clip_loss  # noqa: E402
from mllm_scratch.gpt import GPT, GPTConfig, lm_loss, next_token_loss  # noqa: E402
from mllm_scratch.runtime import choose_device  # noqa: E402
from mllm_scratch.train import TrainConfig, train  # noqa: E402
from mllm_scratch.vit import ViTClassifier, ViTConfig  # noqa: E402
from mllm_scratch.vlm import UnifiedVLM, VLMBatch, VLMConfig, vlm_loss  # noqa: E402
from mllm_scratch.xattn import CrossAttentionVLM, XAttnConfig, xattn_loss  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0, "RTX 3090": 71.0}

# Batch sizes: the chapters' on CPU; the CLI's `--preset gpu` batch on a GPU.
PRESETS = {"cpu": {"vit": 64, "gpt": 16, "clip": 64, "vlm-A": 32, "vlm-B": 32},
           "gpu": {"vit": 512, "gpt": 128, "clip": 512, "vlm-A": 128, "vlm-B": 128}}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return value
    return None


class MatmulPeak(NamedTuple):
    """GFLOP/s of a square `torch.mm`: the best and the median of the timed repeats."""

    best: float
    median: float
    size: int
    dtype: torch.dtype
    repeats: int


def matmul_peak(device: torch.device, size: int, repeats: int = 5) -> MatmulPeak:
    """The measured limit: GFLOP/s of (size, size) @ (size, size) on `device` and the current threads.

    float32 on a CPU (what the models train in there), bf16 on a GPU (what autocast runs the
    matmuls in). Two untimed products warm up the kernels; on a GPU each timed repeat runs
    enough products to last well beyond the launch and sync overhead.
    """
    if size < 1 or repeats < 1:
        raise ValueError(f"matmul size and repeats must be positive, got size {size} and repeats {repeats}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    inner = 20 if device.type == "cuda" else 1  # products per timed repeat

    def sync() -> None:  # GPU work is asynchronous: wait for it before reading the clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    for _ in range(2):
        torch.mm(a, b, out=out)
    sync()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        sync()
        rates.append(2 * size**3 * inner / (time.perf_counter() - start) / 1e9)  # a multiply and an add per term
    return MatmulPeak(max(rates), statistics.median(rates), size, dtype, repeats)


def image_batch(b: int) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32)


def text_ids(b: int, t: int, vocab: int = 500) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t))


def caption_ids(b: int, t: int, eot: int = 500) -> torch.Tensor:
    ids = text_ids(b, t)
    ids[:, -1] = eot  # the text tower pools at <|endoftext|>
    return ids


def vlm_batch(b: int, num_image: int, prompt: int = 12, target: int = 4, image_id: int = 502) -> VLMBatch:
    ids = torch.cat([torch.full((b, num_image), image_id), text_ids(b, prompt + target)], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -target:] = ids[:, -target:]
    return VLMBatch(image_batch(b), ids, labels)


def make_cases(batch: dict[str, int]) -> dict[str, tuple[Callable[[], torch.nn.Module], Callable, object]]:
    """name -> (model factory, loss_fn, one batch)."""
    lm = GPTConfig()
    cases = {
        "vit": (lambda: ViTClassifier(ViTConfig(num_classes=5)),
                lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
                (image_batch(batch["vit"]), torch.randint(0, 5, (batch["vit"],)))),
        "gpt": (lambda: GPT(lm), lm_loss,
                (text_ids(batch["gpt"], lm.context_length), text_ids(batch["gpt"], lm.context_length))),
        "clip": (lambda: CLIP(CLIPConfig()), batch_loss,
                 (image_batch(batch["clip"]), caption_ids(batch["clip"], CLIPConfig().text.context_length))),
        "vlm-A": (lambda: UnifiedVLM(VLMConfig(lm=lm)), vlm_loss,
                  vlm_batch(batch["vlm-A"], ViTConfig().num_patches)),
    }
    vit = ViTConfig()
    cases["vlm-B"] = (lambda: CrossAttentionVLM(XAttnConfig(lm=lm, media_dim=vit.dim, media_tokens=vit.num_patches,
                                                             vision=vit)),
                      xattn_loss, vlm_batch(batch["vlm-B"], 1))
    return cases


COMPARED = ("gpt", "vit", "clip")  # the models transformers has a counterpart of


def transformers_cases(batch: dict[str, int]) -> dict[str, tuple[str, Callable[[], torch.nn.Module], Callable]]:
    """name -> (transformers class, model factory, loss_fn): the Hugging Face models at the book's default configs.

    Raises ImportError (naming the pip command) when transformers is not installed.
    """
    try:
        import transformers
    except ImportError as error:
        raise ImportError("the comparison needs transformers: pip install transformers") from error

    same = dict(attn_implementation="sdpa")  # the fused attention the book's modules call too
    lm = GPTConfig()
    gpt2 = transformers.GPT2Config(
        vocab_size=lm.vocab_size, n_positions=lm.context_length, n_embd=lm.dim, n_layer=lm.depth, n_head=lm.num_heads,
        n_inner=int(lm.dim * lm.mlp_ratio), activation_function="gelu", layer_norm_epsilon=1e-5,
        resid_pdrop=lm.dropout, embd_pdrop=lm.dropout, attn_pdrop=lm.dropout, tie_word_embeddings=lm.tie_weights,
        bos_token_id=500, eos_token_id=500, use_cache=False, **same)
    vit = ViTConfig(num_classes=5)
    hf_vit = transformers.ViTConfig(
        image_size=vit.image_size, patch_size=vit.patch_size, num_channels=vit.in_channels, hidden_size=vit.dim,
        num_hidden_layers=vit.depth, num_attention_heads=vit.num_heads, intermediate_size=int(vit.dim * vit.mlp_ratio),
        hidden_act="gelu", layer_norm_eps=1e-5, hidden_dropout_prob=vit.dropout,
        attention_probs_dropout_prob=vit.dropout, num_labels=vit.num_classes, **same)
    clip = CLIPConfig()
    text, vision = clip.text, clip.vision
    hf_clip = transformers.CLIPConfig(
        text_config=dict(vocab_size=text.vocab_size, max_position_embeddings=text.context_length, hidden_size=text.dim,
                         num_hidden_layers=text.depth, num_attention_heads=text.num_heads,
                         intermediate_size=int(text.dim * text.mlp_ratio), hidden_act="gelu", layer_norm_eps=1e-5,
                         attention_dropout=text.dropout, bos_token_id=None, eos_token_id=clip.eot_id),
        vision_config=dict(image_size=vision.image_size, patch_size=vision.patch_size, num_channels=vision.in_channels,
                           hidden_size=vision.dim, num_hidden_layers=vision.depth, num_attention_heads=vision.num_heads,
                           intermediate_size=int(vision.dim * vision.mlp_ratio), hidden_act="gelu",
                           layer_norm_eps=1e-5, attention_dropout=vision.dropout),
        projection_dim=clip.embed_dim, **same)

    def gpt2_loss(model, b):  # logits for every position, scored like lm_loss
        return next_token_loss(model(input_ids=b[0]).logits, b[1])

    def vit_loss(model, b):
        return torch.nn.functional.cross_entropy(model(pixel_values=b[0]).logits, b[1])

    def clip_model_loss(model, b):  # the book's symmetric InfoNCE on transformers' logits
        return clip_loss(model(input_ids=b[1], pixel_values=b[0]).logits_per_image)

    return {
        "gpt": ("GPT2LMHeadModel", lambda: transformers.GPT2LMHeadModel(gpt2), gpt2_loss),
        "vit": ("ViTForImageClassification", lambda: transformers.ViTForImageClassification(hf_vit), vit_loss),
        "clip": ("CLIPModel", lambda: transformers.CLIPModel(hf_clip), clip_model_loss),
    }


# Why a transformers model's parameter count differs from the book's at the same config.
PARAM_NOTES = {
    "clip": "transformers' CLIP vision tower, like OpenAI's CLIP, has a LayerNorm before the blocks (ln_pre: "
            "+2 x width) and a patch projection without bias (-width); the book's ViT has neither",
}


def flops_per_step(model: torch.nn.Module, loss_fn: Callable, batch, device: torch.device) -> int:
    """Forward + backward FLOPs of one step, counted by PyTorch's FlopCounterMode (matmuls and attention)."""
    from mllm_scratch.train import to_device

    model.to(device).train()
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(model, to_device(batch, device)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def throughput(factory, loss_fn, batch, device: torch.device, steps: int, compile_flag) -> float:
    """Examples/s of `steps` training steps through `train`, after a warm-up run on the same model."""
    torch.manual_seed(0)
    model = factory()
    if device.type == "cuda":
        batch = type(batch)(*(t.pin_memory() for t in batch)) if hasattr(batch, "_fields") else \
            tuple(t.pin_memory() for t in batch)
    size = len(batch[0])

    def stream():
        while True:
            yield batch

    cfg = dict(lr=1e-4, warmup_steps=0, record_every=10, log_every=0, progress=False, compile=compile_flag)
    train(model, stream(), loss_fn, TrainConfig(steps=3, **cfg), device=device)  # warm-up: compile, allocate
    history = train(model, stream(), loss_fn, TrainConfig(steps=steps, **cfg), device=device,
                    batch_size_of=lambda b: size)
    return history.examples_per_second


def compare_with_transformers(cases: dict, names: list[str], batch: dict[str, int], device: torch.device,
                              steps: int, rounds: int) -> None:
    """The book's GPT, ViT and CLIP against transformers' at the same configs: params, FLOPs, examples/s, ratio."""
    names = [n for n in COMPARED if n in names]
    if not names:
        return
    print()
    try:
        import transformers

        references = transformers_cases(batch)
    except ImportError:
        print("transformers is not installed: the comparison with its GPT-2, ViT and CLIP is skipped "
              "(pip install transformers)")
        return
    print(f"the book's models against transformers {transformers.__version__} (attn_implementation=\"sdpa\") at the "
          f"same configs and batches, through the same train loop, eager; best of {rounds} alternating runs of "
          f"{steps} steps")
    head = (f"{'model':5s} {'transformers class':26s} {'params book':>11s} {'params HF':>10s} {'GFLOP/ex book':>13s} "
            f"{'HF':>7s} {'book ex/s':>9s} {'HF ex/s':>8s} {'book/HF':>7s} {'per round: median (range)':>25s}")
    print(head)
    print("-" * len(head))
    notes = []
    for name in names:
        factory, loss_fn, data = cases[name]
        hf_class, hf_factory, hf_loss = references[name]
        size = len(data[0])
        counts, gflops = [], []
        for make, loss in ((factory, loss_fn), (hf_factory, hf_loss)):
            model = make()
            counts.append(sum(p.numel() for p in model.parameters()))
            gflops.append(flops_per_step(model, loss, data, device) / size / 1e9)
            del model
        book, hf = [], []
        for _ in range(rounds):  # alternate, so that a slow spell of the machine hits both
            book.append(throughput(factory, loss_fn, data, device, steps, False))
            hf.append(throughput(hf_factory, hf_loss, data, device, steps, False))
        ratios = [b / h for b, h in zip(book, hf)]
        spread = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        print(f"{name:5s} {hf_class:26s} {counts[0]:11,d} {counts[1]:10,d} {gflops[0]:13.4f} {gflops[1]:7.4f} "
              f"{max(book):9.1f} {max(hf):8.1f} {max(book) / max(hf):7.2f} {spread:>25s}", flush=True)
        if counts[0] != counts[1]:
            why = PARAM_NOTES.get(name, "not explained")
            notes.append(f"{name}: transformers' model has {counts[1] - counts[0]:+,d} parameters: {why}")
    for note in notes:
        print(note)
    print("book/HF = the book's best examples/s over transformers' best (above 1: the book's model is faster); "
          "per round: the ratio of each round's two runs, back to back")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--device", help="cpu, cuda or mps (default: the GPU if there is one)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="batch sizes (default: gpu on CUDA, else cpu)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) and print the ratio")
    parser.add_argument("--models", nargs="*", help="a subset of: vit gpt clip vlm-A vlm-B")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as the notebooks run)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU on an unlisted GPU")
    parser.add_argument("--steps", type=int, help="timed steps per run (default: 10 CPU / 50 GPU with --quick, "
                                                  "else 30 / 200)")
    parser.add_argument("--mm-size", type=int, help="side of the square torch.mm that measures the peak "
                                                    "(default 2048 on a CPU, 8192 on a GPU)")
    parser.add_argument("--rounds", type=int, help="alternating runs per model in the transformers comparison "
                                                   "(default 5 with --quick, else 7)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the comparison with transformers")
    args = parser.parse_args()
    for option in ("threads", "steps", "mm_size", "rounds"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be a positive integer, got {value}")

    torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    steps = args.steps or ((10 if args.quick else 30) if device.type == "cpu" else (50 if args.quick else 200))
    rounds = args.rounds or (5 if args.quick else 7)
    peak = peak_tflops(device, args.peak_tflops)
    cases = make_cases(PRESETS[preset])
    names = args.models or list(cases)
    unknown = sorted(set(names) - set(cases))
    if unknown:
        parser.error(f"unknown model(s) {unknown}: expected some of {list(cases)}")

    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}, {threads} thread(s)"
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    print(f"device {where}; torch {torch.__version__}; preset {preset}; {steps} timed steps after 3 warm-up steps; "
          f"bf16 autocast {'on' if amp else 'off'}")
    # The peak is timed before the models and again after each one, and the best burst is kept:
    # on a shared machine one burst may land in a busy moment, which would inflate every MFU.
    mm_size = args.mm_size or (8192 if device.type == "cuda" else 2048)
    bursts = [matmul_peak(device, mm_size)]
    rows = []
    for name in names:
        factory, loss_fn, batch = cases[name]
        model = factory()
        params = sum(p.numel() for p in model.parameters())
        size = len(batch[0])
        gflop = flops_per_step(model, loss_fn, batch, device) / size / 1e9
        del model
        eager = throughput(factory, loss_fn, batch, device, steps, False)
        compiled = throughput(factory, loss_fn, batch, device, steps, True) if args.compile else None
        rows.append((name, params, size, gflop, eager, compiled))
        bursts.append(matmul_peak(device, mm_size))
    mm = max(bursts, key=lambda burst: burst.best)
    dtype = str(mm.dtype).removeprefix("torch.")
    medians = [burst.median for burst in bursts]
    print(f"measured matmul peak: torch.mm {mm_size}x{mm_size} @ {mm_size}x{mm_size} {dtype} on {threads} thread(s): "
          f"{mm.best:.1f} GFLOP/s (best of {len(bursts)} bursts x {mm.repeats} products, one burst before the models "
          f"and one after each; burst medians {min(medians):.1f}-{max(medians):.1f})")
    if device.type == "cuda" and peak is None:
        print("unknown GPU: pass --peak-tflops to get MFU")
    head = f"{'model':7s} {'params':>9s} {'batch':>6s} {'GFLOP/ex':>9s} {'eager ex/s':>11s}"
    if args.compile:
        head += f" {'compiled ex/s':>14s} {'ratio':>6s}"
    head += f" {'GFLOP/s':>8s} {'mm MFU':>7s}"
    if peak:
        head += f" {'MFU':>7s}"
    print(head)
    print("-" * len(head))
    for name, params, size, gflop, eager, compiled in rows:
        line = f"{name:7s} {params:9,d} {size:6d} {gflop:9.4f} {eager:11.1f}"
        best = eager
        if compiled is not None:
            best = max(best, compiled)
            line += f" {compiled:14.1f} {compiled / eager:6.2f}"
        line += f" {best * gflop:8.1f} {best * gflop / mm.best:7.2%}"
        if peak:
            line += f" {best * gflop * 1e9 / (peak * 1e12):7.2%}"
        print(line)
    better = "; the better of eager and compiled" if args.compile else ""
    print(f"mm MFU = GFLOP/s / the measured {dtype} matmul peak ({mm.best:.1f} GFLOP/s){better}")
    if peak:
        print(f"MFU = examples/s x FLOP per example / {peak:.0f} TFLOP/s (dense bf16 peak, data sheet){better}")
    sys.stdout.flush()
    if not args.no_transformers:
        compare_with_transformers(cases, names, PRESETS[preset], device, steps, rounds)


if __name__ == "__main__":
    main()
