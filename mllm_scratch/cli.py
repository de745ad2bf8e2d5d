"""The book's command line: make a ShapeWorld scene or clip, caption it and ask about it, or train your own VLM.

    python -m mllm_scratch render 2 --out scene.png             # test scene 2 as a PNG, its caption and questions
    python -m mllm_scratch caption scene.png                    # chapter 06's unified VLM describes it
    python -m mllm_scratch ask scene.png "how many objects are there?"
    python -m mllm_scratch ask scene.png "what colour is the triangle?" --model xattn   # chapter 07's model
    python -m mllm_scratch questions                            # the question forms the models were trained on
    python -m mllm_scratch render 0 --video --out clip.gif      # a test clip, as an animated GIF (or a folder)
    python -m mllm_scratch ask-video clip.gif "which shape moves?"                  # chapter 09's video model
    python -m mllm_scratch train-vlm --out vlm.pt               # train chapter 06's VLM yourself (CPU: minutes)
    python -m mllm_scratch chat scene.png                       # a conversation about it (chapter 12); /help
    python -m mllm_scratch draw "a small red circle left of a large blue square" --out x.png   # chapter 13
    python -m mllm_scratch caption scene.png --checkpoint vlm.pt
    torchrun --nproc_per_node 2 -m mllm_scratch train-vlm --device cpu --out vlm.pt      # 2 processes (gloo)
    torchrun --nproc_per_node 8 -m mllm_scratch train-vlm --preset gpu --device cuda --out vlm_gpu.pt  # 8 GPUs

Any image file Pillow opens is read and resized to the model's input size (32 px). Without
--checkpoint, each command uses the book's shipped checkpoint (data/checkpoints/).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

# Budgets (and batch sizes) per preset; every other field is VLMRecipe's default, the notebook's two stages.
PRESETS: dict[str, dict] = {
    "cpu": dict(stage1_steps=100, stage2_steps=400),  # see CPU_PRESET_MEASURED
    # the shipped checkpoint's recipe: vlm.SHIPPED_RECIPE (a test checks they agree; written out here so
    # that building the parser needs no torch)
    "book": dict(place_codes=True, grounded=True, spatial_steps=3000, stage2_lm_lr=3e-4, colour_shape_prior=True),
    "gpu": dict(batch_size=256, caption_pairs=20_000, qa_pairs=100_000, stage1_steps=300, stage2_steps=8000,
                stage2_lr=1e-3, stage2_lm_lr=3e-4),
}
# A preset listed here trains a bigger LM than chapter 04's: a GPT of this shape is first pretrained
# on ShapeWorld text (PretrainRecipe's fields; "stage 0", data-parallel like the others), then
# takes the place of the shipped one in both stages.
PRESET_LMS: dict[str, dict] = {
    "gpu": dict(model=dict(dim=512, depth=8, num_heads=8), train_texts=100_000, batch_size=64, steps=2000, lr=1e-3,
                warmup_steps=100),
}
GPU_COMMAND = "torchrun --nproc_per_node 8 -m mllm_scratch train-vlm --preset gpu --device cuda --out vlm_gpu.pt"
# What `train-vlm` with the cpu preset reached, measured with (see the README's command-line section)
# OMP_NUM_THREADS=1 python -m mllm_scratch train-vlm --out /tmp/cli_default.pt --threads 1 --no-progress --eval 600
# 122 s of CPU time (6 min of wall time on a shared machine); test VQA colour 0.24, shape 0.76, count 0.75,
# spatial 0.42, existence 0.63, reading 0.00, all 0.47
CPU_PRESET_MEASURED = "about 2 min on one CPU thread, reaching 0.47 overall on 600 test questions"


def book_preset_measured() -> str:
    """What the book preset took and reached, from the shipped checkpoint's own manifest (data/checkpoints/vlm.json)."""
    import json

    try:  # the path of vlm.DEFAULT_CHECKPOINT's manifest, without importing torch to build the parser
        m = json.loads((Path(__file__).resolve().parent.parent / "data" / "checkpoints" / "vlm.json").read_text())["metrics"]
        questions = m["vqa_questions_per_skill"] * len(m["test_vqa"].keys() - {"all"})
        return f"about {m['train_seconds'] / 60:.0f} min, {m['test_vqa']['all']:.2f} on {questions:,} test questions"
    except (OSError, ValueError, KeyError, TypeError):  # no manifest to quote: say nothing rather than something stale
        return "see data/checkpoints/vlm.json"


_OVERRIDES = ("encoder", "projector", "caption_pairs", "qa_pairs", "batch_size", "stage1_steps", "stage2_steps",
              "stage1_lr", "stage2_lr", "stage2_lm_lr", "seed", "train_encoder", "spatial_steps", "lm", "place_codes",
              "grounded", "text_questions", "colour_shape_prior")
MODELS = {"vlm": "chapter 06's unified VLM (image tokens spliced into the LM's input; the default)",
          "xattn": "chapter 07's cross-attention VLM (the frozen LM reads the image through gated blocks)",
          "tiled": "chapter 10's tiled VLM (64 px: a 32 px thumbnail and 2 x 2 tiles at full resolution; reads text)"}
VIDEO_MODELS = {"xattn": "video", "unified": "unified"}  # --model of ask-video -> the chapter-09 model's name


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------
# train-vlm


def _recipe(args: argparse.Namespace):
    """The VLMRecipe that train-vlm's arguments ask for: VLMRecipe(), then the preset's changes, then each option given."""
    from mllm_scratch.vlm import VLMRecipe

    recipe = replace(VLMRecipe(), **PRESETS[args.preset])
    given = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
    try:  # the recipe checks its budgets before anything trains
        return replace(recipe, **given)
    except ValueError as err:
        name, _, rest = str(err).partition(" ")  # the option's name, as typed: "--stage2-steps must be an int >= 1, got -1"
        raise CLIError(f"--{name.replace('_', '-')} {rest}") from None


