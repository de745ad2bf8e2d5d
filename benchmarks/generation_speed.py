#!/usr/bin/env python
"""Generation speed with and without the KV cache, side by side in one run.

    python benchmarks/generation_speed.py            # 32, 64, 128, 224 new tokens
    python benchmarks/generation_speed.py --quick     # 32, 64, 128, fewer repeats

Without a cache, every new token re-runs the model over the whole sequence so far
(cost grows with the length: quadratic in total); with it, each step runs one token
through the model and attends to the stored keys and values. The model is chapter
04's default GPT shape with a longer context (256) so 128+ new tokens fit without
the sliding window; random weights (speed does not depend on them), greedy decoding,
and both paths are checked to produce identical tokens. Times are the best of
a few runs on one CPU thread by default, as the notebooks run. At batch 1 this tiny
model's cached step is dominated by Python and kernel-launch overhead (about a
millisecond whatever the length), so the speed-up is smaller than at batch 8, where
the uncached path's extra arithmetic dominates.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mllm_scratch.gpt import GPT, GPTConfig, generate  # noqa: E402
from mllm_scratch.runtime import choose_device  # noqa: E402


def best_time(fn, repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer lengths and repeats")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as the notebooks)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or mps")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="sequences generated together (one table each)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    lengths = (32, 64, 128) if args.quick else (32, 64, 128, 224)
    repeats = 2 if args.quick else 3
    torch.manual_seed(0)
    config = GPTConfig(context_length=256)
    model = GPT(config).to(device).eval()
    generate(model, torch.zeros(1, args.prompt, dtype=torch.long, device=device), 8, temperature=0.0)  # warm-up

    print(f"GPT dim {config.dim}, depth {config.depth}, context {config.context_length}; device {device}, "
          f"{torch.get_num_threads()} thread(s), prompt {args.prompt} tokens, greedy; best of {repeats}; "
          f"torch {torch.__version__}")
    for batch in args.batches:
        prompt = torch.randint(0, config.vocab_size, (batch, args.prompt), device=device)
        print(f"\nbatch {batch}: tokens/s counts every sequence's new tokens")
        print(f"{'new tokens':>10} | {'uncached tok/s':>14} | {'cached tok/s':>12} | {'speed-up':>8} | same tokens")
        for n in lengths:
            runs, outs = {}, {}
            for use_cache in (False, True):
                def run(use_cache=use_cache):
                    outs[use_cache] = generate(model, prompt, n, temperature=0.0, use_cache=use_cache)
                runs[use_cache] = best_time(run, repeats, device)
            same = torch.equal(outs[True], outs[False])
            tok = n * batch
            print(f"{n:>10} | {tok / runs[False]:>14.0f} | {tok / runs[True]:>12.0f} | "
                  f"{runs[False] / runs[True]:>7.1f}x | {same}")

if __name__ == "__main__":
    main()
