"""The cross-attention VLM (method B): media masks, tanh gates, the frozen LM, and the invariants chapter 07 proves."""

import json
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mllm_scratch.checkpoints import CheckpointError, read_payload
from mllm_scratch.gpt import GPT, GPTConfig
from mllm_scratch.tokenizer import load_tokenizer
from mllm_scratch.vit import ViTConfig
from mllm_scratch.vlm import VLMCollator
from mllm_scratch.xattn import (
    CrossAttentionVLM,
    GatedCrossAttentionBlock,
    XAttnConfig,
    XAttnRecipe,
    gate_history,
    lm_checksum,
    load_xattn,
    media_index,
    media_mask,
    save_xattn,
    train_xattn,
    xattn_loss,
    xattn_param_groups,
)

TOK = load_tokenizer()
M = TOK.image_id  # the marker
VISION = ViTConfig(image_size=32, patch_size=8, dim=16, depth=1, num_heads=2)  # 16 media tokens per image
LM = GPTConfig(vocab_size=TOK.vocab_size, context_length=64, dim=32, depth=2, num_heads=2)


PLACEMENTS = ("after", "before")


def tiny_model(every: int = 1, attend: str = "latest", seed: int = 0, gates: float | None = None,
               placement: str = "after") -> CrossAttentionVLM:
    torch.manual_seed(seed)
    config = XAttnConfig(lm=LM, media_dim=VISION.dim, media_tokens=VISION.num_patches, vision=VISION, every=every,
                         num_heads=2, media_id=M, attend=attend, placement=placement)
    model = CrossAttentionVLM(config, lm=GPT(LM)).eval()
    if gates is not None:  # open the gates, as training would
        with torch.no_grad():
            for block in model.blocks.values():
                block.attn_gate.fill_(gates)
                block.mlp_gate.fill_(-gates)
    return model


def text(s: str) -> list[int]:
    return TOK.encode_ordinary(s)


# ----------------------------------------------------------------------------------
# Media masks


def test_media_index_and_latest_mask_by_hand():
    ids = torch.tensor([[7, 8, M, 9, 10, M, 11]])
    assert media_index(ids, M).tolist() == [[-1, -1, 0, 0, 0, 1, 1]]
    mask = media_mask(ids, M, tokens_per_item=2, num_items=2)  # (1, 7, 4)
    expected = [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert mask[0].int().tolist() == expected
    every_earlier = media_mask(ids, M, 2, 2, attend="all")[0].int().tolist()
    assert every_earlier[-1] == [1, 1, 1, 1] and every_earlier[1] == [0, 0, 0, 0]


def test_text_before_any_image_sees_nothing_and_a_row_without_markers_sees_nothing():
    ids = torch.tensor([[5, 6, 7, M, 8], [5, 6, 7, 8, 9]])
    mask = media_mask(ids, M, tokens_per_item=3, num_items=1)
    assert not mask[0, :3].any() and mask[0, 3:].all()
    assert not mask[1].any()


def test_several_images_per_sequence_and_per_row_counts_differ():
    ids = torch.tensor([[M, 5, M, 6, M, 7], [5, M, 6, 7, 8, 9]])
    mask = media_mask(ids, M, tokens_per_item=1, num_items=3)  # (2, 6, 3)
    assert mask[0].int().tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]
    assert mask[1].int().tolist() == [[0, 0, 0]] + [[1, 0, 0]] * 5
    with pytest.raises(ValueError, match="holds 3 media markers but only 2 media items"):
        media_mask(ids, M, 1, 2)
    with pytest.raises(ValueError, match="attend must be 'latest' or 'all'"):
        media_mask(ids, M, 1, 3, attend="first")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([1, 2, 3, M]), min_size=1, max_size=12), min_size=1, max_size=4),
       st.integers(1, 3), st.sampled_from(["latest", "all"]))
