"""Tests for ShapeWorld: determinism, geometry, text consistency, splits, datasets, video."""

import hashlib
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mllm_scratch import shapeworld as sw
from mllm_scratch.shapeworld import ShapeWorldConfig

TEXT = ShapeWorldConfig(text_probability=1.0)
NO_TEXT = ShapeWorldConfig(text_probability=0.0)


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- determinism

GOLDEN = {
    # (seed, image_size, with text): sha256 of the rendered pixels
    (0, 32, False): "4506e0d968285ce5ea7cb8f17fb477ecb81745d239f436f15f24f69fd41ed42a",
    (1, 32, True): "e867a998c3a16f9006aa961b6cf4c9e8f295a0ff8de7f5860df88ff3c90b29b5",
    (2, 64, False): "e26bb3ebe8df233a3918ccab7427e1ff58cbc36b3169b7459e2e664424bedae6",
    (3, 64, True): "56a477809c9256c0e5891949a2a3e92589be7371e51e0ce6c6cfeacafd6dcfdc",
    (4, 128, True): "df7127f6935ebf2029bd48b13eae50f4ca25ea9baf3fe6fac358de5dc09ea727",
}
GOLDEN_CLIP = "7111793220fc2bd7f8b8af22d116f9a6ed1e534131b47e734c4871e3416192dd"  # generate_clip(5, 8) at 32 px
GOLDEN_TEXT = (  # caption and description of generate_scene(2, TEXT)
    "a small orange cross, a small yellow triangle and a small orange diamond. the text says ac.",
    "there are three objects. a small orange cross is left of a small yellow triangle. "
    "the small yellow triangle is left of a small orange diamond. the text says ac.",
)
GOLDEN_CORPUS = "41a8867bd4227ab21b98834074de2ef11292719db946e22b69939df5f4fe63da"  # text_corpus(50, seed=0)


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_golden_pixels(key):
    seed, size, text = key
    config = ShapeWorldConfig.preset(size, text_probability=1.0 if text else 0.0)
    scene = sw.generate_scene(seed, config)
    assert (scene.text is not None) == text
    image = sw.render(scene)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert sha(image) == GOLDEN[key]


def test_golden_clip_and_text():
    assert sha(sw.render_clip(sw.generate_clip(5, 8))) == GOLDEN_CLIP
    scene = sw.generate_scene(2, TEXT)
    assert (sw.caption(scene), sw.description(scene)) == GOLDEN_TEXT
    corpus = "\n".join(sw.text_corpus(num_scenes=50, seed=0))
    assert hashlib.sha256(corpus.encode()).hexdigest() == GOLDEN_CORPUS


def test_same_seed_same_pixels_and_different_seeds_differ():
    a = [sw.render(sw.generate_scene(s, TEXT)) for s in range(20)]
    b = [sw.render(sw.generate_scene(s, TEXT)) for s in range(20)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len({sha(x) for x in a}) == 20


def test_render_paints_exact_colours_and_stays_in_boxes():
    for seed in range(50):
        scene = sw.generate_scene(seed, TEXT)
        image = sw.render(scene)
        inside = np.zeros(image.shape[:2], dtype=bool)
        for o in scene.objects:
            c = o.side // 2  # the box centre is inside every shape
            assert tuple(image[o.y + c, o.x + c]) == sw.RGB[o.colour]
            inside[o.y : o.y + o.side, o.x : o.x + o.side] = True
        x0, y0, x1, y1 = scene.text_box
        text = image[y0:y1, x0:x1].reshape(-1, 3)
        assert {tuple(p) for p in text} == {sw.BACKGROUND, sw.TEXT_RGB}
        inside[y0:y1, x0:x1] = True
        assert (image[~inside] == sw.BACKGROUND).all()


def test_shapes_differ_in_pixels():
    # Same box, same colour: every pair of shapes must give a different coverage mask.
    for side in (8, 12, 24):
        masks = {s: sw._coverage(sw.ShapeObject(s, "red", "small", 0, 0, side)) for s in sw.SHAPES}
        for a in sw.SHAPES:
            for b in sw.SHAPES:
                if a < b:
                    assert (masks[a] != masks[b]).sum() >= side, (a, b, side)


def test_text_mask_is_the_bitmap_font():
    m = sw.text_mask("A7", 1)
    assert m.shape == (8, 11) and m.dtype == bool and 10 < m.sum() < 60
    assert np.array_equal(sw.text_mask("A7", 2), m.repeat(2, 0).repeat(2, 1))
    assert not np.array_equal(sw.text_mask("A7"), sw.text_mask("7A"))


def test_missing_bitmap_font_names_pillow_version(monkeypatch):
    from PIL import ImageFont

    monkeypatch.delattr(ImageFont, "load_default_imagefont")
    sw._glyph.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"Pillow >= 10\.1"):
            sw.text_mask("Z")
    finally:
        sw._glyph.cache_clear()


