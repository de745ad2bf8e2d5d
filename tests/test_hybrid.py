"""The hybrid VLM (NVLM-H) and chapter 08's shared recipe: shapes, the thumbnail splice, masks, gates, generation, checkpoints."""

import json
from dataclasses import replace

import pytest
import torch

from mllm_scratch.checkpoints import CheckpointError, read_payload
from mllm_scratch.gpt import GPT, GPTConfig
from mllm_scratch.hybrid import (
    ALL_METHODS,
    FUYU,
    METHODS,
    HybridConfig,
    HybridVLM,
    MethodsRecipe,
    ThumbnailEncoder,
    build_target,
    char_accuracy,
    checkpoint_path,
    hybrid_loss,
    image_slots,
    load_method,
    load_methods,
    make_method,
    method_of,
    pool_patches,
    save_method,
    thumbnail_vlm,
    train_method,
    trained_counts,
    trained_parts,
)
from mllm_scratch.tokenizer import load_tokenizer
from mllm_scratch.vit import ViTConfig, VisionTransformer
from mllm_scratch.vlm import PatchEncoder, UnifiedVLM, VLMCollator
from mllm_scratch.xattn import CrossAttentionVLM

TOK = load_tokenizer()
VISION = ViTConfig(image_size=16, patch_size=4, dim=16, depth=1, num_heads=2)  # a 4 x 4 grid: 16 patches
LM = GPTConfig(vocab_size=TOK.vocab_size, context_length=64, dim=32, depth=2, num_heads=2)


def tiny_hybrid(grid: int = 2, seed: int = 0, gates: float | None = None) -> HybridVLM:
    torch.manual_seed(seed)
    config = HybridConfig(lm=LM, media_dim=VISION.dim, media_tokens=VISION.num_patches, vision=VISION,
                          media_id=TOK.image_id, thumbnail_grid=grid)
    model = HybridVLM(config).eval()
    if gates is not None:
        with torch.no_grad():
            for block in model.blocks.values():
                block.attn_gate.fill_(gates)
                block.mlp_gate.fill_(gates)
    return model


def ids_with_slots(model: HybridVLM, before: int = 0, after: int = 5, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, 500, (batch, n), generator=g)  # noqa: E731
    slots = torch.full((batch, model.num_image_tokens), TOK.image_id)
    return torch.cat([text(before), slots, text(after)], dim=1)


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_pool_patches_averages_blocks_row_major():
    features = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)  # a 4 x 4 grid
    pooled = pool_patches(features, 2)
    assert pooled.shape == (2, 4, 3)
    grid = features.reshape(2, 4, 4, 3)
    torch.testing.assert_close(pooled[:, 0], grid[:, :2, :2].mean(dim=(1, 2)))  # top-left block
    torch.testing.assert_close(pooled[:, 1], grid[:, :2, 2:].mean(dim=(1, 2)))  # top-right block
    torch.testing.assert_close(pooled[:, 3], grid[:, 2:, 2:].mean(dim=(1, 2)))
    torch.testing.assert_close(pool_patches(features, 4), features)  # grid = the patch grid: unchanged
    with pytest.raises(ValueError, match="does not divide the 4 x 4 patch grid"):
        pool_patches(features, 3)
    with pytest.raises(ValueError, match="square grid"):
        pool_patches(features[:, :15], 1)


def test_config_rejects_a_thumbnail_grid_that_does_not_divide():
    with pytest.raises(ValueError, match="thumbnail_grid 3 does not divide the 4 x 4 patch grid"):
        HybridConfig(lm=LM, media_dim=16, media_tokens=16, thumbnail_grid=3)


def test_shapes_of_both_paths_and_the_logits():
    model = tiny_hybrid()
    media, thumb = model.image_paths(images())
    assert media.shape == (2, 16, LM.dim) and thumb.shape == (2, 4, LM.dim)
    ids = ids_with_slots(model, before=0, after=5)
    assert model(ids, images()).shape == (2, 4 + 5, LM.vocab_size)
    assert image_slots(model) == 4 and method_of(model) == "hybrid"


def test_thumbnail_tokens_are_spliced_at_the_slots_in_order():
    model = tiny_hybrid()
    ids = ids_with_slots(model, before=3, after=2)
    _, thumb = model.image_paths(images())
    embeds = model.splice(ids, thumb)
    torch.testing.assert_close(embeds[:, 3:7], thumb)
    torch.testing.assert_close(embeds[:, :3], model.lm.embed(ids[:, :3]))
    torch.testing.assert_close(embeds[:, 7:], model.lm.embed(ids[:, 7:]))