def test_media_mask_matches_its_definition(rows, per_item, attend):
    """Any sequences: token t may see media token j of item k iff k is the latest item at or before t ('latest'),
    or any item at or before t ('all'); the shape is (B, T, items * per_item)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    items = max(1, max(r.count(M) for r in rows))
    mask = media_mask(ids, M, per_item, items, attend=attend)
    assert mask.shape == (len(rows), width, items * per_item)
    for b, row in enumerate(ids.tolist()):
        seen = -1
        for t, token in enumerate(row):
            seen += token == M
            for j in range(items * per_item):
                k = j // per_item
                allowed = (k == seen) if attend == "latest" else (k <= seen)
                assert bool(mask[b, t, j]) == allowed


# ----------------------------------------------------------------------------------
# The gated block


def test_gated_block_with_closed_gates_is_the_identity_bit_for_bit():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(32, 2)
    x, media = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    mask = torch.rand(2, 5, 7) > 0.3
    assert block.gates() == (0.0, 0.0)
    assert torch.equal(block(x, media, mask), x)


def test_fully_masked_rows_get_exactly_zero_update_and_no_nan():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(32, 2)
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
        block.mlp_gate.fill_(1.0)
    x, media = torch.randn(1, 4, 32, requires_grad=True), torch.randn(1, 6, 32)
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[0, 2:] = True  # tokens 0 and 1 come before the image
    out = block(x, media, mask)
    assert torch.equal(out[0, :2], x[0, :2])  # not even the out_proj bias or the MLP leaks through
    assert not torch.equal(out[0, 2:], x[0, 2:])
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in block.parameters())


def test_at_initialisation_only_the_gates_get_gradient():
    """tanh(0) = 0 multiplies both branches, so the first step can only open the gates (Flamingo's slow start)."""
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(32, 2)
    x, media = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    block(x, media, torch.ones(2, 5, 7, dtype=torch.bool)).pow(2).sum().backward()
    assert block.attn_gate.grad.abs().item() > 0 and block.mlp_gate.grad.abs().item() > 0
    others = [p.grad for n, p in block.named_parameters() if not n.endswith("_gate")]
    assert all(g is None or not g.any() for g in others)


# ----------------------------------------------------------------------------------
# The model: the LM wrapped, not forked


def test_lm_state_dict_keys_are_the_chapter_04_gpts():
    model = tiny_model(every=2)
    assert list(model.lm.state_dict()) == list(GPT(LM).state_dict())
    lm_keys = [k for k in model.state_dict() if k.startswith("lm.")]
    assert lm_keys == ["lm." + k for k in GPT(LM).state_dict()]
    assert model.config.layers == [1] and list(model.blocks) == ["1"]
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "lm", "xattn"}


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_closed_gates_give_the_lms_logits_bit_for_bit(placement):
    model = tiny_model(placement=placement)
    a = text("is there a red circle?") + [M] + text("what colour is it?")
    b = [M] + text("there is a small blue cross. there are two objects.")
    ids = torch.tensor([a, b[: len(a)]])
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(ids, images), model.lm(ids))
        assert torch.equal(model(ids[:1, :3]), model.lm(ids[:1, :3]))  # text only: the plain LM


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_changing_image_k_never_changes_outputs_before_image_k(placement):
    for attend in ("latest", "all"):
        model = tiny_model(gates=0.7, attend=attend, placement=placement)
        ids = torch.tensor([text("a") + [M] + text("b c") + [M] + text("d e f") + [M] + text("g")])
        marks = (ids[0] == M).nonzero().flatten().tolist()
        media = torch.rand(1, 3, 3, 32, 32)
        with torch.no_grad():
            base = model(ids, media)
            for k in range(3):
                changed = media.clone()
                changed[0, k] = torch.rand(3, 32, 32)
                out = model(ids, changed)
                assert torch.equal(out[0, : marks[k]], base[0, : marks[k]]), (attend, k)
                assert not torch.allclose(out[0, marks[k]:], base[0, marks[k]:])


def test_latest_mask_hides_earlier_images_from_the_cross_attention_itself():
    """'latest' limits what the cross-attention reads directly; 'all' lets a token read every earlier image.

    (Through the LM's self-attention a later token can still read the *text* that read an earlier
    image, in both modes: the mask is about the direct path.)"""
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(32, 2)
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
        block.mlp_gate.fill_(1.0)
    ids = torch.tensor([[5, M, 6, 7, M, 8, 9]])
    x, media = torch.randn(1, 7, 32), torch.randn(1, 2 * 3, 32)  # two items of 3 tokens
    changed = media.clone()
    changed[0, :3] = torch.randn(3, 32)  # a different first image
    for attend in ("latest", "all"):
        mask = media_mask(ids, M, 3, 2, attend)
        with torch.no_grad():
            same = torch.equal(block(x, media, mask)[0, 4:], block(x, changed, mask)[0, 4:])
        assert same == (attend == "latest"), attend


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_text_before_the_first_image_is_the_lms_output_with_open_gates(placement):
    model = tiny_model(gates=1.0, placement=placement)
    ids = torch.tensor([text("there are two objects") + [M] + text("red")])
    first = (ids[0] == M).nonzero().item()
    with torch.no_grad():
        out = model(ids, torch.rand(1, 3, 32, 32))
        assert torch.equal(out[:, :first], model.lm(ids)[:, :first])
        assert torch.isfinite(out).all()


