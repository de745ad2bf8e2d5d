#!/usr/bin/env python
"""The three ways to feed an image to an LM, side by side as the image grows: cost per example.

    python benchmarks/vlm_methods.py --quick      # 32, 64, 128 px; batch 4; a few minutes on one CPU thread
    python benchmarks/vlm_methods.py              # batch 8, more repeats
    python benchmarks/vlm_methods.py --device cuda

Method A (unified decoder, NVLM-D / LLaVA): every patch becomes a token of the LM's sequence.
Method B (cross-attention, NVLM-X / Flamingo): one marker token in the sequence; the patches
are read by gated cross-attention after every LM block. H (hybrid, NVLM-H): a 16-token
thumbnail (the patch grid average-pooled to 4 x 4) in the sequence plus all patches through
cross-attention. Chapter 05's tower shape (patch 4, width 48, depth 3) and chapter 04's LM
shape (width 128, depth 4) at 32, 64 and 128 px: 64, 256 and 1,024 image tokens. The
weights are random (cost does not depend on them); the text is 16 tokens. Trainable parts
are those of stage 2 of chapter 08's recipe (A: tower, projector and LM; B and H: tower and
new parts, the LM frozen).

Columns: the LM's sequence length; forward GFLOPs per example (counted by hand in
`mllm_scratch.costs.method_flops`, which the chapter checks against FlopCounterMode); MiB
of activations saved for backward per example and the allocator's peak during a training
step (PyTorch's profiler on CPU, `max_memory_allocated` on a GPU), both per example;
training (forward + backward + AdamW) and inference (one no-grad forward over the prompt)
examples/s, medians of interleaved runs. Ratios are method / A at the same size (for time:
A's time / the method's, so above 1 means faster than A), and each method's growth from the
smallest size to the largest.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mllm_scratch.costs import (  # noqa: E402
    TEXT_TOKENS,
    activation_bytes,
    cost_batch,
    cost_models,
    cost_shapes,
    inference_fn,
    interleaved_times,
    loss_fn,
    method_flops,
    peak_bytes,
)
from mllm_scratch.hybrid import METHODS  # noqa: E402
from mllm_scratch.runtime import choose_device  # noqa: E402

SHORT = {"unified": "A", "cross": "B", "hybrid": "H"}


def synced(fn, device: torch.device):
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return run


def gpu_peak(fn, device: torch.device) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - before


def measure(size: int, batch: int, repeats: int, device: torch.device) -> dict[str, dict[str, float]]:
    from mllm_scratch.costs import train_step_fn

    shapes = cost_shapes(size)
    models = {m: model.to(device) for m, model in cost_models(shapes).items()}
    batches = {}
    for m in METHODS:
        b = cost_batch(m, shapes, batch)
        batches[m] = type(b)(*(t.to(device) for t in b))
    out: dict[str, dict[str, float]] = {}
    for m, model in models.items():
        b = batches[m]
        step = train_step_fn(model, b)
        step()  # AdamW's state exists before memory is measured: every step after the first looks like this
        if device.type == "cuda":
            peak = gpu_peak(step, device)
        else:
            peak = peak_bytes(step)
        out[m] = {
            "seq": shapes.sequence_length(m, TEXT_TOKENS),
            "gflops": method_flops(m, shapes, TEXT_TOKENS)["total"] / 1e9,
            "act_mib": activation_bytes(loss_fn(model, b), model) / batch / 2**20,
            "peak_mib": peak / batch / 2**20,
        }
    train = interleaved_times({m: synced(train_step_fn(models[m], batches[m]), device) for m in METHODS}, repeats)
    infer = interleaved_times({m: synced(inference_fn(models[m], batches[m]), device) for m in METHODS}, repeats)
    for m in METHODS:
        out[m]["train_eps"] = batch / train[m]
        out[m]["infer_eps"] = batch / infer[m]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 4, 3 repeats (a few minutes on one CPU thread)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as the notebooks)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="image sizes in pixels")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = choose_device(args.device)
    batch, repeats = (4, 3) if args.quick else (8, 7)
    start = time.perf_counter()
    results = {size: measure(size, batch, repeats, device) for size in args.sizes}

    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s), batch {batch}, "
          f"median of {repeats} interleaved runs; text {TEXT_TOKENS} tokens; per example")
    print("x A: the method's value / A's at the same size (time columns: A's time / the method's, above 1 = faster)\n")
    head = (f"{'px':>4} {'img tok':>7} {'method':<9} {'seq':>5} {'GFLOP':>7} {'x A':>5} {'act MiB':>8} {'x A':>5} "
            f"{'peak MiB':>8} {'x A':>5} {'train ex/s':>10} {'x A':>5} {'infer ex/s':>10} {'x A':>5}")
    print(head)
    print("-" * len(head))
    for size, res in results.items():
        a = res["unified"]
        tokens = (size // 4) ** 2
        for m in METHODS:
            r = res[m]
            print(f"{size:>4} {tokens:>7} {SHORT[m] + ' ' + m:<9} {r['seq']:>5} {r['gflops']:>7.3f} {r['gflops'] / a['gflops']:>5.2f} "
                  f"{r['act_mib']:>8.2f} {r['act_mib'] / a['act_mib']:>5.2f} {r['peak_mib']:>8.2f} {r['peak_mib'] / a['peak_mib']:>5.2f} "
                  f"{r['train_eps']:>10.1f} {r['train_eps'] / a['train_eps']:>5.2f} "
                  f"{r['infer_eps']:>10.1f} {r['infer_eps'] / a['infer_eps']:>5.2f}")
    first, last = args.sizes[0], args.sizes[-1]
    print(f"\ngrowth from {first} px to {last} px ({(last // first) ** 2}x the image tokens): last / first")
    print(f"{'method':<10} {'seq':>6} {'GFLOP':>7} {'act MiB':>8} {'peak MiB':>9} {'train time':>10} {'infer time':>10}")
    for m in METHODS:
        f, l = results[first][m], results[last][m]
        print(f"{SHORT[m] + ' ' + m:<10} {l['seq'] / f['seq']:>6.1f} {l['gflops'] / f['gflops']:>7.1f} "
              f"{l['act_mib'] / f['act_mib']:>8.1f} {l['peak_mib'] / f['peak_mib']:>9.1f} "
              f"{f['train_eps'] / l['train_eps']:>10.1f} {f['infer_eps'] / l['infer_eps']:>10.1f}")
    print(f"\n({time.perf_counter() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
