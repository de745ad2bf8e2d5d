"""The shared checkpoint helper: atomic save, sha256 manifest, clear errors on every kind of mismatch."""

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mllm_scratch.checkpoints import (
    FORMAT,
    FORMAT_TORCH,
    CheckpointError,
    _shuffled_bytes,
    atomic_write,
    config_differences,
    load_checkpoint,
    load_state_dict_strict,
    manifest_path,
    read_payload,
    save_checkpoint,
    sha256_file,
    write_payload,
)


def small_model(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2))


def test_round_trip_and_manifest(tmp_path):
    model = small_model()
    path = tmp_path / "toy.pt"
    manifest = save_checkpoint(path, model, {"width": 4}, name="toy", recipe={"steps": 1}, metrics={"acc": 1.0})
    assert manifest == json.loads(manifest_path(path).read_text())
    assert manifest["sha256"] == sha256_file(path) and manifest["bytes"] == path.stat().st_size
    assert manifest["parameters"] == 4 * 3 + 4 + 2 * 4 + 2 and manifest["rebuild"] == "python scripts/build_checkpoints.py toy"
    config, state_dict, _ = load_checkpoint(path, expected_config={"width": 4})
    assert config == {"width": 4}
    fresh = load_state_dict_strict(small_model(), {k: v for k, v in state_dict.items()}, path)
    x = torch.randn(5, 3)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_float16_storage_halves_the_file_and_loads_as_rounded_float32(tmp_path):
    model = nn.Linear(64, 64)
    full, half = tmp_path / "full.pt", tmp_path / "half.pt"
    assert save_checkpoint(full, model, {}, name="full")["stored_as"] == "float32"
    manifest = save_checkpoint(half, model, {}, name="half", dtype=torch.float16)
    assert manifest["stored_as"] == "float16" and manifest["bytes"] < 0.6 * full.stat().st_size
    _, state_dict, _ = load_checkpoint(half)
    assert state_dict["weight"].dtype == torch.float16
    fresh = load_state_dict_strict(nn.Linear(64, 64), state_dict, half)
    assert fresh.weight.dtype == torch.float32
    torch.testing.assert_close(fresh.weight, model.weight.detach().half().float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="dtype torch.int8 is not a storage type for checkpoints"):
        save_checkpoint(tmp_path / "int.pt", model, {}, name="int", dtype=torch.int8)


def test_saving_twice_gives_the_same_bytes(tmp_path):
    model = small_model()
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    save_checkpoint(a, model, {"width": 4}, name="toy")
    save_checkpoint(b, model, {"width": 4}, name="toy")
    assert sha256_file(a) == sha256_file(b)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")

    def explode(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, explode)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_sha_mismatch_names_the_file_and_the_rebuild_command(tmp_path):
    path = tmp_path / "toy.pt"
    save_checkpoint(path, small_model(), {"width": 4}, name="toy")
    data = bytearray(path.read_bytes())
    data[-10] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"toy\.pt has sha256 .* rebuild it with: make toy"):
        load_checkpoint(path, rebuild="make toy")


def test_config_mismatches_are_listed(tmp_path):
    path = tmp_path / "toy.pt"
    save_checkpoint(path, small_model(), {"width": 4, "depth": 1}, name="toy")
    with pytest.raises(CheckpointError, match=r"another config: width: 4 in the file, 8 expected"):
        load_checkpoint(path, expected_config={"width": 8, "depth": 1})
    assert config_differences({"a": 1}, {"a": 1, "b": 2}) == ["b: '<missing>' in the file, 2 expected"]


def test_manifest_config_must_match_the_file(tmp_path):
    path = tmp_path / "toy.pt"
    save_checkpoint(path, small_model(), {"width": 4}, name="toy")
    man = json.loads(manifest_path(path).read_text())
    man["config"] = {"width": 5}
    manifest_path(path).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="differs from its manifest: width: 4 in the file, 5 expected"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_are_reported(tmp_path):
    path = tmp_path / "toy.pt"
    save_checkpoint(path, small_model(width=4), {"width": 4}, name="toy")
    _, state_dict, _ = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"does not fit the model \(shape mismatch 0\.weight: \(4, 3\) in the file, \(8, 3\)"):
        load_state_dict_strict(small_model(width=8), state_dict, path)


def test_path_must_end_in_pt(tmp_path):
    with pytest.raises(ValueError, match="should end in .pt"):
        save_checkpoint(tmp_path / "toy.bin", small_model(), {}, name="toy")


