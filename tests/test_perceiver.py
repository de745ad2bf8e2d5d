"""The Perceiver and the Perceiver Resampler: fixed output size, masks, time-embedding bounds, no symmetry."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mllm_scratch.perceiver import Perceiver, PerceiverConfig, PerceiverResampler, ResamplerConfig

SMALL = ResamplerConfig(media_dim=12, dim=16, num_latents=5, depth=2, num_heads=2, max_frames=64)


def resampler(config: ResamplerConfig = SMALL, seed: int = 0) -> PerceiverResampler:
    torch.manual_seed(seed)
    return PerceiverResampler(config).eval()


SPATIAL = ResamplerConfig(media_dim=12, dim=16, num_latents=5, depth=2, num_heads=2, max_frames=64, spatial_pos=True)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, SMALL.max_frames), st.integers(1, 9))
def test_output_shape_for_any_frame_count_and_batch_size(b, t, s):
    out = resampler()(torch.randn(b, t, s, SMALL.media_dim))
    assert out.shape == (b, SMALL.num_latents, SMALL.dim)
    assert torch.isfinite(out).all()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, SPATIAL.max_frames), st.sampled_from([1, 4, 9, 16]))
def test_spatial_output_shape_for_any_frame_count(b, t, s):
    assert resampler(SPATIAL)(torch.randn(b, t, s, SPATIAL.media_dim)).shape == (b, SPATIAL.num_latents, SPATIAL.dim)


def test_output_size_fixed_from_4_to_64_frames():
    model = resampler()
    shapes = {tuple(model(torch.randn(2, t, 3, SMALL.media_dim)).shape) for t in range(4, 65)}
    assert shapes == {(2, SMALL.num_latents, SMALL.dim)}


def test_perceiver_output_shape_for_any_input_length():
    torch.manual_seed(0)
    config = PerceiverConfig(input_dim=10, dim=16, num_latents=7, depth=1, num_heads=4)
    model = Perceiver(config).eval()
    rng = random.Random(1)
    for _ in range(30):
        b, n = rng.randint(1, 4), rng.randint(1, 300)
        assert model(torch.randn(b, n, 10)).shape == (b, 7, 16)


@pytest.mark.parametrize("seed", range(6))
def test_padded_frames_masked_equal_unpadded(seed):
    config = SPATIAL if seed % 2 else SMALL
    model = resampler(config, seed=seed)
    rng = random.Random(seed)
    lengths = [rng.randint(1, 20) for _ in range(3)]
    longest = max(lengths) + rng.randint(0, 5)
    s = rng.choice([1, 4, 9]) if config.spatial_pos else rng.randint(1, 6)
    clips = [torch.randn(n, s, config.media_dim) for n in lengths]
    padded = torch.full((3, longest, s, config.media_dim), 7.0)  # padding that would matter if it were seen
    mask = torch.zeros(3, longest, dtype=torch.bool)
    for i, clip in enumerate(clips):
        padded[i, : len(clip)] = clip
        mask[i, : len(clip)] = True
    out = model(padded, mask)
    for i, clip in enumerate(clips):
        torch.testing.assert_close(out[i], model(clip[None])[0], rtol=1e-5, atol=1e-5)


def test_perceiver_mask_equals_unpadded():
    torch.manual_seed(0)
    model = Perceiver(PerceiverConfig(input_dim=8, dim=16, num_latents=4, depth=2, num_heads=2)).eval()
    x = torch.randn(1, 11, 8)
    padded = torch.cat([x, torch.randn(1, 5, 8)], dim=1)
    mask = torch.tensor([[True] * 11 + [False] * 5])
    torch.testing.assert_close(model(padded, mask), model(x), rtol=1e-5, atol=1e-5)


def test_without_mask_padding_changes_output():
    model = resampler()
    x = torch.randn(1, 6, 3, SMALL.media_dim)
    padded = torch.cat([x, torch.zeros(1, 2, 3, SMALL.media_dim)], dim=1)
    assert not torch.allclose(model(padded), model(x), atol=1e-4)


def test_too_many_frames_is_a_clear_error():
    model = resampler()
    with pytest.raises(ValueError, match=r"65 frames.*64 \(max_frames\)"):
        model(torch.randn(1, 65, 2, SMALL.media_dim))


def test_bad_shapes_are_clear_errors():
    model = resampler()
    with pytest.raises(ValueError, match="media must have shape"):
        model(torch.randn(2, 4, SMALL.media_dim))
    with pytest.raises(ValueError, match="media must have shape"):
        model(torch.randn(2, 4, 3, SMALL.media_dim + 1))
    with pytest.raises(ValueError, match="frame_mask must be boolean"):
        model(torch.randn(2, 4, 3, SMALL.media_dim), torch.ones(2, 4))
    with pytest.raises(ValueError, match="frame_mask must be boolean"):
        model(torch.randn(2, 4, 3, SMALL.media_dim), torch.ones(2, 5, dtype=torch.bool))


@pytest.mark.parametrize("bad", [dict(dim=10, num_heads=4), dict(num_latents=0), dict(max_frames=0), dict(mlp_ratio=0.0),
                                 dict(dim=18, num_heads=2, spatial_pos=True)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        ResamplerConfig(**bad)


def test_time_embeddings_make_frame_order_matter():
    model = resampler()
    x = torch.randn(1, 5, 3, SMALL.media_dim)
    reversed_clip = x.flip(1)
    assert not torch.allclose(model(x), model(reversed_clip), atol=1e-4)
    # Without time embeddings, media is a set: the order of frames would not matter.
    with torch.no_grad():
        model.time_emb.zero_()
    torch.testing.assert_close(model(x), model(reversed_clip), rtol=1e-5, atol=1e-5)


def test_equal_latents_stay_equal_under_training():
    model = resampler()
    model.train()
    with torch.no_grad():
        model.latents.copy_(model.latents[:1].expand_as(model.latents))  # every latent the same vector
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.randn(2, SMALL.dim)
    for _ in range(3):
        out = model(torch.randn(2, 4, 3, SMALL.media_dim))
        # Whatever reads the latents treats them as a set (the LM's cross-attention does): a symmetric loss.
        loss = ((out.sum(1).tanh() - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = model(torch.randn(2, 4, 3, SMALL.media_dim))
    torch.testing.assert_close(out, out[:, :1].expand_as(out))  # all rows still identical
    torch.testing.assert_close(model.latents, model.latents[:1].expand_as(model.latents))


def test_random_latents_give_distinct_outputs():
    out = resampler()(torch.randn(2, 4, 3, SMALL.media_dim))
    assert torch.cdist(out[0], out[0]).fill_diagonal_(1.0).min() > 1e-3


def test_media_dim_equal_to_dim_uses_no_projection():
    model = PerceiverResampler(ResamplerConfig(media_dim=16, dim=16, num_latents=3, depth=1, num_heads=2))
    assert isinstance(model.proj, torch.nn.Identity)


def test_attention_maps_match_forward_and_mask():
    model = resampler()
    x = torch.randn(2, 6, 3, SMALL.media_dim)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    maps = model.attention_maps(x, mask)
    assert len(maps) == SMALL.depth
    for m in maps:
        assert m.shape == (2, SMALL.num_heads, SMALL.num_latents, 6 * 3 + SMALL.num_latents)
        torch.testing.assert_close(m.sum(-1), torch.ones(2, SMALL.num_heads, SMALL.num_latents))
        assert m[1, :, :, 4 * 3 : 6 * 3].abs().max() == 0  # padded frames get no attention


def test_gradients_reach_every_parameter():
    model = resampler()
    model.train()
    model(torch.randn(2, 3, 4, SMALL.media_dim)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_spatial_pos_makes_patch_places_matter():
    # Swapping two patches in every frame: a set without place codes cannot tell; with spatial_pos it can.
    x = torch.randn(1, 3, 4, SMALL.media_dim)
    swapped = x[:, :, [1, 0, 2, 3]]
    torch.testing.assert_close(resampler(SMALL)(x), resampler(SMALL)(swapped), rtol=1e-5, atol=1e-5)
    model = resampler(SPATIAL)
    assert not torch.allclose(model(x), model(swapped), atol=1e-4)


def test_spatial_codes_are_the_vit_sincos_grid():
    from mllm_scratch.vit import sincos_2d_position_embedding

    model = resampler(SPATIAL)
    torch.testing.assert_close(model.spatial_codes(9), sincos_2d_position_embedding(3, 3, SPATIAL.dim))
    x = torch.randn(2, 3, 9, SPATIAL.media_dim)
    expected = (model.proj(x) + model.time_emb[:3] + model.spatial_codes(9)).reshape(2, 27, SPATIAL.dim)
    torch.testing.assert_close(model.media_tokens(x), expected)


def test_spatial_pos_needs_a_square_grid():
    with pytest.raises(ValueError, match="square grid of patches per frame, got 6 tokens"):
        resampler(SPATIAL)(torch.randn(1, 2, 6, SPATIAL.media_dim))
