"""Released weights in the book's modules: GPT-2 into `GPT`, CLIP into `CLIP`, SigLIP's image tower into `VisionTransformer`.

A Hugging Face model directory holds `config.json` (the architecture) and
`model.safetensors` (every tensor, by name). Loading one into the book's classes takes
three steps, each a public function here so that a reader can look at it:

1. read config.json into the book's config (`gpt2_config`, `clip_config`,
   `siglip_vision_config`), refusing any setting the book's modules cannot express;
2. name every book tensor after the file's tensor that fills it (`gpt2_names`,
   `clip_names`, `vision_names`): a `Mapping(book, hf, transpose, part, reshape)`. GPT-2 stores its linear layers as
   `Conv1D`, whose weight is the transpose of `nn.Linear`'s, and packs q, k and v into
   one matrix; SigLIP's attention pool packs them too; CLIP keeps its class token and
   position table without the batch dimension the book's ViT gives them;
3. fill the model strictly (`load_gpt2`, `load_clip`, `load_siglip_vision`): every weight
   of the book's model must come from the file, and every tensor of the file must be used
   or accounted for (`WeightReport`): a buffer that holds no weight (GPT-2's causal mask),
   a tied copy, or a part of the file outside the module asked for (a SigLIP checkpoint's
   text tower when only the image tower is loaded).

The book's defaults differ from the released models in a few places, which the config
switches cover: GPT-2's and SigLIP's tanh GELU and CLIP's QuickGELU (`activation`),
SigLIP's LayerNorm epsilon (`norm_eps`), CLIP's LayerNorm before the first block
(`ViTConfig.embed_norm`), its bias-free patch convolution (`patch_bias`) and SigLIP's
attention-pooling head (`pool="map"`). Reading the files needs the `safetensors` package;
nothing is downloaded here. Models come back in eval mode, float32, with dropout 0.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mllm_scratch.clip import CLIP, CLIPConfig
from mllm_scratch.gpt import GPT, GPTConfig
from mllm_scratch.vit import VisionTransformer, ViTConfig

Kind = Literal["gpt2", "clip", "siglip_vision"]
INSTALL_HINT = "pip install transformers safetensors"

# Hugging Face's names for the MLP's nonlinearity -> the book's `activation`.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",  # GPT-2: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    "gelu_pytorch_tanh": "gelu_tanh",  # SigLIP: the same formula, PyTorch's kernel
    "quick_gelu": "quick_gelu",  # CLIP: x * sigmoid(1.702 x)
}

# The defaults of the `transformers` config classes, for config.json files that leave a field out.
GPT2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
    "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
}
CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
CLIP_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}
SIGLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6, "vision_use_head": True,
}


class UnsupportedConfigError(ValueError):
    """A config.json setting the book's modules cannot express; the message names the field and its value."""


# ----------------------------------------------------------------------------------
# Step 1: config.json -> the book's config


