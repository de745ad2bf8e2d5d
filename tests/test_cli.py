"""The command line end to end: train a tiny VLM into a temporary folder, caption and ask; and its error messages."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllm_scratch.cli import build_parser, main
from mllm_scratch.shapeworld import generate_scene, render

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--encoder", "patches", "--projector", "linear", "--caption-pairs", "16", "--qa-pairs", "16",
        "--batch-size", "8", "--stage1-steps", "2", "--stage2-steps", "2", "--eval", "12", "--no-progress",
        "--threads", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Train through the real entry point, `python -m mllm_scratch train-vlm`, in a subprocess."""
    out = tmp_path_factory.mktemp("cli") / "tiny.pt"
    env = {**os.environ, "MLLM_DEVICE": "cpu"}
    result = subprocess.run([sys.executable, "-m", "mllm_scratch", "train-vlm", "--out", str(out), *TINY],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "stage 1: loss" in result.stdout and "stage 2: loss" in result.stdout
    assert "test VQA accuracy: colour" in result.stdout
    assert f"wrote {out}" in result.stdout
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # the atomic write left nothing behind
    return out


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    """A ShapeWorld scene saved as a 64 px PNG (the CLI resizes it to 32 px)."""
    path = tmp_path_factory.mktemp("img") / "scene.png"
    image = Image.fromarray(render(generate_scene(7)))
    image.resize((64, 64)).save(path)
    return path


def test_caption_and_ask(trained, png, capsys):
    assert main(["caption", str(png), "--checkpoint", str(trained)]) == 0
    caption = capsys.readouterr().out
    assert caption.endswith("\n") and caption.count("\n") == 1  # one line: the caption (a tiny model: any words)
    assert main(["ask", str(png), "What colour is the circle?", "--checkpoint", str(trained), "--max-new-tokens", "2"]) == 0
    answer = capsys.readouterr().out
    assert answer.count("\n") == 1 and len(answer.split()) <= 2


def test_greyscale_jpeg_of_any_size_works(trained, tmp_path, capsys):
    path = tmp_path / "grey.jpg"
    Image.fromarray(np.full((20, 30), 128, dtype=np.uint8)).save(path)  # greyscale, not square, not 32 px
    assert main(["ask", str(path), "how many objects are there?", "--checkpoint", str(trained)]) == 0
    assert capsys.readouterr().out.count("\n") == 1


def test_missing_image(trained, tmp_path, capsys):
    assert main(["caption", str(tmp_path / "nope.png"), "--checkpoint", str(trained)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: image file") and "nope.png" in err and "does not exist" in err


def test_unreadable_image(trained, tmp_path, capsys):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    assert main(["ask", str(path), "what shape is the red object?", "--checkpoint", str(trained)]) == 2
    err = capsys.readouterr().err
    assert "is not an image file Pillow can read" in err and "notes.png" in err


def test_missing_and_corrupt_checkpoint(png, trained, tmp_path, capsys):
    assert main(["caption", str(png), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err
    assert "none.pt does not exist" in err and "train-vlm" in err
    broken = tmp_path / "broken.pt"
    broken.write_bytes(trained.read_bytes()[:1000])
    broken.with_suffix(".json").write_text(trained.with_suffix(".json").read_text())
    assert main(["ask", str(png), "is there a red circle?", "--checkpoint", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.pt has sha256" in err and "rebuild it with" in err


def test_bad_out_suffix(capsys):
    assert main(["train-vlm", "--out", "model.bin", *TINY]) == 2
    assert "should end in .pt" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["train-vlm"], ["caption"], ["ask"]])
def test_help_on_every_command(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m mllm_scratch")
    if argv == ["train-vlm"]:
        assert "--preset" in out and "--out" in out
    if argv == ["ask"]:
        assert "question" in out and "--checkpoint" in out
