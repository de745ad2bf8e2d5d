"""The unified VLM (method A): label masking, <|image|> splicing, freezing, and the error for a wrong image-token count."""

import json
from dataclasses import replace

import pytest
import torch

from mllm_scratch.checkpoints import CheckpointError, read_payload
from mllm_scratch.gpt import GPTConfig, tokenizer_sha256
from mllm_scratch.shapeworld import CaptionDataset, VQADataset
from mllm_scratch.tokenizer import load_tokenizer
from mllm_scratch.train import TrainConfig, batches, train
from mllm_scratch.vit import ViTConfig
import mllm_scratch.vlm as vlm
from mllm_scratch.vlm import (
    IGNORE_INDEX,
    UnifiedVLM,
    VLMCollator,
    VLMConfig,
    VLMRecipe,
    caption_scores,
    load_vlm,
    param_groups,
    save_vlm,
    train_stage,
    vlm_loss,
)

TOK = load_tokenizer()
VISION = ViTConfig(image_size=32, patch_size=8, dim=16, depth=1, num_heads=2)  # 16 image tokens
# Every spatial switch on: the QA GPT, place codes, a spatial stage, the LM at 3e-4 (`train-vlm --spatial-steps ...`).
SPATIAL = VLMRecipe(lm="qa", place_codes=True, spatial_steps=6000, stage2_lm_lr=3e-4)
SHIPPED_RECIPE = vlm.SHIPPED_RECIPE


def tiny_vlm(encoder: str = "vit", projector: str = "mlp", seed: int = 0) -> UnifiedVLM:
    torch.manual_seed(seed)
    lm = GPTConfig(vocab_size=TOK.vocab_size, context_length=64, dim=32, depth=1, num_heads=2)
    return UnifiedVLM(VLMConfig(encoder=encoder, vision=VISION, lm=lm, projector=projector, image_id=TOK.image_id))


def vqa_items(n: int = 4) -> list[tuple]:
    ds = VQADataset("train", 64)
    return [ds[i] for i in range(n)]


def test_labels_score_only_the_answer_and_endoftext():
    items = vqa_items(6)
    batch = VLMCollator(TOK, 16)(items)
    for row, (_, question, answer, _) in enumerate(items):
        scored = batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist()
        assert scored == TOK.encode_ordinary(" " + answer) + [TOK.eot_id]
        # nothing at an image, prompt or padding position is scored
        image_or_pad = (batch.ids[row] == TOK.image_id) | (batch.ids[row] == TOK.pad_id)
        assert (batch.labels[row][image_or_pad] == IGNORE_INDEX).all()
        prompt_len = 16 + len(TOK.encode_ordinary(question))
        assert (batch.labels[row, :prompt_len] == IGNORE_INDEX).all()


def test_loss_is_the_mean_over_answer_tokens_only():
    """vlm_loss equals cross-entropy averaged over the answer tokens (and <|endoftext|>) alone, found by hand."""
    model = tiny_vlm()
    items = vqa_items(4)
    batch = VLMCollator(TOK, 16)(items)
    logits = model(batch.ids, batch.images)
    losses = []
    for row, (_, question, answer, _) in enumerate(items):
        start = 16 + len(TOK.encode_ordinary(question))  # first answer token
        target = TOK.encode_ordinary(" " + answer) + [TOK.eot_id]
        for k, token in enumerate(target):  # the logits at position p predict token p + 1
            losses.append(-torch.log_softmax(logits[row, start + k - 1], dim=-1)[token])
    torch.testing.assert_close(vlm_loss(model, batch), torch.stack(losses).mean())


def test_caption_labels_have_no_prompt():
    ds = CaptionDataset("train", 8)
    batch = VLMCollator(TOK, 16)([ds[i] for i in range(3)])
    for row in range(3):
        scored = batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist()
        assert scored == TOK.encode_ordinary(ds[row][1]) + [TOK.eot_id]
        assert batch.labels[row, 16] != IGNORE_INDEX  # the caption starts right after the image


def test_splice_puts_image_token_k_at_slot_k_for_different_prompt_lengths():
    model = tiny_vlm()
    items = vqa_items(6)
    batch = VLMCollator(TOK, 16)(items)
    lengths = {len(TOK.encode_ordinary(q)) for _, q, _, _ in items}
    assert len(lengths) > 1  # the batch really mixes prompt lengths (so it is padded)
    spliced = model.splice(batch.ids, batch.images)
    image_tokens = model.image_tokens(batch.images)  # (B, 16, dim)
    text = model.lm.embed(batch.ids)
    for row in range(len(items)):
        slots = (batch.ids[row] == TOK.image_id).nonzero().flatten()
        assert slots.tolist() == list(range(16))
        torch.testing.assert_close(spliced[row, slots], image_tokens[row])
        others = batch.ids[row] != TOK.image_id
        torch.testing.assert_close(spliced[row, others], text[row, others])


