"""The GPT of chapter 04: causality, generation (cached = uncached), hooks, the shipped checkpoint."""

import json
import math
from dataclasses import asdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mllm_scratch.attention import KVCache
from mllm_scratch.checkpoints import CheckpointError, manifest_path, save_checkpoint, sha256_file
from mllm_scratch.gpt import (
    DEFAULT_CHECKPOINT,
    GPT,
    GPTConfig,
    PretrainRecipe,
    evaluate_lm,
    generate,
    lm_loss,
    next_token_loss,
    pretrained_gpt,
    sample_next,
    tokenizer_sha256,
)
from mllm_scratch.text import PackedTextDataset, pack_texts, unigram_cross_entropy
from mllm_scratch.vit import config_dict

TINY = GPTConfig(vocab_size=50, context_length=16, dim=32, depth=2, num_heads=4)

TOKENIZER = {"tokenizer_sha256": tokenizer_sha256()}  # what a real GPT checkpoint records


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(**{**asdict(TINY), **overrides})
    model = GPT(config).eval()
    # Random init gives near-uniform logits; a larger final-norm gain gives peaked ones (logit std ~2),
    # so greedy decoding and sampling are both non-trivial.
    with torch.no_grad():
        model.norm.weight.mul_(20)
    return model


# ---------------------------------------------------------------- model


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="dim 30 is not divisible by num_heads 4"):
        GPTConfig(dim=30)
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got 0"):
        GPTConfig(vocab_size=0)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)


def test_default_vocab_matches_shipped_tokenizer():
    from mllm_scratch.tokenizer import load_tokenizer

    assert GPTConfig().vocab_size == load_tokenizer().vocab_size


def test_shapes_and_tied_weights():
    model = tiny_model()
    ids = torch.randint(0, 50, (3, 7))
    assert model(ids).shape == (3, 7, 50)
    assert model.head.weight is model.tok_emb.weight
    untied = tiny_model(tie_weights=False)
    tied_count = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    assert sum(p.numel() for p in untied.parameters()) == tied_count + 50 * 32
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 2


@settings(max_examples=25, deadline=None)
@given(t=st.integers(2, 16), j=st.data())
def test_no_leakage_from_future_tokens(t, j):
    model = tiny_model()
    pos = j.draw(st.integers(1, t - 1))  # the token we change
    ids = torch.randint(0, 50, (2, t), generator=torch.Generator().manual_seed(t))
    changed = ids.clone()
    changed[:, pos] = (changed[:, pos] + 1 + torch.arange(2)) % 50
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :pos], b[:, :pos], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, pos:], b[:, pos:])  # and the change is seen from its position on


def test_inputs_embeds_equals_ids():
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=model.embed(ids)), model(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one of ids"):
        model(ids, inputs_embeds=model.embed(ids))
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(batch, tokens, 32\)"):
        model(inputs_embeds=torch.zeros(2, 9, 31))


def test_spliced_embeddings_change_only_later_positions():
    model = tiny_model()
    ids = torch.randint(0, 50, (1, 10))
    emb = model.embed(ids)
    spliced = emb.clone()
    spliced[:, 4:6] = torch.randn(1, 2, 32)  # "image features" in the middle of the text
    with torch.no_grad():
        a, b = model(inputs_embeds=emb), model(inputs_embeds=spliced)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-6)


def test_manual_block_loop_and_after_block_hook_equal_forward():
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        x = model.input_states(ids)
        for block in model.blocks:
            x = block(x, causal=True)
        manual = model.to_logits(x)
        calls = []
        hooked = model.to_logits(model.hidden_states(ids, after_block=lambda i, h: calls.append(i) or h))
        torch.testing.assert_close(manual, model(ids), rtol=0, atol=0)
        torch.testing.assert_close(hooked, model(ids), rtol=0, atol=0)
        assert calls == [0, 1]
        # A layer inserted between blocks really changes the result.
        shifted = model.to_logits(model.hidden_states(ids, after_block=lambda i, h: h + 1.0 if i == 0 else h))
        assert not torch.allclose(shifted, manual)