def test_every_build_target_names_the_files_it_ships(monkeypatch):
    import importlib.util
    import sys

    from mllm_scratch.checkpoints import DEFAULT_DIR
    from mllm_scratch.hybrid import FUYU, METHODS, checkpoint_path

    spec = importlib.util.spec_from_file_location("build_checkpoints", Path(__file__).parent.parent / "scripts" / "build_checkpoints.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # dataclasses look their module up there
    spec.loader.exec_module(script)
    assert script.TARGETS["methods"].files == tuple(checkpoint_path(m).name for m in METHODS)
    assert not script.TARGETS["methods_fuyu"].files and checkpoint_path(FUYU).name == "methods_fuyu.pt"  # <name>.pt
    for t in script.TARGETS.values():
        for name in t.files or (f"{t.name}.pt",):
            assert (DEFAULT_DIR / name).exists(), f"target {t.name} ships {name}, which is missing from {DEFAULT_DIR}"


def test_shuffled_bytes_equal_a_hand_written_loop():
    t = torch.randn(5, 3).half()
    raw = t.numpy().tobytes()  # element i is raw[2i : 2i + 2]
    by_hand = bytes(raw[2 * i + b] for b in range(2) for i in range(t.numel()))  # every byte 0, then every byte 1
    assert _shuffled_bytes(t) == by_hand


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes()


def test_every_dtype_and_shape_round_trips_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 4), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2).bfloat16(),
        "f64": torch.randn(3).double(), "i64": torch.arange(-3, 3), "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.tensor([-7, 300], dtype=torch.int16), "i8": torch.tensor([-1, 5], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8), "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "view": torch.randn(4, 6)[:, ::2],  # not contiguous
        "signs": torch.tensor([0.0, -0.0, float("nan"), float("-inf")]),
    }
    path = tmp_path / "all.pt"
    with open(path, "wb") as f:
        write_payload(f, "all", {"k": [1, 2]}, tensors)
    payload = read_payload(path)
    assert payload["format"] == FORMAT and payload["name"] == "all" and payload["config"] == {"k": [1, 2]}
    assert list(payload["state_dict"]) == list(tensors)
    for k, t in tensors.items():
        got = payload["state_dict"][k]
        assert got.dtype == t.dtype and got.shape == t.shape and _bits(got) == _bits(t), k


def test_a_tied_weight_is_stored_once_and_equal_values_are_not_equal_bits(tmp_path):
    emb = torch.randn(200, 32)
    tied, untied = tmp_path / "tied.pt", tmp_path / "untied.pt"
    with open(tied, "wb") as f:
        write_payload(f, "t", {}, {"emb": emb, "head": emb.clone(), "zeros": torch.zeros(3), "signed": -torch.zeros(3)})
    with open(untied, "wb") as f:
        write_payload(f, "u", {}, {"emb": emb, "head": torch.randn(200, 32)})
    assert tied.stat().st_size < 0.6 * untied.stat().st_size
    state_dict = read_payload(tied)["state_dict"]
    assert _bits(state_dict["head"]) == _bits(emb) == _bits(state_dict["emb"])
    assert _bits(state_dict["signed"]) == _bits(-torch.zeros(3)) != _bits(torch.zeros(3))  # -0.0 is not stored as 0.0
    state_dict["head"].add_(1)  # each name is a tensor of its own, as after torch.load
    assert _bits(state_dict["emb"]) == _bits(emb)