def test_forward_errors_name_the_problem():
    model = tiny_model()
    ids = torch.tensor([[M, 5, M, 6]])
    with pytest.raises(ValueError, match="no media were given"):
        model(ids)
    with pytest.raises(ValueError, match="2 media markers but only 1 media items"):
        model(ids, torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="media for 2 sequences and ids for 1"):
        model(ids, torch.rand(2, 2, 3, 32, 32))
    with pytest.raises(ValueError, match="media must have shape"):
        model(ids, torch.rand(32, 32))
    with pytest.raises(ValueError, match="every must be between 1 and the LM's depth 2"):
        XAttnConfig(lm=LM, media_dim=16, media_tokens=16, every=3)
    with pytest.raises(ValueError, match="placement must be 'after' or 'before', got 'inside'"):
        XAttnConfig(lm=LM, media_dim=16, media_tokens=16, placement="inside")


# ----------------------------------------------------------------------------------
# Placement: after the LM block (the book's default) or before it (Flamingo, torchtune's FusionLayer)


def call_order(model: CrossAttentionVLM, ids: torch.Tensor, media: torch.Tensor) -> list[str]:
    """The order in which the LM blocks and the gated blocks run in one forward pass, read with forward hooks."""
    order, handles = [], []
    for i, block in enumerate(model.lm.blocks):
        handles.append(block.register_forward_hook(lambda *_, i=i: order.append(f"lm{i}")))
    for key, block in model.blocks.items():
        handles.append(block.register_forward_hook(lambda *_, key=key: order.append(f"gated{key}")))
    try:
        with torch.no_grad():
            model(ids, media)
    finally:
        for h in handles:
            h.remove()
    return order


def test_before_runs_each_gated_block_in_front_of_its_lm_block():
    ids = torch.tensor([[M] + text("what colour is it?")])
    images = torch.rand(1, 3, 32, 32)
    assert call_order(tiny_model(placement="after"), ids, images) == ["lm0", "gated0", "lm1", "gated1"]
    assert call_order(tiny_model(placement="before"), ids, images) == ["gated0", "lm0", "gated1", "lm1"]
    assert call_order(tiny_model(every=2, placement="after"), ids, images) == ["lm0", "lm1", "gated1"]
    assert call_order(tiny_model(every=2, placement="before"), ids, images) == ["lm0", "gated1", "lm1"]


def test_before_feeds_the_gated_blocks_output_into_the_lm_block():
    """With open gates the two placements compute different functions from the same weights; 'before' by hand."""
    after, before = tiny_model(gates=0.6), tiny_model(gates=0.6, placement="before")
    assert list(after.state_dict()) == list(before.state_dict())  # same parameters, same names: only the order differs
    before.load_state_dict(after.state_dict())
    ids = torch.tensor([[M] + text("what colour is the circle?")])
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        media, mask = before.encode_media(images), before.mask_for(ids, 1)
        x = before.lm.input_states(ids)
        for i, block in enumerate(before.lm.blocks):
            x = block(before.blocks[str(i)](x, media, mask), causal=True)
        by_hand = before.lm.to_logits(x)
        assert torch.equal(before(ids, images), by_hand)
        assert not torch.allclose(after(ids, images), by_hand)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_gradients_reach_every_gated_block_under_both_placements(placement):
    model = tiny_model(gates=0.5, placement=placement).set_trainable(xattn=True)
    ids = torch.tensor([[M] + text("what colour is the circle? red")])
    model(ids, torch.rand(1, 3, 32, 32)).logsumexp(-1).sum().backward()
    for key, block in model.blocks.items():
        assert block.attn.q_proj.weight.grad.abs().sum() > 0, key


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_cached_generation_matches_the_uncached_greedy_loop(placement):
    model = tiny_model(gates=0.8, placement=placement)
    images = torch.rand(3, 3, 32, 32)
    prompts = ["what colour is the circle?", "how many objects are there?", "what colour is the square?"]
    said = model.generate(TOK, images, prompts, max_new_tokens=5)
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([[M] + text(prompt)])
        new = []
        with torch.no_grad():
            for _ in range(5):
                token = int(model(ids, images[i : i + 1])[0, -1].argmax())
                if token == TOK.eot_id:
                    break
                new.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert said[i] == TOK.decode(new).strip()
    text_only = model.generate(TOK, None, prompts[:1], max_new_tokens=3)
    lm_only = [TOK.decode(model.lm(torch.tensor([text(prompts[0])]))[0, -1:].argmax(-1).tolist())]
    assert text_only[0].startswith(lm_only[0].strip())


