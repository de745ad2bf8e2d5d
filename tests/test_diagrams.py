"""The book's diagrams: each is a small Figure whose labels say what the package's models really do.

The shapes a diagram prints are computed from the config it is given; these tests run the
package's model for the same config on a zero input and check that the printed shapes are
the shapes it returns, so a diagram cannot drift from the code. They also check that no
text is cut off by the figure's edge or drawn over other text.
"""

from __future__ import annotations

import itertools
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from mllm_scratch import diagrams  # noqa: E402
from mllm_scratch.clip import CLIP, CLIPConfig  # noqa: E402
from mllm_scratch.gpt import GPT, GPTConfig  # noqa: E402
from mllm_scratch.hybrid import HybridConfig, HybridVLM  # noqa: E402
from mllm_scratch.patches import PatchEmbedding, patchify  # noqa: E402
from mllm_scratch.perceiver import PerceiverResampler, ResamplerConfig  # noqa: E402
from mllm_scratch.tokenizer import load_tokenizer  # noqa: E402
from mllm_scratch.vit import TransformerBlock, ViTClassifier, ViTConfig, VisionTransformer  # noqa: E402
from mllm_scratch.vlm import UnifiedVLM, VLMConfig  # noqa: E402
from mllm_scratch.xattn import CrossAttentionVLM, GatedCrossAttentionBlock, XAttnConfig  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def texts(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text().strip()]


def joined(fig: Figure) -> str:
    return "\n".join(texts(fig))


def shape(*dims) -> str:
    return "(" + ", ".join(f"{d:,}" if isinstance(d, int) else str(d) for d in dims) + ")"