def _with_header(tmp_path, edit) -> Path:
    """A format-2 file of two tensors whose header `edit` changed (the bytes after it unchanged)."""
    import lzma

    path = tmp_path / "edited.pt"
    with open(path, "wb") as f:
        write_payload(f, "x", {}, {"a": torch.arange(4.0), "b": torch.arange(4.0)})
    raw = lzma.decompress(path.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(lzma.compress(len(text).to_bytes(8, "little") + text + raw[8 + size :]))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["tensors"][0].update(bytes=8), r"tensor 'a' holds 8 bytes, but dtype float32 and shape \[4\] need 16"),
    (lambda h: h["tensors"][0].update(offset=-12), r"tensor 'a' has offset -12; expected a non-negative int"),
    (lambda h: h["tensors"][0].update(offset=8), r"tensor 'a' ends at byte 24, past the 16 bytes"),
    (lambda h: h["tensors"][0].update(shape=[-1]), r"tensor 'a' has shape \[-1\]; expected a list of non-negative ints"),
    (lambda h: h["tensors"][0].update(dtype="complex64"), r"tensor 'a' has dtype 'complex64'; expected one of"),
    (lambda h: h["tensors"][1].update(same_as="zz"), r"tensor 'b' is the same as 'zz', which is not an earlier tensor"),
    (lambda h: h["tensors"][1].update(key="a"), r"tensor 'a' appears twice"),
    (lambda h: h.update(format="mllm_scratch.checkpoint/1"), r"header is not that of the format"),
])
def test_a_header_that_write_payload_could_not_have_written_is_refused(tmp_path, edit, message):
    path = _with_header(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        read_payload(path)


def test_the_header_of_a_written_file_is_as_documented(tmp_path):
    import lzma

    path = _with_header(tmp_path, lambda h: None)
    raw = lzma.decompress(path.read_bytes())
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["tensors"] == [{"key": "a", "dtype": "float32", "shape": [4], "offset": 0, "bytes": 16},
                                 {"key": "b", "dtype": "float32", "shape": [4], "same_as": "a"}]
    with pytest.raises(ValueError, match=r"tensor 'c' has dtype torch.complex64, which a checkpoint cannot store"):
        write_payload(io.BytesIO(), "c", {}, {"c": torch.zeros(2, dtype=torch.complex64)})


def test_a_torch_save_file_of_format_1_still_loads(tmp_path):
    model = small_model()
    path = tmp_path / "old.pt"
    manifest = save_checkpoint(path, model, {"width": 4}, name="old")
    torch.save({"format": FORMAT_TORCH, "name": "old", "config": {"width": 4}, "state_dict": model.state_dict()}, path)
    manifest_path(path).write_text(json.dumps({**manifest, "sha256": sha256_file(path), "format": FORMAT_TORCH}))
    _, state_dict, _ = load_checkpoint(path)
    assert all(torch.equal(state_dict[k], v) for k, v in model.state_dict().items())
    torch.save({"format": FORMAT, "name": "old", "config": {"width": 4}, "state_dict": model.state_dict()}, path)
    with pytest.raises(ValueError, match="a torch.save file that says it is in the format 'mllm_scratch.checkpoint/2'"):
        read_payload(path)


def test_a_damaged_file_whose_manifest_vouches_for_it_is_refused(tmp_path):
    path = tmp_path / "toy.pt"
    save_checkpoint(path, small_model(), {"width": 4}, name="toy")
    path.write_bytes(path.read_bytes()[:-20])  # the xz stream cut short
    man = json.loads(manifest_path(path).read_text())
    manifest_path(path).write_text(json.dumps({**man, "sha256": sha256_file(path)}))
    with pytest.raises(CheckpointError, match=r"toy.pt cannot be read \(.*\); rebuild it with"):
        load_checkpoint(path)


def test_the_shipped_files_are_format_2_and_fit_the_budget():
    from mllm_scratch.checkpoints import DEFAULT_DIR

    files = sorted(DEFAULT_DIR.glob("*.pt"))
    assert len(files) >= 15
    for path in files:
        assert read_payload(path)["format"] == FORMAT, path.name
    total = sum(p.stat().st_size for p in files) / 2**20
    assert total <= 28, f"the shipped checkpoints hold {total:.1f} MiB; the book's budget is 28 MiB"


def test_a_second_read_skips_decompression_and_never_shares_tensors(tmp_path, monkeypatch):
    """read_payload remembers decompressed streams by their bytes' sha256: the same bytes read again are not
    decompressed again, every read builds tensors of its own, a file rewritten in place is read anew, and the
    cache stays within its bound."""
    import lzma

    import mllm_scratch.checkpoints as ck

    monkeypatch.setattr(ck, "_DECOMPRESSED", {})
    calls = []
    real = lzma.decompress
    monkeypatch.setattr(ck.lzma, "decompress", lambda data: calls.append(len(data)) or real(data))
    path = tmp_path / "toy.pt"
    save_checkpoint(path, small_model(), {"width": 4}, name="toy")
    first = read_payload(path)["state_dict"]
    first["0.weight"].zero_()  # a caller that changes what it was given...
    second = read_payload(path)["state_dict"]
    assert len(calls) == 1  # ...the second read did not decompress
    assert torch.equal(second["0.weight"], small_model().state_dict()["0.weight"])  # ...and did not see the change
    save_checkpoint(path, small_model(width=5), {"width": 5}, name="toy")  # rebuilt in place: other bytes
    assert read_payload(path)["state_dict"]["0.weight"].shape == (5, 3) and len(calls) == 2
    monkeypatch.setattr(ck, "DECOMPRESSED_CACHE_BYTES", 1)  # too small for two: only the newest stays
    read_payload(path)
    assert len(ck._DECOMPRESSED) == 1