def test_xattn_loss_scores_only_the_answer():
    from mllm_scratch.shapeworld import VQADataset

    model = tiny_model(gates=0.5)
    items = [VQADataset("train", 8)[i] for i in range(3)]
    batch = VLMCollator(TOK, 1)(items)
    assert ((batch.ids == M).sum(1) == 1).all()  # one marker per image
    logits = model(batch.ids, batch.images)
    losses = []
    for row, (_, question, answer, _) in enumerate(items):
        start = 1 + len(text(question))
        for k, token in enumerate(text(" " + answer) + [TOK.eot_id]):
            losses.append(-torch.log_softmax(logits[row, start + k - 1], dim=-1)[token])
    torch.testing.assert_close(xattn_loss(model, batch), torch.stack(losses).mean())


# ----------------------------------------------------------------------------------
# Training: the LM stays frozen, the gates open


def tiny_recipe(**kw) -> XAttnRecipe:
    return XAttnRecipe(**{**dict(caption_pairs=32, qa_pairs=64, batch_size=8, steps=12, warmup_steps=2,
                                 spatial_steps=0, canonical_pairs=16), **kw})


def test_training_leaves_the_lm_bit_identical_and_opens_the_gates():
    model = tiny_model()
    before = lm_checksum(model.lm)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    ids = torch.tensor([text("there is a small red circle.")])
    with torch.no_grad():
        text_logits = model(ids)
    history = train_xattn(model, tiny_recipe(train_encoder=False), TOK, log_every=0, progress=False, gate_every=4)
    assert lm_checksum(model.lm) == before
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.encoder.state_dict().items())  # Flamingo: tower frozen
    assert all(abs(g) > 1e-3 for pair in model.gates().values() for g in pair)
    with torch.no_grad():
        assert torch.equal(model(ids), text_logits)  # text-only behaviour untouched
    curves = gate_history(history)
    assert set(curves) == {"attn0", "mlp0", "attn1", "mlp1"}
    assert curves["attn0"][0] == [0, 4, 8, 12] and curves["attn0"][1][0] == 0.0
    assert model.trainable() == {"encoder": False, "xattn": False, "lm": False}


def test_train_encoder_flag_trains_the_tower_at_its_own_rate():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    recipe = tiny_recipe(train_encoder=True, encoder_lr=1e-4, steps=3)
    model.set_trainable(encoder=True, xattn=True, lm=False)
    rates = {g["part"]: g["lr"] for g in xattn_param_groups(model, recipe)}
    assert rates["encoder"] == 1e-4 and rates["gates"] == recipe.gate_lr and rates["xattn"] == recipe.lr
    checksum = lm_checksum(model.lm)
    train_xattn(model, recipe, TOK, log_every=0, progress=False)
    assert any(not torch.equal(v, before[k]) for k, v in model.encoder.state_dict().items())
    assert lm_checksum(model.lm) == checksum


def test_param_groups_refuse_an_unfrozen_lm():
    model = tiny_model().set_trainable(xattn=True, lm=True)
    with pytest.raises(ValueError, match="the LM must stay frozen"):
        xattn_param_groups(model, tiny_recipe())


def test_loss_falls_with_the_pretrained_lm_frozen():
    from mllm_scratch.gpt import pretrained_gpt

    lm = pretrained_gpt()
    torch.manual_seed(0)
    config = XAttnConfig(lm=lm.config, media_dim=VISION.dim, media_tokens=VISION.num_patches, vision=VISION, every=2,
                         num_heads=2, media_id=M)
    model = CrossAttentionVLM(config, lm=lm)
    checksum = lm_checksum(lm)
    history = train_xattn(model, tiny_recipe(steps=30, lr=3e-3, gate_lr=3e-2, qa_pairs=32, caption_pairs=32), TOK,
                          log_every=0, progress=False)
    assert history.loss[-1] < 0.7 * history.loss[0]
    assert lm_checksum(model.lm) == checksum


