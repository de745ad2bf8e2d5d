import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from mllm_scratch.attention import KVCache, causal_mask
from mllm_scratch.train import TrainConfig, batches, train
from mllm_scratch.vit import (
    ConvNetClassifier,
    TransformerBlock,
    ViTClassifier,
    ViTConfig,
    VisionTransformer,
    interpolate_pos_embed,
    load_vit,
    resize_vit,
    save_vit,
    sincos_1d_position_embedding,
    sincos_2d_position_embedding,
)


@pytest.mark.parametrize("image_size,patch_size", [(32, 4), (32, 8), (48, 16), (28, 7)])
@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_output_shapes(image_size, patch_size, pool, pos):
    cfg = ViTConfig(image_size=image_size, patch_size=patch_size, dim=32, depth=2, num_heads=4, pool=pool,
                    pos_embedding=pos, num_classes=7)
    n = (image_size // patch_size) ** 2
    vit = VisionTransformer(cfg).eval()
    out = vit(torch.rand(3, 3, image_size, image_size))
    assert out.patches.shape == (3, n, 32) and out.pooled.shape == (3, 32)
    assert cfg.num_patches == n
    maps = vit.attention_maps(torch.rand(3, 3, image_size, image_size))
    t = n + (pool == "cls")
    assert len(maps) == 2 and maps[0].shape == (3, 4, t, t)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(3, 4, t))
    if pool == "mean":
        torch.testing.assert_close(out.pooled, out.patches.mean(1))
    assert ViTClassifier(cfg)(torch.rand(2, 3, image_size, image_size)).shape == (2, 7)


def test_sincos_properties():
    pe = sincos_2d_position_embedding(4, 6, 32)
    assert pe.shape == (24, 32)
    # each of the dim/2 (sin, cos) pairs has unit norm
    torch.testing.assert_close(pe.norm(dim=1), torch.full((24,), 4.0))
    assert len({tuple(r) for r in pe.tolist()}) == 24  # every position distinct
    grid = pe.reshape(4, 6, 32)
    torch.testing.assert_close(grid[:, 0, :16], grid[:, 5, :16])  # first half: the row only
    torch.testing.assert_close(grid[0, :, 16:], grid[3, :, 16:])  # second half: the column only
    torch.testing.assert_close(pe[0], torch.tensor([0.0] * 8 + [1.0] * 8 + [0.0] * 8 + [1.0] * 8))
    # similarity falls with distance along a row (for nearby positions)
    sims = grid[1, :, :] @ grid[1, 0, :]
    assert all(a > b for a, b in zip(sims[:3].tolist(), sims[1:4].tolist()))
    with pytest.raises(ValueError, match="divisible by 4, got dim 30"):
        sincos_2d_position_embedding(2, 2, 30)


def test_sincos_buffer_is_fixed_and_not_saved():
    vit = VisionTransformer(ViTConfig(pos_embedding="sincos", depth=1))
    assert "pos_embed" not in vit.state_dict() and not vit.pos_embed.requires_grad
    torch.testing.assert_close(vit.pos_embed[0, 1:], sincos_2d_position_embedding(8, 8, 48))
    torch.testing.assert_close(vit.pos_embed[0, 0], torch.zeros(48))


def hand_block(block: TransformerBlock, x, mask=None):
    """Pre-norm block written out with explicit attention."""
    attn = block.attn
    h = block.norm1(x)
    b, t, d = h.shape
    split = lambda y: y.reshape(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h))
    scores = q @ k.transpose(-2, -1) / attn.head_dim**0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    a = torch.softmax(scores, -1) @ v
    x = x + attn.out_proj(a.transpose(1, 2).reshape(b, t, d))
    return x + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x))))


@pytest.mark.parametrize("causal", [False, True])
def test_block_equals_hand_rolled_and_torch_encoder_layer(causal):
    torch.manual_seed(0)
    block = TransformerBlock(32, 4).eval()
    x = torch.randn(2, 9, 32)
    mask = causal_mask(9) if causal else None
    torch.testing.assert_close(block(x, causal=causal), hand_block(block, x, mask))
    ref = nn.TransformerEncoderLayer(32, 4, 128, dropout=0.0, activation="gelu", batch_first=True, norm_first=True).eval()
    with torch.no_grad():
        a = block.attn
        ref.self_attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        ref.self_attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        ref.self_attn.out_proj.load_state_dict(a.out_proj.state_dict())
        ref.linear1.load_state_dict(block.mlp.fc1.state_dict())
        ref.linear2.load_state_dict(block.mlp.fc2.state_dict())
        ref.norm1.load_state_dict(block.norm1.state_dict())
        ref.norm2.load_state_dict(block.norm2.state_dict())
    expected = ref(x, src_mask=~mask if causal else None)  # PyTorch: True = may NOT attend
    torch.testing.assert_close(block(x, causal=causal), expected)