def _with_defaults(hf: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    return {**defaults, **{k: v for k, v in hf.items() if k in defaults}}


def _unsupported(where: str, name: str, value: Any, expected: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(f"config.json{where} has {name}={value!r}: the book's modules express {expected}")


def _wrong_model(model_type: Any, expected: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(f"config.json has model_type={model_type!r}: this loader reads {expected}")


def _activation(where: str, name: str, value: Any) -> str:
    if value not in HF_ACTIVATIONS:
        raise _unsupported(where, name, value, f"only {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[value]


def _mlp_ratio(where: str, name: str, hidden: int, dim: int) -> float:
    """intermediate size / width, checked to give back exactly `hidden` (the book sizes the MLP as int(dim * ratio))."""
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        raise _unsupported(where, name, hidden, f"an MLP width int(dim * ratio) for dim {dim}")
    return ratio


def _square(where: str, name: str, value: Any) -> int:
    """An image or patch size: an int, or a [height, width] pair of equal ints (the book's ViT is square)."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise _unsupported(where, name, value, "square images and patches (one int)")
    return value


def _model_type(hf: dict[str, Any], expected: tuple[str, ...]) -> str:
    model_type = hf.get("model_type")
    if model_type not in expected:
        raise _wrong_model(model_type, " or ".join(repr(e) for e in expected))
    return model_type


def gpt2_config(hf: dict[str, Any]) -> GPTConfig:
    """GPT-2's config.json (a dict) -> the `GPTConfig` that expresses it exactly."""
    _model_type(hf, ("gpt2",))
    c = _with_defaults(hf, GPT2_DEFAULTS)
    if not c["scale_attn_weights"]:
        raise _unsupported("", "scale_attn_weights", False, "attention scaled by 1/sqrt(head_dim) (True)")
    if c["scale_attn_by_inverse_layer_idx"]:
        raise _unsupported("", "scale_attn_by_inverse_layer_idx", True, "the same attention scale in every layer (False)")
    if c["add_cross_attention"]:
        raise _unsupported("", "add_cross_attention", True, "a decoder without cross-attention (False)")
    dim = c["n_embd"]
    inner = 4 * dim if c["n_inner"] is None else c["n_inner"]
    return GPTConfig(
        vocab_size=c["vocab_size"], context_length=c["n_positions"], dim=dim, depth=c["n_layer"], num_heads=c["n_head"],
        mlp_ratio=_mlp_ratio("", "n_inner", inner, dim), dropout=0.0, bias=True,
        tie_weights=bool(c["tie_word_embeddings"]),
        activation=_activation("", "activation_function", c["activation_function"]),
        norm_eps=float(c["layer_norm_epsilon"]),
    )


def _clip_vision(v: dict[str, Any], where: str, *, siglip: bool) -> ViTConfig:
    dim = v["hidden_size"]
    pool = ("map" if v["vision_use_head"] else "mean") if siglip else "cls"
    return ViTConfig(
        image_size=_square(where, "image_size", v["image_size"]), patch_size=_square(where, "patch_size", v["patch_size"]),
        in_channels=v["num_channels"], dim=dim, depth=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
        mlp_ratio=_mlp_ratio(where, "intermediate_size", v["intermediate_size"], dim), dropout=0.0,
        pos_embedding="learned", pool=pool,
        activation=_activation(where, "hidden_act", v["hidden_act"]), norm_eps=float(v["layer_norm_eps"]),
        embed_norm=not siglip,  # CLIP's pre_layrnorm
        patch_bias=siglip,  # CLIP's patch convolution has no bias, SigLIP's has one
    )


def _tower_settings(hf: dict[str, Any], tower: str) -> dict[str, Any]:
    """A CLIP config.json's settings for one tower: `{tower}_config_dict` if present (its missing fields
    then take the defaults, as in transformers, whatever `{tower}_config` says), else `{tower}_config`."""
    legacy = hf.get(f"{tower}_config_dict")
    return dict(legacy) if legacy is not None else dict(hf.get(f"{tower}_config") or {})


def clip_config(hf: dict[str, Any], logit_scale: float | None = None) -> CLIPConfig:
    """CLIP's config.json (a dict) -> the `CLIPConfig` that expresses it exactly.

    `logit_scale` is the stored log temperature (the file's `logit_scale` tensor); the book
    clamps exp() of it at `max_logit_scale`, so that cap is raised to the stored value if
    needed (a stored value a hair above ln 100) and the loaded scale is used as is.
    The text tower pools at the first `eos_token_id`; configs written before that id was
    fixed say 2 and pool at the largest id instead, which is <|endoftext|> (the last id of
    the vocabulary), so the book pools at vocab_size - 1.
    """
    _model_type(hf, ("clip",))
    # Early transformers versions wrote the towers' settings as *_config_dict. Where a file has
    # one, transformers fills it with the class defaults and lets that override *_config
    # entirely, and so does the book.
    v = _with_defaults(_tower_settings(hf, "vision"), CLIP_VISION_DEFAULTS)
    t = _with_defaults(_tower_settings(hf, "text"), CLIP_TEXT_DEFAULTS)
    vision = _clip_vision(v, " vision_config", siglip=False)
    dim = t["hidden_size"]
    text = GPTConfig(
        vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"], dim=dim, depth=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"],
        mlp_ratio=_mlp_ratio(" text_config", "intermediate_size", t["intermediate_size"], dim), dropout=0.0, bias=True,
        tie_weights=True,  # CLIP's text tower has no output head; the book's (tied, no weight of its own) goes unused
        activation=_activation(" text_config", "hidden_act", t["hidden_act"]), norm_eps=float(t["layer_norm_eps"]),
    )
    eos = t["eos_token_id"]
    if eos == 2:  # the legacy config: pool at the largest id, <|endoftext|>
        eos = t["vocab_size"] - 1
    if not isinstance(eos, int) or isinstance(eos, bool) or not 0 <= eos < t["vocab_size"]:
        expected = f"one token id below vocab_size {t['vocab_size']}"
        raise _unsupported(" text_config", "eos_token_id", t["eos_token_id"], expected)
    scale = float(hf.get("logit_scale_init_value", 2.6592) if logit_scale is None else logit_scale)
    return CLIPConfig(
        vision=vision, text=text, embed_dim=hf.get("projection_dim", 512), eot_id=eos, loss="infonce",
        init_logit_scale=scale, max_logit_scale=max(100.0, math.exp(scale)),  # the clamp rounds back to the stored t
    )


def siglip_vision_config(hf: dict[str, Any]) -> ViTConfig:
    """The config.json of a SigLIP image tower, or of a whole SigLIP (its vision_config) -> the `ViTConfig` that expresses it."""
    if _model_type(hf, ("siglip_vision_model", "siglip")) == "siglip":
        vision = _with_defaults(hf.get("vision_config") or {}, SIGLIP_VISION_DEFAULTS)
        return _clip_vision(vision, " vision_config", siglip=True)
    return _clip_vision(_with_defaults(hf, SIGLIP_VISION_DEFAULTS), "", siglip=True)


# ----------------------------------------------------------------------------------
# Step 2: which file tensor fills which book tensor


@dataclass(frozen=True)
class Mapping:
    """One book tensor and the file tensor it comes from: transposed (Conv1D), cut to a third (packed q, k, v), reshaped."""

    book: str
    hf: str
    transpose: bool = False
    part: int | None = None  # 0, 1, 2: the q, k or v third along dim 0
    reshape: bool = False  # the same numbers, another shape (CLIP's class token: (dim,) -> (1, 1, dim))

    def how(self) -> str:
        """A few words on the conversion, for a table: "copy", "transpose", "transpose, k third", ..."""
        steps = ["transpose"] if self.transpose else []
        steps += [f"{'qkv'[self.part]} third"] if self.part is not None else []
        steps += ["reshape"] if self.reshape else []
        return ", ".join(steps) or "copy"

    def apply(self, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The file's tensor converted for a book tensor of `shape` (float32); a shape that does not fit is an error."""
        if self.transpose:
            tensor = tensor.T
        if self.part is not None:
            tensor = tensor.chunk(3, dim=0)[self.part]
        if self.reshape and tensor.numel() == shape.numel():
            tensor = tensor.reshape(shape)
        if tensor.shape != shape:
            raise ValueError(
                f"{self.hf} ({self.how()}) has shape {tuple(tensor.shape)}, but the book's {self.book} is {tuple(shape)}"
            )
        return tensor.to(torch.float32).contiguous()


def _linear(book: str, hf: str, transpose: bool = False, part: int | None = None) -> list[Mapping]:
    """The weight and bias of a linear layer or LayerNorm; a Conv1D transposes its weight only."""
    return [Mapping(f"{book}.weight", f"{hf}.weight", transpose, part), Mapping(f"{book}.bias", f"{hf}.bias", part=part)]


def _encoder_layer(book: str, hf: str) -> list[Mapping]:
    """A CLIP / SigLIP encoder layer -> the book's `TransformerBlock`: the same pieces, other names."""
    out = _linear(f"{book}.norm1", f"{hf}.layer_norm1") + _linear(f"{book}.norm2", f"{hf}.layer_norm2")
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        out += _linear(f"{book}.attn.{proj}", f"{hf}.self_attn.{proj}")
    return out + _linear(f"{book}.mlp.fc1", f"{hf}.mlp.fc1") + _linear(f"{book}.mlp.fc2", f"{hf}.mlp.fc2")


def gpt2_names(config: GPTConfig, prefix: str = "transformer.") -> list[Mapping]:
    """Every GPT tensor and the GPT-2 tensor it comes from; `prefix` is "transformer." (GPT2LMHeadModel) or "" (GPT2Model)."""
    p = prefix
    out = [Mapping("tok_emb.weight", f"{p}wte.weight"), Mapping("pos_emb.weight", f"{p}wpe.weight")]
    for i in range(config.depth):
        b, h = f"blocks.{i}", f"{p}h.{i}"
        out += _linear(f"{b}.norm1", f"{h}.ln_1") + _linear(f"{b}.norm2", f"{h}.ln_2")
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):  # c_attn packs q, k, v side by side
            out += _linear(f"{b}.attn.{proj}", f"{h}.attn.c_attn", transpose=True, part=part)
        out += _linear(f"{b}.attn.out_proj", f"{h}.attn.c_proj", transpose=True)
        out += _linear(f"{b}.mlp.fc1", f"{h}.mlp.c_fc", transpose=True)
        out += _linear(f"{b}.mlp.fc2", f"{h}.mlp.c_proj", transpose=True)
    out += _linear("norm", f"{p}ln_f")
    out.append(Mapping("head.weight", f"{p}wte.weight" if config.tie_weights else "lm_head.weight"))
    return out


def vision_names(config: ViTConfig, prefix: str = "vision_model.", book: str = "") -> list[Mapping]:
    """Every tensor of a `VisionTransformer` built from a CLIP or SigLIP config and the file tensor it comes from."""
    e, p = f"{prefix}embeddings", prefix
    out = [Mapping(f"{book}patch_embed.proj.weight", f"{e}.patch_embedding.weight")]
    if config.patch_bias:
        out.append(Mapping(f"{book}patch_embed.proj.bias", f"{e}.patch_embedding.bias"))
    if config.pool == "cls":
        out.append(Mapping(f"{book}cls_token", f"{e}.class_embedding", reshape=True))
    out.append(Mapping(f"{book}pos_embed", f"{e}.position_embedding.weight", reshape=True))
    if config.embed_norm:
        out += _linear(f"{book}embed_norm", f"{p}pre_layrnorm")  # sic: the name in CLIP's files
    for i in range(config.depth):
        out += _encoder_layer(f"{book}blocks.{i}", f"{p}encoder.layers.{i}")
    out += _linear(f"{book}norm", f"{p}post_layernorm")
    if config.pool == "map":
        a, h = f"{book}attn_pool", f"{p}head"
        out.append(Mapping(f"{a}.probe", f"{h}.probe"))
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):  # nn.MultiheadAttention packs q, k, v
            out += [Mapping(f"{a}.attn.{proj}.weight", f"{h}.attention.in_proj_weight", part=part),
                    Mapping(f"{a}.attn.{proj}.bias", f"{h}.attention.in_proj_bias", part=part)]
        out += _linear(f"{a}.attn.out_proj", f"{h}.attention.out_proj") + _linear(f"{a}.norm", f"{h}.layernorm")
        out += _linear(f"{a}.mlp.fc1", f"{h}.mlp.fc1") + _linear(f"{a}.mlp.fc2", f"{h}.mlp.fc2")
    return out


def clip_names(config: CLIPConfig) -> list[Mapping]:
    """Every tensor of the book's `CLIP` and the CLIPModel tensor it comes from."""
    out = vision_names(config.vision, "vision_model.", "vision.")
    t = "text_model."
    out += [Mapping("text.tok_emb.weight", f"{t}embeddings.token_embedding.weight"),
            Mapping("text.pos_emb.weight", f"{t}embeddings.position_embedding.weight")]
    for i in range(config.text.depth):
        out += _encoder_layer(f"text.blocks.{i}", f"{t}encoder.layers.{i}")
    out += _linear("text.norm", f"{t}final_layer_norm")
    out.append(Mapping("text.head.weight", f"{t}embeddings.token_embedding.weight"))  # tied: the same matrix
    out += [Mapping("image_proj.weight", "visual_projection.weight"), Mapping("text_proj.weight", "text_projection.weight"),
            Mapping("logit_scale", "logit_scale", reshape=True)]
    return out


# ----------------------------------------------------------------------------------
# Reading a directory


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"reading Hugging Face weights needs the {module.split('.')[0]} package: {INSTALL_HINT}") from None


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a Hugging Face model directory, as a dict; a clear error if the directory or the file is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory: expected a Hugging Face model directory holding config.json and "
            "model.safetensors (e.g. from `hf download openai-community/gpt2`)"
        )
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} has no config.json: expected a Hugging Face model directory (config.json + model.safetensors)"
        )
    return json.loads(file.read_text(encoding="utf-8"))


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The tensor files of a model directory: model.safetensors, its shards, or (older uploads) pytorch_model.bin."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [path / s for s in shards]
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    raise FileNotFoundError(
        f"{path} has no model.safetensors (nor its shards' index, nor pytorch_model.bin): no weights to load"
    )