# ----------------------------------------------------------------------------- geometry


def check_scene(scene, config):
    gap, size = config.gap, config.image_size
    assert config.min_objects <= len(scene.objects) <= config.max_objects
    boxes = [o.box for o in scene.objects] + ([scene.text_box] if scene.text else [])
    for x0, y0, x1, y1 in boxes:
        assert gap <= x0 < x1 <= size - gap and gap <= y0 < y1 <= size - gap
    for i, a in enumerate(boxes):
        for b in boxes[:i]:
            assert a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
    pairs = [(o.colour, o.shape) for o in scene.objects]
    assert len(set(pairs)) == len(pairs)
    for o in scene.objects:
        assert o.side == config.sides[o.size]
    if scene.text:
        assert 2 <= len(scene.text) <= 3 and set(scene.text) <= set(sw.TEXT_ALPHABET)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**40), size=st.sampled_from([32, 64, 128]), text=st.floats(0, 1))
def test_scenes_never_overlap(seed, size, text):
    config = ShapeWorldConfig.preset(size, text_probability=text)
    check_scene(sw.generate_scene(seed, config), config)


def test_crowded_configs_still_place_everything():
    for size in (32, 64, 128):
        most = ShapeWorldConfig.preset(size, text_probability=1.0).max_fit()
        config = ShapeWorldConfig.preset(size, text_probability=1.0, min_objects=most, max_objects=most)
        for seed in range(20):
            check_scene(sw.generate_scene(seed, config), config)


# ----------------------------------------------------------------------------- text


def answer_from_graph(scene, question):
    """Re-derive the answer to a question from the scene graph, independently of the generator."""
    objs = scene.objects
    named = {f"{o.colour} {o.shape}": o for o in objs}
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        (o,) = [o for o in objs if o.shape == m[1]]  # exactly one: unambiguous
        return o.colour
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (o,) = [o for o in objs if o.colour == m[1]]
        return o.shape
    if question == "how many objects are there?":
        return sw.NUMBER_WORDS[len(objs)]
    if m := re.fullmatch(r"is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?", question):
        a, b = named[m[1]], named[m[3]]
        ax, ay, bx, by = a.x + a.side / 2, a.y + a.side / 2, b.x + b.side / 2, b.y + b.side / 2
        # the relation is asked only when the boxes are apart on that axis
        apart_x = a.x + a.side <= b.x or b.x + b.side <= a.x
        apart_y = a.y + a.side <= b.y or b.y + b.side <= a.y
        assert apart_x if "of" in m[2] else apart_y
        truth = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[m[2]]
        return "yes" if truth else "no"
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        assert question.startswith("is there an ") == (m[1] == "orange")
        return "yes" if f"{m[1]} {m[2]}" in named else "no"
    if question == "what does the text say?":
        return scene.text.lower()
    raise AssertionError(f"unknown question {question!r}")


def test_answers_follow_from_the_scene_graph():
    config = ShapeWorldConfig.preset(64, text_probability=0.5)
    seen = set()
    for seed in range(400):
        scene = sw.generate_scene(seed, config)
        for qa in sw.questions(scene, seed, config=config):
            assert qa.answer == answer_from_graph(scene, qa.question), qa
            assert re.fullmatch(r"[a-z0-9]+", qa.answer) and qa.question == qa.question.lower()
            seen.add(qa.skill)
    assert seen == set(sw.SKILLS)


def test_yes_no_answers_are_balanced():
    for skill in ("spatial", "existence"):
        answers = []
        for seed in range(600):
            scene = sw.generate_scene(seed)
            answers += [qa.answer for qa in sw.questions(scene, seed, [skill])]
        assert len(answers) > 300
        assert 0.4 < answers.count("yes") / len(answers) < 0.6, skill


