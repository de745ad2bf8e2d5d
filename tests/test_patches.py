import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mllm_scratch.patches import PatchEmbedding, conv_to_linear, linear_to_conv, num_patches, patchify, unpatchify


@st.composite
def image_and_patch(draw):
    p = draw(st.integers(1, 8))
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    c = draw(st.integers(1, 4))
    b = draw(st.integers(1, 3))
    return torch.randn(b, c, rows * p, cols * p), p


@settings(max_examples=60, deadline=None)
@given(image_and_patch(), st.sampled_from(["chw", "hwc"]))
def test_patchify_round_trip_for_all_valid_sizes(case, order):
    images, p = case
    b, c, h, w = images.shape
    patches = patchify(images, p, order=order)
    assert patches.shape == (b, (h // p) * (w // p), c * p * p)
    assert torch.equal(unpatchify(patches, p, (h, w), channels=c, order=order), images)


def test_patch_contents_and_grid_order():
    # A 1-channel 4x4 image of its own pixel indices: patch k must hold the k-th block, row by row.
    img = torch.arange(16.0).reshape(1, 1, 4, 4)
    patches = patchify(img, 2)
    assert patches[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_chw_and_hwc_orders_differ_for_colour():
    img = torch.randn(1, 3, 4, 4)
    a, b = patchify(img, 2, "chw"), patchify(img, 2, "hwc")
    assert not torch.equal(a, b)
    # same numbers, different order inside each patch
    assert torch.equal(a.sort(-1).values, b.sort(-1).values)


@pytest.mark.parametrize("size,patch", [(32, 4), (32, 8), (64, 16), ((32, 48), 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_conv_after_weight_copy(size, patch, bias):
    torch.manual_seed(0)
    h, w = (size, size) if isinstance(size, int) else size
    images = torch.randn(2, 3, h, w)
    conv = nn.Conv2d(3, 16, patch, stride=patch, bias=bias)
    linear = conv_to_linear(conv)
    from_conv = conv(images).flatten(2).transpose(1, 2)
    from_linear = linear(patchify(images, patch))
    torch.testing.assert_close(from_linear, from_conv, rtol=1e-5, atol=1e-5)
    back = linear_to_conv(linear, 3, patch)
    assert torch.equal(back.weight, conv.weight)
    assert from_linear.shape == (2, num_patches((h, w), patch), 16)


def test_wrong_flattening_order_breaks_equivalence():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 8, 8)
    conv = nn.Conv2d(3, 8, 4, stride=4)
    linear = conv_to_linear(conv)
    wrong = linear(patchify(images, 4, order="hwc"))
    right = conv(images).flatten(2).transpose(1, 2)
    assert not torch.allclose(wrong, right, atol=1e-3)


@pytest.mark.parametrize("mode", ["conv", "linear"])
def test_patch_embedding_converts_without_changing_outputs(mode):
    torch.manual_seed(1)
    emb = PatchEmbedding(patch_size=4, in_channels=3, dim=32, mode=mode)
    other = emb.converted("linear" if mode == "conv" else "conv")
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(other(x), emb(x), rtol=1e-5, atol=1e-5)
    assert emb(x).shape == (3, 16, 32)
    assert sum(p.numel() for p in emb.parameters()) == sum(p.numel() for p in other.parameters()) == 3 * 16 * 32 + 32


def test_clear_errors():
    emb = PatchEmbedding(patch_size=4, in_channels=3, dim=8)
    with pytest.raises(ValueError, match="image height 30 is not divisible by patch_size 4"):
        emb(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="image width 30 is not divisible by patch_size 4"):
        emb(torch.randn(1, 3, 32, 30))
    with pytest.raises(ValueError, match="images have 1 channels, expected 3"):
        emb(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="got 3 dims"):
        emb(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="mode must be 'conv' or 'linear'"):
        PatchEmbedding(mode="dense")
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        patchify(torch.randn(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="expected \\(batch, 4, 48\\)"):
        unpatchify(torch.randn(1, 5, 48), 4, 8)
    with pytest.raises(ValueError, match="only a patch convolution"):
        conv_to_linear(nn.Conv2d(3, 8, 3, stride=1))
    with pytest.raises(ValueError, match="in_features is 10"):
        linear_to_conv(nn.Linear(10, 4), 3, 2)
