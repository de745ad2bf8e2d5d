"""The command line end to end: render a scene and a clip, caption and ask (shipped and freshly trained checkpoints,
both image models), ask about a video given as a GIF or a folder, the question forms, the encoder switch, and the
error messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mllm_scratch.checkpoints import read_payload
from mllm_scratch.cli import PRESETS, _recipe, build_parser, main, matching_form, question_forms
from mllm_scratch.images import load_frames, load_image, save_frames
from mllm_scratch.shapeworld import (COLOURS, NUMBER_WORDS, SHAPES, SKILLS, VIDEO_SKILLS, CaptionDataset,
                                     ShapeWorldConfig, VideoQADataset, VQADataset, final_answer, generate_clip,
                                     generate_scene, questions, render_clip, split_seed, to_tensor)
from mllm_scratch.video import VIDEO_SCENES
from mllm_scratch.vlm import SHIPPED_RECIPE, VLMRecipe, parse_caption

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "MLLM_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
TINY = ["--encoder", "patches", "--projector", "linear", "--caption-pairs", "16", "--qa-pairs", "16",
        "--batch-size", "8", "--stage1-steps", "2", "--stage2-steps", "2", "--eval", "12", "--no-progress",
        "--threads", "1"]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """`python -m mllm_scratch ARGV`, the real entry point, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "mllm_scratch", *argv], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Train through the real entry point, `python -m mllm_scratch train-vlm`, in a subprocess."""
    out = tmp_path_factory.mktemp("cli") / "tiny.pt"
    result = run_cli("train-vlm", "--out", str(out), *TINY)
    assert result.returncode == 0, result.stderr
    assert "stage 1: loss" in result.stdout and "stage 2: loss" in result.stdout
    assert "test VQA accuracy: colour" in result.stdout
    assert f"wrote {out}" in result.stdout
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # the atomic write left nothing behind
    return out


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    """Test scene 1 written by `render` (256 px), which must be exactly CaptionDataset("test")[1], caption included."""
    path = tmp_path_factory.mktemp("img") / "scene.png"
    result = run_cli("render", "1", "--out", str(path))
    assert result.returncode == 0, result.stderr
    image, caption = CaptionDataset("test", 2)[1]
    assert result.stdout.splitlines()[:2] == [
        f"wrote {path}: scene 1 of the test split (seed {split_seed('test', 1)}), 32 px shown at 256 px",
        f"caption: {caption}"]
    assert Image.open(path).size == (256, 256)
    assert torch.equal(load_image(path, 32), image)  # the models read back exactly the pixels they trained on
    questions = result.stdout.split("questions (skill, question, true answer):\n")[1].splitlines()
    assert [line.split()[0] for line in questions] == ["colour", "shape", "count", "spatial", "existence", "reading"]
    assert "how many objects are there? three" in result.stdout  # the truth: three objects
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, Path]:
    """Test clip 0 written by `render --video` as a GIF and as a folder of frames, both the clip's exact pixels."""
    folder = tmp_path_factory.mktemp("clip")
    gif, frames = folder / "clip.gif", folder / "frames"
    result = run_cli("render", "0", "--video", "--out", str(gif), "--out", str(frames))
    assert result.returncode == 0, result.stderr
    pixels = to_tensor(render_clip(generate_clip(split_seed("test", 0), 16, VIDEO_SCENES, "test")))  # (16, 3, 32, 32)
    assert torch.equal(load_frames(gif, 32), pixels) and torch.equal(load_frames(frames, 32), pixels)
    assert len(list(frames.iterdir())) == 16
    assert f"wrote {gif}: clip 0 of the test split" in result.stdout and f"wrote {frames}/: clip 0" in result.stdout
    assert "  direction  which way does the " in result.stdout and "  appearing  how many objects appear" in result.stdout
    return gif, frames


# -- the shipped checkpoints, default tower (chapter 05's CLIP tower)