def preset_lm_recipe(preset: str, seed: int = 0):
    """The PretrainRecipe of a preset's own bigger LM (see PRESET_LMS), or None for chapter 04's shipped GPT."""
    from mllm_scratch.gpt import GPTConfig, PretrainRecipe

    spec = PRESET_LMS.get(preset)
    if spec is None:
        return None
    return PretrainRecipe(**{**spec, "model": GPTConfig(**spec["model"]), "seed": seed})


def _pretrain_lm(pre, tokenizer, args, parallel, device, state_dir: Path):
    """Stage 0 of a preset with its own LM: pretrain the GPT on ShapeWorld text, on every rank's shard."""
    import torch

    from mllm_scratch.gpt import GPT, lm_loss, text_datasets
    from mllm_scratch.train import batches, train

    train_set, _ = text_datasets(pre, tokenizer)
    torch.manual_seed(pre.seed)
    lm = GPT(pre.model)
    data = batches(train_set, pre.batch_size, seed=pre.seed, device=device, micro_batches=args.grad_accum,
                   shard=parallel.shard)
    config = pre.train_config(log_every=0, progress=not args.no_progress, grad_accum_steps=args.grad_accum,
                              checkpoint_every=args.checkpoint_every)
    history = train(lm, data, lm_loss, config, device=device, parallel=parallel, checkpoint=state_dir / "stage0.pt",
                    resume=args.resume, run={"pretrain": repr(pre)}, batch_size_of=lambda b: b[0].numel())
    return lm, history