def test_splice_anywhere_in_the_sequence():
    """<|image|> may stand after some text, at different places per row: token k still lands in slot k."""
    model = tiny_vlm(projector="linear")
    images = torch.rand(2, 3, 32, 32)
    a = TOK.encode_ordinary("is there a red circle?")
    ids = torch.tensor([a[:2] + [TOK.image_id] * 16 + a[2:] + [TOK.pad_id] * 3, a + [TOK.pad_id] * 2 + [TOK.image_id] * 16 + [TOK.pad_id]])
    spliced = model.splice(ids, images)
    tokens = model.image_tokens(images)
    torch.testing.assert_close(spliced[0, 2:18], tokens[0])
    torch.testing.assert_close(spliced[1, len(a) + 2 : len(a) + 18], tokens[1])


def test_wrong_number_of_image_tokens_raises():
    model = tiny_vlm()
    batch = VLMCollator(TOK, 15)(vqa_items(2))  # one <|image|> short of the 16 patches
    with pytest.raises(ValueError, match=r"exactly 16 <\|image\|> tokens .* got \[15, 15\]"):
        model(batch.ids, batch.images)
    with pytest.raises(ValueError, match="no images were given"):
        model(batch.ids, None)
    with pytest.raises(ValueError, match="one image per sequence"):
        model(VLMCollator(TOK, 16)(vqa_items(2)).ids, torch.rand(3, 3, 32, 32))


def test_stage1_trains_only_the_projector():
    model = tiny_vlm()
    model.set_trainable(encoder=False, projector=True, lm=False)
    assert model.trainable() == {"encoder": False, "projector": True, "lm": False}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = CaptionDataset("train", 16)
    optimizer = torch.optim.AdamW(param_groups(model, 1e-2, 1e-3), lr=1e-2)
    train(model, batches(ds, 8, collate_fn=VLMCollator(TOK, 16)), vlm_loss,
          TrainConfig(steps=2, warmup_steps=0, log_every=0, progress=False), optimizer=optimizer, device="cpu")
    after = model.state_dict()
    for name, value in after.items():
        if name.startswith("projector."):
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), name  # encoder and LM untouched, bit for bit


def test_param_groups_give_pretrained_parts_the_lower_rate():
    model = tiny_vlm().set_trainable(encoder=False, projector=True, lm=True)
    groups = param_groups(model, 1e-3, 1e-4)
    assert {g["part"]: g["lr"] for g in groups} == {"projector": 1e-3, "lm": 1e-4}
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    model.set_trainable(projector=False, lm=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 1e-3, 1e-4)


def test_train_stage_freezes_per_stage():
    """train_stage itself sets the flags: stage 1 leaves encoder and LM bit-identical."""
    model = tiny_vlm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = VLMRecipe(encoder="vit", caption_pairs=32, qa_pairs=32, batch_size=8, train_encoder=False)
    train_stage(model, recipe, 1, TOK, steps=2, log_every=0, progress=False, device="cpu")
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"projector"}
    train_stage(model, recipe, 2, TOK, steps=2, log_every=0, progress=False, device="cpu")
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"projector", "lm"}
    train_stage(model, VLMRecipe(encoder="vit", caption_pairs=32, qa_pairs=32, batch_size=8, train_encoder=True),
                2, TOK, steps=2, log_every=0, progress=False, device="cpu")
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"encoder", "projector", "lm"}
    assert model.trainable() == {"encoder": False, "projector": False, "lm": False}  # frozen again after a stage


def test_train_stage_takes_another_batch_stream():
    """`data=` replaces the stage's own stream (an experiment on other data, same parts and rates)."""
    model = tiny_vlm()
    recipe = VLMRecipe(encoder="vit", caption_pairs=32, qa_pairs=32, batch_size=8, train_encoder=False)
    collate = VLMCollator(TOK, model.num_image_tokens)
    drawn = []

    def stream():
        while True:
            drawn.append(collate(vqa_items(4)))
            yield drawn[-1]

    train_stage(model, recipe, 2, TOK, steps=3, data=stream(), log_every=0, progress=False, device="cpu")
    assert len(drawn) >= 3  # every step drew from the stream given, none from the recipe's
    assert model.trainable() == {"encoder": False, "projector": False, "lm": False}


