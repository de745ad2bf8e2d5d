"""RoPE, 2-D RoPE, M-RoPE and packing: the invariants chapter 11 relies on."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mllm_scratch.attention import MultiHeadAttention
from mllm_scratch.gpt import GPT, GPTConfig, generate
from mllm_scratch.packing import pack_patches
from mllm_scratch.rope import (
    apply_rope,
    default_mrope_sections,
    mrope_angles,
    mrope_positions,
    rope_2d_angles,
    rope_angles,
    rotate_half,
)
from mllm_scratch.vit import ViTClassifier, ViTConfig, VisionTransformer, config_dict, forward_interpolated


def rope_by_pairs(x, positions, base=10_000.0):
    """RoFormer's RoPE written out: neighbouring features (2i, 2i + 1) are one complex number, turned by position * w_i."""
    d = x.shape[-1]
    w = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d / 2,)
    turn = torch.polar(torch.ones(len(positions), d // 2, dtype=torch.float64), positions[:, None].double() * w)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * turn).reshape(x.shape).to(x.dtype)


def halves_to_pairs(d):
    """The permutation taking features ordered as halves (i, i + d/2) to neighbouring pairs (2i, 2i + 1)."""
    return torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).flatten()


def test_apply_rope_equals_the_complex_rotation_of_neighbouring_pairs():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 16)
    pos = torch.arange(7)
    perm = halves_to_pairs(16)
    ours = apply_rope(x, rope_angles(pos, 16))[..., perm]
    torch.testing.assert_close(ours, rope_by_pairs(x[..., perm], pos), atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 60), n=st.integers(0, 60), shift=st.integers(-30, 30))
def test_rope_scores_depend_only_on_the_offset(m, n, shift):
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    def score(a, b):
        qa = apply_rope(q, rope_angles(torch.tensor([a]), 32))
        kb = apply_rope(k, rope_angles(torch.tensor([b]), 32))
        return float((qa * kb).sum())
    m2, n2 = m + 31, n + 31  # keep the shifted positions >= 0
    assert math.isclose(score(m2, n2), score(m2 + shift, n2 + shift), rel_tol=1e-4, abs_tol=1e-4)


def test_rope_keeps_lengths_and_rotate_half_is_a_quarter_turn():
    x = torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(apply_rope(x, rope_angles(torch.arange(5), 8)).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotate_half(rotate_half(x)), -x)


def test_2d_rope_turns_the_first_half_with_the_row_and_the_second_with_the_column():
    rows, cols = torch.tensor([0, 3, 0]), torch.tensor([0, 0, 5])
    a = rope_2d_angles(rows, cols, 16)  # (3, 8)
    assert torch.all(a[0] == 0)
    assert torch.all(a[1, 4:] == 0) and torch.all(a[1, :4] > 0)
    assert torch.all(a[2, :4] == 0) and torch.all(a[2, 4:] > 0)
    torch.testing.assert_close(a[1, :4], rope_angles(torch.tensor([3]), 8)[0])


def test_mrope_on_text_alone_is_1d_rope():
    pos = torch.arange(11)
    for d in (8, 16, 64):
        torch.testing.assert_close(mrope_angles(pos.expand(3, -1), d), rope_angles(pos, d))
    assert default_mrope_sections(128) == (16, 24, 24)  # Qwen2-VL's split of 64 pairs


def test_interleaved_mrope_deals_the_pairs_in_turn_and_is_1d_rope_on_text():
    pos = torch.arange(5)
    torch.testing.assert_close(mrope_angles(pos.expand(3, -1), 16, interleaved=True), rope_angles(pos, 16))
    only_width = torch.stack([torch.zeros(5), torch.zeros(5), pos.float()])  # (3, T): time and height fixed at 0
    a = mrope_angles(only_width, 16, interleaved=True)  # (T, 8)
    assert (a[1:, [2, 5]] != 0).all() and (a[:, [0, 1, 3, 4, 6, 7]] == 0).all()  # pairs 2 and 5 are width's
    contiguous = mrope_angles(only_width, 16)  # sections (2, 3, 3): width turns the last, slowest pairs
    assert torch.all(contiguous[:, :5] == 0) and contiguous[1, 5:].gt(0).all()
    with pytest.raises(ValueError, match="mrope_interleaved needs position 'mrope'"):
        GPTConfig(position="rope", mrope_interleaved=True)


