#!/usr/bin/env python
"""Training throughput of each of the book's models, side by side in one run.

    python benchmarks/training_throughput.py --quick            # CPU: eager only, a few minutes
    python benchmarks/training_throughput.py --compile          # also torch.compile (slow to compile on CPU)
    python benchmarks/training_throughput.py --device cuda --preset gpu   # on a GPU: bf16, fused AdamW, MFU

Each model is the book's default shape with random weights (speed does not depend on the
weights) and trains through the package's own loop, `mllm_scratch.train.train`, exactly as
the chapters call it: AdamW (fused on a GPU), gradient clipping, bf16 autocast on a GPU,
one host-device sync per `record_every` steps. One batch is made once, in pinned memory on a
GPU, and fed again every step, so the data pipeline is not measured here (ShapeWorld's own
speed is `benchmarks/shapeworld_speed.py`); the copy to the device is.

Columns: model FLOPs per example (forward + backward, counted by `torch.utils.flop_counter`);
examples/s after a warm-up; the ratio of compiled to eager (above 1: compile helps); the
achieved model GFLOP/s (examples/s x FLOPs per example: how well each model keeps the
hardware busy, comparable across models); and on a GPU the model FLOPs utilisation (MFU):
achieved FLOP/s over the card's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from mllm_scratch.clip import CLIP, CLIPConfig, batch_loss  # noqa: E402
from mllm_scratch.gpt import GPT, GPTConfig, lm_loss  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--device", help="cpu, cuda or mps (default: the GPU if there is one)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="batch sizes (default: gpu on CUDA, else cpu)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) and print the ratio")
    parser.add_argument("--models", nargs="*", help="a subset of: vit gpt clip vlm-A vlm-B")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as the notebooks run)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU on an unlisted GPU")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    steps = (10 if args.quick else 30) if device.type == "cpu" else (50 if args.quick else 200)
    peak = peak_tflops(device, args.peak_tflops)
    cases = make_cases(PRESETS[preset])
    names = args.models or list(cases)
    unknown = sorted(set(names) - set(cases))
    if unknown:
        parser.error(f"unknown model(s) {unknown}: expected some of {list(cases)}")

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}, {args.threads} thread(s)"
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    print(f"device {where}; torch {torch.__version__}; preset {preset}; {steps} timed steps after 3 warm-up steps; "
          f"bf16 autocast {'on' if amp else 'off'}")
    if device.type == "cuda" and peak is None:
        print("unknown GPU: pass --peak-tflops to get MFU")
    head = f"{'model':7s} {'params':>9s} {'batch':>6s} {'GFLOP/ex':>9s} {'eager ex/s':>11s}"
    if args.compile:
        head += f" {'compiled ex/s':>14s} {'ratio':>6s}"
    head += f" {'GFLOP/s':>8s}"
    if peak:
        head += f" {'MFU':>7s}"
    print(head)
    print("-" * len(head))
    for name in names:
        factory, loss_fn, batch = cases[name]
        model = factory()
        params = sum(p.numel() for p in model.parameters())
        size = len(batch[0])
        gflop = flops_per_step(model, loss_fn, batch, device) / size / 1e9
        del model
        eager = throughput(factory, loss_fn, batch, device, steps, False)
        line = f"{name:7s} {params:9,d} {size:6d} {gflop:9.4f} {eager:11.1f}"
        best = eager
        if args.compile:
            compiled = throughput(factory, loss_fn, batch, device, steps, True)
            best = max(best, compiled)
            line += f" {compiled:14.1f} {compiled / eager:6.2f}"
        line += f" {best * gflop:8.1f}"
        if peak:
            line += f" {best * gflop * 1e9 / (peak * 1e12):7.2%}"
        print(line, flush=True)
    if peak:
        print(f"MFU = examples/s x FLOP per example / {peak:.0f} TFLOP/s (dense bf16 peak); the better of eager and compiled")


if __name__ == "__main__":
    main()