def test_wrong_number_of_slots_is_refused():
    model = tiny_hybrid()
    ids = ids_with_slots(model)[:, 1:]  # one slot short
    with pytest.raises(ValueError, match=r"exactly 4 <\|image\|> tokens"):
        model(ids, images())
    with pytest.raises(ValueError, match="no images were given"):
        model(ids_with_slots(model))


def test_mask_sees_the_image_from_the_first_slot_on():
    model = tiny_hybrid()
    ids = ids_with_slots(model, before=3, after=2)
    mask = model.mask_for(ids)
    assert mask.shape == (2, 3 + 4 + 2, 16)
    assert not mask[:, :3].any() and mask[:, 3:].all()


def test_text_before_the_image_gets_exactly_zero_update():
    """With open gates, tokens before the first slot have the plain LM's logits, bit for bit in float64."""
    model = tiny_hybrid(gates=0.7).double()
    ids = ids_with_slots(model, before=4, after=3)
    logits = model(ids, images().double())
    torch.testing.assert_close(logits[:, :4], model.lm(ids[:, :4]), rtol=0, atol=0)
    assert not torch.allclose(logits[:, 4:], model.lm(ids)[:, 4:])  # after it, the image matters


def test_gates_at_zero_make_it_method_a_on_the_thumbnail():
    model = tiny_hybrid()  # gates start at 0 (Flamingo)
    assert all(g == (0.0, 0.0) for g in model.gates().values())
    unified = thumbnail_vlm(model)
    assert unified.lm is model.lm and unified.projector is model.projector and unified.num_image_tokens == 4
    ids, imgs = ids_with_slots(model, before=2, after=5), images()
    torch.testing.assert_close(model(ids, imgs), unified(ids, imgs), rtol=0, atol=0)
    opened = tiny_hybrid(gates=0.5)
    assert not torch.allclose(opened(ids, imgs), thumbnail_vlm(opened)(ids, imgs))


def test_thumbnail_encoder_pools_the_tower():
    tower = VisionTransformer(VISION).eval()
    x = images()
    torch.testing.assert_close(ThumbnailEncoder(tower, 2)(x), pool_patches(tower(x).patches, 2))


def test_cached_generation_matches_greedy_argmax_of_the_full_forward():
    model = tiny_hybrid(gates=0.5)
    imgs = images()
    prompts = ["what colour is the circle?", "how many objects are there?"]
    out = model.generate(TOK, imgs, prompts, max_new_tokens=4)
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([[TOK.image_id] * 4 + TOK.encode_ordinary(prompt)])
        new = []
        for _ in range(4):
            nxt = int(model(ids, imgs[i : i + 1])[0, -1].argmax())
            if nxt == TOK.eot_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert out[i] == TOK.decode(new).strip()


def test_a_few_steps_lower_the_loss():
    model = tiny_hybrid().train()
    from mllm_scratch.shapeworld import ShapeWorldConfig, VQADataset

    data = VQADataset("train", 8, ShapeWorldConfig(image_size=32))
    items = [(torch.nn.functional.avg_pool2d(it[0], 2), *it[1:]) for it in (data[i] for i in range(8))]  # 16 px
    batch = VLMCollator(TOK, 4)(items)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = float(hybrid_loss(model, batch).detach())
    for _ in range(15):
        opt.zero_grad()
        hybrid_loss(model, batch).backward()
        opt.step()
    assert float(hybrid_loss(model, batch).detach()) < 0.7 * first
    assert all(abs(a) > 0 for a, _ in model.gates().values())  # the gates opened


def test_char_accuracy():
    assert char_accuracy("a7k", "a7k") == 1.0
    assert char_accuracy("a7x", "a7k") == pytest.approx(2 / 3)
    assert char_accuracy("", "ab") == 0.0
    assert char_accuracy("7a", "a7") == 0.0  # position matters


# -- the shared recipe, on the shipped pretrained parts


def pretrained_parts():
    from mllm_scratch.clip import pretrained_image_tower
    from mllm_scratch.gpt import pretrained_gpt

    return pretrained_image_tower(), pretrained_gpt()


def test_protocol_freezes_the_lm_of_b_and_h_only():
    recipe = MethodsRecipe()
    for method in ALL_METHODS:
        assert trained_parts(method, 1, recipe) == {"encoder": False, "new": True, "lm": False}
    assert trained_parts("unified", 2, recipe)["lm"] and not trained_parts("cross", 2, recipe)["lm"]
    assert not trained_parts("hybrid", 2, recipe)["lm"]
    assert trained_parts(FUYU, 2, recipe)["lm"]  # Fuyu is method A: its LM trains in stage 2
    with pytest.raises(ValueError, match="method must be one of"):
        trained_parts("perceiver", 2, recipe)