def test_block_masks_and_cache_for_the_gpt():
    torch.manual_seed(0)
    block = TransformerBlock(16, 2).eval()
    x = torch.randn(2, 6, 16)
    full = block(x, causal=True)
    cache = KVCache()
    steps = [block(x[:, :3], causal=True, cache=cache)] + [block(x[:, t : t + 1], causal=True, cache=cache) for t in range(3, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full)
    keep = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = block(x, key_padding_mask=keep)
    y = x.clone()
    y[1, 4:] = 100.0  # padding content must not matter to the real tokens
    torch.testing.assert_close(block(y, key_padding_mask=keep)[1, :4], out[1, :4])
    torch.testing.assert_close(block(x, attn_mask=causal_mask(6)), full)


def test_package_vit_equals_manual_forward():
    torch.manual_seed(0)
    cfg = ViTConfig(dim=32, depth=2, num_heads=2, num_classes=3)
    model = ViTClassifier(cfg).eval()
    images = torch.rand(2, 3, 32, 32)
    enc = model.encoder
    x = enc.patch_embed(images)
    x = torch.cat([enc.cls_token.expand(2, -1, -1), x], 1) + enc.pos_embed
    for blk in enc.blocks:
        x = hand_block(blk, x)
    torch.testing.assert_close(model(images), model.head(enc.norm(x)[:, 0]))


def test_bidirectional_every_patch_sees_every_patch():
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(dim=32, depth=1, num_heads=2, pool="mean")).eval()
    images = torch.rand(1, 3, 32, 32, requires_grad=True)
    # A random direction, not .sum(): the final LayerNorm's outputs sum to a constant, so the
    # gradient of their sum is zero up to rounding, and whether rounding leaves a trace is up to the CPU.
    probe = torch.randn(32)
    (vit(images).patches[0, 0] @ probe).backward()  # the first patch's output ...
    grad = images.grad[0].abs().sum(0)  # ... depends on the last patch's pixels too
    assert grad[-4:, -4:].sum() > 1e-3 * grad[:4, :4].sum()