def tensor_names(path: str | os.PathLike) -> list[str]:
    """The names of every tensor in a model directory, read from the file headers (no tensor is loaded from safetensors)."""
    names: list[str] = []
    for file in weight_files(path):
        if file.suffix == ".bin":
            names += list(torch.load(file, map_location="meta", weights_only=True))
        else:
            with _need("safetensors").safe_open(str(file), framework="pt") as f:
                names += list(f.keys())
    return names


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, by name, on the CPU."""
    out: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        if file.suffix == ".bin":
            out.update(torch.load(file, map_location="cpu", weights_only=True))
        else:
            out.update(_need("safetensors.torch").load_file(str(file), device="cpu"))
    return out


def local_copy(repo_id: str, env: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The reader's copy of a Hugging Face model, never downloaded: the directory in $`env` if set, else the
    Hugging Face cache's (or `cache_dir`'s) snapshot of `repo_id` (from `hf download repo_id`), else None."""
    if env and os.environ.get(env):
        return Path(os.environ[env])
    try:
        from huggingface_hub import try_to_load_from_cache  # reads the cache's folders; it has no network code path
    except ImportError:
        return None
    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    return Path(config).parent if isinstance(config, str) else None  # the snapshot folder holding config.json


# ----------------------------------------------------------------------------------
# Step 3: account for every tensor, then fill the model