def test_questions_only_when_unambiguous():
    two_circles = sw.Scene(
        (sw.ShapeObject("circle", "red", "small", 1, 1, 8), sw.ShapeObject("circle", "blue", "small", 20, 1, 8)),
        None,
        32,
    )
    qas = {qa.skill: qa for qa in sw.questions(two_circles, 0)}
    assert "colour" not in qas and "reading" not in qas  # two circles: "what colour is the circle?" is ambiguous
    assert qas["shape"].answer == "circle" and qas["count"].answer == "two"


def test_caption_and_description_list_objects_left_to_right():
    scene = sw.Scene(
        (sw.ShapeObject("square", "blue", "large", 18, 10, 12), sw.ShapeObject("circle", "red", "small", 2, 2, 8)),
        "A7K",
        32,
        (2, 22, 19, 30),
    )
    assert sw.caption(scene) == "a small red circle and a large blue square. the text says a7k."
    assert sw.description(scene) == (
        "there are two objects. a small red circle is left of a large blue square. the text says a7k."
    )
    three = sw.Scene(scene.objects + (sw.ShapeObject("cross", "green", "small", 21, 0, 8),), None, 32)
    assert sw.caption(three) == "a small red circle, a large blue square and a small green cross."
    assert sw.description(three).endswith("the large blue square is below a small green cross.")
    one = sw.Scene(scene.objects[:1], None, 32)
    assert sw.description(one) == "there is one object. it is a large blue square."


def test_text_corpus_covers_every_task_and_is_deterministic():
    corpus = sw.text_corpus(num_scenes=300, seed=1)
    assert corpus == sw.text_corpus(num_scenes=300, seed=1)
    vocab = set().union(*map(sw.words, corpus))
    chars = set("".join(corpus))
    assert set(sw.TEXT_ALPHABET.lower()) <= chars
    produced = set()
    for seed in range(300):
        config = ShapeWorldConfig.preset((32, 64, 128)[seed % 3])
        scene = sw.generate_scene(10**6 + seed, config, split="compositional")
        # reading strings are random: the corpus covers them character by character
        produced |= (sw.words(sw.caption(scene)) | sw.words(sw.description(scene))) - {(scene.text or "").lower()}
        for qa in sw.questions(scene, seed, config=config):
            produced |= sw.words(qa.question) | ({qa.answer} if qa.skill != "reading" else set())
        clip = sw.generate_clip(seed, 4 + seed % 20, config)
        for qa in sw.clip_questions(clip, seed):
            produced |= sw.words(f"{qa.question} {qa.answer}")
    produced |= set(sw.NUMBER_WORDS) | set(sw.COLOURS) | set(sw.SHAPES) | set(sw.DIRECTIONS)
    assert produced <= vocab, produced - vocab


def test_class_labels():
    assert sw.class_names("shape") == list(sw.SHAPES)
    assert len(sw.class_names("colour_shape")) == len(sw.SHAPES) * len(sw.COLOURS)
    ds = sw.ShapeClassificationDataset("train", 40, task="colour_shape")
    for i in range(40):
        scene = sw.generate_scene(sw.split_seed("train", i), ds.config, split="train")
        image, y = ds[i]
        assert ds.classes[y] == scene.objects[0].name
        assert torch.equal(image, sw.to_tensor(sw.render(scene)))


# ----------------------------------------------------------------------------- splits


def test_split_seed_ranges_are_disjoint():
    ranges = sorted(sw.SPLIT_SEEDS.values())
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    assert sw.split_seed("val", 3) == sw.SPLIT_SEEDS["val"][0] + 3
    with pytest.raises(ValueError, match=r"index 100000 is out of range for split 'test'"):
        sw.split_seed("test", 100_000)


def test_held_out_pairs_only_in_the_compositional_split():
    held = set(sw.HELD_OUT)
    config = ShapeWorldConfig.preset(64)
    for split in ("train", "val", "test"):
        for i in range(150):
            scene = sw.generate_scene(sw.split_seed(split, i), config, split=split)
            assert not {(o.colour, o.shape) for o in scene.objects} & held
            clip = sw.generate_clip(sw.split_seed(split, i), 4, config, split=split)
            assert not {(o.colour, o.shape) for o in clip.objects} & held
    for i in range(150):
        scene = sw.generate_scene(sw.split_seed("compositional", i), config, split="compositional")
        assert {(o.colour, o.shape) for o in scene.objects} & held
    # every colour and shape is still trained in some other pair
    train = ShapeWorldConfig().train_pairs()
    assert {c for c, _ in train} == set(sw.COLOURS) and {s for _, s in train} == set(sw.SHAPES)
    # negative existence questions never name a held-out pair
    for seed in range(200):
        for qa in sw.questions(sw.generate_scene(seed), seed, ["existence"]):
            if qa.answer == "no":
                assert not any(f"{c} {s}" in qa.question for c, s in held)