def test_mrope_gpt_on_text_equals_the_rope_gpt():
    torch.manual_seed(0)
    rope = GPT(GPTConfig(position="rope", dim=32, depth=2)).eval()
    mrope = GPT(GPTConfig(position="mrope", dim=32, depth=2)).eval()
    mrope.load_state_dict(rope.state_dict())
    ids = torch.randint(0, 512, (2, 9))
    torch.testing.assert_close(mrope(ids), rope(ids))
    torch.testing.assert_close(mrope(ids, positions=mrope_positions([9])), rope(ids))


def test_mrope_positions_follow_qwen2_vl():
    pos = mrope_positions([2, (2, 3), 1, (2, 1, 2)])
    assert pos.shape == (3, 2 + 6 + 1 + 4)
    assert pos[:, :2].tolist() == [[0, 1]] * 3  # text: equal indices
    assert pos[:, 2:8].tolist() == [[2] * 6, [2, 2, 2, 3, 3, 3], [2, 3, 4, 2, 3, 4]]  # image: start + (0, row, col)
    assert pos[:, 8].tolist() == [5, 5, 5]  # next text: one past the largest index so far (2 + 3)
    assert pos[0, 9:].tolist() == [6, 6, 7, 7]  # video: time advances by frame


@pytest.mark.parametrize("position", ["rope", "mrope"])
def test_rope_gpt_cached_generation_equals_uncached(position):
    torch.manual_seed(0)
    model = GPT(GPTConfig(position=position, dim=32, depth=2, context_length=24))
    ids = torch.randint(0, 512, (2, 5))
    fast = generate(model, ids, 30, temperature=0, use_cache=True)  # slides past context_length
    slow = generate(model, ids, 30, temperature=0, use_cache=False)
    assert torch.equal(fast, slow)


def test_rope_gpt_has_no_position_table_and_a_learned_gpt_is_unchanged():
    assert not hasattr(GPT(GPTConfig(position="rope")), "pos_emb")
    assert "position" not in config_dict(GPTConfig())  # the book's GPT stores what it always stored
    assert config_dict(GPTConfig(position="rope"))["position"] == "rope"


def test_rope_errors_name_the_value():
    with pytest.raises(ValueError, match="head_dim must be a positive multiple of 2, got 7"):
        rope_angles(torch.arange(3), 7)
    with pytest.raises(ValueError, match="head_dim must be even, got 5"):
        apply_rope(torch.randn(1, 1, 3, 5), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"angles must have shape \(4, 4\)"):
        apply_rope(torch.randn(1, 1, 4, 8), torch.zeros(3, 4))  # a grid of 3 positions for 4 tokens
    with pytest.raises(ValueError, match="head_dim must be a positive multiple of 4"):
        rope_2d_angles(torch.arange(2), torch.arange(2), 6)
    with pytest.raises(ValueError, match="add up to head_dim / 2 = 4"):
        mrope_angles(torch.zeros(3, 2, dtype=torch.long), 8, sections=(1, 1, 1))
    with pytest.raises(ValueError, match="head_dim 33"):
        GPTConfig(position="rope", dim=66, num_heads=2)
    with pytest.raises(ValueError, match="head_dim 6 .* must be divisible by 4"):
        ViTConfig(dim=24, num_heads=4, pos_embedding="rope2d")
    with pytest.raises(ValueError, match=r"M-RoPE positions must have shape \(3, T\)"):
        GPT(GPTConfig(position="mrope"))(torch.zeros(1, 4, dtype=torch.long), positions=torch.arange(4))
    with pytest.raises(ValueError, match="learned position table"):
        GPT(GPTConfig())(torch.zeros(1, 4, dtype=torch.long), positions=torch.arange(4))
    with pytest.raises(ValueError, match="part must be an int"):
        mrope_positions([(2, 0)])
    with pytest.raises(ValueError, match="self-attention only"):
        MultiHeadAttention(16, 2)(torch.randn(1, 3, 16), torch.randn(1, 4, 16), rope=torch.zeros(3, 4))


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_packed_images_equal_each_image_alone(pool):
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(dim=32, num_heads=2, depth=2, pos_embedding="rope2d", pool=pool)).eval()
    images = [torch.rand(3, h, w) for h, w in [(24, 24), (32, 64), (40, 32), (8, 4)]]
    for image, out in zip(images, vit.forward_packed(images)):
        alone = vit(image[None])
        torch.testing.assert_close(out.patches, alone.patches, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.pooled, alone.pooled, atol=1e-5, rtol=1e-5)


