"""Shipped checkpoints: a state dict plus its config, and a JSON manifest that vouches for them.

A later chapter starts from a model an earlier chapter trained (the VLMs start from
chapter 04's GPT, chapter 06 from chapter 05's CLIP), without retraining it and without
having run that notebook. The book therefore ships small checkpoints in
`data/checkpoints/`, each built by `python scripts/build_checkpoints.py NAME`:

    data/checkpoints/NAME.pt     torch.save({"format", "name", "config", "state_dict"})
    data/checkpoints/NAME.json   manifest: sha256 of NAME.pt, config, training recipe, metrics

Loading checks everything it can before a model is built: the files exist, the sha256 of
the .pt matches the manifest, the config inside the file matches the manifest (and the
config the caller expects), and every tensor fits. Any failure raises `CheckpointError`,
which names the file and the command that rebuilds it; a wrong model is never returned
silently. Files are written to a temporary file and `os.replace`d, so an interrupted
build leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "mllm_scratch.checkpoint/1"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "data" / "checkpoints"
BUILD_COMMAND = "python scripts/build_checkpoints.py"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, stale or does not fit the model; the message says how to rebuild it."""


def rebuild_command(name: str) -> str:
    """The command that rebuilds the shipped checkpoint `name`."""
    return f"{BUILD_COMMAND} {name}"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_path(path: str | os.PathLike) -> Path:
    """The manifest that sits beside a checkpoint: NAME.pt -> NAME.json."""
    return Path(path).with_suffix(".json")


def atomic_write(path: Path, write) -> None:
    """Call `write(file)` on a temporary file in path's directory, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a checkpoint is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# The book's shipped VLM files store float16: half the bytes, each weight rounded to about
# 3 significant digits. Their build scripts round the model first (`round_to_dtype`) and
# score it then, so the manifest's metrics are those of the weights the file holds.
STORED_DTYPE = torch.float16


def round_to_dtype(model: nn.Module, dtype: torch.dtype = STORED_DTYPE) -> nn.Module:
    """Round every floating-point parameter and buffer to `dtype` and back, in place: the model as a file of `dtype` holds it."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(dtype))
    return model


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: dict[str, Any],
    *,
    name: str,
    recipe: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Write NAME.pt (state dict + config) and its manifest NAME.json atomically; return the manifest.

    Floating-point tensors are stored as `dtype`: float32 (the default) keeps the trained
    weights exactly; float16 halves the file and rounds each weight to about 3 significant
    digits. `load_state_dict` copies them into the model's float32 parameters either way.
    """
    path = Path(path)
    if path.suffix != ".pt":
        raise ValueError(f"checkpoint path {path} should end in .pt (its manifest is the .json beside it)")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {dtype} is not a storage type for checkpoints: expected torch.float32, float16 or bfloat16")
    # CPU tensors. A tied weight appears under both names, as load_state_dict
    # expects, but torch.save stores a shared tensor's data only once.
    state_dict = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
        for k, v in model.state_dict().items()
    }
    payload = {"format": FORMAT, "name": name, "config": dict(config), "state_dict": state_dict}
    atomic_write(path, lambda f: torch.save(payload, f))
    manifest = {
        "format": FORMAT,
        "name": name,
        "file": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "config": dict(config),
        "parameters": sum(v.numel() for v in {id(p): p for p in model.parameters()}.values()),
        "recipe": recipe,
        "metrics": metrics,
        "torch": torch.__version__,
        "stored_as": str(dtype).removeprefix("torch."),
        "rebuild": rebuild_command(name),
        **(extra or {}),
    }
    # The .pt goes first: if we stop between the two writes, the old manifest's sha256 no
    # longer matches and loading says to rebuild.
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    atomic_write(manifest_path(path), lambda f: f.write(text.encode("utf-8")))
    return manifest


def read_manifest(path: str | os.PathLike, rebuild: str = BUILD_COMMAND) -> dict[str, Any]:
    """The manifest of checkpoint `path`, checked for the fields loading relies on."""
    man = manifest_path(path)
    if not man.is_file():
        raise CheckpointError(f"checkpoint manifest {man} does not exist; rebuild it with: {rebuild}")
    try:
        manifest = json.loads(man.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str) or not isinstance(
            manifest.get("config"), dict
        ):
            raise ValueError("expected a JSON object with 'sha256' and 'config'")
    except ValueError as err:
        raise CheckpointError(f"checkpoint manifest {man} is corrupt ({err}); rebuild it with: {rebuild}") from None
    return manifest


def config_differences(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Readable differences between two config dicts, e.g. ["dim: 64 in the file, 128 expected"]."""
    keys = list(dict.fromkeys([*expected, *saved]))
    return [
        f"{k}: {saved.get(k, '<missing>')!r} in the file, {expected.get(k, '<missing>')!r} expected"
        for k in keys
        if saved.get(k, "<missing>") != expected.get(k, "<missing>")
    ]


