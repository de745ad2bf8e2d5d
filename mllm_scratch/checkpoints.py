"""Shipped checkpoints: a state dict plus its config, and a JSON manifest that vouches for them.

A later chapter starts from a model an earlier chapter trained (the VLMs start from
chapter 04's GPT, chapter 06 from chapter 05's CLIP), without retraining it and without
having run that notebook. The book therefore ships small checkpoints in
`data/checkpoints/`, each built by `python scripts/build_checkpoints.py NAME`:

    data/checkpoints/NAME.pt     the tensors and config, compressed (format 2, below)
    data/checkpoints/NAME.json   manifest: sha256 of NAME.pt, config, training recipe, metrics

Format 2 is one xz stream: the length of a JSON header (8 bytes, little-endian), the header
(format, name, config, and per tensor its key, dtype, shape, and where its bytes lie: `offset`
and `bytes`), then the tensors' bytes. Three things make it smaller than `torch.save` of the
same tensors, with every weight bit-identical (`python benchmarks/checkpoint_size.py`: the
shipped files take 32.0 MiB as `torch.save`):

- xz compression (27.0 MiB);
- *shuffled* bytes: first byte 0 of every element of a tensor, then byte 1, and so on. The
  high byte of a float16 (sign, exponent, two mantissa bits) varies little from weight to
  weight and compresses well once it sits apart from the noisy low byte;
- a tensor whose bytes equal an earlier one's (a tied embedding and output head) is stored
  once, as `same_as` that tensor (`torch.save` keeps a tie only while both names share
  storage, which rounding to float16 undoes). Together with the shuffle: 25.6 MiB.

There is no pickle in it, so reading a file runs no code, and a header that `write_payload`
could not have written is refused with the tensor it names. Files in format 1 (`torch.save`
of {"format", "name", "config", "state_dict"}) still load.

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
import lzma
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "mllm_scratch.checkpoint/2"  # what save_checkpoint writes
FORMAT_TORCH = "mllm_scratch.checkpoint/1"  # torch.save of {"format", "name", "config", "state_dict"}: still read
XZ_MAGIC = b"\xfd7zXZ\x00"
# dtypes a format-2 file may hold, by the name its header gives them
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                       torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                                       torch.bool)}
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


def state_checksum(module: nn.Module, *, shapes: bool = True) -> str:
    """A sha256 over a module's state dict: names, shapes (unless `shapes=False`) and bytes.

    Equal before and after training means the module was not touched; a manifest records it
    for a frozen part that a file refers to instead of storing (the shipped GPT, the tower).
    Chapter 08's method files record it without the shapes (`shapes=False`), as they were built.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        if shapes:
            digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
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