def test_shipped_vlm_captions_and_answers_a_rendered_scene(png, capsys):
    result = run_cli("caption", str(png))  # no --checkpoint: data/checkpoints/vlm.pt
    assert result.returncode == 0, result.stderr
    caption = result.stdout
    assert caption.count("\n") == 1 and caption.endswith(".\n")
    objects, _ = parse_caption(caption)
    assert 1 <= len(objects) <= 3 and all(c in COLOURS and s in SHAPES for _, c, s in objects)
    assert main(["ask", str(png), "What colour is the square?"]) == 0  # capitals and all: normalised
    out, err = capsys.readouterr()
    assert out.strip() in COLOURS and err == ""  # an answer of the right kind, and no warning
    assert main(["ask", str(png), "how many objects are there"]) == 0  # the missing "?" is added
    assert capsys.readouterr().out.strip() in NUMBER_WORDS
    scene = generate_scene(split_seed("test", 1), ShapeWorldConfig(), "test")
    (qa,) = questions(scene, 0, ["spatial"], grounded=True)
    assert main(["ask", str(png), qa.question]) == 0  # the shipped model grounds a spatial reply: names, places, answer
    reply = capsys.readouterr().out.strip()
    words, truth = reply.split(), qa.answer.split()
    assert len(words) == 7 and words[:2] + words[3:5] == truth[:2] + truth[3:5] and final_answer(reply) in ("yes", "no")


def test_tiled_model_reads_a_64_px_scene_and_fits_any_shape(tmp_path, capsys):
    from mllm_scratch.tiling import TiledRecipe

    config = TiledRecipe().scene_config()
    index = next(i for i in range(50) if generate_scene(split_seed("test", i), config, "test").text)
    scene = generate_scene(split_seed("test", index), config, "test")
    out = tmp_path / "scene64.png"
    assert main(["render", str(index), "--scene-size", "64", "--out", str(out)]) == 0  # 256 px: shrunk back exactly
    capsys.readouterr()
    assert main(["ask", str(out), "what does the text say?", "--model", "tiled"]) == 0
    assert capsys.readouterr().out.strip() == scene.text.lower()
    assert main(["caption", str(out), "--model", "tiled"]) == 0
    objects, _ = parse_caption(capsys.readouterr().out)
    assert objects and all(c in COLOURS and s in SHAPES for _, c, s in objects)
    wide = tmp_path / "wide.png"  # any aspect ratio: fitted into the 2 x 2 grid, the rest background
    Image.new("RGB", (96, 32), (16, 16, 24)).save(wide)
    assert main(["ask", str(wide), "how many objects are there?", "--model", "tiled"]) == 0
    assert capsys.readouterr().out.strip() in NUMBER_WORDS
    assert main(["render", "--video", "--scene-size", "64"]) == 2
    assert "clips are drawn at 32 px only" in capsys.readouterr().err