@dataclass
class WeightReport:
    """Where every tensor of a model directory goes: mapped into the book's model, or why not."""

    kind: str
    mappings: list[Mapping]
    ignored: dict[str, str] = field(default_factory=dict)  # file tensor -> why it holds no weight to load
    unused: dict[str, str] = field(default_factory=dict)  # file tensor outside the module loaded -> which part it is
    missing: list[str] = field(default_factory=list)  # book tensors no file tensor fills (must be empty to load)
    unexpected: list[str] = field(default_factory=list)  # file tensors nobody accounts for (must be empty to load)

    def check(self, path: str | os.PathLike) -> None:
        """Raise ValueError unless every book tensor is filled and every file tensor is accounted for."""
        problems = []
        if self.missing:
            problems.append(f"{len(self.missing)} book tensors have no source in the file, e.g. {self.missing[:3]}")
        if self.unexpected:
            problems.append(f"{len(self.unexpected)} file tensors would be dropped, e.g. {self.unexpected[:3]}")
        if problems:
            raise ValueError(f"{path} does not fit the book's {self.kind} loader: " + "; ".join(problems))

    def rows(self) -> list[tuple[str, str, str]]:
        """(file name, book name, conversion) per mapped tensor, then (file name, "-", reason) per ignored or unused one."""
        out = [(m.hf, m.book, m.how()) for m in self.mappings]
        out += [(name, "-", why) for name, why in {**self.ignored, **self.unused}.items()]
        return out