def _shuffled_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes grouped by position in the element: every element's byte 0, then every byte 1, ..."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).reshape(-1, flat.element_size()).t().contiguous().numpy().tobytes()


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _unshuffled(data: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """The inverse of `_shuffled_bytes` (the caller has checked that `data` holds exactly `shape`'s elements)."""
    store = torch.uint8 if dtype == torch.bool else dtype
    if len(data) == 0:  # an empty tensor (frombuffer refuses an empty buffer)
        return torch.empty(shape, dtype=dtype)
    planes = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(_element_size(store), -1)
    t = planes.t().contiguous().reshape(-1).view(store).reshape(shape)
    return t.to(torch.bool) if dtype == torch.bool else t


def _little_endian_only() -> None:
    if sys.byteorder != "little":  # the bytes are written as the machine holds them
        raise ValueError(f"checkpoint format {FORMAT!r} is little-endian; this machine is {sys.byteorder}-endian")


def write_payload(f, name: str, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """Write a format-2 checkpoint (see the module's docstring) to the binary file `f`."""
    _little_endian_only()
    entries, blobs, stored, offset = [], [], {}, 0  # stored: (dtype, shape, bytes) -> key of its first holder
    for key, t in state_dict.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {key!r} has dtype {t.dtype}, which a checkpoint cannot store; expected one of {sorted(_DTYPES)}")
        data = _shuffled_bytes(t)
        entry = {"key": key, "dtype": dtype, "shape": list(t.shape)}
        same = stored.get((dtype, tuple(t.shape), data))  # equal bytes, not torch.equal: -0.0 stays -0.0
        if same is not None:
            entries.append({**entry, "same_as": same})
            continue
        stored[dtype, tuple(t.shape), data] = key
        entries.append({**entry, "offset": offset, "bytes": len(data)})
        blobs.append(data)
        offset += len(data)
    header = json.dumps({"format": FORMAT, "name": name, "config": config, "tensors": entries}).encode("utf-8")
    with lzma.open(f, "wb", format=lzma.FORMAT_XZ, preset=6) as out:
        out.write(len(header).to_bytes(8, "little"))
        out.write(header)
        for data in blobs:
            out.write(data)


def _checked_entry(e: Any, seen: dict[str, tuple[str, list[int]]], data_bytes: int) -> str:
    """Refuse a header entry that could not have come from `write_payload`; return its key."""
    if not isinstance(e, dict) or not isinstance(e.get("key"), str):
        raise ValueError(f"a tensor entry {str(e)[:80]!r} has no key")
    key, dtype, shape = e["key"], e.get("dtype"), e.get("shape")
    if key in seen:
        raise ValueError(f"tensor {key!r} appears twice")
    if dtype not in _DTYPES:
        raise ValueError(f"tensor {key!r} has dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"tensor {key!r} has shape {shape!r}; expected a list of non-negative ints")
    if "same_as" in e:
        if seen.get(e["same_as"]) != (dtype, shape):
            raise ValueError(f"tensor {key!r} is the same as {e['same_as']!r}, which is not an earlier tensor "
                             f"of dtype {dtype} and shape {shape}")
        return key
    offset, size = e.get("offset"), e.get("bytes")
    want = _element_size(_DTYPES[dtype]) * math.prod(shape)
    for field, value in (("offset", offset), ("bytes", size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"tensor {key!r} has {field} {value!r}; expected a non-negative int")
    if size != want:
        raise ValueError(f"tensor {key!r} holds {size} bytes, but dtype {dtype} and shape {shape} need {want}")
    if offset + size > data_bytes:
        raise ValueError(f"tensor {key!r} ends at byte {offset + size}, past the {data_bytes} bytes of tensor data")
    return key


# Decompressed format-2 streams, by the sha256 of the file's bytes: a process that loads the same
# checkpoint again (a test suite, a notebook that reloads) skips the xz decompression, which is
# nearly all of a load's time. Keyed by content, not path, so a file rebuilt in place is read anew;
# tensors are built from a copy of the bytes, so nothing a caller does to them reaches the cache.
_DECOMPRESSED: dict[bytes, bytes] = {}
DECOMPRESSED_CACHE_BYTES = 64 * 2**20  # the most it holds; the oldest streams go first


def _decompressed(data: bytes) -> bytes:
    """lzma.decompress(data), from the cache when these very bytes were decompressed before."""
    key = hashlib.sha256(data).digest()
    raw = _DECOMPRESSED.pop(key, None)
    if raw is None:
        raw = lzma.decompress(data)
    _DECOMPRESSED[key] = raw  # (re)inserted last: the newest
    while sum(map(len, _DECOMPRESSED.values())) > DECOMPRESSED_CACHE_BYTES and len(_DECOMPRESSED) > 1:
        del _DECOMPRESSED[next(iter(_DECOMPRESSED))]
    return raw


def read_payload(path: str | os.PathLike) -> dict[str, Any]:
    """{"format", "name", "config", "state_dict"} from a checkpoint file of either format (no checks of the manifest).

    Raises ValueError, naming the tensor, for a header that `write_payload` could not have written.
    """
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(len(XZ_MAGIC))
    if magic != XZ_MAGIC:  # format 1: a torch.save zip
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(payload, dict) and payload.get("format") != FORMAT_TORCH:
            raise ValueError(f"a torch.save file that says it is in the format {payload.get('format')!r}, "
                             f"expected {FORMAT_TORCH!r}")
        return payload
    _little_endian_only()
    raw = _decompressed(path.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size].decode("utf-8"))
    if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(header.get("tensors"), list):
        raise ValueError(f"an xz file whose header is not that of the format {FORMAT!r}")
    body = memoryview(raw)[8 + size :]
    seen: dict[str, tuple[str, list[int]]] = {}
    state_dict: dict[str, torch.Tensor] = {}
    for e in header["tensors"]:
        key = _checked_entry(e, seen, len(body))
        seen[key] = (e["dtype"], e["shape"])
        if "same_as" in e:  # its own tensor, as torch.load would give for two names
            state_dict[key] = state_dict[e["same_as"]].clone()
        else:
            state_dict[key] = _unshuffled(body[e["offset"] : e["offset"] + e["bytes"]], _DTYPES[e["dtype"]], e["shape"])
    return {"format": header["format"], "name": header.get("name"), "config": header.get("config"), "state_dict": state_dict}


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
    # expects, but write_payload stores equal tensors' data only once.
    state_dict = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
        for k, v in model.state_dict().items()
    }
    atomic_write(path, lambda f: write_payload(f, name, dict(config), state_dict))
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
        payload = read_payload(path)
    except Exception as err:  # a file that matches its sha but does not read: a bad build
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); rebuild it with: {rebuild}") from None
    if (not isinstance(payload, dict) or payload.get("format") not in (FORMAT, FORMAT_TORCH)
            or not isinstance(payload.get("state_dict"), dict)):
        raise CheckpointError(f"checkpoint {path} is not in the format {FORMAT!r} (or {FORMAT_TORCH!r}); "
                              f"rebuild it with: {rebuild}")
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
    "read_payload",
    "rebuild_command",
    "save_checkpoint",
    "sha256_file",
    "state_checksum",
    "write_payload",
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