def test_attn_mask_limits_what_a_patch_sees():
    """With attn_mask a patch sees only the tokens its row allows; all-True is the default, every token."""
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(dim=32, depth=2, num_heads=2, pool="mean")).eval()
    images = torch.rand(2, 3, 32, 32)
    plain = vit(images).patches
    vit.attn_mask = torch.ones(64, 64, dtype=torch.bool)
    torch.testing.assert_close(vit(images).patches, plain)
    row, col = torch.arange(64) // 8, torch.arange(64) % 8
    vit.attn_mask = ((row[:, None] - row[None]).abs() <= 1) & ((col[:, None] - col[None]).abs() <= 1)  # 3 x 3 neighbours
    images.requires_grad_(True)
    probe = torch.randn(32)  # (a plain sum of a LayerNorm's output would have no gradient at init)
    (vit(images).patches[0, 0] @ probe).backward()  # patch (0, 0) after two blocks: patches up to 2 rows/columns away
    grad = images.grad[0].abs().sum(0)  # (32, 32) pixels
    assert grad[:12, :12].sum() > 0 and grad[12:].sum() == 0 and grad[:, 12:].sum() == 0
    weights = vit.attention_maps(images.detach())[0][0, :, 0]  # (heads, 64): what patch (0, 0) attends to in block 1
    assert weights[:, ~vit.attn_mask[0]].sum() == 0 and weights[:, vit.attn_mask[0]].sum() > 0  # the maps obey the mask too


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    cfg = ViTConfig(dim=32, depth=2, num_heads=2, num_classes=4, pos_embedding="sincos", pool="mean")
    model = ViTClassifier(cfg).eval()
    path = tmp_path / "vit.pt"
    save_vit(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["vit.pt"]  # no temporary file left behind
    images = torch.rand(2, 3, 32, 32)
    loaded = load_vit(path).eval()
    assert isinstance(loaded, ViTClassifier) and loaded.config == cfg
    torch.testing.assert_close(loaded(images), model(images))
    into = ViTClassifier(cfg)
    assert load_vit(path, into) is into
    torch.testing.assert_close(into.eval()(images), model(images))
    with pytest.raises(ValueError, match=r"different ViTConfig: dim: 32 in the file, 48 expected"):
        load_vit(path, ViTClassifier(ViTConfig(num_classes=4, depth=2, num_heads=2, pos_embedding="sincos", pool="mean")))
    with pytest.raises(ValueError, match="holds a ViTClassifier, not a VisionTransformer"):
        load_vit(path, VisionTransformer(cfg))
    with pytest.raises(TypeError, match="save_vit saves one of"):
        save_vit(nn.Linear(2, 2), tmp_path / "linear.pt")
    enc_path = tmp_path / "enc.pt"
    save_vit(model.encoder, enc_path)
    torch.testing.assert_close(load_vit(enc_path).eval()(images).pooled, model.encoder(images).pooled)


def test_error_messages():
    with pytest.raises(ValueError, match="image_size 30 is not divisible by patch_size 4"):
        ViTConfig(image_size=30)
    with pytest.raises(ValueError, match="dim 30 is not divisible by num_heads 4"):
        ViTConfig(dim=30)
    with pytest.raises(ValueError, match="pool must be 'cls', 'mean' or 'map', got 'max'"):
        ViTConfig(pool="max")
    with pytest.raises(ValueError, match="needs config.num_classes"):
        ViTClassifier(ViTConfig())
    vit = VisionTransformer(ViTConfig(depth=1))
    with pytest.raises(ValueError, match=r"images must have shape \(batch, 3, 32, 32\).*got \(2, 1, 32, 32\)"):
        vit(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"got \(2, 3, 28, 28\)"):
        vit(torch.rand(2, 3, 28, 28))


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 4), st.sampled_from([4, 8]), st.integers(1, 3))
def test_patch_count_for_any_grid(grid, patch, batch):
    cfg = ViTConfig(image_size=grid * patch, patch_size=patch, dim=16, depth=1, num_heads=2)
    out = VisionTransformer(cfg)(torch.rand(batch, 3, grid * patch, grid * patch))
    assert out.patches.shape == (batch, grid * grid, 16)


def test_short_training_run_loss_falls():
    torch.manual_seed(0)
    # a toy task: is the bright square in the left or the right half?
    images = torch.zeros(256, 3, 16, 16)
    labels = torch.randint(0, 2, (256,))
    for i, y in enumerate(labels.tolist()):
        col = torch.randint(0, 4, ()).item() + 8 * y
        row = torch.randint(0, 12, ()).item()
        images[i, :, row : row + 4, col : col + 4] = 1.0
    model = ViTClassifier(ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, num_heads=2, num_classes=2))
    cfg = TrainConfig(steps=60, lr=3e-3, warmup_steps=5, log_every=0, record_every=10, progress=False)
    hist = train(model, batches(TensorDataset(images, labels), 32), lambda m, b: F.cross_entropy(m(b[0]), b[1]), cfg,
                 device="cpu")
    assert hist.loss[-1] < 0.3 * hist.loss[0]


def test_sincos_stretched_onto_a_trained_grid():
    plain = sincos_2d_position_embedding(8, 8, 32)
    assert torch.equal(sincos_2d_position_embedding(8, 8, 32, trained_grid=(8, 8)), plain)  # same grid: unchanged
    big = sincos_2d_position_embedding(12, 6, 32, trained_grid=(8, 4)).reshape(12, 6, 32)
    rows = (torch.arange(12, dtype=torch.float64) + 0.5) * 8 / 12 - 0.5  # pixel centres, as F.interpolate maps them
    cols = (torch.arange(6, dtype=torch.float64) + 0.5) * 4 / 6 - 0.5
    torch.testing.assert_close(big[:, 0, :16], sincos_1d_position_embedding(rows, 16))
    torch.testing.assert_close(big[0, :, 16:], sincos_1d_position_embedding(cols, 16))