def test_cross_attention_model(png, capsys):
    assert main(["caption", str(png), "--model", "xattn"]) == 0
    objects, _ = parse_caption(capsys.readouterr().out)
    assert objects and all(c in COLOURS and s in SHAPES for _, c, s in objects)
    assert main(["ask", str(png), "is there a yellow circle?", "--model", "xattn"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() in ("yes", "no") and err == ""


def test_ask_video_on_a_gif_and_on_its_frames(clip, capsys):
    gif, frames = clip
    answers = {}
    for source in (gif, frames):
        for model in ("xattn", "unified"):
            assert main(["ask-video", str(source), "which shape moves?", "--model", model]) == 0
            out, err = capsys.readouterr()
            assert out.strip() in SHAPES and err == ""
            answers[source, model] = out
    assert answers[gif, "xattn"] == answers[frames, "xattn"]  # the same pixels: the same answer
    assert answers[gif, "unified"] == answers[frames, "unified"]


# -- question forms


def test_questions_lists_every_form_and_every_generated_question_matches_one(capsys):
    assert main(["questions"]) == 0
    out = capsys.readouterr().out
    for skill in (*SKILLS, *VIDEO_SKILLS):
        assert f"\n  {skill} " in out
    assert "what colour is the {shape}?" in out and "which shape moves?" in out and "{relation}: left of" in out
    for _, question, _, _ in VQADataset("test", 60):  # the forms are read off the generators: they cannot drift
        assert matching_form(question) is not None, question
    for _, question, _, _ in VideoQADataset("test", 12, VIDEO_SCENES, num_frames=4):
        assert matching_form(question, video=True) is not None, question
    assert matching_form("is there an orange circle?") == "is there a {colour} {shape}?"
    assert matching_form("what is in this picture?") is None
    assert matching_form("what colour is the circle?", video=True) is None
    assert set(question_forms()) == set(SKILLS) and set(question_forms(video=True)) == set(VIDEO_SKILLS)


def test_off_template_question_warns_and_still_answers(trained, png, clip, capsys):
    assert main(["ask", str(png), "What is in this picture?", "--checkpoint", str(trained)]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1  # still an answer
    assert err.startswith("warning: 'what is in this picture?' is not a question form")
    assert err.strip().endswith("python -m mllm_scratch questions")
    assert main(["ask-video", str(clip[0]), "what colour is the circle?"]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and err.strip().endswith("python -m mllm_scratch questions --video")


# -- a checkpoint of the reader's own (the tiny Fuyu run of the fixture)


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


# -- the image tower's switch reaches the recipe


def test_encoder_switch_reaches_the_recipe(capsys):
    parser = build_parser()
    assert _recipe(parser.parse_args(["train-vlm"])).train_encoder == SHIPPED_RECIPE.train_encoder  # the book's recipe
    assert _recipe(parser.parse_args(["train-vlm", "--freeze-encoder"])).train_encoder is False
    assert _recipe(parser.parse_args(["train-vlm", "--train-encoder"])).train_encoder is True
    assert _recipe(parser.parse_args(["train-vlm", "--preset", "book", "--freeze-encoder"])) == replace_recipe(False)
    with pytest.raises(SystemExit):
        parser.parse_args(["train-vlm", "--train-encoder", "--freeze-encoder"])
    assert "not allowed with argument" in capsys.readouterr().err


def replace_recipe(train_encoder: bool) -> VLMRecipe:
    from dataclasses import replace

    return replace(SHIPPED_RECIPE, train_encoder=train_encoder)


def test_spatial_switches_reach_the_recipe():
    """--spatial-steps, --lm, --place-codes and --grounded override the preset; the book preset is SHIPPED_RECIPE
    (place codes, grounded answers, a spatial stage), the cpu preset VLMRecipe()'s two stages with them off."""
    parser = build_parser()
    book = _recipe(parser.parse_args(["train-vlm", "--preset", "book"]))
    assert book == SHIPPED_RECIPE and (book.spatial_steps, book.place_codes, book.grounded, book.lm) == (3000, True, True, "base")
    cpu = _recipe(parser.parse_args(["train-vlm"]))
    assert (cpu.spatial_steps, cpu.place_codes, cpu.grounded, cpu.text_questions, book.text_questions) == (0, False, False, 0, 0)
    assert _recipe(parser.parse_args(["train-vlm", "--text-questions", "500"])).text_questions == 500
    assert book.colour_shape_prior is True and cpu.colour_shape_prior is False  # the product of experts: the book's only
    assert _recipe(parser.parse_args(["train-vlm", "--colour-shape-prior"])).colour_shape_prior is True
    assert _recipe(parser.parse_args(["train-vlm", "--preset", "book", "--no-colour-shape-prior"])).colour_shape_prior is False
    assert _recipe(parser.parse_args(["train-vlm", "--grounded"])).grounded is True
    assert _recipe(parser.parse_args(["train-vlm", "--preset", "book", "--no-grounded"])).grounded is False
    r = _recipe(parser.parse_args(["train-vlm", "--preset", "book", "--spatial-steps", "5", "--place-codes", "--lm", "qa",
                                   "--stage2-lm-lr", "3e-4"]))
    assert (r.spatial_steps, r.place_codes, r.lm, r.stage2_lm_lr, r.stage2_steps) == (5, True, "qa", 3e-4, 6000)
    r = _recipe(parser.parse_args(["train-vlm", "--spatial-steps", "7", "--no-place-codes"]))
    assert (r.spatial_steps, r.place_codes, r.lm, r.stage2_steps) == (7, False, "base", PRESETS["cpu"]["stage2_steps"])


@pytest.mark.parametrize("option, value, message", [
    ("--stage2-steps", "-1", "--stage2-steps must be an int >= 1, got -1"),
    ("--stage1-steps", "0", "--stage1-steps must be an int >= 1, got 0"),
    ("--spatial-steps", "-3", "--spatial-steps must be an int >= 0, got -3"),
    ("--text-questions", "-5", "--text-questions must be an int >= 0, got -5"),
])
def test_a_bad_budget_is_refused_before_anything_trains(option, value, message, tmp_path, capsys):
    assert main(["train-vlm", option, value, "--out", str(tmp_path / "v.pt")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}" and not any(tmp_path.iterdir())


def test_lm_cannot_be_chosen_for_a_preset_with_its_own_lm(tmp_path, capsys):
    assert main(["train-vlm", "--preset", "gpu", "--lm", "qa", "--out", str(tmp_path / "v.pt")]) == 2
    err = capsys.readouterr().err
    assert "--lm qa: the gpu preset pretrains an LM of its own" in err and not any(tmp_path.iterdir())


# -- error messages: one line, exit status 2


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
    assert main(["ask", str(png), "is there a red circle?", "--model", "xattn", "--checkpoint", str(trained)]) == 2
    assert capsys.readouterr().err.startswith("error: ")  # a chapter-06 file is not a chapter-07 model


def test_ask_video_errors(clip, tmp_path, capsys):
    def error(*argv: str) -> str:
        assert main(["ask-video", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err

    assert "does not exist: expected an animated GIF or a folder of frames" in error(str(tmp_path / "no.gif"), "which shape moves?")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a frame")
    assert "holds no frames" in error(str(empty), "which shape moves?")
    broken = tmp_path / "broken"
    save_frames(np.zeros((3, 32, 32, 3), dtype=np.uint8), broken)
    (broken / "frame_01.png").write_text("not an image")
    assert "frame_01.png" in error(str(broken), "which shape moves?")
    (tmp_path / "bad.gif").write_bytes(b"GIF89a garbage")
    assert "bad.gif" in error(str(tmp_path / "bad.gif"), "which shape moves?")
    short = tmp_path / "short"
    save_frames(np.zeros((3, 32, 32, 3), dtype=np.uint8), short)
    assert "has 3 frames: the video model reads 8 evenly spaced frames, so give at least 8" in error(
        str(short), "which shape moves?")
    assert "the question is empty" in error(str(clip[0]), "  ")


def test_render_errors(tmp_path, capsys):
    def error(*argv: str) -> str:
        assert main(["render", *argv]) == 2
        return capsys.readouterr().err

    assert "--size 100 is not a multiple of the 32 px scene" in error("--size", "100", "--out", str(tmp_path / "a.png"))
    assert "index 100000 is out of range for split 'test'" in error("100000", "--out", str(tmp_path / "a.png"))
    assert "should be a .gif file or a folder" in error("--video", "--out", str(tmp_path / "a.mp4"))
    assert "cannot write the image" in error("--out", str(tmp_path / "no" / "such" / "a.png"))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_bad_out_suffix(capsys):
    assert main(["train-vlm", "--out", "model.bin", *TINY]) == 2
    assert "should end in .pt" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["train-vlm"], ["caption"], ["ask"], ["render"], ["questions"], ["ask-video"], ["draw"],
                                  ["chat"]])
def test_help_on_every_command(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert out.startswith("usage: python -m mllm_scratch")
    if argv == ["train-vlm"]:
        assert "--preset" in out and "--out" in out and "on one CPU thread, reaching" in out
        assert "--freeze-encoder stage 2 keeps the image tower frozen, LLaVA's recipe" in out
        default = "--train-encoder" if VLMRecipe().train_encoder else "--freeze-encoder"
        assert out.count("(the default: the book's recipe)") == 1
        assert out.index("(the default: the book's recipe)") > out.index(f"{default} stage 2")
    if argv == ["ask"]:
        assert "question" in out and "--checkpoint" in out and "--model {tiled,vlm,xattn}" in out
        assert "python -m mllm_scratch questions" in out
    if argv == ["ask-video"]:
        assert "8 evenly spaced" in out and "render --video" in out
    if argv == ["chat"]:
        assert "/image PATH" in out and "/reset" in out and "chat_vlm.pt" in out
    if argv == ["draw"]:
        assert "--guidance" in out and "--temperature" in out and "--model {emu3,janus}" in out


# ----------------------------------------------------------------------------------
# chat: chapter 12's chat model, a conversation read from standard input


@pytest.fixture(scope="module")
def chat_model():
    from mllm_scratch.chat import load_chat_vlm

    return load_chat_vlm()


def chat_replies(model, images, messages, later=None) -> list[str]:
    """What `chat` should print: `chat.reply` on the whole conversation so far, `images` with the first message
    (and `later[k]`, a list of images, with message k), each reply given what is left of the context, 40 at most."""
    from mllm_scratch.chat import IMAGE, ChatTemplate, Turn, reply
    from mllm_scratch.tokenizer import load_tokenizer

    template = ChatTemplate(load_tokenizer(), model.num_image_tokens)
    later = {0: list(images), **(later or {})}
    turns, said, shown = [], [], []
    for k, message in enumerate(messages):
        new = later.get(k, [])
        turns.append(Turn("user", IMAGE * len(new) + message))
        shown += new
        room = model.config.lm.context_length - len(template.prompt(turns, num_images=len(shown)))
        said.append(reply(model, template, torch.stack(shown), turns, max_new_tokens=min(40, room)))
        turns.append(Turn("assistant", said[-1]))
    return said


def test_chat_keeps_the_conversation(png, chat_model):
    """Through the real entry point, messages piped in: each reply is the package's reply to the whole conversation."""
    messages = ["describe the image.", "what shape is the green object?", "how many objects are there?"]
    typed = ["Describe the image", "what  shape is the GREEN object", "how many objects are there?"]  # normalised
    result = subprocess.run([sys.executable, "-m", "mllm_scratch", "chat", str(png)], input="\n".join(typed) + "\n",
                            capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    image = load_image(png, 32)
    assert result.stdout.splitlines() == chat_replies(chat_model, [image], messages)
    caption = result.stdout.splitlines()[0]
    assert parse_caption(caption)[0], caption  # the first reply is a caption of the scene


def test_chat_shows_images_from_the_command_line_and_with_slash_image(tmp_path, chat_model, monkeypatch, capsys):
    import io

    from mllm_scratch.chat import SAME_COUNT

    paths = []
    for i in (3, 4):
        paths.append(tmp_path / f"scene{i}.png")
        assert main(["render", str(i), "--out", str(paths[-1])]) == 0
    capsys.readouterr()
    images = [load_image(p, 32) for p in paths]
    want = chat_replies(chat_model, images, [SAME_COUNT])[0]
    assert want in ("yes", "no")
    monkeypatch.setattr(sys, "stdin", io.StringIO(SAME_COUNT + "\n"))
    assert main(["chat", *map(str, paths)]) == 0  # both images with the first message
    assert capsys.readouterr().out.splitlines() == [want]
    lines = ["/help", "/image", f"/image {tmp_path / 'missing.png'}", "/colour", "<|image|>what is this?",
             "<|END|> hi", f"/image {paths[1]}", SAME_COUNT, "/quit", "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines)))
    assert main(["chat", str(paths[0])]) == 0  # the second image added by /image: both shown with the first message
    out, err = capsys.readouterr()
    assert out.splitlines() == [want] and "never read" not in out + err  # piped: stdout holds the replies only
    errors = err.split("error: ")
    assert "/image PATH" in errors[0] and errors[1:] == [
        "/image needs a file: /image PATH\n",
        f"image file {str(tmp_path / 'missing.png')!r} does not exist (or is not a file)\n",
        "unknown command '/colour': expected /image PATH, /reset, /help or /quit\n",
        "type no <|image|>: the chat template writes it (show an image with /image PATH)\n",
        "type no <|end|>: the chat template writes it (show an image with /image PATH)\n"]
    messages = ["how many objects are there?", "how many objects are there?"]  # about the first image, then the second
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{messages[0]}\n/image {paths[1]}\n{messages[1]}\n"))
    assert main(["chat", str(paths[0])]) == 0  # an image shown mid-conversation goes with the next message
    assert capsys.readouterr().out.splitlines() == chat_replies(chat_model, images[:1], messages, {1: images[1:]})


def test_chat_refuses_a_message_that_does_not_fit_and_resets(png, chat_model, monkeypatch, capsys):
    import io

    question = "is there a red circle?"
    long = "is there a red circle" + " or a red circle" * 40 + "?"  # more than the 192 positions hold
    lines = [long, question] + [question] * 12 + ["/reset", question]  # the context holds a few exchanges
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", str(png)]) == 0
    out, err = capsys.readouterr()
    refused = err.splitlines()
    assert len(refused) >= 2 and all(line.startswith("error: the conversation would leave room for ") and
                                     line.endswith("Type /reset to start over.") for line in refused)
    replies = out.splitlines()
    assert len(replies) + len(refused) == 15 and len(replies) >= 3
    first = chat_replies(chat_model, [load_image(png, 32)], [question])[0]
    assert replies[0] == replies[-1] == first  # the long message left nothing behind; /reset started over


def test_chat_errors(png, tmp_path, capsys):
    assert main(["chat", str(tmp_path / "missing.png")]) == 2
    assert capsys.readouterr().err == f"error: image file {str(tmp_path / 'missing.png')!r} does not exist (or is not a file)\n"
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert main(["chat", str(png), str(bad)]) == 2  # every file is checked before the first message
    assert "is not an image file Pillow can read" in capsys.readouterr().err
    assert main(["chat", str(png), "--max-new-tokens", "0"]) == 2
    assert capsys.readouterr().err == "error: --max-new-tokens 0 is invalid: expected an int >= 1\n"
    assert main(["chat", str(png), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "none.pt" in capsys.readouterr().err


def test_train_vlm_resumes_a_crashed_run_to_the_same_model(tmp_path, monkeypatch):
    import mllm_scratch.vlm as vlm

    reference = tmp_path / "whole.pt"
    assert main(["train-vlm", "--out", str(reference), *TINY, "--checkpoint-every", "1"]) == 0
    assert not (tmp_path / "whole.train-state").exists()  # a finished run leaves only its model

    real_loss, calls = vlm.vlm_loss, []

    def crash_in_stage_2(model, batch):
        calls.append(1)
        if len(calls) == 4:  # stage 1 has 2 steps; stage 2 dies on its second
            raise RuntimeError("power cut")
        return real_loss(model, batch)

    out = tmp_path / "resumed.pt"
    monkeypatch.setattr(vlm, "vlm_loss", crash_in_stage_2)
    with pytest.raises(RuntimeError, match="power cut"):
        main(["train-vlm", "--out", str(out), *TINY, "--checkpoint-every", "1"])
    monkeypatch.setattr(vlm, "vlm_loss", real_loss)
    state = tmp_path / "resumed.train-state"
    assert sorted(p.name for p in state.iterdir()) == ["stage1.pt", "stage2.pt"] and not out.exists()
    assert main(["train-vlm", "--out", str(out), *TINY]) == 2  # an unfinished run is not overwritten by accident
    assert main(["train-vlm", "--out", str(out), *TINY, "--resume", "--batch-size", "4"]) == 2  # another recipe
    steps_run = []
    monkeypatch.setattr(vlm, "vlm_loss", lambda model, batch: steps_run.append(1) or real_loss(model, batch))
    assert main(["train-vlm", "--out", str(out), *TINY, "--resume"]) == 0
    assert len(steps_run) == 1  # stage 1 was finished and stage 2 saved after its first step: one step was left
    assert not state.exists()
    a, b = (read_payload(p)["state_dict"] for p in (reference, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, as if never stopped


def test_train_vlm_resumes_inside_the_spatial_stage(tmp_path, monkeypatch, capsys):
    """With --spatial-steps, train-vlm runs stage 1, the spatial stage and stage 2, each with its own saved state;
    a run that dies inside the spatial stage resumes there and ends bit for bit where an unbroken run ends."""
    import mllm_scratch.vlm as vlm

    spatial = [*TINY, "--spatial-steps", "2", "--place-codes", "--checkpoint-every", "1"]
    reference = tmp_path / "whole.pt"
    assert main(["train-vlm", "--out", str(reference), *spatial]) == 0
    out_text = capsys.readouterr().out
    assert "spatial stage 2 steps" in out_text and "stage spatial: loss" in out_text
    manifest = json.loads(reference.with_suffix(".json").read_text())
    assert {"stage1_loss", "spatial_loss", "stage2_loss"} <= manifest["metrics"].keys()
    assert manifest["config"]["place_codes"] is True and manifest["recipe"]["spatial_steps"] == 2

    real_loss, calls = vlm.vlm_loss, []

    def crash_in_spatial_stage(model, batch):
        calls.append(1)
        if len(calls) == 4:  # stage 1 has 2 steps; the spatial stage dies on its second
            raise RuntimeError("power cut")
        return real_loss(model, batch)

    out = tmp_path / "resumed.pt"
    monkeypatch.setattr(vlm, "vlm_loss", crash_in_spatial_stage)
    with pytest.raises(RuntimeError, match="power cut"):
        main(["train-vlm", "--out", str(out), *spatial])
    assert sorted(p.name for p in (tmp_path / "resumed.train-state").iterdir()) == ["spatial.pt", "stage1.pt"]
    steps_run = []
    monkeypatch.setattr(vlm, "vlm_loss", lambda model, batch: steps_run.append(1) or real_loss(model, batch))
    assert main(["train-vlm", "--out", str(out), *spatial, "--resume"]) == 0
    assert len(steps_run) == 1 + 2  # the spatial stage's last step, then stage 2
    a, b = (read_payload(p)["state_dict"] for p in (reference, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gpu_preset_builds_a_bigger_lm_and_a_valid_recipe(capsys):
    from mllm_scratch.cli import GPU_COMMAND, PRESET_LMS, preset_lm_recipe
    from mllm_scratch.distributed import Parallel, local_batch_size
    from mllm_scratch.gpt import GPT, GPTConfig
    from mllm_scratch.vlm import VLMConfig

    args = build_parser().parse_args(["train-vlm", "--preset", "gpu", "--device", "cuda", "--grad-accum", "2"])
    recipe = _recipe(args)
    assert recipe.batch_size > VLMRecipe().batch_size and recipe.stage2_steps >= VLMRecipe().stage2_steps
    assert args.grad_accum == 2 and args.parallel == "ddp"
    pre = preset_lm_recipe("gpu", recipe.seed)
    shipped = GPTConfig()
    assert pre.model.dim > shipped.dim and pre.model.depth > shipped.depth and set(PRESET_LMS) == {"gpu"}
    assert preset_lm_recipe("cpu") is None and preset_lm_recipe("book") is None  # these keep chapter 04's GPT
    for gpus in (1, 2, 4, 8):  # both global batches split over 8 GPUs, with or without accumulation
        assert local_batch_size(recipe.batch_size, Parallel(0, gpus), 2) * gpus * 2 == recipe.batch_size
        assert local_batch_size(pre.batch_size, Parallel(0, gpus), 2) * gpus * 2 == pre.batch_size
    lm = GPT(pre.model)
    config = VLMConfig(lm=lm.config)  # room for the image tokens and a question in its context
    assert sum(p.numel() for p in lm.parameters()) > 10 * sum(p.numel() for p in GPT(shipped).parameters())
    assert config.num_image_tokens < pre.model.context_length
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-vlm", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert GPU_COMMAND in out and "--grad-accum" in out and "BATCH / (N x GRAD_ACCUM)" in out


def test_grad_accum_must_split_the_batch(capsys):
    assert main(["train-vlm", "--out", "x.pt", *TINY, "--grad-accum", "3"]) == 2
    assert "--batch-size: the global batch of 8 does not split over 1 process x 3 micro-batches" in capsys.readouterr().err
    assert main(["train-vlm", "--out", "x.pt", *TINY, "--grad-accum", "0"]) == 2
    assert "--grad-accum 0: expected a number of micro-batches" in capsys.readouterr().err
