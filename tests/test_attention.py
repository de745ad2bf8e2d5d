import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mllm_scratch.attention import KVCache, MultiHeadAttention, causal_mask, reference_attention


def split(x, h):
    b, t, d = x.shape
    return x.reshape(b, t, h, d // h).transpose(1, 2)


def by_hand(mha: MultiHeadAttention, x, context=None, mask=None):
    """The module's computation written out with reference_attention."""
    src = x if context is None else context
    q, k, v = split(mha.q_proj(x), mha.num_heads), split(mha.k_proj(src), mha.num_heads), split(mha.v_proj(src), mha.num_heads)
    out = reference_attention(q, k, v, mask)
    return mha.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], mha.dim))


def test_reference_equals_sdpa_with_and_without_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    torch.testing.assert_close(reference_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(reference_attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("causal", [False, True])
def test_module_equals_hand_written(causal):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4).eval()
    x = torch.randn(3, 6, 32)
    mask = causal_mask(6) if causal else None
    torch.testing.assert_close(mha(x, causal=causal), by_hand(mha, x, mask=mask))


def test_module_equals_nn_multihead_attention_with_padding():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4).eval()
    ref = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias]))
        ref.out_proj.weight.copy_(mha.out_proj.weight)
        ref.out_proj.bias.copy_(mha.out_proj.bias)
    x = torch.randn(2, 5, 32)
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
    expected, _ = ref(x, x, x, key_padding_mask=~keep)  # PyTorch's convention: True = ignore
    torch.testing.assert_close(mha(x, key_padding_mask=keep), expected)
    expected_causal, _ = ref(x, x, x, attn_mask=~causal_mask(5))
    torch.testing.assert_close(mha(x, causal=True), expected_causal)


def test_cross_attention_reduces_to_self_attention():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2).eval()
    x = torch.randn(2, 4, 16)
    torch.testing.assert_close(mha(x, context=x), mha(x))
    cross = MultiHeadAttention(16, 2, context_dim=24).eval()
    ctx = torch.randn(2, 9, 24)
    out = cross(x, context=ctx)
    assert out.shape == (2, 4, 16)
    torch.testing.assert_close(out, by_hand(cross, x, context=ctx))


def test_future_tokens_never_change_earlier_outputs():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    x = torch.randn(1, 8, 16, requires_grad=True)
    out = mha(x, causal=True)
    out[0, 3].sum().backward()
    assert x.grad[0, 4:].abs().max() == 0  # no gradient from position 3 to any later position
    assert x.grad[0, :4].abs().max() > 0
    y = x.detach().clone()
    y[0, 5:] = torch.randn(3, 16)
    torch.testing.assert_close(mha(y, causal=True)[0, :5], out[0, :5].detach())


def test_fully_masked_rows_give_zeros_not_nan_and_no_gradient():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, context_dim=8)
    x = torch.randn(2, 3, 16, requires_grad=True)
    ctx = torch.randn(2, 4, 8, requires_grad=True)
    mask = torch.ones(2, 1, 3, 4, dtype=torch.bool)
    mask[0, :, 1] = False  # query 1 of example 0 sees nothing
    out = mha(x, ctx, attn_mask=mask)
    assert not out.isnan().any()
    torch.testing.assert_close(out[0, 1], mha.out_proj.bias)  # zero attention output, then only the bias
    out[0, 1].sum().backward()
    assert ctx.grad.abs().max() == 0
    all_padding = torch.zeros(2, 4, dtype=torch.bool)
    assert not mha(x, ctx, key_padding_mask=all_padding).isnan().any()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6))
def test_kv_cache_matches_full_causal_pass(prefix, extra):
    torch.manual_seed(prefix * 10 + extra)
    mha = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, prefix + extra, 16)
    full = mha(x, causal=True)
    cache = KVCache()
    outs = [mha(x[:, :prefix], causal=True, cache=cache)]
    for t in range(prefix, prefix + extra):  # one new token at a time, as in generation
        outs.append(mha(x[:, t : t + 1], causal=True, cache=cache))
    assert len(cache) == prefix + extra
    torch.testing.assert_close(torch.cat(outs, dim=1), full)


