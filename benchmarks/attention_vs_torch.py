"""The package's attention and ViT block against PyTorch's, measured side by side in one run.

    python benchmarks/attention_vs_torch.py [--quick] [--threads N]

Compares, at the same sizes and with the same weights:
- `mllm_scratch.attention.MultiHeadAttention` vs `nn.MultiheadAttention` vs a naive version
  built on `reference_attention` (which stores the full score matrix), without a mask and causal;
- `mllm_scratch.vit.TransformerBlock` vs `nn.TransformerEncoderLayer(norm_first=True, batch_first=True)`.

"forward" is inference (eval mode, no grad: PyTorch's fast paths are allowed); "fwd+bwd" is one
training step's forward and backward. Each number is the median of interleaved repeats; the
ratio is time / package time, so a ratio above 1 means the package is faster.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from mllm_scratch.attention import MultiHeadAttention, causal_mask, reference_attention
from mllm_scratch.costs import interleaved_times
from mllm_scratch.vit import TransformerBlock


class NaiveAttention(nn.Module):
    """The package module's weights, computed with the written-out reference_attention."""

    def __init__(self, mha: MultiHeadAttention):
        super().__init__()
        self.mha = mha

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        m = self.mha
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, m.num_heads, m.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(m.q_proj(x)), split(m.k_proj(x)), split(m.v_proj(x))
        out = reference_attention(q, k, v, causal_mask(t, device=x.device) if causal else None)
        return m.out_proj(out.transpose(1, 2).reshape(b, t, d))


def torch_mha_like(mha: MultiHeadAttention) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(mha.dim, mha.num_heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias]))
        ref.out_proj.load_state_dict(mha.out_proj.state_dict())
    return ref


def torch_layer_like(block: TransformerBlock) -> nn.TransformerEncoderLayer:
    d = block.norm1.normalized_shape[0]
    ref = nn.TransformerEncoderLayer(d, block.attn.num_heads, block.mlp.fc1.out_features, dropout=0.0,
                                     activation="gelu", batch_first=True, norm_first=True)
    with torch.no_grad():
        ref.self_attn.load_state_dict(torch_mha_like(block.attn).state_dict())
        ref.linear1.load_state_dict(block.mlp.fc1.state_dict())
        ref.linear2.load_state_dict(block.mlp.fc2.state_dict())
        ref.norm1.load_state_dict(block.norm1.state_dict())
        ref.norm2.load_state_dict(block.norm2.state_dict())
    return ref


def measure(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call; implementations interleaved so drift affects all alike (one warm-up call each)."""
    return interleaved_times(fns, repeats, warmup=1)


def forward_fn(model: nn.Module, x: torch.Tensor, **kw) -> Callable[[], object]:
    def run():
        model.eval()
        with torch.no_grad():
            return model(x, **kw)
    return run


def train_fn(model: nn.Module, x: torch.Tensor, **kw) -> Callable[[], object]:
    def run():
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(x, **kw)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (about a minute)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the notebooks run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        sizes, repeats = [(8, 65, 48, 4), (4, 256, 128, 4), (1, 1024, 128, 8)], 15
    else:
        sizes, repeats = [(8, 65, 48, 4), (32, 65, 64, 4), (4, 256, 128, 4), (4, 576, 256, 8), (1, 1024, 128, 8), (1, 2048, 256, 8)], 30

    rows = []
    for batch, t, dim, heads in sizes:
        x = torch.randn(batch, t, dim, requires_grad=True)
        mha = MultiHeadAttention(dim, heads)
        ref, naive = torch_mha_like(mha), NaiveAttention(mha)
        mask = ~causal_mask(t)  # PyTorch's convention: True = may not attend
        size = f"b={batch} T={t} d={dim} h={heads}"
        for causal in (False, True):
            torch_kw = dict(need_weights=False, attn_mask=mask if causal else None, is_causal=causal)
            cases = {
                "package": (mha, dict(causal=causal), lambda m, y, kw: m(y, **kw)),
                "nn.MultiheadAttention": (ref, torch_kw, lambda m, y, kw: m(y, y, y, **kw)),
                "naive (reference_attention)": (naive, dict(causal=causal), lambda m, y, kw: m(y, **kw)),
            }
            for mode, make in (("forward", forward_fn), ("fwd+bwd", train_fn)):
                fns = {}
                for name, (module, kw, call) in cases.items():
                    wrapped = _Call(module, call, kw)
                    fns[name] = make(wrapped, x)
                rows.append((f"attention{' causal' if causal else ''}", size, mode, measure(fns, repeats)))
        block = TransformerBlock(dim, heads)
        layer = torch_layer_like(block)
        for mode, make in (("forward", forward_fn), ("fwd+bwd", train_fn)):
            fns = {"package": make(block, x), "nn.TransformerEncoderLayer": make(layer, x)}
            rows.append(("ViT block", size, mode, measure(fns, repeats)))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {repeats} interleaved runs")
    print("ratio = other / package (above 1: the package is faster)\n")
    head = f"{'what':<17} {'size':<24} {'mode':<8} {'package ms':>10}  {'other':<28} {'ms':>8} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for what, size, mode, times in rows:
        pkg = times["package"]
        for i, (name, sec) in enumerate((n, s) for n, s in times.items() if n != "package"):
            first = f"{what:<17} {size:<24} {mode:<8} {1000 * pkg:>10.3f}" if i == 0 else " " * 62
            print(f"{first}  {name:<28} {1000 * sec:>8.3f} {sec / pkg:>6.2f}")


class _Call(nn.Module):
    """Adapts the three attention call signatures to model(x)."""

    def __init__(self, module: nn.Module, call: Callable, kw: dict):
        super().__init__()
        self.module, self.call, self.kw = module, call, kw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(self.module, x, self.kw)


if __name__ == "__main__":
    main()