def test_fuyu_is_method_a_without_the_tower():
    """Same LM, same projector shape and initial weights as A; its encoder is the raw pixels of each patch."""
    tower, lm = pretrained_parts()
    a = make_method("unified", tower, lm, image_id=TOK.image_id)
    fuyu = make_method(FUYU, tower, lm, image_id=TOK.image_id)
    assert isinstance(fuyu, UnifiedVLM) and isinstance(fuyu.encoder, PatchEncoder)
    assert method_of(fuyu) == FUYU and method_of(a) == "unified" and image_slots(fuyu) == image_slots(a) == 64
    assert sum(p.numel() for p in fuyu.encoder.parameters()) == 0 and fuyu.lm is lm
    for pa, pf in zip(a.projector.parameters(), fuyu.projector.parameters(), strict=True):
        assert torch.equal(pa, pf)  # the same seed gives the same starting projector: only the tower differs
    imgs = images(2, seed=3)
    imgs = torch.nn.functional.interpolate(imgs, size=32)
    feats = fuyu.encoder(imgs)
    assert feats.shape == (2, 64, 48)
    from mllm_scratch.patches import patchify

    torch.testing.assert_close(feats, patchify(imgs, 4), rtol=0, atol=0)  # no weights: the pixels themselves
    assert build_target(FUYU) == "methods_fuyu" and all(build_target(m) == "methods" for m in METHODS)


def test_stage_two_leaves_b_and_h_lm_bit_identical_and_trains_a_lm():
    recipe = MethodsRecipe(caption_pairs=32, qa_pairs=32, batch_size=4, warmup_steps=1)
    for method in ALL_METHODS:
        tower, lm = pretrained_parts()
        model = make_method(method, tower, lm, image_id=TOK.image_id)
        before = {k: v.clone() for k, v in model.lm.state_dict().items()}
        train_method(model, recipe, 2, TOK, steps=2, log_every=0, progress=False, device="cpu")
        same = all(torch.equal(v, before[k]) for k, v in model.lm.state_dict().items())
        assert same == (method not in ("unified", FUYU)), method
        counts = trained_counts(model, recipe)
        assert counts[2] >= counts[1] > 0  # stage 2 trains what stage 1 did, and more for A and Fuyu (their LM)
        assert (counts[2] > counts[1]) == (method in ("unified", FUYU)), method
        if method != FUYU:  # with the tower tuned (Molmo's choice), stage 2 trains it too
            tuned = trained_counts(model, replace(recipe, train_encoder=True))
            assert tuned[2] == counts[2] + sum(p.numel() for p in model.encoder.parameters()), method


def test_save_and_load_round_trip(tmp_path):
    imgs = images(2, seed=3)
    imgs = torch.nn.functional.interpolate(imgs, size=32)  # the shipped tower reads 32 px
    for method in ALL_METHODS:
        tower, lm = pretrained_parts()
        model = make_method(method, tower, lm, image_id=TOK.image_id, seed=1).eval()
        if method not in ("unified", FUYU):
            with torch.no_grad():
                for block in model.blocks.values():
                    block.attn_gate.fill_(0.3)
        path = checkpoint_path(method, tmp_path)
        manifest = save_method(path, model, recipe={"test": True})
        saved = read_payload(path)["state_dict"]
        if method not in ("unified", FUYU):  # B and H do not store the frozen shipped LM
            assert not any(k.startswith("lm.") for k in saved)
        if method == FUYU:  # no tower to store: projector + LM only
            assert not any(k.startswith("encoder.") for k in saved) and manifest["rebuild"].endswith("methods_fuyu")
        loaded = load_method(path)
        assert type(loaded) is type(model) and manifest["method"] == method
        ids = torch.tensor([[TOK.image_id] * image_slots(model) + TOK.encode_ordinary("how many objects are there?")] * 2)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids, imgs), model(ids, imgs), rtol=0, atol=0)
    assert set(load_methods(tmp_path / "methods.pt")) == set(METHODS)
    assert set(load_methods(tmp_path, methods=ALL_METHODS)) == set(ALL_METHODS)


def test_load_refuses_another_lm(tmp_path):
    tower, lm = pretrained_parts()
    model = make_method("cross", tower, lm, image_id=TOK.image_id)
    assert isinstance(model, CrossAttentionVLM)
    path = checkpoint_path("cross", tmp_path)
    save_method(path, model)
    manifest = json.loads(path.with_suffix(".json").read_text())
    manifest["lm_sha256"] = "0" * 64
    path.with_suffix(".json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="wraps another GPT"):
        load_method(path)


def test_unknown_method_is_refused():
    tower, lm = VisionTransformer(VISION), GPT(LM)
    with pytest.raises(ValueError, match="method must be one of"):
        make_method("perceiver", tower, lm, image_id=TOK.image_id)
    with pytest.raises(ValueError, match="method must be one of"):
        load_methods(methods=("perceiver",))