def test_fuyu_uses_raw_patches():
    model = tiny_vlm(encoder="patches", projector="linear")
    assert sum(p.numel() for p in model.encoder.parameters()) == 0
    images = torch.rand(2, 3, 32, 32)
    tokens = model.image_tokens(images)
    assert tokens.shape == (2, 16, 32)
    patch = images[0, :, :8, 8:16].reshape(-1)  # the second patch of the first row, channel-first
    torch.testing.assert_close(tokens[0, 1], model.projector(patch))


def test_generate_groups_prompts_and_matches_uncached_greedy():
    model = tiny_vlm().eval()
    items = vqa_items(4)
    images = torch.stack([it[0] for it in items])
    prompts = [it[1] for it in items]
    out = model.generate(TOK, images, prompts, max_new_tokens=3)
    for i, prompt in enumerate(prompts):  # one row at a time, full forward each step
        ids = torch.tensor([[TOK.image_id] * 16 + TOK.encode_ordinary(prompt)])
        new = []
        for _ in range(3):
            logits = model(ids, images[i : i + 1])
            nxt = int(logits[0, -1].argmax())
            if nxt == TOK.eot_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert out[i] == TOK.decode(new).strip()


def test_caption_scores():
    s = caption_scores(["a small red circle.", "a large blue square and a small red cross. the text says ab."],
                       ["a small red circle.", "a large blue square and a small green cross. the text says ab."])
    assert s["exact"] == 0.5 and s["count"] == 1.0 and s["colour"] == 2 / 3 and s["shape"] == 1.0 and s["text"] == 1.0