def load_checkpoint(
    path: str | os.PathLike,
    *,
    expected_config: dict[str, Any] | None = None,
    rebuild: str = BUILD_COMMAND,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Verify and read a checkpoint: returns (config, state_dict, manifest), or raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; build it with: {rebuild}")
    manifest = read_manifest(path, rebuild)
    sha = sha256_file(path)
    if sha != manifest["sha256"]:
        raise CheckpointError(
            f"checkpoint {path} has sha256 {sha}, but its manifest {manifest_path(path)} expects "
            f"{manifest['sha256']} (corrupt, truncated, edited, or from another build); rebuild it with: {rebuild}"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a file that matches its sha but does not unpickle: a bad build
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); rebuild it with: {rebuild}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path} is not in the format {FORMAT!r}; rebuild it with: {rebuild}")
    config = payload.get("config")
    if config != manifest["config"]:
        raise CheckpointError(
            f"checkpoint {path} holds a config that differs from its manifest: "
            + "; ".join(config_differences(config or {}, manifest["config"]))
            + f"; rebuild it with: {rebuild}"
        )
    if expected_config is not None and config != expected_config:
        raise CheckpointError(
            f"checkpoint {path} was saved with another config: "
            + "; ".join(config_differences(config, expected_config))
            + f"; load it with its own config, or rebuild it with: {rebuild}"
        )
    return config, payload["state_dict"], manifest


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                           rebuild: str = BUILD_COMMAND) -> nn.Module:
    """`model.load_state_dict(strict=True)`, with every mismatch reported as a CheckpointError naming the file."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: {tuple(state_dict[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        raise CheckpointError(f"checkpoint {path} does not fit the model ({', '.join(parts)}); rebuild it with: {rebuild}")
    model.load_state_dict(state_dict, strict=True)
    return model


__all__ = [
    "CheckpointError",
    "atomic_write",
    "config_differences",
    "load_checkpoint",
    "load_state_dict_strict",
    "manifest_path",
    "read_manifest",
    "rebuild_command",
    "save_checkpoint",
    "sha256_file",
]


def load_verified(
    name: str,
    path: str | os.PathLike | None,
    default_path: Path,
    *,
    expected_config: dict[str, Any] | None,
    recipe: dict[str, Any],
    recipe_owner: str,
    tokenizer_sha256: str,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path, str]:
    """Read a pretrained checkpoint (default: the shipped one) and refuse it unless it is the model we think it is.

    Checks the sha256 and config (`load_checkpoint`), the training recipe for the shipped
    file (a changed recipe means a stale file), and the tokenizer it was trained with.
    Returns (config dict, state dict, path, rebuild command) for the caller to build its model.
    """
    default = path is None
    path = Path(default_path if default else path)
    rebuild = rebuild_command(name)
    if not default and path.resolve() != Path(default_path).resolve():
        rebuild += f" --out {path.parent}"
    saved, state_dict, manifest = load_checkpoint(path, expected_config=expected_config, rebuild=rebuild)
    if default and manifest.get("recipe") != recipe:
        raise CheckpointError(
            f"checkpoint {path} was trained with another recipe than {recipe_owner} "
            f"(the recipe changed since it was built); rebuild it with: {rebuild}"
        )
    # Token ids mean nothing without the tokenizer that produced them: a checkpoint that
    # does not record it is refused, not trusted.
    trained_with = manifest.get("tokenizer_sha256")
    if trained_with is None:
        raise CheckpointError(
            f"checkpoint {path}'s manifest does not record the tokenizer it was trained with "
            f"(no 'tokenizer_sha256'); rebuild it with: {rebuild}"
        )
    if trained_with != tokenizer_sha256:
        raise CheckpointError(
            f"checkpoint {path} was trained with another tokenizer (sha256 {trained_with[:12]}..., "
            f"the shipped one is {tokenizer_sha256[:12]}...); rebuild it with: {rebuild}"
        )
    return saved, state_dict, path, rebuild