# ----------------------------------------------------------------------------------
# Checkpoints: the tower and xattn only, the LM verified by checksum


def test_save_load_round_trip_stores_no_lm_and_checks_it(tmp_path):
    model = tiny_model(gates=0.3)
    path = tmp_path / "x.pt"
    manifest = save_xattn(path, model, recipe={"note": "test"})
    assert manifest["lm_checksum"] == lm_checksum(model.lm)
    assert manifest["parameters"] == sum(p.numel() for p in model.encoder.parameters()) + sum(
        p.numel() for p in model.xattn.parameters())
    stored = read_payload(path)["state_dict"]
    assert not any(k.startswith("lm.") for k in stored)
    loaded = load_xattn(path, lm=model.lm)
    ids = torch.tensor([[M] + text("what colour is the circle?")])
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(ids, images), model(ids, images))
    assert loaded.trainable() == {"encoder": False, "xattn": False, "lm": False}
    other = GPT(LM)  # an LM with other weights: refused
    with pytest.raises(CheckpointError, match="trained on another LM"):
        load_xattn(path, lm=other)
    data = json.loads(path.with_suffix(".json").read_text())
    data["tokenizer_sha256"] = "0" * 64
    path.with_suffix(".json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="another tokenizer"):
        load_xattn(path, lm=model.lm)


def test_placement_round_trips_and_a_config_saved_without_it_loads_as_after(tmp_path):
    from mllm_scratch.checkpoints import save_checkpoint
    from mllm_scratch.gpt import tokenizer_sha256
    from mllm_scratch.xattn import _trained_parts

    model = tiny_model(gates=0.3, placement="before")
    save_xattn(tmp_path / "before.pt", model)
    loaded = load_xattn(tmp_path / "before.pt", lm=model.lm)
    ids = torch.tensor([[M] + text("how many objects are there?")])
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert loaded.config.placement == "before" and torch.equal(loaded(ids, images), model(ids, images))
    # a file written before the field existed (the shipped xattn.pt, methods_*.pt): no "placement" in its config
    old = tiny_model(gates=0.3)
    config = old.config.to_dict()
    del config["placement"]
    save_checkpoint(tmp_path / "old.pt", _trained_parts(old), config, name="old",
                    extra={"lm_checksum": lm_checksum(old.lm), "tokenizer_sha256": tokenizer_sha256()})
    loaded = load_xattn(tmp_path / "old.pt", lm=old.lm)
    with torch.no_grad():
        assert loaded.config.placement == "after" and torch.equal(loaded(ids, images), old(ids, images))


def test_shipped_checkpoint_keeps_its_frozen_lm():
    from mllm_scratch.gpt import pretrained_gpt, pretrained_gpt_qa
    from mllm_scratch.xattn import DEFAULT_CHECKPOINT

    if not DEFAULT_CHECKPOINT.exists():
        pytest.skip("data/checkpoints/xattn.pt not built yet: python scripts/build_checkpoints.py xattn")
    model = load_xattn()
    assert model.config.placement == "after" and model.config.place_codes  # what it was trained with
    lm = pretrained_gpt_qa()  # XAttnRecipe().lm == "qa"
    assert lm_checksum(model.lm) == lm_checksum(lm) != lm_checksum(pretrained_gpt())
    with pytest.raises(CheckpointError, match="trained on another LM"):
        load_xattn(DEFAULT_CHECKPOINT, lm=pretrained_gpt())
    assert all(abs(a) > 0 for a, _ in model.gates().values())
    ids = torch.tensor([text("there are two objects. a small red circle")])
    with torch.no_grad():
        assert torch.equal(model(ids), lm(ids))


def test_build_xattn_takes_a_given_tower():
    from mllm_scratch.vit import VisionTransformer
    from mllm_scratch.xattn import build_xattn

    torch.manual_seed(0)
    tower = VisionTransformer(ViTConfig(image_size=32, patch_size=8, dim=16, depth=1, num_heads=2))
    lm = GPT(GPTConfig(vocab_size=TOK.vocab_size, context_length=32, dim=32, depth=1, num_heads=2))
    model = build_xattn(XAttnRecipe(), TOK, lm, tower=tower)
    assert model.encoder is tower and model.lm is lm
    assert model.config.media_tokens == 16 and model.config.media_dim == 16 and model.config.vision == tower.config


# ----------------------------------------------------------------------------------
# Place codes, the two stages and the stage data


def test_place_codes_add_a_rows_code_and_a_columns_code_to_each_patch():
    torch.manual_seed(0)
    config = XAttnConfig(lm=LM, media_dim=VISION.dim, media_tokens=VISION.num_patches, vision=VISION,
                         num_heads=2, media_id=M, place_codes=True)
    model = CrossAttentionVLM(config, lm=GPT(LM)).eval()
    place = model.xattn["place"]
    grid = place.grid
    assert grid * grid == VISION.num_patches
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        plain = model.xattn["proj"](model.encoder(images).patches)
        coded = model.encode_media(images)
    for r in range(grid):
        for c in range(grid):  # patches are row-major: token r * grid + c lies in row r, column c
            torch.testing.assert_close(coded[:, r * grid + c] - plain[:, r * grid + c], (place.row[r] + place.column[c]).expand(2, -1))
    # the switch is off by default and leaves no trace in the saved config or the state dict
    off = tiny_model()
    assert "place" not in off.xattn and "place_codes" not in off.config.to_dict()
    assert config.to_dict()["place_codes"] is True


def test_place_codes_need_a_square_grid():
    with pytest.raises(ValueError, match="media_tokens 10"):
        XAttnConfig(lm=LM, media_dim=16, media_tokens=10, num_heads=2, media_id=M, place_codes=True)


def test_the_spatial_stage_asks_only_spatial_questions_and_the_mix_leaves_out_reading():
    from mllm_scratch.xattn import xattn_data

    recipe = tiny_recipe(qa_pairs=40, canonical_pairs=20, caption_pairs=8, batch_size=8)
    spatial = next(xattn_data(recipe, TOK, stage="spatial"))
    words = [TOK.decode([t for t in row.tolist() if t not in (TOK.pad_id, M, TOK.eot_id)]) for row in spatial.ids]
    assert all(w.startswith("is the ") and w.endswith((" yes", " no")) for w in words), words
    mixed = xattn_data(recipe, TOK, stage="mix")
    texts = {TOK.decode([t for t in row.tolist() if t not in (TOK.pad_id, M, TOK.eot_id)]) for _ in range(9)
             for row in next(mixed).ids}
    assert not any(t.startswith("what does the text say") for t in texts)  # recipe.reading is False
    assert any(t.startswith("what colour") for t in texts) and any(t.startswith("there ") or t.startswith("a ") for t in texts)
    with pytest.raises(ValueError, match="stage must be one of"):
        xattn_data(recipe, TOK, stage="both")


def test_the_canonical_questions_ask_about_scenes_of_their_own():
    from mllm_scratch.xattn import xattn_datasets

    recipe = tiny_recipe(qa_pairs=40, canonical_pairs=20, caption_pairs=8)
    canonical, four = xattn_datasets(recipe, "spatial")
    assert canonical.offset == recipe.canonical_offset == 1_000_000 and four.offset == 0
    assert not any(torch.equal(canonical[i][0], four[i][0]) for i in range(10))
    assert [d.offset for d in xattn_datasets(recipe, "mix")] == [0, 1_000_000, 0]
    shared, _ = xattn_datasets(replace(recipe, canonical_offset=0), "spatial")  # the same scenes as the four-word ones
    assert all(torch.equal(shared[i][0], four[i][0]) for i in range(10))


def test_training_runs_the_spatial_stage_then_the_mix_as_one_history():
    model = tiny_model()
    history = train_xattn(model, tiny_recipe(spatial_steps=5, steps=7), TOK, log_every=0, progress=False, gate_every=1)
    assert history.steps == [5, 12]  # each stage records its last step; the mix's count on from the spatial stage's
    assert [step for step, _ in history.evals] == list(range(13))  # the gates before every step, and at the end
    with pytest.raises(ValueError, match="spatial steps must be an int >= 0, got -1"):
        train_xattn(model, tiny_recipe(), TOK, spatial_steps=-1, log_every=0, progress=False)
    with pytest.raises(ValueError, match="mix steps must be an int >= 1, got 0"):
        train_xattn(model, tiny_recipe(), TOK, steps=0, log_every=0, progress=False)


def test_a_recipe_names_the_lm_it_freezes():
    from mllm_scratch.xattn import recipe_lm

    with pytest.raises(ValueError, match="lm must be 'base' or 'qa', got 'chat'"):
        recipe_lm(XAttnRecipe(lm="chat"))