@pytest.mark.parametrize("num_prefix", [0, 1])
def test_interpolate_pos_embed(num_prefix):
    torch.manual_seed(0)
    pos = torch.randn(1, num_prefix + 64, 8)
    torch.testing.assert_close(interpolate_pos_embed(pos, 8, num_prefix), pos)  # same grid: unchanged
    for mode in ("bicubic", "bilinear"):
        big = interpolate_pos_embed(pos, 12, num_prefix, mode)
        assert big.shape == (1, num_prefix + 144, 8)
        assert torch.equal(big[:, :num_prefix], pos[:, :num_prefix])  # [CLS]'s row is kept as it is
    # a table that is constant along the rows stays constant along the rows
    smooth = torch.arange(8.0).repeat(8)[None, :, None].expand(1, 64, 3)  # value = column index
    grid = interpolate_pos_embed(smooth, 16, 0, "bilinear").reshape(16, 16, 3)
    torch.testing.assert_close(grid[0], grid[15])
    with pytest.raises(ValueError, match="mode must be 'bicubic' or 'bilinear', got 'nearest'"):
        interpolate_pos_embed(pos, 12, num_prefix, "nearest")
    with pytest.raises(ValueError, match="do not form a square grid"):
        interpolate_pos_embed(pos[:, :-1], 12, num_prefix)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_resize_vit_learned_positions(pool):
    torch.manual_seed(0)
    model = ViTClassifier(ViTConfig(dim=32, depth=1, num_heads=2, pool=pool, num_classes=3)).eval()
    images = torch.rand(2, 3, 32, 32)
    same = resize_vit(model, 32)
    torch.testing.assert_close(same(images), model(images))  # same size: the same model
    big = resize_vit(model, 48, mode="bilinear")
    assert big.config.image_size == 48 and big(torch.rand(2, 3, 48, 48)).shape == (2, 3) and not big.training
    prefix = 1 if pool == "cls" else 0
    expected = interpolate_pos_embed(model.encoder.pos_embed, 12, prefix, "bilinear")
    torch.testing.assert_close(big.encoder.pos_embed, expected)
    torch.testing.assert_close(big.head.weight, model.head.weight)
    assert big.encoder.pos_embed is not model.encoder.pos_embed  # a copy: training one leaves the other alone
    encoder = resize_vit(model.encoder.train(), 40)
    assert isinstance(encoder, VisionTransformer) and encoder.training and encoder.config.grid_size == 10


def test_resize_vit_sincos_positions():
    torch.manual_seed(0)
    model = ViTClassifier(ViTConfig(dim=32, depth=1, num_heads=2, pos_embedding="sincos", num_classes=3)).eval()
    extended = resize_vit(model, 48)
    torch.testing.assert_close(extended.encoder.pos_embed[0, 1:], sincos_2d_position_embedding(12, 12, 32))
    stretched = resize_vit(model, 48, sincos="stretch")
    torch.testing.assert_close(stretched.encoder.pos_embed[0, 1:],
                               sincos_2d_position_embedding(12, 12, 32, trained_grid=(8, 8)))
    torch.testing.assert_close(stretched.encoder.pos_embed[0, 0], torch.zeros(32))  # [CLS] still has no position
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(resize_vit(model, 32, sincos="stretch")(images), model(images))
    with pytest.raises(ValueError, match="sincos must be 'extend' or 'stretch', got 'wrap'"):
        resize_vit(model, 48, sincos="wrap")


def test_resize_vit_refuses_what_it_cannot_resize():
    class Sub(VisionTransformer):
        pass

    with pytest.raises(TypeError, match="resizes a VisionTransformer or a ViTClassifier, got Sub"):
        resize_vit(Sub(ViTConfig(depth=1)), 48)
    vit = VisionTransformer(ViTConfig(depth=1))
    vit.attn_mask = torch.ones(64, 64, dtype=torch.bool)
    with pytest.raises(ValueError, match="attn_mask is set"):
        resize_vit(vit, 48)


def test_conv_net_classifier():
    torch.manual_seed(0)
    cnn = ConvNetClassifier(5)
    assert sum(p.numel() for p in cnn.parameters()) == 93_893  # about the size of chapter 03's ViT
    assert cnn(torch.rand(2, 3, 32, 32)).shape == (2, 5) and cnn(torch.rand(2, 3, 48, 48)).shape == (2, 5)
    # convolutions + a global average: moving an object (by a multiple of the pooling stride, 4, and far
    # enough from the borders that no padding is in view) does not change the output
    x = torch.zeros(1, 3, 64, 64)
    x[:, :, 24:28, 24:28] = 1.0
    torch.testing.assert_close(cnn(x), cnn(torch.roll(x, shifts=(8, 4), dims=(2, 3))))
    assert ConvNetClassifier(2, channels=(8,))(torch.rand(1, 3, 5, 5)).shape == (1, 2)
    with pytest.raises(ValueError, match="at least one convolution"):
        ConvNetClassifier(5, channels=())