def test_key_padding_mask_hides_padded_keys():
    model = tiny_model()
    ids = torch.randint(0, 50, (1, 6))
    other = ids.clone()
    other[0, 2] = (other[0, 2] + 7) % 50
    keep = torch.ones(1, 6, dtype=torch.bool)
    keep[0, 2] = False  # key 2 is padding
    with torch.no_grad():
        a = model(ids, key_padding_mask=keep)
        b = model(other, key_padding_mask=keep)
        unmasked = model(other)
    # Other positions never attend to token 2, so its value cannot matter (except at its own query).
    rows = [0, 1, 3, 4, 5]
    torch.testing.assert_close(a[:, rows], b[:, rows], rtol=0, atol=1e-6)
    assert not torch.allclose(b[:, 3:], unmasked[:, 3:])
    attn_mask = torch.ones(6, 6, dtype=torch.bool)
    attn_mask[:, 2] = False
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attn_mask=attn_mask)[:, rows], a[:, rows], rtol=0, atol=1e-6)


def test_cached_forward_equals_full_forward():
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 12))
    caches = model.new_caches()
    with torch.no_grad():
        full = model(ids)
        first = model(ids[:, :5], caches=caches)  # a prompt...
        rest = [model(ids[:, t : t + 1], caches=caches) for t in range(5, 12)]  # ...then one token at a time
    assert all(isinstance(c, KVCache) and len(c) == 12 for c in caches)
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, rtol=1e-5, atol=1e-5)


def test_context_length_is_enforced_with_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceed context_length 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in 0..49, got min 0 and max 50"):
        model(torch.tensor([[0, 50]]))


def test_next_token_loss_of_a_uniform_model_is_log_vocab_and_ignores_masked_targets():
    logits = torch.zeros(2, 5, 50)
    targets = torch.randint(0, 50, (2, 5))
    assert math.isclose(float(next_token_loss(logits, targets)), math.log(50), rel_tol=1e-6)
    targets[:, 2:] = -100
    logits[:, 2:, 0] = 100.0  # would be a large loss if those targets were scored
    assert math.isclose(float(next_token_loss(logits, targets)), math.log(50), rel_tol=1e-6)


def test_loss_falls_when_training_on_a_pattern():
    torch.manual_seed(0)
    model = GPT(TINY)
    ids = torch.arange(16).repeat(4, 2)[:, :17] % 50  # 0 1 2 ... 15 0: fully predictable
    batch = (ids[:, :-1], ids[:, 1:])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = float(lm_loss(model, batch).detach())
    for _ in range(60):
        loss = lm_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.2 * first


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (0.8, 5)])
@pytest.mark.parametrize("new_tokens", [6, 30])  # 30 runs past context_length 16: the window slides
def test_cached_and_uncached_generation_pick_the_same_tokens(temperature, top_k, new_tokens):
    model = tiny_model()
    prompt = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(1))
    outs = [
        generate(model, prompt, new_tokens, temperature, top_k, use_cache=use_cache,
                 generator=torch.Generator().manual_seed(7))
        for use_cache in (True, False)
    ]
    assert outs[0].shape == (3, 4 + new_tokens)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][:, :4], prompt)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = tiny_model()
    prompt = torch.tensor([1, 2, 3])
    a = generate(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(3))
    c = generate(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(4))
    assert a.shape == (23,) and torch.equal(a, b)
    assert not torch.equal(a, c)


def test_greedy_equals_top_1_and_argmax():
    model = tiny_model()
    prompt = torch.tensor([[5, 6]])
    greedy = generate(model, prompt, 10, temperature=0.0)
    assert torch.equal(greedy, generate(model, prompt, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        assert int(greedy[0, 2]) == int(model(prompt)[0, -1].argmax())


def test_top_k_only_samples_the_k_most_likely_tokens():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, -1.0]]).repeat(500, 1)
    picks = sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {1, 2}


