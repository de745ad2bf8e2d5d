"""What a VLM costs per example: sequence length, FLOPs counted by hand, activation memory and throughput.

Chapter 08 compares the unified decoder (A), the cross-attention decoder (B) and the hybrid (H)
as the image grows. Three measurements, each honest about what it counts:

- `method_flops`: forward FLOPs per example, component by component, counted by hand the way
  `torch.utils.flop_counter.FlopCounterMode` counts them (2 per multiply-add of every matrix
  product: linear layers, the patch convolution, both attention products, the LM head; norms,
  activations and softmax are left out). `counted_flops` runs FlopCounterMode for the check.
  Attention counts every (query, key) pair, as the kernel computes them (the causal half
  is not skipped in the count).
- `activation_bytes`: the bytes of every tensor autograd saves for the backward pass of one
  training step (found with `torch.autograd.graph.saved_tensors_hooks`, each storage counted
  once, parameters left out). That is the memory that grows with the sequence; the weights,
  gradients and optimiser state are the same for every image size. `peak_bytes` is
  PyTorch's own CPU allocator peak (the profiler's memory events) over a whole step.
- `throughput`: examples per second for a training step and for inference, timed side by
  side (interleaved) so machine noise hits all models alike; only ratios are meaningful.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mllm_scratch.gpt import GPTConfig
from mllm_scratch.vit import ViTConfig

# ----------------------------------------------------------------------------------
# FLOPs by hand


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """A Linear (d_in -> d_out) applied to `tokens` vectors: one multiply-add per weight per token, 2 FLOPs each."""
    return 2 * tokens * d_in * d_out


def attention_flops(queries: int, keys: int, dim: int) -> int:
    """Scores q k^T and the weighted sum of values: two (queries x keys x dim) products."""
    return 2 * 2 * queries * keys * dim


def block_flops(tokens: int, dim: int, hidden: int) -> int:
    """One pre-norm Transformer block (self-attention + MLP) over `tokens` tokens."""
    projections = 4 * linear_flops(tokens, dim, dim)  # q, k, v, out
    mlp = linear_flops(tokens, dim, hidden) + linear_flops(tokens, hidden, dim)
    return projections + attention_flops(tokens, tokens, dim) + mlp


def xattn_block_flops(text: int, media: int, dim: int, hidden: int) -> int:
    """One gated cross-attention block: text queries, media keys/values, then the gated MLP on the text."""
    projections = 2 * linear_flops(text, dim, dim) + 2 * linear_flops(media, dim, dim)  # q, out on text; k, v on media
    mlp = linear_flops(text, dim, hidden) + linear_flops(text, hidden, dim)
    return projections + attention_flops(text, media, dim) + mlp


def tower_flops(vision: ViTConfig) -> int:
    """The ViT over one image: patch projection, then depth blocks over [CLS] + patches."""
    n = vision.num_patches
    tokens = n + (1 if vision.pool == "cls" else 0)
    patch = linear_flops(n, vision.in_channels * vision.patch_size**2, vision.dim)
    return patch + vision.depth * block_flops(tokens, vision.dim, int(vision.dim * vision.mlp_ratio))


def packing_costs(sizes: Sequence[tuple[int, int]], vision: ViTConfig) -> dict[str, dict[str, int]]:
    """Tokens and forward FLOPs of the ViT over images of (height, width) `sizes`, three ways (chapter 11).

    - "padded": every image's sequence padded to the longest, as a rectangular batch needs;
    - "packed, dense mask": one sequence of all tokens with a block-diagonal mask, computed as
      a full (total x total) attention (what `forward_packed` does with a dense mask);
    - "packed, per image": the same sequence, with attention computed only inside each image
      (what a variable-length kernel such as FlashAttention's varlen mode does).
    Tokens count [CLS] when pool="cls".
    """
    if not sizes:
        raise ValueError("packing_costs needs at least one image size, got none")
    prefix = 1 if vision.pool == "cls" else 0
    p, dim, hidden = vision.patch_size, vision.dim, int(vision.dim * vision.mlp_ratio)
    for h, w in sizes:
        if h <= 0 or w <= 0 or h % p or w % p:
            raise ValueError(f"image size ({h}, {w}) must be positive multiples of patch_size {p}")
    tokens = [prefix + (h // p) * (w // p) for h, w in sizes]
    patch_in = vision.in_channels * p * p

    def tower(n_images: int, n_tokens: int) -> int:
        # n_images' patches projected, then depth blocks over one sequence of n_tokens (attention over all pairs)
        patch = linear_flops(n_tokens - prefix * n_images, patch_in, dim)
        return patch + vision.depth * block_flops(n_tokens, dim, hidden)

    longest, total = max(tokens), sum(tokens)
    return {
        "padded": {"tokens": len(sizes) * longest, "flops": len(sizes) * tower(1, longest)},
        "packed, dense mask": {"tokens": total, "flops": tower(len(sizes), total)},
        "packed, per image": {"tokens": total, "flops": sum(tower(1, t) for t in tokens)},
    }


@dataclass(frozen=True)
class Shapes:
    """The parts' shapes for one cost question: tower, LM, cross-attention placement, thumbnail."""

    vision: ViTConfig
    lm: GPTConfig
    every: int = 1  # cross-attention after every `every`-th LM block
    thumbnail_grid: int = 4  # the hybrid's sequence holds thumbnail_grid ** 2 image tokens
    xattn_mlp_ratio: float = 4.0

    @property
    def image_tokens(self) -> int:
        return self.vision.num_patches

    def sequence_length(self, method: str, text_tokens: int) -> int:
        """Tokens the LM's self-attention runs over: image slots + text."""
        slots = {"unified": self.image_tokens, "cross": 1, "hybrid": self.thumbnail_grid**2}
        if method not in slots:
            raise ValueError(f"method must be one of {tuple(slots)}, got {method!r}")
        return slots[method] + text_tokens


def method_flops(method: str, shapes: Shapes, text_tokens: int) -> dict[str, int]:
    """Forward FLOPs of one example by component ('tower', 'connector', 'lm', 'xattn', 'head') and 'total'."""
    v, lm = shapes.vision, shapes.lm
    n, d_img, d = shapes.image_tokens, v.dim, lm.dim
    t = shapes.sequence_length(method, text_tokens)
    hidden = int(d * lm.mlp_ratio)
    out = {"tower": tower_flops(v), "connector": 0, "lm": lm.depth * block_flops(t, d, hidden), "xattn": 0,
           "head": linear_flops(t, d, lm.vocab_size)}
    mlp_projector = lambda tokens: linear_flops(tokens, d_img, d) + linear_flops(tokens, d, d)  # noqa: E731
    if method in ("cross", "hybrid"):
        layers = len([i for i in range(lm.depth) if (i + 1) % shapes.every == 0])
        out["connector"] += linear_flops(n, d_img, d)  # the media projection (Linear + LayerNorm)
        out["xattn"] = layers * xattn_block_flops(t, n, d, int(d * shapes.xattn_mlp_ratio))
    if method == "unified":
        out["connector"] += mlp_projector(n)
    if method == "hybrid":
        out["connector"] += mlp_projector(shapes.thumbnail_grid**2)  # pooling itself is not a matrix product
    out["total"] = sum(out.values())
    return out


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs that `torch.utils.flop_counter.FlopCounterMode` counts while `fn()` runs.

    Attention runs on PyTorch's math backend here: the counter has no formula for the CPU's
    fused attention kernel (it would count 0 for it), while the math backend is plain matrix
    products that it counts. The result is the same computation.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------
# Memory


def activation_bytes(step: Callable[[], torch.Tensor], model: nn.Module) -> int:
    """Bytes autograd saves for backward while `step()` builds its loss (each storage once, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 (what C++ code writes to) to the null device for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of PyTorch's CPU allocations during `fn()`, above what was allocated before it, from the profiler's memory events.

    Every allocation and free is attributed to the operator that made it; replaying them in
    time order gives the running total, whose maximum is the peak (to within one operator's
    own temporaries).
    """
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler's C++ side logs its start and stop there; fn's own messages still show
        prof.__enter__()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    level = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        level += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage  # frees outside an op: [memory]
        peak = max(peak, level)
    return peak


# ----------------------------------------------------------------------------------
# Throughput


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, the functions run in turn so that drift hits them all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def ratios(values: dict[str, float], baseline: str) -> dict[str, float]:
    """Each value divided by the baseline's."""
    return {k: v / values[baseline] for k, v in values.items()}


def growth(values: Sequence[float]) -> float:
    """How much a cost grew from the first to the last setting (last / first)."""
    return values[-1] / values[0]


# ----------------------------------------------------------------------------------
# The three methods at any image size, untrained (cost does not depend on the weights)

TEXT_TOKENS = 16  # a question, its answer and <|endoftext|>: about what ShapeWorld's questions take


def cost_shapes(image_size: int, *, patch_size: int = 4, text_tokens: int = TEXT_TOKENS, every: int = 1,
                thumbnail_grid: int = 4) -> Shapes:
    """Chapter 05's tower shape and chapter 04's LM shape at `image_size`; the LM's context fits method A's prompt and answer."""
    vision = ViTConfig(image_size=image_size, patch_size=patch_size, dim=48, depth=3, num_heads=4, pool="cls")
    context = vision.num_patches + 2 * text_tokens  # room to generate an answer after the prompt
    lm = GPTConfig(context_length=context)  # context only sizes the position table: no FLOPs
    return Shapes(vision=vision, lm=lm, every=every, thumbnail_grid=thumbnail_grid)


def cost_models(shapes: Shapes, *, image_id: int = 502, seed: int = 0) -> dict[str, nn.Module]:
    """Untrained A, B and H of these shapes (each its own tower and LM), trainable as in stage 2 of `MethodsRecipe`."""
    from mllm_scratch.gpt import GPT
    from mllm_scratch.hybrid import METHODS, MethodsRecipe, make_method, trained_parts
    from mllm_scratch.vit import VisionTransformer

    models = {}
    recipe = MethodsRecipe()
    for method in METHODS:
        torch.manual_seed(seed)
        tower, lm = VisionTransformer(shapes.vision), GPT(shapes.lm)
        model = make_method(method, tower, lm, image_id=image_id, every=shapes.every,
                            thumbnail_grid=shapes.thumbnail_grid, seed=seed)
        parts = trained_parts(method, 2, recipe)
        model.requires_grad_(False)
        for name in ("projector", "xattn"):
            if hasattr(model, name):
                getattr(model, name).requires_grad_(parts["new"])
        model.encoder.requires_grad_(parts["encoder"])
        model.lm.requires_grad_(parts["lm"])
        models[method] = model
    return models


def cost_batch(method: str, shapes: Shapes, batch_size: int, *, text_tokens: int = TEXT_TOKENS, image_id: int = 502,
               seed: int = 0):
    """A `VLMBatch` of random images and a fixed random text of `text_tokens` ids after the method's image slots."""
    from mllm_scratch.vlm import IGNORE_INDEX, VLMBatch

    g = torch.Generator().manual_seed(seed)
    slots = shapes.sequence_length(method, 0)
    text = torch.randint(0, 500, (batch_size, text_tokens), generator=g)  # ordinary tokens (specials are 500+)
    ids = torch.cat([torch.full((batch_size, slots), image_id), text], dim=1)  # (B, slots + text)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -3:] = ids[:, -3:]  # the answer's tokens are scored
    v = shapes.vision
    images = torch.rand(batch_size, v.in_channels, v.image_size, v.image_size, generator=g)
    return VLMBatch(images, ids, labels)


def train_step_fn(model: nn.Module, batch, lr: float = 1e-4) -> Callable[[], None]:
    """One training step (forward, backward, AdamW) of `model` on `batch`, as a function to time."""
    from mllm_scratch.hybrid import method_loss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        method_loss(model, batch).backward()
        optimizer.step()

    return step


def inference_fn(model: nn.Module, batch) -> Callable[[], None]:
    """One no-grad forward over the whole prompt (the prefill that dominates a short answer), as a function to time."""

    def run() -> None:
        model.eval()
        with torch.no_grad():
            model(batch.ids, batch.images)

    return run


def loss_fn(model: nn.Module, batch) -> Callable[[], torch.Tensor]:
    """The training loss of `model` on `batch`, as a function (for `activation_bytes`)."""
    from mllm_scratch.hybrid import method_loss

    def run() -> torch.Tensor:
        model.train()
        return method_loss(model, batch)

    return run


__all__ = [
    "Shapes",
    "TEXT_TOKENS",
    "cost_batch",
    "cost_models",
    "cost_shapes",
    "inference_fn",
    "loss_fn",
    "train_step_fn",
    "activation_bytes",
    "attention_flops",
    "block_flops",
    "counted_flops",
    "growth",
    "interleaved_times",
    "linear_flops",
    "method_flops",
    "peak_bytes",
    "ratios",
    "tower_flops",
    "xattn_block_flops",
]