def test_datasets_use_their_split_seeds():
    ds = sw.CaptionDataset("val", 5)
    scene = sw.generate_scene(sw.split_seed("val", 4), ds.config, split="val")
    image, text = ds[4]
    assert text == sw.caption(scene) and torch.equal(image, sw.to_tensor(sw.render(scene)))
    assert sw.TextDataset("val", 5)[4] == sw.description(scene)
    assert sw.CaptionDataset("train", 5)[4][1] != text or sw.CaptionDataset("test", 5)[4][1] != text


# ----------------------------------------------------------------------------- datasets


def test_dataset_items_shapes_and_types():
    image, y = sw.ShapeClassificationDataset("train", 10)[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(y, int)
    assert 0.0 <= image.min() and image.max() <= 1.0
    image, caption = sw.CaptionDataset("test", 10, ShapeWorldConfig.preset(64))[0]
    assert image.shape == (3, 64, 64) and caption.endswith(".")
    assert isinstance(sw.TextDataset("train", 10)[9], str)
    frames, q, a, skill = sw.VideoQADataset("val", 10, num_frames=6)[2]
    assert frames.shape == (6, 3, 32, 32) and frames.dtype == torch.float32 and skill in sw.VIDEO_SKILLS


def test_vqa_dataset_cycles_skills_and_filters():
    ds = sw.VQADataset("train", 60, cache=True)
    skills = [ds[i][3] for i in range(60)]
    assert skills == [sw.SKILLS[i % len(sw.SKILLS)] for i in range(60)]
    assert ds[5] is ds[5]  # cached
    for i in range(12):
        image, q, a, skill = ds[i]
        assert image.shape == (3, 32, 32) and isinstance(q, str) and isinstance(a, str)
    only = sw.VQADataset("test", 20, skills=["reading", "count"])
    assert {only[i][3] for i in range(20)} == {"reading", "count"}
    video = sw.VideoQADataset("train", 8, skills=["order"])
    assert all(video[i][3] == "order" for i in range(8))


def test_to_tensor():
    image = sw.render(sw.generate_scene(0))
    t = sw.to_tensor(image)
    assert t.shape == (3, 32, 32)
    assert torch.equal(t * 255, torch.from_numpy(image).permute(2, 0, 1).float())
    assert sw.to_tensor(np.stack([image, image])).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="expected uint8"):
        sw.to_tensor(image.astype(np.float32))


# ----------------------------------------------------------------------------- video


def mover_centre(frame, colour):
    ys, xs = np.nonzero((frame == sw.RGB[colour]).all(-1))
    return xs.mean(), ys.mean()


@pytest.mark.parametrize("num_frames", [4, 9, 16, 64])
def test_clips_move_bounce_appear_and_never_overlap(num_frames):
    config = ShapeWorldConfig()
    for seed in range(15):
        clip = sw.generate_clip(seed, num_frames, config)
        video = sw.render_clip(clip)
        assert video.shape == (num_frames, 32, 32, 3) and video.dtype == np.uint8
        movers = [m for m in clip.objects if m.direction]
        assert len(movers) == 1 and movers[0].appear == 0
        mover = movers[0]
        assert len({m.shape for m in clip.objects}) == len({m.colour for m in clip.objects}) == len(clip.objects)
        for t in range(num_frames):
            scene = sw.frame_scene(clip, t)
            check_scene(scene, ShapeWorldConfig(min_objects=1, max_objects=config.max_objects, text_probability=0))
            assert len(scene.objects) == sum(m.appear <= t for m in clip.objects)
        # the first step goes in the named direction
        (x0, y0), (x1, y1) = mover_centre(video[0], mover.colour), mover_centre(video[1], mover.colour)
        step = {"left": x1 < x0, "right": x1 > x0, "up": y1 < y0, "down": y1 > y0}
        assert step[mover.direction] and sum(step.values()) == 1
        qas = {qa.skill: qa for qa in sw.clip_questions(clip, seed)}
        assert qas["direction"].answer == mover.direction
        assert qas["appearing"].answer == sw.NUMBER_WORDS[sum(m.appear > 0 for m in clip.objects)]
        assert qas["mover"].answer in (mover.shape, mover.colour)
        if "order" in qas:
            m = re.fullmatch(r"which appears first, the (\w+) (\w+) or the (\w+) (\w+)\?", qas["order"].question)
            first = {o.shape: o.appear for o in clip.objects}
            assert first[qas["order"].answer] == min(first[m[2]], first[m[4]]) and first[m[2]] != first[m[4]]