def test_causal_mask_alignment():
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    with pytest.raises(ValueError, match="at least as many keys as queries"):
        causal_mask(4, 2)


def test_dropout_only_in_training():
    mha = MultiHeadAttention(16, 2, dropout=0.5)
    x = torch.randn(1, 5, 16)
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x))
    mha.train()
    torch.manual_seed(0)
    a = mha(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, mha(x))


def test_clear_errors():
    with pytest.raises(ValueError, match="dim 30 is not divisible by num_heads 4"):
        MultiHeadAttention(30, 4)
    mha = MultiHeadAttention(16, 2, context_dim=8)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, tokens, 16\), got \(2, 3, 12\)"):
        mha(torch.randn(2, 3, 12))
    with pytest.raises(ValueError, match=r"context must have shape \(2, tokens, 8\), got \(2, 4, 16\)"):
        mha(torch.randn(2, 3, 16), torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="attn_mask must be boolean"):
        MultiHeadAttention(16, 2)(torch.randn(1, 3, 16), attn_mask=torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"key_padding_mask must be boolean of shape \(batch, keys\) = \(1, 3\)"):
        MultiHeadAttention(16, 2)(torch.randn(1, 3, 16), key_padding_mask=torch.ones(1, 4, dtype=torch.bool))


def test_attention_weights_are_what_forward_uses():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
    w = mha.attention_weights(x, key_padding_mask=keep, causal=True)
    assert w.shape == (2, 4, 5, 5)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 5))
    assert w[1, :, :, 3:].abs().max() == 0 and w.triu(1).abs().max() == 0
    v = mha._split_heads(mha.v_proj(x))
    by_weights = mha.out_proj((w @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(by_weights, mha(x, key_padding_mask=keep, causal=True))
    none = mha.attention_weights(x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert not none.isnan().any() and none.abs().max() == 0  # fully masked rows: zeros


def test_causal_fast_path_equals_explicit_causal_mask():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 7, 16, requires_grad=True)
    fast = mha(x, causal=True)  # no other mask: the kernel's is_causal path
    explicit = mha(x, attn_mask=causal_mask(7))  # the boolean-mask path
    torch.testing.assert_close(fast, explicit)
    g_fast, = torch.autograd.grad(fast.sum(), x)
    g_explicit, = torch.autograd.grad(explicit.sum(), x)
    torch.testing.assert_close(g_fast, g_explicit)
    keep = torch.ones(2, 7, dtype=torch.bool)  # all real: causal + padding must give the same numbers
    torch.testing.assert_close(mha(x, causal=True, key_padding_mask=keep), fast)


def test_cross_attention_cache_projects_the_context_once():
    """In cross-attention a cache keeps the context's keys/values: same output, k_proj and v_proj run once."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, context_dim=8).eval()
    x, context = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    calls = []
    mha.k_proj.register_forward_hook(lambda *_: calls.append("k"))
    mha.v_proj.register_forward_hook(lambda *_: calls.append("v"))
    cache = KVCache()
    full = mha(x, context, attn_mask=mask)
    first = mha(x[:, :3], context, attn_mask=mask[:, :, :3], cache=cache)  # fills the cache
    second = mha(x[:, 3:], context, attn_mask=mask[:, :, 3:], cache=cache)  # reuses it
    assert calls == ["k", "v", "k", "v"]  # the uncached call, then the first cached one; none for the second
    assert len(cache) == 7  # the context's length, not the queries'
    torch.testing.assert_close(torch.cat([first, second], dim=1), full)
    with pytest.raises(ValueError, match="causal applies to self-attention only"):
        mha(x, context, causal=True)