def cmd_train_vlm(args: argparse.Namespace) -> int:
    import torch

    from mllm_scratch.distributed import distributed, local_batch_size
    from mllm_scratch.runtime import seed_everything
    from mllm_scratch.shapeworld import VQADataset
    from mllm_scratch.tokenizer import load_tokenizer
    from mllm_scratch.vlm import build_vlm, save_vlm, train_stage, vqa_accuracy

    out = Path(args.out)
    if out.suffix != ".pt":
        raise CLIError(f"--out {out} should end in .pt (its manifest is written beside it as {out.with_suffix('.json').name})")
    if args.grad_accum < 1:
        raise CLIError(f"--grad-accum {args.grad_accum}: expected a number of micro-batches, at least 1")
    if args.checkpoint_every < 0:
        raise CLIError(f"--checkpoint-every {args.checkpoint_every}: expected a number of steps, or 0 for only Ctrl-C")
    recipe = _recipe(args)
    pre = preset_lm_recipe(args.preset, recipe.seed)
    if pre is not None and args.lm is not None:
        raise CLIError(f"--lm {args.lm}: the {args.preset} preset pretrains an LM of its own (stage 0); leave --lm out")
    with distributed(args.device, args.parallel) as (parallel, device):
        for what, size in [("--batch-size", recipe.batch_size)] + ([("the LM's pretraining batch", pre.batch_size)] if pre else []):
            try:
                local_batch_size(size, parallel, args.grad_accum)
            except ValueError as err:
                raise CLIError(f"{what}: {err}") from None
        say = print if parallel.is_main else (lambda *a, **k: None)  # only rank 0 speaks and writes
        seed_everything(recipe.seed)
        if args.threads:
            torch.set_num_threads(args.threads)
        tokenizer = load_tokenizer()
        tuned = "projector + LM" + (" + image tower" if recipe.train_encoder and recipe.encoder != "patches" else "")
        split = ""
        if parallel.active or args.grad_accum > 1:
            split = (f" = {parallel.world_size} process{'es' * (parallel.world_size != 1)} ({parallel.strategy}) x "
                     f"{args.grad_accum} micro-batch{'es' * (args.grad_accum != 1)} x "
                     f"{local_batch_size(recipe.batch_size, parallel, args.grad_accum)}")
        spatial = f"spatial stage {recipe.spatial_steps} steps ({tuned}, spatial questions), " if recipe.spatial_steps else ""
        say(f"train-vlm: encoder {recipe.encoder}, projector {recipe.projector}, stage 1 {recipe.stage1_steps} steps "
            f"(projector, captions), {spatial}stage 2 {recipe.stage2_steps} steps ({tuned}, questions), "
            f"batch {recipe.batch_size}{split}, on {device}")
        # Each stage keeps its training state beside the output, so Ctrl-C (or a crash, back to the last
        # --checkpoint-every) loses nothing: run the same command with --resume to continue.
        state_dir = out.with_name(out.stem + ".train-state")
        if not args.resume and state_dir.exists() and any(state_dir.iterdir()):
            raise CLIError(f"{state_dir} holds an unfinished run: add --resume to continue it, or delete the folder to start over")
        metrics: dict = {}
        lm = None
        if pre is not None:
            m = pre.model
            say(f"stage 0: pretraining the preset's LM ({m.dim} wide, {m.depth} blocks, {m.num_heads} heads) on "
                f"{pre.train_texts} ShapeWorld texts for {pre.steps} steps")
            lm, history = _pretrain_lm(pre, tokenizer, args, parallel, device, state_dir)
            metrics["stage0_loss"] = round(history.loss[-1], 4)
            say(f"stage 0: loss {history.loss[-1]:.4f} after {history.steps[-1]} steps ({history.seconds:.0f} s)")
        model = build_vlm(recipe, tokenizer, lm=lm)
        for stage in recipe.stages:
            name = f"stage{stage}" if isinstance(stage, int) else stage  # stage1, spatial, stage2
            history = train_stage(model, recipe, stage, tokenizer, log_every=0, progress=not args.no_progress,
                                  device=device, checkpoint=state_dir / f"{name}.pt", resume=args.resume,
                                  checkpoint_every=args.checkpoint_every, grad_accum_steps=args.grad_accum,
                                  parallel=parallel)
            metrics[f"{name}_loss"] = round(history.loss[-1], 4)
            say(f"stage {stage}: loss {history.loss[-1]:.4f} after {history.steps[-1]} steps ({history.seconds:.0f} s)")
        if not parallel.is_main:
            return 0
        if args.eval:
            acc = vqa_accuracy(model, tokenizer, VQADataset("test", args.eval, recipe.scene_config()))
            metrics["test_vqa"] = {k: round(v, 4) for k, v in acc.items()}
            print("test VQA accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
        model.to("cpu")
        saved = recipe.to_dict() if pre is None else {**recipe.to_dict(), "lm_pretrain": repr(pre)}
        save_vlm(out, model, recipe=saved, metrics=metrics)
        print(f"wrote {out} and {out.with_suffix('.json').name}")
        shutil.rmtree(state_dir)  # the run is finished: its training state is no longer needed
    return 0


# ----------------------------------------------------------------------------------
# render: a ShapeWorld scene (or clip) to a file, with the truth about it


def _write(write, path: Path, what: str) -> None:
    try:
        write(path)
    except (OSError, ValueError) as err:  # a missing folder, no permission, a suffix Pillow cannot write
        raise CLIError(f"cannot write {what} {str(path)!r}: {err}") from None


def cmd_render(args: argparse.Namespace) -> int:
    from mllm_scratch.images import save_frames, save_gif, save_image
    from mllm_scratch.shapeworld import Rng, caption, clip_questions, generate_clip, generate_scene, questions
    from mllm_scratch.shapeworld import render, render_clip, split_seed
    from mllm_scratch.vlm import VLMRecipe

    try:
        seed = split_seed(args.split, args.index)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if args.video and args.scene_size != 32:
        raise CLIError(f"--scene-size {args.scene_size} with --video: clips are drawn at 32 px only")
    outs = [Path(p) for p in (args.out or ["clip.gif" if args.video else "scene.png"])]
    if args.video:
        from mllm_scratch.video import VIDEO_SCENES, video_recipes

        config, num_frames = VIDEO_SCENES, video_recipes()["video"].source_frames
    elif args.scene_size == 64:  # chapter 10's scenes: text at the font's own size, for the tiled model
        from mllm_scratch.tiling import TiledRecipe

        config = TiledRecipe().scene_config()
    else:
        config = VLMRecipe().scene_config()
    if args.size is not None and (args.size < config.image_size or args.size % config.image_size):
        raise CLIError(f"--size {args.size} is not a multiple of the {config.image_size} px scene: expected "
                       f"{config.image_size}, {2 * config.image_size}, ... (then reading it back is exact)")
    size = f"{config.image_size} px" + (f" shown at {args.size} px" if args.size and args.size != config.image_size else "")
    if args.video:
        clip = generate_clip(seed, num_frames, config, args.split)
        frames = render_clip(clip)  # (T, H, W, 3)
        for out in outs:
            if out.suffix.lower() == ".gif":
                _write(lambda p: save_gif(frames, p, args.size), out, "the GIF")
            elif out.suffix:
                raise CLIError(f"--out {out} with --video should be a .gif file or a folder for the frames (no suffix)")
            else:
                _write(lambda p: save_frames(frames, p, args.size), out, "the frames to")
            print(f"wrote {out}{'/' if not out.suffix else ''}: clip {args.index} of the {args.split} split "
                  f"(seed {seed}), {len(frames)} frames of {size}")
        qas = clip_questions(clip, Rng(seed))
    else:
        scene = generate_scene(seed, config, args.split)  # = CaptionDataset(split)[index]'s scene
        for out in outs:
            _write(lambda p: save_image(render(scene), p, args.size), out, "the image")
            print(f"wrote {out}: scene {args.index} of the {args.split} split (seed {seed}), {size}")
        print(f"caption: {caption(scene)}")
        qas = questions(scene, Rng(seed))
    print("questions (skill, question, true answer):")
    for qa in qas:
        print(f"  {qa.skill:<10} {qa.question} {qa.answer}")
    return 0


def cmd_draw(args: argparse.Namespace) -> int:
    import torch

    from mllm_scratch.images import save_image
    from mllm_scratch.imagegen import EVAL, check_prompt, draw_codes, pretrained_drawing_model
    from mllm_scratch.vq import pretrained_vqvae

    args.guidance = EVAL["guidance"] if args.guidance is None else args.guidance  # the chapter's setting
    args.temperature = EVAL["temperature"] if args.temperature is None else args.temperature
    try:
        text = check_prompt(args.caption)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if args.guidance < 0:
        raise CLIError(f"--guidance {args.guidance} is invalid: expected 0 or more (1 = no guidance)")
    if not 0 <= args.temperature <= 10:
        raise CLIError(f"--temperature {args.temperature} is invalid: expected 0 (greedy) to 10")
    if args.count < 1:
        raise CLIError(f"--count {args.count} is invalid: expected 1 or more drawings")
    if args.size < 32 or args.size % 32:
        raise CLIError(f"--size {args.size} is not a multiple of the 32 px drawing: expected 32, 64, ...")
    model, vqvae = pretrained_drawing_model(args.model), pretrained_vqvae()
    generator = torch.Generator().manual_seed(args.seed)
    images = vqvae.decode(draw_codes(model, [text] * args.count, guidance=args.guidance, temperature=args.temperature,
                                     generator=generator))
    out = Path(args.out)
    for i, image in enumerate(images):
        path = out if args.count == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        _write(lambda p: save_image(pixels, p, args.size), path, "the drawing")
        print(f"wrote {path}: {text!r} drawn by the {args.model} model (seed {args.seed}, guidance {args.guidance})")
    return 0


# ----------------------------------------------------------------------------------
# Question forms, read off shapeworld's own generators (so this list cannot drift from the training data)

_RELATIONS = ("left of", "right of", "above", "below")


def _abstract(question: str) -> str:
    """A generated question with its object words replaced by placeholders: "what colour is the {shape}?"."""
    from mllm_scratch.shapeworld import COLOURS, SHAPES

    question = re.sub(rf"\b({'|'.join(_RELATIONS)})\b", "{relation}", question)
    question = re.sub(rf"\b({'|'.join(COLOURS)})\b", "{colour}", question)
    question = re.sub(rf"\b({'|'.join(SHAPES)})\b", "{shape}", question)
    return question.replace("an {colour}", "a {colour}")  # "is there an orange circle?"


@lru_cache(maxsize=2)
def question_forms(video: bool = False) -> dict[str, dict[str, tuple[str, ...]]]:
    """{skill: {question form: answers seen}} of the questions shapeworld generates for scenes (or clips).

    Read off the generators themselves: 400 seeds produce every form of every skill.
    """
    from mllm_scratch.shapeworld import SKILLS, VIDEO_SKILLS, ShapeWorldConfig, clip_questions, generate_clip
    from mllm_scratch.shapeworld import generate_scene, questions

    forms: dict[str, dict[str, set[str]]] = {skill: {} for skill in (VIDEO_SKILLS if video else SKILLS)}
    for seed in range(400):
        if video:
            from mllm_scratch.video import VIDEO_SCENES

            qas = clip_questions(generate_clip(seed, 8, VIDEO_SCENES), seed)
        else:
            qas = questions(generate_scene(seed, ShapeWorldConfig()), seed)
        for qa in qas:
            forms[qa.skill].setdefault(_abstract(qa.question), set()).add(qa.answer)
    return {skill: {form: tuple(sorted(answers)) for form, answers in by_form.items()} for skill, by_form in forms.items()}


def _form_pattern(form: str) -> re.Pattern:
    from mllm_scratch.shapeworld import COLOURS, SHAPES

    words = {"{colour}": COLOURS, "{shape}": SHAPES, "{relation}": _RELATIONS}
    parts = re.split(r"(\{\w+\})", form)
    return re.compile("".join(f"(?:{'|'.join(words[p])})" if p in words else re.escape(p) for p in parts))


def matching_form(question: str, video: bool = False) -> str | None:
    """The trained question form a (normalised) question follows, or None."""
    from mllm_scratch.shapeworld import COLOURS

    question = re.sub(rf"\ban (?=({'|'.join(COLOURS)})\b)", "a ", question)
    for by_form in question_forms(video).values():
        for form in by_form:
            if _form_pattern(form).fullmatch(question):
                return form
    return None


def _describe_answers(answers: tuple[str, ...]) -> str:
    from mllm_scratch.shapeworld import COLOURS, DIRECTIONS, NUMBER_WORDS, SHAPES

    if set(answers) <= set(COLOURS):
        return "a colour"
    if set(answers) <= set(SHAPES):
        return "a shape"
    order = ("yes", "no", *NUMBER_WORDS, *DIRECTIONS)
    if len(answers) <= 4 and set(answers) <= set(order):
        return ", ".join(sorted(answers, key=order.index))
    return "the text, lowercase"


def _normalise(question: str) -> str:
    """ShapeWorld text: lowercase, single spaces, ending in "?"."""
    question = " ".join(question.lower().split())
    return question if not question or question.endswith("?") else question + "?"


def _check_form(question: str, video: bool) -> None:
    if matching_form(question, video) is None:
        where = "questions" + (" --video" if video else "")
        print(f"warning: {question!r} is not a question form the model was trained on, so its answer means little; "
              f"the forms: python -m mllm_scratch {where}", file=sys.stderr)


def cmd_questions(args: argparse.Namespace) -> int:
    from mllm_scratch.shapeworld import COLOURS, SHAPES, caption, generate_scene, questions

    sections = [(True, "Video questions (ask-video CLIP QUESTION)")] if args.video else [
        (False, "Image questions (ask IMAGE QUESTION)"), (True, "Video questions (ask-video CLIP QUESTION)")]
    print("The question forms the models were trained on, by skill, with the answers they expect.")
    print("Any other question is answered too, but by a model that never saw its form.")
    for video, title in sections:
        print(f"\n{title}:")
        width = max(len(form) for by_form in question_forms(video).values() for form in by_form)
        for skill, by_form in question_forms(video).items():
            for form, answers in by_form.items():
                print(f"  {skill:<10} {form:<{width}}  -> {_describe_answers(answers)}")
    print(f"\n{{colour}}: {', '.join(COLOURS)}\n{{shape}}: {', '.join(SHAPES)}\n{{relation}}: {', '.join(_RELATIONS)}")
    if not args.video:
        example = next(caption(s) for s in map(generate_scene, range(100)) if s.text and len(s.objects) == 2)
        print(f"\nCaptions (caption IMAGE) list the objects left to right, e.g. \"{example}\"")
        grounded = next(q for s in range(100) for q in questions(generate_scene(s), s, ["spatial"], grounded=True))
        print(f"Chapter 06's model (--model vlm) grounds a spatial answer: each object's column (or row) of 8, then "
              f"yes or no,\ne.g. \"{grounded.question}\" -> \"{grounded.answer}\"")
    return 0


# ----------------------------------------------------------------------------------
# caption, ask, ask-video


def _load_model(kind: str, checkpoint: str | None):
    """The VLM of chapter 06 ("vlm") or chapter 07 ("xattn"), from `checkpoint` or the shipped file."""
    if kind == "xattn":
        from mllm_scratch.xattn import load_xattn

        return load_xattn(checkpoint)  # CheckpointError names the file and how to rebuild it
    if kind == "tiled":
        from mllm_scratch.tiling import load_tiled_vlm

        return load_tiled_vlm(checkpoint)
    from mllm_scratch.vlm import load_vlm

    return load_vlm(checkpoint)


def _read_image(path: str, read):
    """`read()`, which reads the image file `path`, with its failures as a CLIError: a missing file, a file that is
    not an image, an unreadable one (permissions, a truncated file)."""
    if not Path(path).is_file():
        raise CLIError(f"image file {str(path)!r} does not exist (or is not a file)")
    try:
        return read()
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from None
    except OSError as err:
        raise CLIError(f"cannot read image {str(path)!r}: {err}") from None


def _load(args: argparse.Namespace):
    """The model and the image, resized to the model's input size (1, 3, size, size)."""
    from mllm_scratch.images import load_image

    _read_image(args.image, lambda: None)  # a missing file fails before the model loads
    model = _load_model(args.model, args.checkpoint)
    if args.model == "tiled":  # any size and shape: fitted into the model's grid of tiles, aspect ratio kept
        image = _read_image(args.image, lambda: _fitted(args.image, model))
    else:  # (3, size, size) in [0, 1]
        image = _read_image(args.image, lambda: load_image(args.image, model.config.vision.image_size))
    return model, image[None]


def _fitted(path: str, model) -> "torch.Tensor":
    """An image file of any size as the tiled model's canvas (LLaVA-NeXT's AnyRes for its one grid): scaled, aspect
    ratio kept, to fit rows x cols tiles (a whole-number shrink is exact), centred on ShapeWorld's background."""
    from PIL import Image

    from mllm_scratch.images import load_image
    from mllm_scratch.shapeworld import BACKGROUND
    from mllm_scratch.tiling import fit_and_pad

    (rows, cols), t = model.grid, model.tile_size
    with Image.open(path) as img:
        width, height = img.size
    scale = min(cols * t / width, rows * t / height)
    fitted = load_image(path, (max(1, min(rows * t, round(height * scale))), max(1, min(cols * t, round(width * scale)))))
    return fit_and_pad(fitted, (rows, cols), t, fill=tuple(v / 255 for v in BACKGROUND))


def cmd_caption(args: argparse.Namespace) -> int:
    from mllm_scratch.tokenizer import load_tokenizer

    model, image = _load(args)
    print(model.generate(load_tokenizer(), image, [""], max_new_tokens=args.max_new_tokens)[0])
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from mllm_scratch.tokenizer import load_tokenizer

    question = _normalise(args.question)
    if not question:
        raise CLIError("the question is empty: ask something, e.g. \"what colour is the circle?\"")
    _check_form(question, video=False)
    model, image = _load(args)
    print(model.generate(load_tokenizer(), image, [question], max_new_tokens=args.max_new_tokens)[0])
    return 0


def cmd_ask_video(args: argparse.Namespace) -> int:
    import torch

    from mllm_scratch.checkpoints import read_manifest
    from mllm_scratch.images import frame_files, load_frames
    from mllm_scratch.tokenizer import load_tokenizer
    from mllm_scratch.video import DEFAULT_CHECKPOINT, load_video_models, sample_frames, video_recipes

    question = _normalise(args.question)
    if not question:
        raise CLIError("the question is empty: ask something, e.g. \"which shape moves?\"")
    clip = Path(args.clip)
    if not clip.exists():
        raise CLIError(f"clip {str(clip)!r} does not exist: expected an animated GIF or a folder of frames")
    if clip.is_dir() and not frame_files(clip):
        raise CLIError(f"folder {str(clip)!r} holds no frames: expected image files such as frame_00.png, frame_01.png, ...")
    _check_form(question, video=True)
    name = VIDEO_MODELS[args.model]
    model = load_video_models(args.checkpoint)[name]
    recipes = read_manifest(args.checkpoint or DEFAULT_CHECKPOINT).get("recipe") or {}  # verified by the loader
    wanted = recipes.get(name, {}).get("frames", video_recipes()[name].frames)  # frames it was trained on
    try:
        frames = load_frames(clip, model.encoder.tower.config.image_size)  # (T, 3, size, size)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from None
    if len(frames) < wanted:
        raise CLIError(f"clip {str(clip)!r} has {len(frames)} frame{'s' * (len(frames) != 1)}: the video model "
                       f"reads {wanted} evenly spaced frames, so give at least {wanted}")
    frames = frames[torch.tensor(sample_frames(len(frames), wanted))]  # (wanted, 3, size, size), first and last kept
    print(model.generate(load_tokenizer(), frames[None], [question], max_new_tokens=args.max_new_tokens)[0])
    return 0


# ----------------------------------------------------------------------------------
# chat: a conversation about one or more images (chapter 12's chat model)

CHAT_HELP = """Type a message and press Enter; the assistant replies with the whole conversation in view.
  /image PATH   show the assistant another image with your next message
  /reset        start over (the images given on the command line are shown again)
  /help         this text
  /quit         end (so does Ctrl-D, or the end of piped input)"""


MIN_CHAT_REPLY = 4  # reply tokens a message must leave room for (a one-word answer and its <|end|>, with room to spare)


def _chat_text(message: str) -> str:
    """A message as the chat model was trained on them: lowercase, single spaces, a request ending in "." ("describe
    the image.") and anything else in "?"."""
    text = " ".join(message.lower().split())
    if text.endswith(("?", ".")):
        return text
    return text + ("." if text.startswith("describe") else "?")


def cmd_chat(args: argparse.Namespace) -> int:
    """Read messages from standard input, one per line, and print each reply on a line of its own.

    Every message goes to the model with the whole conversation before it (`chat.reply` on all the
    turns so far), so a follow-up such as "is it left of the blue square?" refers to what came before.
    The images named on the command line are shown with the first message, and `/image PATH` shows
    another with the next one. Near the end of the model's context a reply is given fewer tokens
    (at most what is left); a message that leaves fewer than MIN_CHAT_REPLY is refused with a line
    on standard error and the conversation kept as it was. Bad input never ends the session."""
    import torch

    from mllm_scratch.chat import ChatTemplate, Turn, check_conversation, load_chat_vlm, reply
    from mllm_scratch.tokenizer import ASSISTANT, END, IMAGE, USER
    from mllm_scratch.tokenizer import load_tokenizer

    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens {args.max_new_tokens} is invalid: expected an int >= 1")
    model = load_chat_vlm(args.checkpoint)  # CheckpointError names the file and how to rebuild it
    size = model.config.vision.image_size
    from mllm_scratch.images import load_image

    first = [_read_image(path, lambda path=path: load_image(path, size)) for path in args.images]  # all checked first
    template = ChatTemplate(load_tokenizer(), model.num_image_tokens)
    context = model.config.lm.context_length
    special = (USER, ASSISTANT, END, IMAGE)  # the template's tokens: a user cannot type them
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chapter 12's chat model, {len(first)} image{'s' * (len(first) != 1)} shown. /help for commands.")
    turns: list = []
    shown: list = []  # the images the conversation's markers stand for, in order
    pending = list(first)  # images that go with the next message
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input (Ctrl-D at the prompt: end its line)
            if interactive:
                print()
            break
        message = line.strip()
        if not message:
            continue
        if message in ("/quit", "/exit"):
            break
        if message == "/help":  # piped: to stderr, so that stdout holds the replies only
            print(CHAT_HELP, file=sys.stdout if interactive else sys.stderr)
            continue
        if message == "/reset":
            turns, shown, pending = [], [], list(first)
            continue
        if message.split(maxsplit=1)[0] == "/image":
            path = message[len("/image"):].strip()
            if not path:
                print("error: /image needs a file: /image PATH", file=sys.stderr)
                continue
            try:
                pending.append(_read_image(path, lambda: load_image(path, size)))
            except CLIError as err:  # a bad file mid-conversation: say so and go on
                print(f"error: {err}", file=sys.stderr)
            continue
        if message.startswith("/"):
            print(f"error: unknown command {message.split()[0]!r}: expected /image PATH, /reset, /help or /quit",
                  file=sys.stderr)
            continue
        text = _chat_text(message)
        typed = [token for token in special if token in text]
        if typed:  # the template's own tokens are not text: refused, as `check_conversation` would
            print(f"error: type no {typed[0]}: the chat template writes it (show an image with /image PATH)",
                  file=sys.stderr)
            continue
        user = Turn("user", IMAGE * len(pending) + text)
        images = shown + pending
        room = context - len(template.prompt([*turns, user], num_images=len(images)))
        if room < MIN_CHAT_REPLY:  # too long for the context: refused, and the conversation stays as it was
            print(f"error: the conversation would leave room for {max(room, 0)} reply tokens in the model's context "
                  f"of {context}: expected at least {MIN_CHAT_REPLY}. Type /reset to start over.", file=sys.stderr)
            continue
        said = reply(model, template, torch.stack(images), [*turns, user],
                     max_new_tokens=min(args.max_new_tokens, room))  # near the end of the context, a shorter reply
        try:
            kept = check_conversation([*turns, user, Turn("assistant", said)], num_images=len(images))
        except ValueError:  # an empty reply, or one that wrote a template token: shown, not kept
            print(f"error: the reply {said!r} cannot stay in the conversation; it goes on as it was",
                  file=sys.stderr)
        else:
            turns = list(kept)
            shown, pending = images, []
        print(said if not interactive else f"assistant> {said}", flush=True)
    return 0


# ----------------------------------------------------------------------------------
# The parser


def build_parser() -> argparse.ArgumentParser:
    from mllm_scratch.shapeworld import SPLITS
    from mllm_scratch.video import video_recipes
    from mllm_scratch.vlm import VLMRecipe

    video = video_recipes()["video"]

    parser = argparse.ArgumentParser(
        prog="python -m mllm_scratch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    r = sub.add_parser("render", help="write a ShapeWorld scene (or clip) to a file, with its caption and questions",
                       description="Render scene INDEX of a ShapeWorld split (the scene CaptionDataset(split)[INDEX] "
                       "holds) to an image file, and print its caption and its questions with the true answers, "
                       "from the generator itself. With --video, a clip (as chapter 09's test clips are made) "
                       "to an animated GIF or a folder of PNG frames, with its video questions.")
    r.add_argument("index", type=int, nargs="?", default=0, help="which scene of the split (default 0)")
    r.add_argument("--split", choices=SPLITS, default="test",
                   help="test (default): scenes no model trained on; compositional: colour-shape pairs never trained on")
    r.add_argument("--out", action="append", metavar="PATH",
                   help="the image file to write (default scene.png); with --video a .gif (default clip.gif) or "
                   "a folder (no suffix) for frame_00.png, frame_01.png, ...; give --out twice for both")
    r.add_argument("--size", type=int, default=256,
                   help="enlarge to this many pixels, nearest neighbour, so you can see it (default 256; 32: as the "
                   "models see it); a multiple of the scene's size (32, or 64 with --scene-size 64), which the commands "
                   "shrink back to exactly the scene's pixels")
    r.add_argument("--scene-size", type=int, choices=(32, 64), default=32,
                   help="32 (default): the scenes of chapters 06-09; 64: chapter 10's, whose text only the tiled "
                   "model (ask --model tiled) can read")
    r.add_argument("--video", action="store_true",
                   help=f"a {video.source_frames}-frame clip of moving shapes instead of a scene")
    r.set_defaults(run=cmd_render)

    q = sub.add_parser("questions", help="list the question forms the models understand, by skill",
                       description="List the question forms the models were trained on, by skill, with the answers "
                       "they expect; read off ShapeWorld's own question generators. ask and ask-video answer any "
                       "question, but warn about one that follows none of these forms.")
    q.add_argument("--video", action="store_true", help="only the video questions (ask-video)")
    q.set_defaults(run=cmd_questions)

    for name, helptext in (("caption", "describe an image in one sentence"), ("ask", "answer a question about an image")):
        p = sub.add_parser(name, help=helptext, description=f"{helptext[0].upper()}{helptext[1:]} with a trained VLM. "
                           "Any image file Pillow opens; it is resized to the model's input size (32 px; "
                           "--model tiled fits it, aspect ratio kept, into 64 px and cuts 2 x 2 tiles). "
                           "The models know only ShapeWorld: make a scene with `render`."
                           + (" Question forms the models were trained on: `python -m mllm_scratch questions`; "
                              "another question is still answered, with a warning." if name == "ask" else ""))
        p.add_argument("image", help="an image file (PNG, JPEG, ...), e.g. one written by render")
        if name == "ask":
            p.add_argument("question", help='e.g. "what colour is the circle?" or "how many objects are there?"')
        p.add_argument("--model", choices=sorted(MODELS), default="vlm",
                       help="; ".join(f"{k}: {v}" for k, v in MODELS.items()))
        p.add_argument("--checkpoint", default=None, help="a checkpoint of that model, e.g. from train-vlm "
                       "(default: the shipped data/checkpoints/vlm.pt, xattn.pt or tiled_vlm.pt)")
        p.add_argument("--max-new-tokens", type=int, default=32 if name == "caption" else 10,
                       help="longest reply in tokens (a grounded spatial reply takes up to 8)")
        p.set_defaults(run=cmd_caption if name == "caption" else cmd_ask)

    v = sub.add_parser("ask-video", help="answer a question about a clip (an animated GIF or a folder of frames)",
                       description="Answer a question about a clip with chapter 09's video model: the frames of a "
                       f"GIF (or the images of a folder, in name order) are resized to 32 px and {video.frames} "
                       "evenly spaced ones, first and last included, go through the image tower and the Perceiver "
                       "Resampler, as in chapter 09's evaluation. "
                       "Make a clip with `render --video`; question forms: `python -m mllm_scratch questions --video`.")
    v.add_argument("clip", help="an animated GIF, or a folder of frame images (frame_00.png, frame_01.png, ...)")
    v.add_argument("question", help='e.g. "which shape moves?" or "which way does the red circle move first?"')
    v.add_argument("--model", choices=sorted(VIDEO_MODELS), default="xattn",
                   help="xattn: the resampler's tokens read by chapter 07's cross-attention decoder (default); "
                   "unified: spliced into chapter 06's decoder")
    v.add_argument("--checkpoint", default=None, help="chapter 09's checkpoint (default: data/checkpoints/video.pt)")
    v.add_argument("--max-new-tokens", type=int, default=3, help="longest reply in tokens")
    v.set_defaults(run=cmd_ask_video)

    book = replace(VLMRecipe(), **PRESETS["book"])
    c = sub.add_parser("chat", help="talk about one or more images with chapter 12's chat model",
                       description="An interactive conversation with chapter 12's chat model: each line you type "
                       "is a message, answered with the whole conversation in view. The images named here are "
                       "shown with the first message. Reads standard input, so a file of messages can be piped "
                       "in: each reply is printed on a line of its own.\n\n" + CHAT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("images", nargs="+", metavar="image", help="image files (PNG, JPEG, ...), e.g. written by render")
    c.add_argument("--checkpoint", default=None, help="a chat model saved by save_chat_vlm "
                   "(default: the shipped data/checkpoints/chat_vlm.pt)")
    c.add_argument("--max-new-tokens", type=int, default=40, help="longest reply in tokens (default 40: a caption)")
    c.set_defaults(run=cmd_chat)

    d = sub.add_parser("draw", help="draw a caption with chapter 13's model",
                       description="Draw a ShapeWorld caption with chapter 13's drawing model: 16 image codes sampled "
                       "one by one, decoded by the VQ-VAE. Captions use sizes, colours and shapes, listed left to right "
                       "('a small red circle and a large blue square') or with one relation "
                       "('a small red circle above a large blue square').")
    d.add_argument("caption", help="what to draw, in ShapeWorld's words")
    d.add_argument("--out", default="drawing.png", help="the image file to write (default drawing.png)")
    d.add_argument("--model", choices=("emu3", "janus"), default="emu3",
                   help="emu3 (default): one tokenizer reads and draws; janus: reads through the image tower")
    d.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (1: none; default: the chapter's, 1.5, imagegen.EVAL)")
    d.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (0: greedy; default: the chapter's, 0.3, imagegen.EVAL)")
    d.add_argument("--seed", type=int, default=0, help="sampling seed (default 0): another seed, another drawing")
    d.add_argument("--count", type=int, default=1, help="how many drawings (default 1; several: NAME_0.png, ...)")
    d.add_argument("--size", type=int, default=256, help="enlarge to this many pixels, nearest neighbour (default 256)")
    d.set_defaults(run=cmd_draw)

    t = sub.add_parser("train-vlm", help="train a tiny unified VLM (chapter 06) and save it",
                       description="Train a unified VLM in LLaVA's two stages (projector on captions, then projector "
                       "+ LM on questions; --spatial-steps puts a stage of spatial questions between them) and write the checkpoint atomically to --out. Uses the GPU when present. "
                       f"The cpu preset takes {CPU_PRESET_MEASURED}. On several processes or GPUs, launch it with "
                       "torchrun: `torchrun --nproc_per_node N -m mllm_scratch train-vlm ...` (gloo on --device cpu, "
                       "NCCL on cuda). --batch-size stays the global batch: each process reads "
                       "BATCH / (N x GRAD_ACCUM) examples per micro-batch, so N and --grad-accum change how the work "
                       f"is split, not what is learned. The gpu preset: {GPU_COMMAND}")
    t.add_argument("--out", default="vlm.pt", help="checkpoint to write, NAME.pt (+ NAME.json); default vlm.pt")
    t.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help=f"cpu (default): {CPU_PRESET_MEASURED}; book: the shipped checkpoint's recipe "
                   f"({book.stage1_steps} + {book.spatial_steps} spatial + {book.stage2_steps} steps, place codes, "
                   f"grounded spatial answers; {book_preset_measured()}); "
                   f"gpu: a bigger LM (pretrained first, as stage 0), longer stages, bigger batches; run it on "
                   f"GPUs with: {GPU_COMMAND}")
    t.add_argument("--encoder", choices=("clip", "vit", "patches"),
                   help="image tower: clip (the book's pretrained tower, chapter 05; default), vit (random), patches (Fuyu: none)")
    t.add_argument("--projector", choices=("linear", "mlp"), help="the connector (default mlp)")
    for name, kind, text in (("caption-pairs", int, "stage-1 captions"), ("qa-pairs", int, "stage-2 questions"),
                             ("batch-size", int, "examples per optimizer step, over all processes (the global "
                              "batch); each of torchrun's N processes reads BATCH / (N x GRAD_ACCUM) per micro-batch"), ("stage1-steps", int, "stage-1 steps"),
                             ("stage2-steps", int, "stage-2 steps"), ("stage1-lr", float, "stage-1 learning rate"),
                             ("stage2-lr", float, "rate of the projector in the spatial stage and stage 2"),
                             ("stage2-lm-lr", float, "rate of the pretrained LM in the spatial stage and stage 2"),
                             ("spatial-steps", int, "steps of the spatial stage, between stages 1 and 2 (0: none)"),
                             ("text-questions", int, "text-only colour and shape questions about described scenes "
                              "that name every (colour, shape) pair, added to stage 2's mix (0, the presets': none)"),
                             ("seed", int, "random seed")):
        t.add_argument(f"--{name}", type=kind, help=f"{text} (overrides the preset)")
    tower = t.add_mutually_exclusive_group()
    default = "--train-encoder" if book.train_encoder else "--freeze-encoder"
    tower.add_argument("--train-encoder", dest="train_encoder", action="store_const", const=True, default=None,
                       help="stage 2 also tunes the image tower, at the LM's rate, as Molmo does"
                       + (" (the default: the book's recipe)" if default == "--train-encoder" else ""))
    tower.add_argument("--freeze-encoder", dest="train_encoder", action="store_const", const=False,
                       help="stage 2 keeps the image tower frozen, LLaVA's recipe"
                       + (" (the default: the book's recipe)" if default == "--freeze-encoder" else ""))
    t.add_argument("--lm", choices=("base", "qa"), help="the pretrained GPT: base (chapter 04's; the presets') or qa "
                   "(pretrained with questions in its text, chapter 07's)")
    places = t.add_mutually_exclusive_group()
    places.add_argument("--place-codes", dest="place_codes", action="store_const", const=True, default=None,
                        help="a LayerNorm and learned 2-D place codes after the projector")
    places.add_argument("--no-place-codes", dest="place_codes", action="store_const", const=False,
                        help="the projector's output as it is (the cpu and gpu presets')")
    grounds = t.add_mutually_exclusive_group()
    grounds.add_argument("--grounded", dest="grounded", action="store_const", const=True, default=None,
                         help="spatial answers say where both objects are first: 'red circle 1 blue square 5 yes' "
                         "(the book preset's)")
    grounds.add_argument("--no-grounded", dest="grounded", action="store_const", const=False,
                         help="spatial answers are one word, yes or no (the cpu and gpu presets')")
    priors = t.add_mutually_exclusive_group()
    priors.add_argument("--colour-shape-prior", dest="colour_shape_prior", action="store_const", const=True,
                        default=None, help="stage 2's loss adds the training pairs' log p(shape | colour) to the logits "
                        "(a product of experts, dropped at test; the book preset's)")
    priors.add_argument("--no-colour-shape-prior", dest="colour_shape_prior", action="store_const", const=False,
                        help="stage 2's plain loss (the cpu and gpu presets')")
    t.add_argument("--eval", type=int, default=300, help="test questions to score after training (0: none; default 300)")
    t.add_argument("--device", help="cuda, mps or cpu (default: the GPU if there is one; $MLLM_DEVICE overrides)")
    t.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS",
                   help="save the training state every this many steps (default 500; Ctrl-C always saves)")
    t.add_argument("--resume", action="store_true",
                   help="continue the unfinished run whose state sits beside --out (OUT.train-state/)")
    t.add_argument("--grad-accum", type=int, default=1, metavar="A",
                   help="micro-batches per optimizer step (default 1): the same global batch in A smaller pieces, "
                   "for less memory; the gradient is that of the whole batch's mean loss")
    t.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="under torchrun, how the processes share the model: ddp (each holds a copy; gradients "
                   "averaged; the default) or fsdp (FSDP2: each holds 1/N of the weights and optimizer state, and "
                   "of the reduced gradients). Each process reads its own 1/N of every global batch; only the first writes --out")
    t.set_defaults(run=cmd_train_vlm)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m mllm_scratch`: returns the exit status (2 with a one-line message on bad input)."""
    from mllm_scratch.checkpoints import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (CLIError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # train-vlm has saved its state by now; the traceback would say nothing more
        print("interrupted", file=sys.stderr)
        return 130


__all__ = ["MODELS", "PRESETS", "PRESET_LMS", "preset_lm_recipe", "build_parser", "main", "matching_form", "question_forms"]