def test_long_clips_bounce_off_walls():
    bounced = 0
    for seed in range(20):
        clip = sw.generate_clip(seed, 64)
        mover = next(m for m in clip.objects if m.direction)
        xs = [next(o for o in sw.frame_scene(clip, t).objects if o.shape == mover.shape).x for t in range(64)]
        ys = [next(o for o in sw.frame_scene(clip, t).objects if o.shape == mover.shape).y for t in range(64)]
        steps = np.diff(xs if mover.dx else ys)
        assert np.abs(steps).max() == abs(mover.dx or mover.dy)  # never faster than its speed
        bounced += (steps > 0).any() and (steps < 0).any()
    assert bounced == 20  # 64 frames always cross the canvas at least once


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ShapeWorldConfig(image_size=20), r"image_size 20 is too small: expected an int of at least 32"),
        (lambda: ShapeWorldConfig(image_size=512), r"image_size 512 is too large: expected at most 256"),
        (
            lambda: ShapeWorldConfig(max_objects=9),
            r"max_objects 9 cannot fit on a 32 px canvas with text: expected at most 3",
        ),
        (lambda: ShapeWorldConfig(min_objects=3, max_objects=2), r"min_objects 3 / max_objects 2"),
        (lambda: ShapeWorldConfig(shapes=("circle", "hexagon")), r"shapes \('circle', 'hexagon'\) is invalid"),
        (lambda: ShapeWorldConfig(colours=("red", "pink")), r"colours \('red', 'pink'\) is invalid"),
        (lambda: ShapeWorldConfig(text_probability=1.5), r"text_probability 1.5 is invalid: expected 0..1"),
        (lambda: ShapeWorldConfig(held_out=(("pink", "circle"),)), r"held_out pair \('pink', 'circle'\) is invalid"),
        (lambda: ShapeWorldConfig.preset(48), r"no preset for image_size 48: expected one of \[32, 64, 128\]"),
        (
            lambda: sw.generate_scene(0, split="training"),
            r"split 'training' is unknown: expected one of \('train', 'val', 'test', 'compositional'\)",
        ),
        (lambda: sw.CaptionDataset("dev", 10), r"split 'dev' is unknown"),
        (lambda: sw.CaptionDataset("val", 0), r"size 0 is invalid for split 'val': expected an int in 1..100000"),
        (lambda: sw.VQADataset("train", 5, skills=["colour", "size"]), r"skills \['colour', 'size'\] are invalid"),
        (lambda: sw.VQADataset("train", 5, NO_TEXT, skills=["reading"]), r"skill 'reading' needs text"),
        (lambda: sw.ShapeClassificationDataset("train", 5, task="size"), r"task 'size' is unknown"),
        (lambda: sw.ShapeClassificationDataset("train", 5, ShapeWorldConfig()), r"max_objects 3: classification needs"),
        (lambda: sw.generate_clip(0, num_frames=1), r"num_frames 1 is invalid: expected 2 <= num_frames <= 256"),
        (lambda: sw.VideoQADataset("train", 5, num_frames=300), r"num_frames 300 is invalid"),
    ],
)
def test_errors_say_what_was_wrong(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_dataset_index_error():
    with pytest.raises(IndexError):
        sw.TextDataset("train", 3)[3]


def test_snap_puts_every_corner_on_the_grid_and_changes_nothing_when_1():
    from mllm_scratch.shapeworld import ShapeWorldConfig, generate_clip, generate_scene, relations

    snapped = ShapeWorldConfig(text_probability=0.0, snap=8)
    for i in range(300):
        scene = generate_scene(i, snapped, "train")
        assert all(o.x % 8 == 0 and o.y % 8 == 0 and o.x + o.side <= 32 and o.y + o.side <= 32 for o in scene.objects)
        for a in scene.objects:  # still no two boxes closer than the gap
            assert all(a is b or relations(a, b) for b in scene.objects)
    plain = ShapeWorldConfig(text_probability=0.0)
    assert generate_scene(7, plain) == generate_scene(7, ShapeWorldConfig(text_probability=0.0, snap=1))
    assert "snap" not in repr(plain) and "snap=8" in repr(snapped)
    with pytest.raises(ValueError, match="snap 9 is invalid"):
        ShapeWorldConfig(snap=9)
    with pytest.raises(ValueError, match="expected snap 1"):
        generate_clip(0, 4, snapped)


def test_canonical_spatial_questions_use_one_word_per_axis_and_answer_by_the_boxes():
    from mllm_scratch.shapeworld import CANONICAL_WORDS, _OPPOSITE, generate_scene, questions, relations

    seen = {"yes": 0, "no": 0}
    for seed in range(300):
        scene = generate_scene(seed)
        if len(scene.objects) < 2:
            continue
        (qa,) = questions(scene, seed, ["spatial"], spatial_words=CANONICAL_WORDS)
        word = "left of" if " left of " in qa.question else "above"
        assert word in qa.question and not any(f" {w} " in qa.question for w in ("right of", "below"))
        names = qa.question[len("is the "):-1].split(f" {word} the ")
        a, b = ([o for o in scene.objects if o.name == n] for n in names)
        holds = any(word in relations(x, y) for x in a for y in b)
        flipped = any(_OPPOSITE[word] in relations(x, y) for x in a for y in b)
        assert (qa.answer == "yes" and holds) or (qa.answer == "no" and flipped), (qa, scene)
        seen[qa.answer] += 1
    assert min(seen.values()) > 0.35 * sum(seen.values())  # both answers common


@pytest.mark.parametrize("words, match", [(("left of",), "'above'"), (("left of", "above", "sideways"), "invalid"), ((), "invalid")])
def test_spatial_words_must_cover_both_axes(words, match):
    from mllm_scratch.shapeworld import VQADataset

    with pytest.raises(ValueError, match=match):
        VQADataset("train", 4, skills=("spatial",), spatial_words=words)


def test_an_offset_gives_a_dataset_the_scenes_past_another_and_is_checked():
    from mllm_scratch.shapeworld import VQADataset

    plain, past = VQADataset("val", 20, skills=("count",)), VQADataset("val", 10, skills=("count",), offset=10)
    for i in range(10):  # item i at offset 10 is item 10 + i without one
        assert torch.equal(past[i][0], plain[10 + i][0]) and past[i][1:] == plain[10 + i][1:]
    assert not torch.equal(past[0][0], plain[0][0])
    for offset, size, match in [(-1, 5, r"offset -1 is invalid for split 'val': expected an int in 0..99999"),
                                (100_000, 5, r"offset 100000 is invalid"), (True, 5, r"offset True is invalid"),
                                (99_998, 3, r"size 3 is invalid for split 'val' at offset 99998: expected an int in 1..2")]:
        with pytest.raises(ValueError, match=match):
            VQADataset("val", size, offset=offset)


def test_text_with_questions_follows_each_description_with_its_answers():
    from mllm_scratch.shapeworld import TextDataset

    plain, asked = TextDataset("val", 5), TextDataset("val", 5, questions=True)
    for i in range(5):
        assert asked[i].startswith(plain[i] + " ")
        assert "how many objects are there? " in asked[i] and asked[i].count("?") >= 3


def test_a_grounded_spatial_answer_names_each_objects_cell_then_answers():
    """grounded=True changes only a spatial answer: "red circle 1 blue square 5 yes", the cells of the two
    named objects' centres along the relation's axis, in the question's order, then the one-word answer."""
    from mllm_scratch.shapeworld import GROUND_CELLS, final_answer, generate_scene, ground_cell, questions

    checked = 0
    for seed in range(200):
        scene = generate_scene(seed, split="val")
        plain = questions(scene, seed, None)
        grounded = questions(scene, seed, None, grounded=True)
        assert [(q.question, q.skill) for q in plain] == [(q.question, q.skill) for q in grounded]  # same questions
        for p, g in zip(plain, grounded):
            assert final_answer(g.answer) == p.answer and final_answer(p.answer) == p.answer
            if p.skill != "spatial":
                assert g.answer == p.answer
                continue
            word = next(w for w in ("left of", "right of", "above", "below") if f" {w} " in p.question)
            first, second = p.question[len("is the "):-1].split(f" {word} the ")
            a, b = (next(o for o in scene.objects if o.name == n) for n in (first, second))
            axis, size = ("x", scene.width) if word in ("left of", "right of") else ("y", scene.height)
            cells = [int((getattr(o, axis) + o.side / 2) / (size / GROUND_CELLS)) for o in (a, b)]
            assert g.answer == f"{first} {cells[0]} {second} {cells[1]} {p.answer}"
            assert [ground_cell(o, word, scene) for o in (a, b)] == cells
            smaller_first = cells[0] < cells[1]  # boxes apart on the axis: the centres' cells differ that way
            assert smaller_first == ((word in ("left of", "above")) == (p.answer == "yes"))
            checked += 1
    assert checked > 100
    assert final_answer("red circle 9 blue square 1 maybe") == "red circle 9 blue square 1 maybe"  # not grounded: as is
    with pytest.raises(ValueError, match="relation 'near' is invalid"):
        ground_cell(generate_scene(0).objects[0], "near", generate_scene(0))


def test_a_grounded_dataset_holds_the_same_scenes_and_questions():
    from mllm_scratch.shapeworld import VQADataset, final_answer

    plain, grounded = VQADataset("test", 30), VQADataset("test", 30, grounded=True)
    for i in range(30):
        (img_p, q_p, a_p, s_p), (img_g, q_g, a_g, s_g) = plain[i], grounded[i]
        assert torch.equal(img_p, img_g) and (q_p, s_p) == (q_g, s_g) and final_answer(a_g) == a_p
        assert (a_g != a_p) == (s_p == "spatial")
    with pytest.raises(ValueError, match="grounded 1 is invalid: expected True or False"):
        VQADataset("test", 3, grounded=1)


# -- described scenes: text-only colour and shape questions (chapter 06's stage-2 mix)


def test_described_questions_are_answered_by_their_text_and_name_held_out_pairs():
    from mllm_scratch.shapeworld import HELD_OUT, DescribedQADataset, Scene

    data = DescribedQADataset("train", 400, offset=2_000_000)
    blank = sw.to_tensor(sw.render(Scene((), None, ShapeWorldConfig().image_size)))
    held = 0
    for i in range(len(data)):
        image, prompt, answer, skill = data[i]
        assert torch.equal(image, blank) and skill == ("colour", "shape")[i % 2]
        text, question = prompt.rsplit(". ", 1)
        if skill == "shape":  # "what shape is the green object?": the text names one green thing, and its shape
            colour = question.split()[-2]
            assert question == f"what shape is the {colour} object?" and f" {colour} {answer}" in text
            held += (colour, answer) in HELD_OUT
        else:  # "what colour is the circle?"
            shape = question.split()[-1].rstrip("?")
            assert question == f"what colour is the {shape}?" and f" {answer} {shape}" in text
    assert held >= 10  # ~1 in 8 of 200 shape answers names a held-out pair
    train_only = DescribedQADataset("train", 200, offset=2_000_000, skills=("shape",), all_pairs=False)
    assert not any((train_only[i][1].split()[-2], train_only[i][2]) in HELD_OUT for i in range(200))
    assert data[7][1:] == DescribedQADataset("train", 400, offset=2_000_000)[7][1:]


@pytest.mark.parametrize("kwargs, message", [
    (dict(skills=("count",)), "skills ['count'] are invalid"),
    (dict(all_pairs="yes"), "all_pairs 'yes' is invalid: expected True or False"),
])
def test_a_bad_described_dataset_is_refused(kwargs, message):
    from mllm_scratch.shapeworld import DescribedQADataset

    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DescribedQADataset("train", 10, **kwargs)


def test_asked_pair_reads_the_object_a_colour_or_shape_question_is_about():
    from mllm_scratch.shapeworld import asked_pair

    assert asked_pair("what shape is the green object?", "circle") == ("green", "circle")
    assert asked_pair("what colour is the circle?", "green") == ("green", "circle")
    asked = 0
    for i in range(60):  # on real questions the pair is one of the scene's objects, the one the question singles out
        scene = sw.generate_scene(sw.split_seed("val", i), ShapeWorldConfig(), "val")
        for qa in sw.questions(scene, i, ["colour", "shape"]):
            colour, shape = asked_pair(qa.question, qa.answer)
            assert (colour, shape) in {(o.colour, o.shape) for o in scene.objects}
            asked += 1
    assert asked >= 60
    with pytest.raises(ValueError, match="is not a colour or shape question"):
        asked_pair("how many objects are there?", "two")