def _ignored_reason(name: str) -> str | None:
    """Why a tensor that is no weight need not be loaded, or None for a weight."""
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return "GPT-2's causal mask, stored as a buffer (the book builds its mask)"
    if name.endswith("position_ids"):
        return "the positions 0..n-1, stored as a buffer"
    return None


def _detect(hf: dict[str, Any], kind: Kind | None) -> Kind:
    if kind is not None:
        if kind not in ("gpt2", "clip", "siglip_vision"):
            raise ValueError(f"kind must be 'gpt2', 'clip' or 'siglip_vision', got {kind!r}")
        return kind
    detected = {"gpt2": "gpt2", "clip": "clip", "siglip": "siglip_vision", "siglip_vision_model": "siglip_vision"}
    model_type = hf.get("model_type")
    if model_type not in detected:
        expected = "GPT-2 ('gpt2'), CLIP ('clip') and SigLIP ('siglip', 'siglip_vision_model')"
        raise _wrong_model(model_type, expected)
    return detected[model_type]  # type: ignore[return-value]


def _config_and_names(kind: Kind, hf: dict[str, Any], names: list[str], logit_scale: float | None = None):
    """The book's config, its name mappings, and a filter for file tensors outside the module (kind-specific)."""
    if kind == "gpt2":
        config: Any = gpt2_config(hf)
        prefix = "transformer." if any(n.startswith("transformer.") for n in names) else ""
        return config, gpt2_names(config, prefix), lambda n: None
    if kind == "clip":
        config = clip_config(hf, logit_scale)
        return config, clip_names(config), lambda n: None
    config = siglip_vision_config(hf)
    prefix = "vision_model." if any(n.startswith("vision_model.") for n in names) else ""

    def outside(name: str) -> str | None:
        if name.startswith("text_model.") or name in ("logit_scale", "logit_bias"):
            return "SigLIP's text tower and its logit scale and bias: only the image tower is loaded"
        return None

    return config, vision_names(config, prefix), outside