def test_eos_stops_generation_and_pads_finished_rows():
    model = tiny_model()
    prompt = torch.randint(0, 50, (4, 2), generator=torch.Generator().manual_seed(2))
    free = generate(model, prompt, 12, temperature=0.0)
    eos = int(free[0, 4])  # row 0 emits this token at its third step
    out = generate(model, prompt, 12, temperature=0.0, eos_id=eos)
    for row in out:
        new = row[2:].tolist()
        if eos in new:
            first = new.index(eos)
            assert all(t == eos for t in new[first:])
    ended = (out[:, 2:] == eos).any(dim=1)
    assert ended[0] and (out.shape[1] < 14 or not ended.all())


def test_generate_rejects_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="temperature must be"):
        generate(model, torch.tensor([1]), 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k must be None or a positive int, got 0"):
        generate(model, torch.tensor([1]), 3, top_k=0)


def test_generate_leaves_training_mode_as_it_was():
    model = tiny_model().train()
    generate(model, torch.tensor([1]), 2)
    assert model.training


# ---------------------------------------------------------------- language-modelling data


class _ToyTokenizer:
    eot_id = 0

    def encode_batch(self, texts):
        return [[ord(c) - 96 for c in t] for t in texts]


def test_packing_puts_eot_between_texts_and_shifts_targets():
    stream = pack_texts(["ab", "c"], _ToyTokenizer())
    assert stream.tolist() == [0, 1, 2, 0, 3, 0]
    data = PackedTextDataset(stream, seq_len=2)
    assert len(data) == 2
    x, y = data[1]
    assert x.tolist() == [2, 0] and y.tolist() == [0, 3]
    assert torch.equal(torch.cat([data[i][1] for i in range(len(data))]), data.targets)
    with pytest.raises(ValueError, match="too short for one window"):
        PackedTextDataset(stream, seq_len=10)


def test_unigram_cross_entropy_matches_counts():
    train_ids = torch.tensor([0, 0, 0, 1])
    ce = unigram_cross_entropy(train_ids, torch.tensor([0, 1]), vocab_size=3, smoothing=1.0)
    # counts + 1 = [4, 2, 1] of 7
    assert math.isclose(ce, -(math.log(4 / 7) + math.log(2 / 7)) / 2, rel_tol=1e-9)


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    path = tmp_path / "gpt.pt"
    save_checkpoint(path, model, config_dict(model.config), name="gpt", extra=TOKENIZER)
    loaded = pretrained_gpt(path)
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    assert loaded.head.weight is loaded.tok_emb.weight  # still tied after loading
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


def test_checkpoint_saved_with_another_config_fails_clearly(tmp_path):
    model = tiny_model()
    path = tmp_path / "gpt.pt"
    save_checkpoint(path, model, config_dict(model.config), name="gpt", extra=TOKENIZER)
    with pytest.raises(CheckpointError, match=r"gpt\.pt was saved with another config: dim: 32 in the file, 64 expected") as err:
        pretrained_gpt(path, config=GPTConfig(**{**asdict(TINY), "dim": 64}))
    assert "build_checkpoints.py gpt" in str(err.value)


def test_checkpoint_whose_weights_do_not_fit_its_config_fails_clearly(tmp_path):
    model = tiny_model()
    path = tmp_path / "gpt.pt"
    lying = {**config_dict(model.config), "depth": 3}  # claims three blocks, holds two
    save_checkpoint(path, model, lying, name="gpt", extra=TOKENIZER)
    with pytest.raises(CheckpointError, match=r"gpt\.pt does not fit the model \(missing \['blocks\.2\."):
        pretrained_gpt(path)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_checkpoint_fails_clearly(tmp_path, damage):
    model = tiny_model()
    path = tmp_path / "gpt.pt"
    save_checkpoint(path, model, config_dict(model.config), name="gpt", extra=TOKENIZER)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"gpt\.pt has sha256 [0-9a-f]{64}, but its manifest .* expects") as err:
        pretrained_gpt(path)
    assert f"python scripts/build_checkpoints.py gpt --out {tmp_path}" in str(err.value)


