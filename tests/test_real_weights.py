"""Released architectures in the book's modules: tiny random `transformers` models saved to disk, loaded, compared.

Nothing is downloaded: every reference model is built from a config with random weights,
saved with `save_pretrained` (safetensors) and read back by `mllm_scratch.real_weights`.
"""

import json
import subprocess
import sys
from dataclasses import asdict, fields

import pytest
import torch
from torch import nn

from mllm_scratch.checkpoints import DEFAULT_DIR, read_payload
from mllm_scratch.clip import CLIP, CLIPConfig, pretrained_clip, pretrained_tower
from mllm_scratch.gpt import GPT, GPTConfig, pretrained_gpt
from mllm_scratch.real_weights import (
    UnsupportedConfigError,
    clip_config,
    gpt2_config,
    load_clip,
    load_gpt2,
    load_siglip_vision,
    local_copy,
    read_tensors,
    siglip_vision_config,
    weight_report,
)
from mllm_scratch.vit import QuickGELU, VisionTransformer, ViTConfig, load_vit, save_vit

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture
def hf():
    """The `transformers` package, quiet (no config warnings, no progress bars); skips the test where it is missing."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    return transformers


def tiny_gpt2(hf, path, **overrides):
    config = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = hf.GPT2LMHeadModel(hf.GPT2Config(**{**config, **overrides})).eval()
    model.save_pretrained(path)
    return model


def tiny_clip(hf, path, eos_token_id=99):
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, eos_token_id=eos_token_id, bos_token_id=98, pad_token_id=1)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    model = hf.CLIPModel(hf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    model.save_pretrained(path)
    return model


SIGLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                     patch_size=8)


def rewrite_config(path, **changes):
    file = path / "config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


# ----------------------------------------------------------------------------------
# GPT-2


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False}, {"activation_function": "gelu", "n_inner": 96}])
def test_gpt2_logits_and_hidden_states_equal_transformers(hf, tmp_path, overrides):
    ref = tiny_gpt2(hf, tmp_path, **overrides)
    model = load_gpt2(tmp_path)
    assert isinstance(model, GPT) and not model.training
    assert model.config.tie_weights == overrides.get("tie_word_embeddings", True)
    ids = torch.randint(0, 100, (3, 32))
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        torch.testing.assert_close(model(ids), out.logits, **TOL)
        torch.testing.assert_close(model.norm(model.hidden_states(ids)), out.hidden_states[-1], **TOL)


def test_gpt2_kv_cache_generation_matches_transformers_greedy(hf, tmp_path):
    ref = tiny_gpt2(hf, tmp_path)
    model = load_gpt2(tmp_path)
    from mllm_scratch.gpt import generate

    prompt = torch.randint(0, 100, (1, 5))
    ours = generate(model, prompt, max_new_tokens=10, temperature=0)
    theirs = ref.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_gpt2_model_without_prefix_and_with_mask_buffers_loads(hf, tmp_path):
    """A GPT2Model upload names tensors without "transformer." and may carry the causal-mask buffers."""
    from safetensors.torch import load_file, save_file

    ref = hf.GPT2Model(hf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0,
                                     eos_token_id=0)).eval()
    ref.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    save_file(tensors, tmp_path / "model.safetensors")
    report = weight_report(tmp_path)
    assert set(report.ignored) == {"h.0.attn.bias"} and not report.missing and not report.unexpected
    assert {row[0] for row in report.rows()} == set(tensors)  # every file tensor is accounted for
    model = load_gpt2(tmp_path)
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.norm(model.hidden_states(ids)), ref(ids).last_hidden_state, **TOL)


def test_gpt2_report_names_the_conv1d_conversion(hf, tmp_path):
    tiny_gpt2(hf, tmp_path)
    how = {m.book: (m.hf, m.how()) for m in weight_report(tmp_path).mappings}
    assert how["blocks.0.attn.k_proj.weight"] == ("transformer.h.0.attn.c_attn.weight", "transpose, k third")
    assert how["blocks.1.mlp.fc2.weight"] == ("transformer.h.1.mlp.c_proj.weight", "transpose")
    assert how["head.weight"] == ("transformer.wte.weight", "copy")  # tied


def test_a_tensor_nobody_accounts_for_is_an_error_not_dropped(hf, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_gpt2(hf, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["transformer.h.0.adapter.weight"] = torch.zeros(4, 4)
    save_file(tensors, tmp_path / "model.safetensors")
    assert weight_report(tmp_path).unexpected == ["transformer.h.0.adapter.weight"]
    with pytest.raises(ValueError, match=r"1 file tensors would be dropped, e.g. \['transformer.h.0.adapter.weight'\]"):
        load_gpt2(tmp_path)


def test_an_older_upload_with_pytorch_model_bin_loads(hf, tmp_path):
    from safetensors.torch import load_file

    ref = tiny_gpt2(hf, tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    assert not weight_report(tmp_path).missing
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_gpt2(tmp_path)(ids), ref(ids).logits, **TOL)


def test_the_package_imports_without_transformers_and_safetensors():
    code = ("import sys; sys.modules['transformers'] = sys.modules['safetensors'] = None; "
            "import mllm_scratch, mllm_scratch.real_weights; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_missing_tensor_is_an_error(hf, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_gpt2(hf, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["transformer.ln_f.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"book tensors have no source in the file, e.g. \['norm.weight'\]"):
        load_gpt2(tmp_path)


# ----------------------------------------------------------------------------------
# CLIP


def clip_inputs(eot: int):
    images = torch.randn(3, 3, 32, 32)
    ids = torch.randint(2, 98, (3, 12))
    for row, end in enumerate((4, 9, 11)):  # captions of different lengths, padded after <|endoftext|>
        ids[row, end] = eot
        ids[row, end + 1 :] = 1
    return images, ids


@pytest.mark.parametrize("eos_token_id", [99, 2])  # 2: the legacy config that pools at the largest id
def test_clip_embeddings_and_logits_equal_transformers(hf, tmp_path, eos_token_id):
    ref = tiny_clip(hf, tmp_path, eos_token_id)
    model = load_clip(tmp_path)
    assert isinstance(model, CLIP) and model.config.eot_id == 99
    images, ids = clip_inputs(eot=99)
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=images)
        torch.testing.assert_close(model.encode_image(images), out.image_embeds, **TOL)
        torch.testing.assert_close(model.encode_text(ids), out.text_embeds, **TOL)
        torch.testing.assert_close(model(images, ids), out.logits_per_image, **TOL)
        torch.testing.assert_close(model.vision(images).pooled, ref.vision_model(pixel_values=images).pooler_output, **TOL)
    assert model.logit_scale.item() == ref.logit_scale.item()  # the forward pass's clamp left it alone


def test_clip_config_switches_express_clip():
    config = clip_config({"model_type": "clip"})  # every field at transformers' defaults: ViT-B/32
    v, t = config.vision, config.text
    assert (v.image_size, v.patch_size, v.dim, v.depth, v.num_heads, v.num_patches) == (224, 32, 768, 12, 12, 49)
    assert (v.activation, v.embed_norm, v.patch_bias, v.pool) == ("quick_gelu", True, False, "cls")
    assert (t.dim, t.depth, t.num_heads, t.context_length, t.vocab_size, config.embed_dim) == (512, 12, 8, 77, 49408, 512)
    assert config.eot_id == 49407


def test_released_clip_scale_is_not_clamped():
    """OpenAI stores log scale 4.6052, a hair above ln 100: the loaded cap lets it through unchanged."""
    config = clip_config({"model_type": "clip"}, logit_scale=4.6052)
    model = CLIP(config)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == torch.tensor(4.6052).item()  # bit for bit


# ----------------------------------------------------------------------------------
# SigLIP's image tower


@pytest.mark.parametrize("use_head", [True, False])
def test_siglip_vision_patches_and_pool_equal_transformers(hf, tmp_path, use_head):
    ref = hf.SiglipVisionModel(hf.SiglipVisionConfig(**SIGLIP_VISION, vision_use_head=use_head)).eval()
    ref.save_pretrained(tmp_path)
    model = load_siglip_vision(tmp_path)
    assert isinstance(model, VisionTransformer)
    expected = ("map" if use_head else "mean", 1e-6, "gelu_tanh")
    assert (model.config.pool, model.config.norm_eps, model.config.activation) == expected
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, ours = ref(pixel_values=images), model(images)
        torch.testing.assert_close(ours.patches, out.last_hidden_state, **TOL)
        if use_head:
            torch.testing.assert_close(ours.pooled, out.pooler_output, **TOL)


def test_siglip_vision_from_a_whole_siglip_reports_the_text_tower(hf, tmp_path):
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=98, eos_token_id=99, pad_token_id=1)
    ref = hf.SiglipModel(hf.SiglipConfig(text_config=text, vision_config=SIGLIP_VISION)).eval()
    ref.save_pretrained(tmp_path)
    report = weight_report(tmp_path)
    assert report.kind == "siglip_vision" and not report.missing and not report.unexpected
    assert "logit_bias" in report.unused and any(k.startswith("text_model.") for k in report.unused)
    model = load_siglip_vision(tmp_path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images).pooled, ref.vision_model(pixel_values=images).pooler_output, **TOL)


# ----------------------------------------------------------------------------------
# Errors


def test_missing_directory_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory: expected a Hugging Face model directory"):
        load_gpt2(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_clip(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_gpt2(tmp_path)


@pytest.mark.parametrize(
    "convert, hf_config, message",
    [
        (gpt2_config, {"model_type": "gpt2", "activation_function": "relu"}, "activation_function='relu'"),
        (gpt2_config, {"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        (gpt2_config, {"model_type": "llama"}, "model_type='llama'"),
        (clip_config, {"model_type": "clip", "vision_config": {"image_size": [224, 160]}},
         r"vision_config has image_size=\[224, 160\]"),
        (clip_config, {"model_type": "clip", "text_config": {"hidden_act": "silu"}}, "text_config has hidden_act='silu'"),
        (siglip_vision_config, {"model_type": "siglip2_vision_model"}, "model_type='siglip2_vision_model'"),
    ],
)
def test_an_architecture_the_book_cannot_express_is_refused_by_name(convert, hf_config, message):
    with pytest.raises(UnsupportedConfigError, match=message):
        convert(hf_config)


def test_loader_refuses_a_directory_of_another_architecture(hf, tmp_path):
    tiny_gpt2(hf, tmp_path)
    with pytest.raises(UnsupportedConfigError, match="model_type='gpt2'"):
        load_clip(tmp_path)
    rewrite_config(tmp_path, activation_function="swish")
    with pytest.raises(UnsupportedConfigError, match="config.json has activation_function='swish'"):
        load_gpt2(tmp_path)


def test_without_safetensors_the_error_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install transformers safetensors"):
        read_tensors(tmp_path)


def test_local_copy_uses_the_environment_then_the_cache_and_never_downloads(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    empty = tmp_path / "empty-cache"
    monkeypatch.delenv("MLLM_TEST_DIR", raising=False)
    assert local_copy("openai-community/gpt2", "MLLM_TEST_DIR", cache_dir=empty) is None
    monkeypatch.setenv("MLLM_TEST_DIR", str(tmp_path))
    assert local_copy("openai-community/gpt2", "MLLM_TEST_DIR", cache_dir=empty) == tmp_path
    # a cache as `hf download` leaves it: refs/main names the snapshot that holds the files
    cache = tmp_path / "cache"
    snapshot = cache / "models--openai-community--gpt2" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--openai-community--gpt2" / "refs").mkdir()
    (cache / "models--openai-community--gpt2" / "refs" / "main").write_text("abc123")
    monkeypatch.delenv("MLLM_TEST_DIR")
    assert local_copy("openai-community/gpt2", "MLLM_TEST_DIR", cache_dir=cache) == snapshot


# ----------------------------------------------------------------------------------
# The defaults are the book's models, unchanged


def _shipped_state(name):
    return read_payload(DEFAULT_DIR / f"{name}.pt")


@pytest.mark.parametrize("name, build", [("gpt", lambda: GPT()), ("clip", lambda: CLIP())])
def test_default_models_have_the_shipped_checkpoints_keys_and_shapes(name, build):
    shipped = _shipped_state(name)
    assert {k: tuple(v.shape) for k, v in build().state_dict().items()} == {
        k: tuple(v.shape) for k, v in shipped["state_dict"].items()
    }


def test_old_configs_without_the_switches_read_as_the_defaults():
    saved = _shipped_state("clip")["config"]
    assert "activation" not in saved["vision"] and "embed_norm" not in saved["vision"]  # written before the switches
    config = CLIPConfig.from_dict(saved)
    assert (config.vision.activation, config.vision.norm_eps, config.vision.embed_norm, config.vision.patch_bias) == (
        "gelu", 1e-5, False, True)
    assert (config.text.activation, config.text.norm_eps) == ("gelu", 1e-5)
    for model in (pretrained_gpt(), pretrained_clip(), pretrained_tower()):  # the shipped files still load
        assert not model.training


def test_default_modules_are_the_books():
    vit, gpt = VisionTransformer(), GPT()
    for model in (vit, gpt):
        acts = [m for m in model.modules() if isinstance(m, (nn.GELU, QuickGELU))]
        assert acts and all(type(a) is nn.GELU and a.approximate == "none" for a in acts)
        assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert vit.patch_embed.proj.bias is not None and not hasattr(vit, "embed_norm") and not hasattr(vit, "attn_pool")


def test_switches_survive_save_and_load(tmp_path):
    config = ViTConfig(pool="map", activation="gelu_tanh", norm_eps=1e-6, embed_norm=True, patch_bias=False)
    model = VisionTransformer(config).eval()
    save_vit(model, tmp_path / "vit.pt")
    loaded = load_vit(tmp_path / "vit.pt").eval()
    assert loaded.config == config
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images).pooled, model(images).pooled, atol=0, rtol=0)


def test_bad_switch_values_are_refused():
    with pytest.raises(ValueError, match="activation must be one of"):
        GPTConfig(activation="relu")
    with pytest.raises(ValueError, match="norm_eps must be a number in"):
        ViTConfig(norm_eps=0)
    with pytest.raises(ValueError, match="pool must be 'cls', 'mean' or 'map'"):
        ViTConfig(pool="max")
    assert {f.name for f in fields(GPTConfig)} >= {"activation", "norm_eps"} and "activation" in asdict(GPTConfig())


def test_clip_config_dict_overrides_config_as_in_transformers():
    transformers = pytest.importorskip("transformers")
    from mllm_scratch.real_weights import clip_config

    hf = {"model_type": "clip",
          "text_config": {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "hidden_size": 64},
          "text_config_dict": {"hidden_act": "gelu", "layer_norm_eps": 1e-6}}
    theirs = transformers.CLIPConfig(**{k: v for k, v in hf.items() if k != "model_type"}).text_config
    ours = clip_config(hf).text
    assert (ours.activation, ours.norm_eps, ours.dim) == (theirs.hidden_act, theirs.layer_norm_eps, theirs.hidden_size)