def test_the_packing_mask_is_block_diagonal():
    plan = pack_patches([torch.zeros(3, 8, 4), torch.zeros(3, 4, 4)], patch_size=4, num_prefix=1)
    assert plan.spans == ((0, 3), (3, 5))
    assert plan.rows.tolist() == [0, 0, 1, 0, 0] and plan.cols.tolist() == [0, 0, 0, 0, 0]
    assert plan.is_prefix.tolist() == [True, False, False, True, False]
    mask = plan.attention_mask()
    assert mask[:3, :3].all() and mask[3:, 3:].all() and not mask[:3, 3:].any() and not mask[3:, :3].any()


def test_packing_errors():
    vit = VisionTransformer(ViTConfig(dim=32, num_heads=2, depth=1, pos_embedding="rope2d"))
    with pytest.raises(ValueError, match="height 30 and width 32 must be positive multiples of patch_size 4"):
        vit.forward_packed([torch.rand(3, 30, 32)])
    with pytest.raises(ValueError, match=r"shape \(channels, height, width\)"):
        vit.forward_packed([torch.rand(1, 3, 32, 32)])
    with pytest.raises(ValueError, match="packing needs images of any size"):
        VisionTransformer(ViTConfig(dim=32, num_heads=2, depth=1)).forward_packed([torch.rand(3, 32, 32)])
    with pytest.raises(ValueError, match="height 30 and width 32"):
        vit(torch.rand(1, 3, 30, 32))


def test_a_rope2d_vit_takes_any_size_and_a_learned_one_only_its_own():
    vit = VisionTransformer(ViTConfig(dim=32, num_heads=2, depth=1, pos_embedding="rope2d"))
    assert vit(torch.rand(2, 3, 24, 48)).patches.shape == (2, 6 * 12, 32)
    fixed = VisionTransformer(ViTConfig(dim=32, num_heads=2, depth=1))
    with pytest.raises(ValueError, match=r"must have shape \(batch, 3, 32, 32\)"):
        fixed(torch.rand(1, 3, 24, 48))
    assert forward_interpolated(fixed, torch.rand(1, 3, 24, 48)).patches.shape == (1, 72, 32)


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_forward_interpolated_at_the_training_size_is_the_model(pos):
    torch.manual_seed(0)
    model = ViTClassifier(ViTConfig(dim=32, num_heads=2, depth=1, pos_embedding=pos, num_classes=3)).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(forward_interpolated(model.encoder, x).pooled, model.encoder(x).pooled)


@pytest.mark.parametrize("position", ["rope", "mrope"])
def test_a_rope_gpt_step_reads_no_device_value(position):
    # on the meta device any read of a value raises: the rotary path adds no host-device sync
    model = GPT(GPTConfig(position=position, dim=32, depth=1)).to("meta")
    ids = torch.zeros(2, 6, dtype=torch.long, device="meta")
    model(ids).sum().backward()
    vit = VisionTransformer(ViTConfig(dim=32, num_heads=2, depth=1, pos_embedding="rope2d")).to("meta")
    vit(torch.zeros(1, 3, 24, 40, device="meta")).pooled.sum().backward()