def _book_model(kind: Kind, config: Any, device: str | torch.device = "cpu") -> nn.Module:
    with torch.device(device):
        if kind == "gpt2":
            return GPT(config)
        if kind == "clip":
            return CLIP(config)
        return VisionTransformer(config)


def _report(
    kind: Kind, config: Any, mappings: list[Mapping], names: list[str], outside: Callable[[str], str | None]
) -> WeightReport:
    book = _book_model(kind, config, "meta").state_dict()  # names and shapes only: nothing is allocated
    report = WeightReport(kind, mappings)
    used = {m.hf for m in mappings}
    file_names = set(names)
    for m in mappings:
        if m.book not in book:
            raise RuntimeError(f"mapping names {m.book!r}, which the book's {kind} model does not have")
    report.missing = sorted(set(book) - {m.book for m in mappings if m.hf in file_names})
    for name in names:
        if name in used:
            continue
        reason = _ignored_reason(name)
        if reason is not None:
            report.ignored[name] = reason
        elif (part := outside(name)) is not None:
            report.unused[name] = part
        elif kind == "gpt2" and name == "lm_head.weight":  # tie_word_embeddings: some files store the copy too
            report.ignored[name] = "the output head, tied to wte (the book's head shares tok_emb)"
        else:
            report.unexpected.append(name)
    return report


def weight_report(path: str | os.PathLike, kind: Kind | None = None) -> WeightReport:
    """Which tensor of a model directory fills which tensor of the book's model, without loading any (kind from config.json)."""
    hf = read_config(path)
    kind = _detect(hf, kind)
    names = tensor_names(path)
    config, mappings, outside = _config_and_names(kind, hf, names)
    return _report(kind, config, mappings, names, outside)


def _load(path: str | os.PathLike, kind: Kind) -> nn.Module:
    hf = read_config(path)
    _detect(hf, kind)
    tensors = read_tensors(path)
    names = list(tensors)
    scale = float(tensors["logit_scale"]) if kind == "clip" and "logit_scale" in tensors else None
    config, mappings, outside = _config_and_names(kind, hf, names, scale)
    _report(kind, config, mappings, names, outside).check(path)
    model = _book_model(kind, config)
    own = model.state_dict()
    try:
        state = {m.book: m.apply(tensors[m.hf], own[m.book].shape) for m in mappings}
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_gpt2(path: str | os.PathLike) -> GPT:
    """GPT-2 (a GPT2LMHeadModel or GPT2Model directory) as the book's `GPT`, in eval mode; its config is `model.config`."""
    return _load(path, "gpt2")  # type: ignore[return-value]


def load_clip(path: str | os.PathLike) -> CLIP:
    """A CLIP (CLIPModel directory, ViT image tower) as the book's `CLIP`, in eval mode; its config is `model.config`.

    The book's image tower returns post-LayerNorm patch vectors; Hugging Face's
    last_hidden_state is the same tokens before that norm (its pooled [CLS] is normed).
    """
    return _load(path, "clip")  # type: ignore[return-value]


def load_siglip_vision(path: str | os.PathLike) -> VisionTransformer:
    """SigLIP's image tower (a SiglipVisionModel or SiglipModel directory) as a `VisionTransformer`, in eval mode.

    Patches are SigLIP's last_hidden_state (after its post-LayerNorm), and pooled is its
    attention-pooling head (`pool="map"`), or the patches' mean for a tower without a head.
    From a whole SigLIP the text tower is not loaded (`weight_report` lists it as unused).
    """
    return _load(path, "siglip_vision")  # type: ignore[return-value]


__all__ = [
    "HF_ACTIVATIONS",
    "Mapping",
    "UnsupportedConfigError",
    "WeightReport",
    "clip_config",
    "clip_names",
    "gpt2_config",
    "gpt2_names",
    "load_clip",
    "load_gpt2",
    "load_siglip_vision",
    "local_copy",
    "read_config",
    "read_tensors",
    "siglip_vision_config",
    "tensor_names",
    "vision_names",
    "weight_files",
    "weight_report",
]