def test_checkpoint_that_does_not_record_its_tokenizer_is_refused(tmp_path):
    model = tiny_model()
    path = tmp_path / "gpt.pt"
    save_checkpoint(path, model, config_dict(model.config), name="gpt")  # no tokenizer_sha256 in the manifest
    with pytest.raises(CheckpointError, match=r"does not record the tokenizer it was trained with"):
        pretrained_gpt(path)
    save_checkpoint(path, model, config_dict(model.config), name="gpt", extra={"tokenizer_sha256": "0" * 64})
    with pytest.raises(CheckpointError, match=r"trained with another tokenizer \(sha256 000000000000"):
        pretrained_gpt(path)


def test_missing_files_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing\.pt does not exist; build it with: python scripts/build_checkpoints.py gpt"):
        pretrained_gpt(tmp_path / "nothing.pt")
    model = tiny_model()
    path = tmp_path / "gpt.pt"
    save_checkpoint(path, model, config_dict(model.config), name="gpt", extra=TOKENIZER)
    manifest_path(path).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"manifest .*gpt\.json is corrupt"):
        pretrained_gpt(path)
    manifest_path(path).unlink()
    with pytest.raises(CheckpointError, match=r"manifest .*gpt\.json does not exist"):
        pretrained_gpt(path)


def test_shipped_checkpoint_loads_and_matches_its_manifest():
    import json

    manifest = json.loads(manifest_path(DEFAULT_CHECKPOINT).read_text())
    assert sha256_file(DEFAULT_CHECKPOINT) == manifest["sha256"]
    assert DEFAULT_CHECKPOINT.stat().st_size < 4 * 2**20
    assert manifest["recipe"] == config_dict(PretrainRecipe())  # switches at their defaults are not stored
    assert manifest["tokenizer_sha256"] == tokenizer_sha256()
    model = pretrained_gpt()
    assert model.config == PretrainRecipe().model and not model.training
    assert manifest["metrics"]["val_perplexity"] < 0.25 * manifest["metrics"]["unigram_perplexity"]


def test_shipped_checkpoint_writes_shapeworld_and_beats_the_unigram_baseline():
    from mllm_scratch.shapeworld import TextDataset
    from mllm_scratch.tokenizer import load_tokenizer

    tok = load_tokenizer()
    model = pretrained_gpt()
    val = TextDataset("val", 100)
    data = PackedTextDataset(pack_texts([val[i] for i in range(100)], tok), model.config.context_length)
    train = TextDataset("train", 500)
    train_ids = pack_texts([train[i] for i in range(500)], tok)
    unigram = math.exp(unigram_cross_entropy(train_ids, data.targets, tok.vocab_size))
    ppl = math.exp(evaluate_lm(model, data))
    assert ppl < 0.25 * unigram, (ppl, unigram)
    out = generate(model, torch.tensor([tok.eot_id]), 60, temperature=0.0, eos_id=tok.eot_id)
    text = tok.decode(out[1:-1].tolist())
    assert text.startswith("there ") and text.endswith(".") and int(out[-1]) == tok.eot_id, text


def test_the_lm_pretrained_with_questions_ships_and_says_yes_or_no():
    from mllm_scratch.gpt import DEFAULT_CHECKPOINT, QA_RECIPE, pretrained_gpt_qa
    from mllm_scratch.tokenizer import load_tokenizer

    path = DEFAULT_CHECKPOINT.with_name("gpt_qa.pt")
    if not path.exists():
        pytest.skip("data/checkpoints/gpt_qa.pt not built yet: python scripts/build_checkpoints.py gpt_qa")
    assert QA_RECIPE.questions and QA_RECIPE.model == PretrainRecipe().model
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["recipe"]["questions"] is True and "questions" not in config_dict(PretrainRecipe())  # a switch
    tok = load_tokenizer()
    lm = pretrained_gpt_qa()
    yes, no = tok.encode_ordinary(" yes")[0], tok.encode_ordinary(" no")[0]
    with torch.no_grad():
        probs = lm(torch.tensor([tok.encode_ordinary("is there a blue square?")]))[0, -1].softmax(-1)
    assert probs[yes] + probs[no] > 0.9