def check_layout(fig: Figure) -> None:
    """Every text lies inside the figure, no two texts overlap, and none is too small to read."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    boxes = []
    for t in fig.findobj(Text):
        if not t.get_text().strip() or not t.get_visible():
            continue
        assert t.get_fontsize() >= 6, f"text {t.get_text()!r} is {t.get_fontsize()} pt: too small to read"
        bb = t.get_window_extent(renderer)
        assert bb.x0 >= -1 and bb.y0 >= -1 and bb.x1 <= width + 1 and bb.y1 <= height + 1, (
            f"text {t.get_text()!r} is cut off by the figure's edge: {bb} in a {width} x {height} figure"
        )
        boxes.append((t.get_text(), bb))
    for (a, ba), (b, bb) in itertools.combinations(boxes, 2):
        overlap_x = min(ba.x1, bb.x1) - max(ba.x0, bb.x0)
        overlap_y = min(ba.y1, bb.y1) - max(ba.y0, bb.y0)
        assert overlap_x <= 1 or overlap_y <= 1, f"texts {a!r} and {b!r} overlap"


DEFAULTS = {name: getattr(diagrams, name) for name in diagrams.__all__}


def test_every_public_function_is_listed():
    public = {n for n in dir(diagrams) if not n.startswith("_") and callable(getattr(diagrams, n))
              and getattr(getattr(diagrams, n), "__module__", None) == diagrams.__name__}
    assert public == set(diagrams.__all__)


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_default_diagram_is_a_small_readable_figure(name):
    fig = DEFAULTS[name]()
    assert isinstance(fig, Figure)
    w, h = fig.get_size_inches()
    assert 7 <= w <= 9.5 and 2 <= h <= 4, (w, h)
    assert len(texts(fig)) >= 5
    check_layout(fig)


VARIANTS = {
    "patch_tokens 224/16": lambda: diagrams.patch_tokens(224, 16, 64, "a blue square"),
    "patch_tokens 32/4": lambda: diagrams.patch_tokens(32, 4, 48),
    "prenorm_block gpt": lambda: diagrams.prenorm_block(GPTConfig()),
    "vit mean sincos head": lambda: diagrams.vit(ViTConfig(pool="mean", pos_embedding="sincos", num_classes=5)),
    "vit 64 px": lambda: diagrams.vit(ViTConfig(image_size=64, patch_size=8, dim=64, depth=6)),
    "gpt untied": lambda: diagrams.gpt(GPTConfig(tie_weights=False, dim=256)),
    "clip n=5": lambda: diagrams.clip_matrix(5, CLIPConfig(embed_dim=32)),
    "clip n=2": lambda: diagrams.clip_matrix(2),
    "qkv first token": lambda: diagrams.qkv(query=0),
    "unified fuyu linear": lambda: diagrams.unified_decoder(VLMConfig(encoder="patches", projector="linear")),
    "unified_vs_cross every=2": lambda: diagrams.unified_vs_cross(every=2),
    "unified_vs_cross depth 2": lambda: diagrams.unified_vs_cross(lm=GPTConfig(depth=2)),
    "hybrid every=2 grid 2": lambda: diagrams.hybrid(HybridConfig(lm=GPTConfig(), media_dim=48, media_tokens=64,
                                                                  every=2, thumbnail_grid=2)),
    "gated before": lambda: diagrams.gated_block(XAttnConfig(lm=GPTConfig(), media_dim=48, media_tokens=64,
                                                             placement="before")),
    "resampler chapter 09": lambda: diagrams.resampler(ResamplerConfig(media_dim=96, spatial_pos=True), frames=8),
    "resampler same width": lambda: diagrams.resampler(ResamplerConfig(media_dim=64), frames=1, compare=(2,)),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_keep_their_layout(name):
    fig = VARIANTS[name]()
    assert isinstance(fig, Figure)
    check_layout(fig)


# ----------------------------------------------------------------------------------
# The printed shapes are the models' shapes


@pytest.mark.parametrize("image_size, patch_size, dim", [(32, 8, 32), (32, 4, 48), (224, 16, 64)])
def test_patch_tokens_shapes_are_patch_embeddings(image_size, patch_size, dim):
    fig = diagrams.patch_tokens(image_size, patch_size, dim)
    images = torch.zeros(1, 3, image_size, image_size)
    tokens = PatchEmbedding(patch_size, 3, dim)(images)[0]  # (num_patches, dim)
    flat = patchify(images, patch_size)[0]  # (num_patches, patch_dim)
    text = joined(fig)
    assert f"{shape(*tokens.shape)} image tokens" in text
    assert f"{flat.shape[0]} rows of 3·{patch_size}·{patch_size} = {flat.shape[1]}" in text
    assert f"Linear {flat.shape[1]} → {dim}" in text
    grid = image_size // patch_size
    assert f"{grid} × {grid} = {flat.shape[0]} patches" in text
    assert f"kernel = stride = {patch_size}" in text


def test_patch_tokens_text_row_is_the_tokenizer():
    tok = load_tokenizer()
    fig = diagrams.patch_tokens(text="a small red circle")
    ids = tok.encode_ordinary("a small red circle")
    labels = texts(fig)
    for i in ids:
        assert f"id {i}" in labels
    assert [t for t in labels if t.startswith("id ")] == [f"id {i}" for i in ids]  # in order
    assert f"Embedding {tok.vocab_size} × 32\nrow = token id" in labels
    assert f"{shape(len(ids), 32)} text tokens" in labels


@pytest.mark.parametrize("image_size, patch_size", [(30, 8), (32, 5), (33, 4)])
def test_patch_tokens_refuses_a_patch_size_that_does_not_tile(image_size, patch_size):
    with pytest.raises(ValueError, match=f"image_size {image_size} is not divisible by patch_size {patch_size}"):
        diagrams.patch_tokens(image_size, patch_size)


@pytest.mark.parametrize("kwargs, message", [
    ({"patch_size": 0}, "patch_size must be an int of at least 1, got 0"),
    ({"dim": 2.5}, "dim must be an int of at least 1, got 2.5"),
    ({"text": "a small red circle is left of a large blue square"}, "tokens; the figure has room for 1 to 6"),
])
def test_patch_tokens_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        diagrams.patch_tokens(**kwargs)


def test_qkv_weights_are_the_softmax_of_the_causally_masked_scores():
    scores = (0.4, 2.2, 1.3, 1.9)
    for query in range(4):
        fig = diagrams.qkv(query=query, scores=scores)
        masked = torch.tensor(scores).masked_fill(torch.arange(4) > query, float("-inf"))
        weights = torch.softmax(masked, 0)
        labels = texts(fig)
        for w in weights.tolist():
            assert f"{w:.2f}" in labels
        assert labels.count("−∞ (future)") == 3 - query  # every later key is masked
        plt.close(fig)


@pytest.mark.parametrize("kwargs", [{"query": 4}, {"query": -1}, {"scores": (1.0, 2.0)}, {"words": ("a",)}])
def test_qkv_refuses_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        diagrams.qkv(**kwargs)


@pytest.mark.parametrize("config", [ViTConfig(), GPTConfig(), ViTConfig(dim=64, mlp_ratio=2.0, num_heads=8)])
def test_prenorm_block_widths_are_the_blocks(config):
    block = TransformerBlock(config.dim, config.num_heads, config.mlp_ratio)
    fig = diagrams.prenorm_block(config)
    text = joined(fig)
    hidden = block.mlp.fc1.out_features
    assert f"MLP: Linear {config.dim} → {hidden}\nGELU, Linear {hidden} → {config.dim}" in text
    assert f"{config.num_heads} heads" in text
    out = block(torch.zeros(2, 5, config.dim))
    assert text.count(shape("B", "T", out.shape[-1])) == 2  # in and out
    assert ("causal" in text) == isinstance(config, GPTConfig)


@pytest.mark.parametrize("config", [
    ViTConfig(),
    ViTConfig(pool="mean", pos_embedding="sincos"),
    ViTConfig(image_size=64, patch_size=8, dim=64, depth=2, num_classes=5),
    ViTConfig(num_classes=3),
])
def test_vit_shapes_are_the_models(config):
    fig = diagrams.vit(config)
    text = joined(fig)
    images = torch.zeros(2, config.in_channels, config.image_size, config.image_size)
    model = VisionTransformer(config).eval()
    with torch.no_grad():
        out = model(images)
        embedded = model.embed(images)  # what the first block sees: ([CLS] +) patches + positions
        patches = model.patch_embed(images)
    assert shape("B", *patches.shape[1:]) in text
    assert shape("B", *embedded.shape[1:]) in text
    assert f"patch vectors {shape('B', *out.patches.shape[1:])}" in text
    assert f"pre-norm block\n× {len(model.blocks)}" in text
    assert ("[CLS] token" in text) == (config.pool == "cls")
    assert ("learned" in text) == (config.pos_embedding == "learned")
    if config.num_classes is None:
        assert f"pooled\n{shape('B', *out.pooled.shape[1:])}" in text
    else:
        with torch.no_grad():
            logits = ViTClassifier(config)(images)
        assert f"logits {shape('B', *logits.shape[1:])}" in text


@pytest.mark.parametrize("config", [GPTConfig(), GPTConfig(tie_weights=False, dim=64, depth=2, vocab_size=600)])
def test_gpt_shapes_and_tied_head_are_the_models(config):
    fig = diagrams.gpt(config)
    text = joined(fig)
    model = GPT(config)
    logits = model(torch.zeros(2, 7, dtype=torch.long))
    assert f"logits\n{shape('B', 'T', logits.shape[-1])}" in text
    assert f"token embedding\n{model.tok_emb.weight.shape[0]} × {model.tok_emb.weight.shape[1]}" in text
    assert f"position embedding\n{model.pos_emb.weight.shape[0]} × {config.dim}" in text
    assert f"LM head\nLinear {model.head.in_features} → {model.head.out_features}" in text
    assert f"block × {len(model.blocks)}" in text
    assert ("tied" in text) == (model.head.weight is model.tok_emb.weight)


def test_gpt_ids_are_the_tokenizers():
    tok = load_tokenizer()
    ids = tok.encode_ordinary("a red circle is")
    text = joined(diagrams.gpt())
    for i in ids:
        assert f"  {i}" in text


@pytest.mark.parametrize("n", [2, 4, 5])
def test_clip_matrix_is_n_by_n_with_the_loss_of_the_package(n):
    config = CLIPConfig(embed_dim=32)
    fig = diagrams.clip_matrix(n, config)
    labels = texts(fig)
    cells = [t for t in labels if "·t" in t and t.startswith("i")]
    assert len(cells) == n * n
    model = CLIP(config)
    emb = model.encode_image(torch.zeros(n, 3, 32, 32))
    assert f"of width {emb.shape[-1]}" in joined(fig)
    assert f"ln {n} = {math.log(n):.2f}" in joined(fig)  # chance: clip_loss of equal logits
    from mllm_scratch.clip import clip_loss

    assert math.isclose(clip_loss(torch.zeros(n, n)).item(), math.log(n), rel_tol=1e-6)


@pytest.mark.parametrize("n", [1, 6, "4"])
def test_clip_matrix_refuses_bad_n(n):
    with pytest.raises(ValueError, match=f"n must be an int from 2 to 5 .*got {n!r}"):
        diagrams.clip_matrix(n)


@pytest.mark.parametrize("config", [VLMConfig(), VLMConfig(encoder="patches", projector="linear"),
                                    VLMConfig(vision=ViTConfig(patch_size=8), lm=GPTConfig(dim=64))])
def test_unified_decoder_shapes_are_the_models(config):
    tok = load_tokenizer()
    fig = diagrams.unified_decoder(config)
    text = joined(fig)
    model = UnifiedVLM(config).eval()
    with torch.no_grad():
        tokens = model.image_tokens(torch.zeros(2, 3, config.vision.image_size, config.vision.image_size))
    n = tokens.shape[1]
    assert f"{n} image tokens {shape('B', *tokens.shape[1:])}" in text
    assert f"{n} × <|image|>" in text and f"−100 × {n}" in text
    q, a = tok.encode_ordinary("what colour is the triangle?"), tok.encode_ordinary(" purple")
    assert f"= {n + len(q) + len(a) + 1} tokens" in text
    assert str(a[0]) in texts(fig) and str(tok.eot_id) in texts(fig)  # the scored labels are the answer's ids
    assert texts(fig).count("−100") == len(q)
    ids = torch.tensor([[tok.image_id] * n + q + a + [tok.eot_id]])
    with torch.no_grad():
        logits = model(ids, torch.zeros(1, 3, config.vision.image_size, config.vision.image_size))
    assert f"logits\n{shape('B', 'T', logits.shape[-1])}" in text


def test_unified_vs_cross_counts_are_the_configs():
    tok = load_tokenizer()
    q = len(tok.encode_ordinary("what colour is the triangle?"))
    for every, depth in ((1, 4), (2, 4), (1, 2)):
        lm = GPTConfig(depth=depth)
        fig = diagrams.unified_vs_cross(lm=lm, every=every)
        labels = texts(fig)
        xc = XAttnConfig(lm=lm, media_dim=48, media_tokens=64, every=every)
        assert labels.count("gated\nx-attn") == len(xc.layers)
        assert sum(t.startswith("LM\nblock") for t in labels) == 2 * depth  # the same LM in A and in B
        assert f"64 + {q} = {64 + q} tokens in every block" in labels
        assert f"1 + {q} = {q + 1} tokens in every block" in labels
        plt.close(fig)


@pytest.mark.parametrize("every, grid", [(1, 4), (2, 2), (4, 8)])
def test_hybrid_is_the_packages(every, grid):
    tok = load_tokenizer()
    q = len(tok.encode_ordinary("what colour is the triangle?"))
    vision = ViTConfig()
    config = HybridConfig(lm=GPTConfig(), media_dim=vision.dim, media_tokens=vision.num_patches, vision=vision,
                          every=every, thumbnail_grid=grid)
    fig = diagrams.hybrid(config)
    labels = texts(fig)
    model = HybridVLM(config).eval()
    with torch.no_grad():
        media, thumbnail = model.image_paths(torch.zeros(1, 3, 32, 32))
    assert f"projector\n→ {thumbnail.shape[1]} tokens" in labels
    assert f"{thumbnail.shape[1]} thumbnail tokens" in labels
    assert f"{thumbnail.shape[1]} + {q} = {thumbnail.shape[1] + q} tokens in every block" in labels
    assert f"keys and values of every gated block: all {media.shape[1]} image tokens" in labels
    assert labels.count("gated\nx-attn") == len(model.blocks)


def test_unified_vs_cross_refuses_a_bad_every():
    with pytest.raises(ValueError, match="every must be between 1 and the LM's depth 4, got 5"):
        diagrams.unified_vs_cross(every=5)


@pytest.mark.parametrize("placement", ["after", "before"])
def test_gated_block_is_the_packages(placement):
    config = XAttnConfig(lm=GPTConfig(), media_dim=48, media_tokens=64, placement=placement)
    fig = diagrams.gated_block(config)
    block = GatedCrossAttentionBlock(config.lm.dim, config.num_heads, config.mlp_ratio)
    assert block.gates() == (0.0, 0.0)  # what the figure says: tanh(0) = 0 at the start
    assert "tanh(0) = 0" in joined(fig)
    x = torch.randn(1, 5, config.lm.dim)
    media = torch.zeros(1, config.media_tokens, config.lm.dim)
    assert torch.equal(block(x, media, torch.ones(1, 5, config.media_tokens, dtype=torch.bool)), x)
    text = joined(fig)
    assert f"image tokens, projected {shape('B', *media.shape[1:])}" in text
    hidden = block.mlp.fc1.out_features
    assert f"MLP\n{config.lm.dim} → {hidden} → {config.lm.dim}" in text
    # the LM block stands where the package runs it: before the gated block with "after", after it with "before"
    by_text = {t.get_text(): t.get_position()[0] for t in fig.findobj(Text)}
    lm_x, xattn_x = by_text["LM block i\n(frozen)"], by_text["cross-attention\nQ: text, K and V: image"]
    assert (lm_x < xattn_x) == (placement == "after")


def test_gated_block_model_order_matches_the_figure():
    # CrossAttentionVLM with placement="after" runs gated block i right after LM block i: a hook on both shows it
    config = XAttnConfig(lm=GPTConfig(depth=2, dim=32, num_heads=4), media_dim=8, media_tokens=4,
                         item_dims=2, placement="after")  # an item: (media_tokens, media_dim) features
    model = CrossAttentionVLM(config, encoder=torch.nn.Identity())
    order = []
    for i, block in enumerate(model.lm.blocks):
        block.register_forward_hook(lambda *_, i=i: order.append(f"lm{i}"))
    for i, block in model.blocks.items():
        block.register_forward_hook(lambda *_, i=i: order.append(f"x{i}"))
    ids = torch.tensor([[config.media_id, 1, 2]])
    model(ids, torch.zeros(1, config.media_tokens, config.media_dim))
    assert order == ["lm0", "x0", "lm1", "x1"]


@pytest.mark.parametrize("config, frames", [(ResamplerConfig(), 8), (ResamplerConfig(media_dim=96, spatial_pos=True), 8),
                                            (ResamplerConfig(media_dim=64, num_latents=8, depth=3), 3)])
def test_resampler_shapes_are_the_models(config, frames):
    fig = diagrams.resampler(config, frames=frames, compare=(4, 64))
    text = joined(fig)
    model = PerceiverResampler(config).eval()
    s = 64
    for t in (4, frames, 64):
        with torch.no_grad():
            out = model(torch.zeros(1, t, s, config.media_dim))
        assert f"T = {t}: {t * s:,} media tokens → {out.shape[1]}" in text
    with torch.no_grad():
        media = model.media_tokens(torch.zeros(1, frames, s, config.media_dim))
        out = model(torch.zeros(1, frames, s, config.media_dim))
    assert f"media\n{shape('B', *media.shape[1:])}" in text
    assert f"{shape('B', *out.shape[1:])}" in text
    assert f"{shape('B', media.shape[1] + config.num_latents, config.dim)}, then MLP" in text  # keys: media + latents
    assert f"resampler layer × {len(model.layers)}" in text
    assert ("place code" in text) == config.spatial_pos
    assert ("Linear" in text) == (config.media_dim != config.dim)


@pytest.mark.parametrize("kwargs", [{"frames": 65}, {"frames": 0}, {"compare": (100,)}, {"tokens_per_frame": 0}])
def test_resampler_refuses_bad_frame_counts(kwargs):
    with pytest.raises(ValueError):
        diagrams.resampler(**kwargs)


@pytest.mark.parametrize("func, bad", [(diagrams.vit, GPTConfig()), (diagrams.gpt, ViTConfig()),
                                       (diagrams.unified_decoder, ViTConfig()), (diagrams.resampler, GPTConfig()),
                                       (diagrams.gated_block, GPTConfig()), (diagrams.prenorm_block, VLMConfig()),
                                       (diagrams.hybrid, ViTConfig())])
def test_a_config_of_the_wrong_kind_is_refused(func, bad):
    with pytest.raises(ValueError, match=type(bad).__name__):
        func(bad)