def test_checkpoint_round_trip_and_corruption(tmp_path):
    model = tiny_vlm(encoder="patches")
    path = tmp_path / "vlm.pt"
    save_vlm(path, model)
    loaded = load_vlm(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert loaded.config == model.config
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="sha256"):
        load_vlm(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vlm(tmp_path / "missing.pt")


def test_manifest_records_the_tokenizer_and_load_refuses_another(tmp_path):
    """save_vlm writes the tokenizer's sha256; load_vlm (through load_verified) refuses a missing or different one."""
    model = tiny_vlm(encoder="patches")
    path = tmp_path / "vlm.pt"
    manifest = save_vlm(path, model)
    assert manifest["tokenizer_sha256"] == tokenizer_sha256() and manifest["loader"] == "mllm_scratch.vlm.load_vlm"
    man = path.with_suffix(".json")
    good = json.loads(man.read_text())
    man.write_text(json.dumps({**good, "tokenizer_sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="another tokenizer"):
        load_vlm(path)
    man.write_text(json.dumps({k: v for k, v in good.items() if k != "tokenizer_sha256"}))
    with pytest.raises(CheckpointError, match="does not record the tokenizer") as info:
        load_vlm(path)
    assert f"train-vlm --out {path}" in str(info.value)  # the reader's own checkpoint: rebuilt by the command line


def test_shipped_checkpoint_must_match_the_current_recipe(tmp_path, monkeypatch):
    """For the default path, a manifest whose recipe is not SHIPPED_RECIPE is stale and refused."""
    import mllm_scratch.vlm as vlm_module

    path = tmp_path / "vlm.pt"
    save_vlm(path, tiny_vlm(encoder="patches"), recipe={**SHIPPED_RECIPE.to_dict(), "stage2_steps": 1})
    monkeypatch.setattr(vlm_module, "DEFAULT_CHECKPOINT", path)
    with pytest.raises(CheckpointError, match=r"another recipe than SHIPPED_RECIPE.*build_checkpoints.py vlm"):
        load_vlm()
    save_vlm(path, tiny_vlm(encoder="patches"), recipe=VLMRecipe().to_dict())  # the switches off: another recipe
    with pytest.raises(CheckpointError, match=r"another recipe than SHIPPED_RECIPE"):
        load_vlm()
    save_vlm(path, tiny_vlm(encoder="patches"), recipe=SHIPPED_RECIPE.to_dict())
    assert load_vlm().config == tiny_vlm(encoder="patches").config


def test_build_vlm_takes_a_given_tower_and_refuses_one_for_fuyu():
    from mllm_scratch.gpt import GPT
    from mllm_scratch.vit import VisionTransformer
    from mllm_scratch.vlm import build_vlm

    torch.manual_seed(0)
    tower = VisionTransformer(ViTConfig(image_size=32, patch_size=4, dim=16, depth=1, num_heads=2))
    lm = GPT(GPTConfig(vocab_size=TOK.vocab_size, context_length=96, dim=32, depth=1, num_heads=2))
    model = build_vlm(VLMRecipe(), TOK, lm=lm, tower=tower)
    assert model.encoder is tower and model.lm is lm and model.config.vision == tower.config
    assert model.num_image_tokens == 64 and model.trainable() == {"encoder": True, "projector": True, "lm": True}
    with pytest.raises(ValueError, match="Fuyu recipe .* has no image tower"):
        build_vlm(VLMRecipe(encoder="patches"), TOK, lm=lm, tower=tower)


def test_the_book_recipe_keeps_the_tower_frozen_in_stage_2():
    """The dense tower's patch vectors are what the LM reads; tuning them in stage 2 wore them down (tower_search)."""
    recipe = VLMRecipe()
    assert recipe.train_encoder is False and recipe.encoder == "clip"
    model = tiny_vlm()
    tower_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    train_stage(model, recipe, 2, TOK, steps=2, progress=False, log_every=0,
                data=batches(VQADataset("train", 8), 4, collate_fn=VLMCollator(TOK, model.num_image_tokens)))
    assert all(torch.equal(v, tower_before[k]) for k, v in model.encoder.state_dict().items())
    assert any(not torch.equal(v, lm_before[k]) for k, v in model.lm.state_dict().items())


def test_a_frozen_shipped_tower_is_stored_by_reference(tmp_path):
    """The shipped tower, unchanged, is recorded by checksum, not stored; loading takes it from tower.pt at the
    file's dtype. A tower that changed is stored; a wrong checksum, or a tower both stored and referenced, is refused."""
    from mllm_scratch.clip import TOWER_REFERENCE, pretrained_image_tower
    from mllm_scratch.gpt import GPT
    from mllm_scratch.vlm import build_vlm

    lm = GPT(GPTConfig(vocab_size=TOK.vocab_size, context_length=96, dim=32, depth=1, num_heads=2))
    model = build_vlm(VLMRecipe(), TOK, lm=lm, tower=pretrained_image_tower())
    path = tmp_path / "vlm.pt"
    manifest = save_vlm(path, model, dtype=torch.float16)
    stored = read_payload(path)["state_dict"]
    assert TOWER_REFERENCE in manifest and not any(k.startswith("encoder.") for k in stored)
    loaded = load_vlm(path)
    for k, v in model.state_dict().items():  # the tower as a float16 file would have held it
        expected = v.to(torch.float16).float() if k.startswith(("encoder.", "projector.", "lm.")) else v
        assert torch.equal(loaded.state_dict()[k], expected), k
    man = path.with_suffix(".json")
    man.write_text(json.dumps({**manifest, TOWER_REFERENCE: "0" * 64}))
    with pytest.raises(CheckpointError, match=f"{path}.*another image tower.*rebuild"):
        load_vlm(path)
    with torch.no_grad():  # a tower that trained is the file's own
        model.encoder.pos_embed.add_(0.1)
    manifest = save_vlm(path, model, dtype=torch.float16)
    assert TOWER_REFERENCE not in manifest
    assert any(k.startswith("encoder.") for k in read_payload(path)["state_dict"])
    man.write_text(json.dumps({**manifest, TOWER_REFERENCE: "0" * 64}))
    with pytest.raises(CheckpointError, match="both stores a tower and references"):
        load_vlm(path)


@pytest.mark.parametrize("name", ["vlm", "xattn", "methods_unified", "methods_cross", "methods_hybrid", "tiled_vlm"])
def test_shipped_vlms_refer_to_the_shipped_tower(name):
    """The shipped VLMs keep the book's tower frozen, so their files hold no copy of it."""
    from mllm_scratch.checkpoints import DEFAULT_DIR
    from mllm_scratch.clip import TOWER_REFERENCE

    manifest = json.loads((DEFAULT_DIR / f"{name}.json").read_text())
    stored = read_payload(DEFAULT_DIR / f"{name}.pt")["state_dict"]
    assert TOWER_REFERENCE in manifest and not any(k.startswith("encoder.") for k in stored)


# -- the spatial switches: place codes after the projector, a spatial stage, the QA LM


def test_spatial_switches_are_stored_only_when_on():
    """Off, the switches leave VLMRecipe's and VLMConfig's stored dicts as they were before they existed, so older
    results files and checkpoints still match; a recipe that turns them on records each of them."""
    from dataclasses import fields

    from dataclasses import replace
    from pathlib import Path

    switches = {"lm", "place_codes", "spatial_steps", "grounded", "text_questions", "colour_shape_prior"}
    assert {f.name for f in fields(VLMRecipe)} >= switches
    assert not switches & VLMRecipe().to_dict().keys()
    assert {k: SPATIAL.to_dict()[k] for k in switches - {"grounded", "text_questions", "colour_shape_prior"}} == {"lm": "qa", "place_codes": True, "spatial_steps": 6000}
    assert SHIPPED_RECIPE == replace(VLMRecipe(), place_codes=True, grounded=True, spatial_steps=3000, stage2_lm_lr=3e-4,
                                     colour_shape_prior=True)
    assert SHIPPED_RECIPE.to_dict().keys() - VLMRecipe().to_dict().keys() == {"place_codes", "grounded", "spatial_steps",
                                                                              "colour_shape_prior"}
    assert SPATIAL.stages == (1, "spatial", 2) and VLMRecipe().stages == (1, 2)
    # a results file written before the switches existed still matches today's two-stage recipe exactly
    longer = json.loads((Path(__file__).resolve().parents[1] / "data" / "results" / "vlm_longer.json").read_text())
    assert longer["recipe"] == replace(VLMRecipe(), stage2_steps=longer["recipe"]["stage2_steps"]).to_dict()
    assert not {"token_norm", "place_codes"} & tiny_vlm().config.to_dict().keys()
    on = VLMConfig(**{**tiny_vlm().config.to_dict(), "token_norm": True, "place_codes": True})
    assert {"token_norm", "place_codes"} <= on.to_dict().keys() and VLMConfig(**on.to_dict()) == on


@pytest.mark.parametrize("bad, message", [
    (dict(lm="big"), "lm must be 'base' or 'qa', got 'big'"),
    (dict(stage1_steps=0), "stage1_steps must be an int >= 1, got 0"),
    (dict(stage2_steps=-5), "stage2_steps must be an int >= 1, got -5"),
    (dict(spatial_steps=-1), "spatial_steps must be an int >= 0, got -1"),
    (dict(spatial_steps=True), "spatial_steps must be an int >= 0, got True"),
    (dict(spatial_steps=2.5), "spatial_steps must be an int >= 0, got 2.5"),
    (dict(grounded="yes"), "grounded must be True or False, got 'yes'"),
    (dict(place_codes=1), "place_codes must be True or False, got 1"),
    (dict(text_questions=-1), "text_questions must be an int >= 0, got -1"),
    (dict(text_questions=100.0), "text_questions must be an int >= 0, got 100.0"),
    (dict(colour_shape_prior="on"), "colour_shape_prior must be True or False, got 'on'"),
])
def test_a_bad_spatial_switch_is_refused(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        VLMRecipe(**bad)


def test_a_stage_that_does_not_exist_is_refused():
    recipe = VLMRecipe(encoder="vit", caption_pairs=32, qa_pairs=32, batch_size=8)
    with pytest.raises(ValueError, match="the recipe has spatial_steps=0, so it has no spatial stage"):
        train_stage(tiny_vlm(), recipe, "spatial", TOK, progress=False)
    config = SPATIAL.train_config("spatial")  # the spatial stage: its own budget, stage 2's rate
    assert (config.steps, config.lr) == (SPATIAL.spatial_steps, SPATIAL.stage2_lr)
    for stage in (3, 0, "mix", True):
        with pytest.raises(ValueError, match=r"stage must be one of \(1, 'spatial', 2\), got " + repr(stage)):
            train_stage(tiny_vlm(), recipe, stage, TOK, steps=1, progress=False)
        with pytest.raises(ValueError, match="stage must be one of"):
            recipe.train_config(stage)


@pytest.mark.parametrize("projector", ["linear", "mlp"])
def test_place_codes_add_row_plus_column_after_a_layernorm(projector):
    """token_norm + place_codes: image token r * grid + c = LayerNorm(projector(patch)) + row[r] + column[c]."""
    torch.manual_seed(0)
    lm = GPTConfig(vocab_size=TOK.vocab_size, context_length=64, dim=32, depth=1, num_heads=2)
    config = VLMConfig(encoder="patches", vision=VISION, lm=lm, projector=projector, image_id=TOK.image_id,
                       token_norm=True, place_codes=True)
    model = UnifiedVLM(config)
    *base, norm, place = model.projector
    assert isinstance(norm, torch.nn.LayerNorm) and place.grid == 4 and len(base) == (1 if projector == "linear" else 3)
    images = torch.rand(2, 3, 32, 32)
    tokens = model.image_tokens(images)
    features = model.encoder(images)
    for layer in base:
        features = layer(features)
    normed = torch.nn.functional.layer_norm(features, (32,), norm.weight, norm.bias)
    for r in range(4):
        for c in range(4):
            torch.testing.assert_close(tokens[:, r * 4 + c], normed[:, r * 4 + c] + place.row[r] + place.column[c])
    assert normed.std(dim=-1).mean().item() == pytest.approx(1.0, abs=0.05)  # at the scale of word embeddings
    with pytest.raises(ValueError, match="expected 16 tokens per item"):
        place(torch.zeros(1, 9, 32))
    with pytest.raises(ValueError, match="place_codes need a square grid of image tokens"):
        class Video(VLMConfig):  # a config whose tokens are not the patch grid (as chapter 09's latents)
            @property
            def num_image_tokens(self) -> int:
                return 16 + 1
        Video(encoder="patches", vision=VISION, lm=lm, image_id=TOK.image_id, place_codes=True)


def test_spatial_data_asks_only_spatial_questions_canonical_words_first():
    from mllm_scratch.shapeworld import CANONICAL_WORDS
    from mllm_scratch.vlm import spatial_datasets

    canonical, four_words = spatial_datasets(VLMRecipe(qa_pairs=40))
    assert len(canonical) == len(four_words) == 40
    for i in range(40):
        assert canonical[i][3] == "spatial" and four_words[i][3] == "spatial"
        assert any(f" {w} " in canonical[i][1] for w in CANONICAL_WORDS)
    words = {w for i in range(40) for w in ("left of", "right of", "above", "below") if f" {w} " in four_words[i][1]}
    assert words == {"left of", "right of", "above", "below"}


def test_the_spatial_stage_trains_what_stage_2_trains_on_spatial_questions(tmp_path):
    """train_vlm runs stage 1, then "spatial", then 2; the spatial stage tunes projector and LM, never the tower,
    and a model with place codes round-trips through save_vlm / load_vlm."""
    from dataclasses import replace

    from mllm_scratch.gpt import GPT
    from mllm_scratch.vit import VisionTransformer
    from mllm_scratch.vlm import build_vlm, stage_data

    recipe = replace(SPATIAL, encoder="vit", caption_pairs=16, qa_pairs=16, batch_size=4)
    batch = next(iter(stage_data(recipe, "spatial", TOK, 64)))
    questions = [TOK.decode([t for t in row.tolist() if t not in (TOK.image_id, TOK.pad_id)]) for row in batch.ids]
    assert all(any(w in q for w in ("left of", "right of", "above", "below")) for q in questions)
    torch.manual_seed(0)
    tower = VisionTransformer(ViTConfig(image_size=32, patch_size=4, dim=16, depth=1, num_heads=2))
    lm = GPT(GPTConfig(vocab_size=TOK.vocab_size, context_length=96, dim=32, depth=1, num_heads=2))
    model = build_vlm(recipe, TOK, lm=lm, tower=tower)
    assert model.config.token_norm and model.config.place_codes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lrs = {}
    real_adamw = torch.optim.AdamW

    def spy(groups, **kw):  # the rates the spatial stage gives each part
        lrs.update({g["part"]: g["lr"] for g in groups})
        return real_adamw(groups, **kw)

    torch.optim.AdamW = spy
    try:
        train_stage(model, recipe, "spatial", TOK, steps=2, log_every=0, progress=False, device="cpu")
    finally:
        torch.optim.AdamW = real_adamw
    assert lrs == {"projector": recipe.stage2_lr, "lm": recipe.stage2_lm_lr}
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"projector", "lm"} and not any(model.trainable().values())
    assert not torch.equal(model.projector[-1].row, before["projector.4.row"])  # the place codes learn
    save_vlm(tmp_path / "v.pt", model)
    loaded = load_vlm(tmp_path / "v.pt")
    assert loaded.config.place_codes and all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_train_vlm_runs_the_spatial_stage_between_1_and_2(monkeypatch):
    """train_vlm follows recipe.stages: a History per stage, named stage1, spatial, stage2, each its own budget."""
    from dataclasses import replace

    import mllm_scratch.vlm as vlm_module
    from mllm_scratch.gpt import GPT
    from mllm_scratch.vit import VisionTransformer
    from mllm_scratch.vlm import build_vlm, loss_curve, train_vlm

    torch.manual_seed(0)
    tower = VisionTransformer(ViTConfig(image_size=32, patch_size=4, dim=16, depth=1, num_heads=2))
    lm = GPT(GPTConfig(vocab_size=TOK.vocab_size, context_length=96, dim=32, depth=1, num_heads=2))
    monkeypatch.setattr(vlm_module, "build_vlm", lambda recipe, tokenizer: build_vlm(recipe, tokenizer, lm=lm, tower=tower))
    recipe = replace(SPATIAL, encoder="vit", caption_pairs=8, qa_pairs=8, batch_size=4,
                     stage1_steps=2, spatial_steps=3, stage2_steps=4)
    model, histories = train_vlm(recipe, TOK, log_every=0, progress=False, device="cpu")
    assert list(histories) == ["stage1", "spatial", "stage2"]
    assert [h.steps[-1] for h in histories.values()] == [2, 3, 4]
    assert not model.training and not any(model.trainable().values())
    assert loss_curve(histories["spatial"], every=1)[-1][0] == 3


# -- grounded spatial answers: the recipe's data, and how replies are scored


def test_a_grounded_recipe_grounds_the_spatial_answers_of_both_stages_that_ask_questions():
    recipe = VLMRecipe(encoder="vit", caption_pairs=32, qa_pairs=64, batch_size=8, spatial_steps=1, grounded=True)
    for data in vlm.spatial_datasets(recipe):
        assert data.grounded and {data[i][3] for i in range(8)} == {"spatial"}
        assert all(len(data[i][2].split()) == 7 for i in range(8))  # "red circle 1 blue square 5 yes"
    assert not any(d.grounded for d in vlm.spatial_datasets(replace(recipe, grounded=False)))
    answers = [TOK.decode([t for t in row.tolist() if t >= 0 and t != TOK.eot_id])
               for _, batch in zip(range(8), vlm.stage_data(recipe, 2, TOK, 4)) for row in batch.labels]
    spatial = [a for a in answers if a.strip().endswith((" yes", " no")) and len(a.split()) == 7]
    plain = [a for a in answers if len(a.split()) == 1]
    assert spatial and plain  # grounded spatial answers beside one-word ones (and captions) in stage 2's mix


def test_text_questions_join_stage_2s_mix_only():
    """text_questions adds described-scene questions (blank image, description + question) to stage 2 alone."""
    recipe = VLMRecipe(encoder="vit", caption_pairs=16, qa_pairs=16, batch_size=16, spatial_steps=1, text_questions=16)

    def prompts(recipe, stage, n):  # the prompts of the stage's first n batches (one epoch of its data)
        return [TOK.decode([t for t in row.tolist() if t not in (TOK.image_id, TOK.pad_id)])
                for _, batch in zip(range(n), vlm.stage_data(recipe, stage, TOK, 4)) for row in batch.ids]

    described = lambda texts: [t for t in texts if t.startswith("there ")]
    mix = prompts(recipe, 2, 3)  # 16 questions + 16 captions + 16 described
    assert len(described(mix)) == 16 and all(" what colour is " in t or " what shape is " in t for t in described(mix))
    assert not described(prompts(recipe, 1, 1)) and not described(prompts(recipe, "spatial", 2))
    assert not described(prompts(replace(recipe, text_questions=0), 2, 2))
    for stage in (1, "spatial"):  # the stages before stage 2 read the very same batches with or without them
        with_text, without = (next(iter(vlm.stage_data(r, stage, TOK, 4))) for r in (recipe, replace(recipe, text_questions=0)))
        assert torch.equal(with_text.ids, without.ids) and torch.equal(with_text.images, without.images)


def handmade_prior_bias(ids, labels, vocab_size, floor=1e-3):
    """The colour-shape bias written out the slow way, position by position, from the training pairs alone."""
    from mllm_scratch.shapeworld import COLOURS, SHAPES, ShapeWorldConfig

    word = {w: TOK.encode_ordinary(" " + w)[0] for w in (*COLOURS, *SHAPES, "object")}
    pairs = ShapeWorldConfig().train_pairs()
    question_mark = TOK.encode_ordinary("?")[0]
    bias = torch.zeros(ids.shape[0], ids.shape[1] - 1, vocab_size)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):  # logits at t predict the token at t + 1
            if labels[b, t + 1] == vlm.IGNORE_INDEX:
                continue
            colour = None
            if int(ids[b, t]) in [word[c] for c in COLOURS]:  # "... green" -> a shape may follow
                colour = next(c for c in COLOURS if word[c] == int(ids[b, t]))
            elif t >= 2 and ids[b, t] == question_mark and ids[b, t - 1] == word["object"]:  # "the green object?" -> answer
                colour = next((c for c in COLOURS if word[c] == int(ids[b, t - 2])), None)
            if colour is None:
                continue
            seen = [s for s in SHAPES if (colour, s) in pairs]
            for s in SHAPES:
                p = 1 / len(seen) if s in seen else floor
                bias[b, t, word[s]] = torch.log(torch.tensor(p * len(SHAPES)))
    return bias


def test_the_colour_shape_prior_equals_the_handmade_one_on_stage_2_batches():
    """ColourShapePrior.bias (a table look-up) equals the position-by-position loop, and vlm_loss(prior=...) adds it to the logits."""
    recipe = VLMRecipe(encoder="vit", caption_pairs=64, qa_pairs=64, batch_size=16, grounded=True)
    model = tiny_vlm("vit")
    vocab = model.lm.config.vocab_size
    prior = vlm.ColourShapePrior(TOK, vocab)
    biased = 0
    for _, batch in zip(range(4), vlm.stage_data(recipe, 2, TOK, model.num_image_tokens)):
        fast = prior.bias(batch.ids, batch.labels)
        assert torch.equal(fast, handmade_prior_bias(batch.ids, batch.labels, vocab))
        biased += int(fast.abs().sum(-1).gt(0).sum())
        logits = model(batch.ids, batch.images)[:, :-1] + fast
        hand = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels[:, 1:].flatten(),
                                                 ignore_index=vlm.IGNORE_INDEX)
        assert torch.allclose(vlm.vlm_loss(model, batch, prior), hand, atol=1e-6)
    assert biased > 20  # captions, grounded names and shape answers all carry it
    green, circle, square = (TOK.encode_ordinary(" " + w)[0] for w in ("green", "circle", "square"))
    row = prior.rows[prior.row_of[green]]
    assert row[circle] < -5 and 0.2 < row[square] < 0.25 and row.ne(0).sum() == 5  # only the five shape words
    assert prior.row_of[TOK.encode_ordinary(" red")[0]] > 0 and prior.row_of[circle] == 0


def test_the_colour_shape_prior_is_refused_a_bad_floor_and_trains_stage_2_only(monkeypatch):
    with pytest.raises(ValueError, match=r"floor must be a probability in \(0, 1\), got 0"):
        vlm.ColourShapePrior(TOK, 512, floor=0)
    with pytest.raises(ValueError, match=r"the word '\w+' must be one token of a 100-token vocabulary, got ids \[\d+\]"):
        vlm.ColourShapePrior(TOK, 100)
    used = []
    plain = vlm.vlm_loss
    monkeypatch.setattr(vlm, "vlm_loss", lambda m, b, prior=None: (prior is not None and used.append(prior)) or plain(m, b))
    recipe = VLMRecipe(encoder="vit", caption_pairs=16, qa_pairs=16, batch_size=8, colour_shape_prior=True)
    model = tiny_vlm("vit")
    for stage in (1, 2):
        vlm.train_stage(model, recipe, stage, TOK, steps=2, progress=False)
        assert len(used) == (0 if stage == 1 else 2)  # stage 1 trains the projector on plain captions
    vlm.train_stage(model, replace(recipe, colour_shape_prior=False), 2, TOK, steps=1, progress=False)
    assert len(used) == 2  # off: the plain loss


class Replies:
    """A stand-in model whose generate() says the given replies, so scoring is tested without training."""

    def __init__(self, replies):
        self.replies = replies

    def generate(self, tokenizer, images, prompts, max_new_tokens):
        assert max_new_tokens >= 8 and len(prompts) == len(self.replies)
        return list(self.replies)


def test_vqa_accuracy_scores_a_grounded_reply_by_its_final_answer():
    data = VQADataset("val", 10, skills=("spatial",), grounded=True)
    truth = [data[i][2] for i in range(10)]
    flipped = {"yes": "no", "no": "yes"}
    replies = truth[:6] + [t.rsplit(" ", 1)[0] + " " + flipped[t.split()[-1]] for t in truth[6:]]
    assert vlm.vqa_accuracy(Replies(replies), TOK, data)["spatial"] == pytest.approx(0.6)
    plain = VQADataset("val", 10, skills=("spatial",))  # one-word truths: a grounded reply still scores by its yes/no
    assert vlm.vqa_accuracy(Replies(replies), TOK, plain)["spatial"] == pytest.approx(0.6)
    assert vlm.vqa_accuracy(Replies([t.split()[-1] for t in truth]), TOK, data)["spatial"] == 1.0


def test_grounding_accuracy_counts_places_swaps_and_answers():
    data = VQADataset("val", 40, skills=("spatial",), grounded=True)
    truth = [data[i][2].split() for i in range(40)]
    def swap(t):
        return " ".join([t[0], t[1], t[5], t[3], t[4], t[2], t[6]])
    replies = [" ".join(t) for t in truth[:30]] + [swap(t) for t in truth[30:]]
    differ = sum(t[2] != t[5] for t in truth[30:])
    scores = vlm.grounding_accuracy(Replies(replies), TOK, data)
    assert scores["both"] == pytest.approx((30 + (10 - differ)) / 40) and scores["swapped"] == pytest.approx(differ / 40)
    assert scores["answer"] == 1.0 and scores["first"] == scores["second"] == scores["both"]
    with pytest.raises(ValueError, match="grounded=True"):
        vlm.grounding_accuracy(Replies([]), TOK, VQADataset("val", 5, skills=("spatial",)))
