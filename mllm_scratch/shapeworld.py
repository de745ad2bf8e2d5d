"""ShapeWorld: the book's own image, text and video data, generated deterministically from a seed.

A scene is a dark canvas with a few coloured shapes (and optionally a short rendered
string). From its scene graph we derive captions, question-answer pairs by skill,
text-only descriptions for language-model pretraining and class labels for the ViT.
Clips are short videos of one moving shape plus shapes that appear later.

Same seed, same pixels on every machine: all sampling goes through `Rng`, which uses
only `random.Random(seed).random()` (the part Python guarantees to repeat across
versions), and shapes are rasterised with integer-only numpy math (4x4 supersampling
with exact integer coverage), never with a drawing library.
The only outside resource is Pillow's built-in bitmap font for the reading task.

Conventions chosen here (the chapters rely on them):
- all text is lowercase; answers are single words; reading answers are the rendered
  string lowercased ("a7k" for the image text "A7K");
- objects in a scene have distinct (colour, shape) pairs, so "the red circle" is
  always unambiguous; in a clip, shapes and colours are each distinct;
- captions and descriptions list objects left to right.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

# ----------------------------------------------------------------------------------
# Vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 245),
    "yellow": (240, 220, 40),
    "purple": (170, 70, 230),
    "orange": (255, 140, 20),
}
BACKGROUND: tuple[int, int, int] = (16, 16, 24)
TEXT_RGB: tuple[int, int, int] = (245, 245, 245)
# Digits and uppercase letters without the look-alikes O/0, I/1 and Q.
TEXT_ALPHABET = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"
NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# Image skills, then video skills.
SKILLS: tuple[str, ...] = ("colour", "shape", "count", "spatial", "existence", "reading")
VIDEO_SKILLS: tuple[str, ...] = ("direction", "mover", "order", "appearing")
CLASS_TASKS: tuple[str, ...] = ("shape", "colour", "colour_shape")

# Held out of train/val/test; the "compositional" split always shows at least one.
# Each uses a different colour and shape, so every colour and shape is still trained.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "cross"),
    ("yellow", "diamond"),
)

# Disjoint seed ranges [start, stop): item i of a split uses seed start + i.
SPLIT_SEEDS: dict[str, tuple[int, int]] = {
    "train": (0, 10_000_000),
    "val": (10_000_000, 10_100_000),
    "test": (10_100_000, 10_200_000),
    "compositional": (10_200_000, 10_300_000),
}
SPLITS: tuple[str, ...] = tuple(SPLIT_SEEDS)

_SUPERSAMPLE = 4  # 4x4 sub-pixel samples per pixel for smooth edges
_MAX_ATTEMPTS = 200  # rejection-sampling attempts before a clear error


# ----------------------------------------------------------------------------------
# Scene graph and configuration


class _Canvas:
    """Height and width in pixels of what has an `image_size` and an optional `canvas` (height, width)."""

    image_size: int
    canvas: tuple[int, int] | None

    @property
    def height(self) -> int:
        return self.image_size if self.canvas is None else self.canvas[0]

    @property
    def width(self) -> int:
        return self.image_size if self.canvas is None else self.canvas[1]


@dataclass(frozen=True)
class ShapeObject:
    """One shape in a scene: its attributes and its bounding box (top-left x, y and side, in pixels)."""

    shape: str
    colour: str
    size: str
    x: int
    y: int
    side: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.x + self.side, self.y + self.side)


@dataclass(frozen=True)
class Scene(_Canvas):
    """A scene graph: objects, an optional rendered string and the canvas size."""

    objects: tuple[ShapeObject, ...]
    text: str | None
    image_size: int
    text_box: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) of the string
    canvas: tuple[int, int] | None = None  # (height, width) when it is not image_size x image_size


@dataclass(frozen=True)
class QA:
    """A question about a scene or clip, its answer (one word, or a grounded spatial answer) and the skill it tests."""

    question: str
    answer: str
    skill: str


@dataclass(frozen=True)
class ShapeWorldConfig(_Canvas):
    """What scenes look like: canvas size, object counts, shape and colour sets, text and held-out pairs."""

    image_size: int = 32
    min_objects: int = 1
    max_objects: int = 3
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    text_probability: float = 0.3
    text_length: tuple[int, int] = (2, 3)
    held_out: tuple[tuple[str, str], ...] = HELD_OUT
    # (height, width) of a canvas other than image_size x image_size. Objects keep the sizes
    # image_size gives them, so a bigger canvas shows more room, not bigger shapes: an image
    # at its native resolution (chapter 11). Stored in a saved config only when set.
    canvas: tuple[int, int] | None = field(default=None, metadata={"switch": True})
    # Objects' top-left corners on multiples of `snap` pixels (1: anywhere). Chapter 13 snaps them to
    # its image tokenizer's 8 px cells, so an object is always the same few codes. Stored only when set.
    snap: int = field(default=1, metadata={"switch": True})

    def __post_init__(self) -> None:
        s = self.image_size
        if not isinstance(s, int) or s < 32:
            raise ValueError(f"image_size {s} is too small: expected an int of at least 32")
        if s > 256:
            raise ValueError(f"image_size {s} is too large: expected at most 256")
        if self.canvas is not None:
            c = self.canvas
            if (not isinstance(c, tuple) or len(c) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and 16 <= v <= 256 for v in c)):
                raise ValueError(f"canvas {c!r} is invalid: expected None or (height, width), ints from 16 to 256")
            side = self.sides["large"] + 2 * self.gap
            if min(c) < side:
                raise ValueError(f"canvas {c} cannot hold a large object ({self.sides['large']} px plus gaps): "
                                 f"expected both sides at least {side}")
        if isinstance(self.snap, bool) or not isinstance(self.snap, int) or not 1 <= self.snap <= self.sides["small"]:
            raise ValueError(f"snap {self.snap!r} is invalid: expected an int from 1 (anywhere) to the small side "
                             f"{self.sides['small']} px")
        for name, values, valid in (("shapes", self.shapes, SHAPES), ("colours", self.colours, COLOURS)):
            bad = [v for v in values if v not in valid]
            if bad or not values or len(set(values)) != len(values):
                raise ValueError(f"{name} {values!r} is invalid: expected distinct names from {valid}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"min_objects {self.min_objects} / max_objects {self.max_objects}: "
                "expected 1 <= min_objects <= max_objects"
            )
        if not 0.0 <= self.text_probability <= 1.0:
            raise ValueError(f"text_probability {self.text_probability} is invalid: expected 0..1")
        lo, hi = self.text_length
        if not 1 <= lo <= hi <= 3:
            raise ValueError(f"text_length {self.text_length} is invalid: expected (lo, hi) with 1 <= lo <= hi <= 3")
        limit = self.max_fit()
        if self.max_objects > limit:
            raise ValueError(
                f"max_objects {self.max_objects} cannot fit on a "
                f"{f'{s} px' if self.canvas is None else f'{self.height} x {self.width} px'} canvas"
                f"{' with text' if self.text_probability > 0 else ''}: expected at most {limit}"
            )
        for pair in self.held_out:
            if len(pair) != 2 or pair[0] not in self.colours or pair[1] not in self.shapes:
                raise ValueError(
                    f"held_out pair {pair!r} is invalid: expected (colour, shape) from {self.colours} x {self.shapes}"
                )
        if len(self.train_pairs()) < self.max_objects:
            raise ValueError(
                f"held_out leaves {len(self.train_pairs())} (colour, shape) pairs: "
                f"expected at least max_objects {self.max_objects}"
            )

    def __repr__(self) -> str:
        # the canvas switch is shown only when set, so a book config prints as it always has
        shown = (f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                 if not (f.metadata.get("switch") and getattr(self, f.name) == f.default))
        return f"ShapeWorldConfig({', '.join(shown)})"

    @classmethod
    def preset(cls, image_size: int, **overrides) -> "ShapeWorldConfig":
        """The book's presets: 32 px (up to 3 objects), 64 and 128 px (up to 4, finer detail)."""
        presets = {32: dict(max_objects=3), 64: dict(max_objects=4), 128: dict(max_objects=4)}
        if image_size not in presets:
            raise ValueError(f"no preset for image_size {image_size}: expected one of {sorted(presets)}")
        return cls(image_size=image_size, **{**presets[image_size], **overrides})

    @property
    def sides(self) -> dict[str, int]:
        """Side of the bounding box in pixels for each size word."""
        return {"small": self.image_size // 4, "large": self.image_size * 3 // 8}

    @property
    def gap(self) -> int:
        return max(1, self.image_size // 32)

    @property
    def text_scale(self) -> int:
        return max(1, self.image_size // 64)

    def max_fit(self) -> int:
        """Most objects that random placement packs reliably (calibrated: about 80% of a grid of large boxes)."""
        cell = self.sides["large"] + self.gap
        h, w = self.height, self.width
        cells = 0.8 * ((h - self.gap) / cell) * ((w - self.gap) / cell)
        if self.text_probability > 0:  # the text box takes room too
            w, h = _text_extent("XXX", self.text_scale)
            cells -= (w + self.gap) * (h + self.gap) / cell**2
        return min(int(cells), len(NUMBER_WORDS) - 1)

    def train_pairs(self) -> list[tuple[str, str]]:
        """(colour, shape) pairs allowed in train/val/test."""
        return [(c, s) for c in self.colours for s in self.shapes if (c, s) not in self.held_out]


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLIT_SEEDS:
        raise ValueError(f"split {split!r} is unknown: expected one of {SPLITS}")


def split_seed(split: str, index: int) -> int:
    """Seed of item `index` of a split: its range start plus index."""
    _check_split(split)
    start, stop = SPLIT_SEEDS[split]
    if not 0 <= index < stop - start:
        raise ValueError(f"index {index} is out of range for split {split!r}: expected 0 <= index < {stop - start}")
    return start + index


# ----------------------------------------------------------------------------------
# Sampling scenes


class Rng:
    """Seeded sampling built only on `random.Random.random()`, which Python promises to repeat across versions."""

    def __init__(self, seed: "int | random.Random | Rng") -> None:
        if isinstance(seed, Rng):
            seed = seed._random
        self._random = seed if isinstance(seed, random.Random) else random.Random(seed)

    def random(self) -> float:
        return self._random.random()

    def below(self, n: int) -> int:
        """Uniform int in [0, n)."""
        return int(self._random.random() * n)

    def randint(self, a: int, b: int) -> int:
        """Uniform int in [a, b]."""
        return a + self.below(b - a + 1)

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def shuffle(self, items: list) -> None:
        for i in range(len(items) - 1, 0, -1):  # Fisher-Yates
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]

    def sample(self, seq, k: int) -> list:
        """k distinct items (partial Fisher-Yates)."""
        pool = list(seq)
        for i in range(k):
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]


def _pick_pairs(rng: Rng, config: ShapeWorldConfig, n: int, split: str | None) -> list[tuple[str, str]]:
    """n distinct (colour, shape) pairs that obey the split's held-out rule."""
    every = [(c, s) for c in config.colours for s in config.shapes]
    if split is None:
        return rng.sample(every, n)
    if split != "compositional":
        return rng.sample(config.train_pairs(), n)
    if not config.held_out:
        raise ValueError("the compositional split needs held_out pairs: config.held_out is empty")
    first = rng.choice(config.held_out)
    pairs = [first] + rng.sample([p for p in every if p != first], n - 1)
    rng.shuffle(pairs)  # so the held-out object is not always placed first (or the mover in a clip)
    return pairs


def _place(rng: Rng, w: int, h: int, taken: list, size: int | tuple[int, int], gap: int,
           snap: int = 1) -> tuple[int, int] | None:
    """A uniformly random top-left corner (x, y) for a w x h box clear of `taken` boxes, or None if none is left.
    With snap > 1, only corners whose x and y are multiples of snap, and a box may touch the canvas's edge
    (boxes still keep `gap` from each other)."""
    height, width = (size, size) if isinstance(size, int) else size  # the canvas
    free = np.zeros((height, width), dtype=bool)  # free[y, x]: may the box's top-left corner go here?
    edge = gap if snap == 1 else 0
    free[edge : height - edge - h + 1, edge : width - edge - w + 1] = True
    if snap > 1:
        on_grid = np.zeros_like(free)
        on_grid[::snap, ::snap] = True
        free &= on_grid
    for x0, y0, x1, y1 in taken:  # corners that would come closer than `gap` to a taken box
        free[max(0, y0 - gap - h + 1) : y1 + gap, max(0, x0 - gap - w + 1) : x1 + gap] = False
    corners = np.flatnonzero(free)
    if corners.size == 0:
        return None
    i = int(corners[rng.below(corners.size)])
    return i % width, i // width


def _sample_scene(rng: Rng, config: ShapeWorldConfig, split: str | None) -> Scene:
    for _ in range(_MAX_ATTEMPTS):
        n = rng.randint(config.min_objects, config.max_objects)
        pairs = _pick_pairs(rng, config, n, split)
        sizes = [rng.choice(SIZES) for _ in range(n)]
        text = None
        if config.text_probability > 0 and rng.random() < config.text_probability:
            text = "".join(rng.choice(TEXT_ALPHABET) for _ in range(rng.randint(*config.text_length)))
        taken: list[tuple[int, int, int, int]] = []
        text_box = None
        if text is not None:  # the widest box goes first
            w, h = _text_extent(text, config.text_scale)
            corner = _place(rng, w, h, taken, (config.height, config.width), config.gap)
            if corner is None:
                continue
            text_box = (corner[0], corner[1], corner[0] + w, corner[1] + h)
            taken.append(text_box)
        objects = []
        for (colour, shape), size in zip(pairs, sizes):
            side = config.sides[size]
            corner = _place(rng, side, side, taken, (config.height, config.width), config.gap, config.snap)
            if corner is None:
                break
            obj = ShapeObject(shape, colour, size, corner[0], corner[1], side)
            taken.append(obj.box)
            objects.append(obj)
        else:
            return Scene(tuple(objects), text, config.image_size, text_box, config.canvas)
    raise RuntimeError(f"could not place {config.max_objects} objects on {config.image_size} px; lower max_objects")


def generate_scene(seed: int, config: ShapeWorldConfig | None = None, split: str | None = None) -> Scene:
    """The scene for a seed; `split` applies the held-out rule (None: any pair may appear)."""
    _check_split(split)
    return _sample_scene(Rng(seed), config or ShapeWorldConfig(), split)


# ----------------------------------------------------------------------------------
# Rendering (integer math only, so pixels are identical everywhere)

_GLYPH_W, _GLYPH_H, _GLYPH_TOP = 6, 8, 2  # cell of Pillow's default bitmap font, ink rows 2..9


@lru_cache(maxsize=None)
def _glyph(char: str) -> np.ndarray:
    """(8, 6) bool mask of one character in Pillow's built-in bitmap font."""
    from PIL import ImageFont
    import PIL

    if not hasattr(ImageFont, "load_default_imagefont"):
        raise RuntimeError(
            f"rendered text needs Pillow >= 10.1 (ImageFont.load_default_imagefont); found Pillow {PIL.__version__}"
        )
    mask = ImageFont.load_default_imagefont().getmask(char)
    w, h = mask.size
    full = np.array(mask, dtype=np.uint8).reshape(h, w) > 0
    cell = np.zeros((_GLYPH_H, _GLYPH_W), dtype=bool)
    part = full[_GLYPH_TOP : _GLYPH_TOP + _GLYPH_H, :_GLYPH_W]
    cell[: part.shape[0], : part.shape[1]] = part
    return cell


def _text_extent(text: str, scale: int) -> tuple[int, int]:
    return ((_GLYPH_W * len(text) - 1) * scale, _GLYPH_H * scale)


@lru_cache(maxsize=8192)
def text_mask(text: str, scale: int = 1) -> np.ndarray:
    """(H, W) bool mask of a string in the bitmap font, each font pixel repeated `scale` times (read-only)."""
    mask = np.concatenate([_glyph(c) for c in text], axis=1)[:, : _GLYPH_W * len(text) - 1]
    mask = mask.repeat(scale, axis=0).repeat(scale, axis=1)
    mask.flags.writeable = False  # cached: shared between calls
    return mask


def _coverage(obj: ShapeObject) -> np.ndarray:
    """(side, side) int array: how many of the 16 sub-pixel samples of each pixel lie inside the shape."""
    ss = _SUPERSAMPLE
    # Sample centres in units of 1/(2*ss) pixel, so all coordinates are integers.
    u = 2 * np.arange(obj.side * ss, dtype=np.int64) + 1
    X, Y = u[None, :], u[:, None]  # (1, n), (n, 1) broadcast to the (n, n) sample grid
    c = obj.side * ss  # box centre, same units
    h = obj.side * ss  # half the box side
    dx, dy = np.abs(X - c), np.abs(Y - c)
    if obj.shape == "circle":
        inside = dx * dx + dy * dy <= h * h
    elif obj.shape == "square":
        inside = (dx <= h * 4 // 5) & (dy <= h * 4 // 5)  # inset so it looks as big as the circle
    elif obj.shape == "diamond":
        inside = dx + dy <= h
    elif obj.shape == "triangle":  # apex at the top centre, base along the bottom
        inside = 2 * dx <= Y
    elif obj.shape == "cross":
        arm = h * 3 // 8
        inside = (dx <= arm) | (dy <= arm)
    else:
        raise ValueError(f"shape {obj.shape!r} is unknown: expected one of {SHAPES}")
    inside = inside & (dx < h) & (dy < h)
    # (n, n) -> (side, ss, side, ss) -> (side, side) counts
    return inside.reshape(obj.side, ss, obj.side, ss).sum(axis=(1, 3), dtype=np.int32)


_RGB_ARRAYS = {name: np.array(rgb, dtype=np.int32) for name, rgb in RGB.items()}


@lru_cache(maxsize=4096)
def _cached_coverage(shape: str, side: int) -> np.ndarray:
    return _coverage(ShapeObject(shape, "red", "small", 0, 0, side))


def render(scene: Scene) -> np.ndarray:
    """Pixels of a scene: (H, W, 3) uint8; H = W = image_size unless the scene has its own canvas."""
    s = scene.image_size
    image = np.empty((scene.height, scene.width, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    n = _SUPERSAMPLE**2
    for obj in scene.objects:
        k = _cached_coverage(obj.shape, obj.side)[:, :, None]  # (side, side, 1) samples inside
        window = image[obj.y : obj.y + obj.side, obj.x : obj.x + obj.side]
        # Exact integer blend of background and colour by coverage, rounded half up.
        window[:] = (window * (n - k) + _RGB_ARRAYS[obj.colour] * k + n // 2) // n
    if scene.text is not None:
        x0, y0, _, _ = scene.text_box
        mask = text_mask(scene.text, max(1, s // 64))
        image[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = TEXT_RGB
    return image


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [0, 1]; also (T, H, W, 3) -> (T, 3, H, W)."""
    if image.dtype != np.uint8 or image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise ValueError(
            f"image of dtype {image.dtype} and shape {image.shape}: expected uint8 (H, W, 3) or (T, H, W, 3)"
        )
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, -3), dtype=np.float32)).div_(255)


# ----------------------------------------------------------------------------------
# Text from the scene graph


def _left_to_right(objects) -> list[ShapeObject]:
    return sorted(objects, key=lambda o: (o.x + o.side / 2, o.y + o.side / 2))


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: ShapeObject, article: str = "a") -> str:
    return f"{article} {obj.size} {obj.colour} {obj.shape}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def relations(a: ShapeObject, b: ShapeObject) -> list[str]:
    """Relations that clearly hold from a to b: "left of", "right of", "above", "below" (boxes apart on that axis)."""
    out = []
    if a.x + a.side <= b.x:
        out.append("left of")
    if b.x + b.side <= a.x:
        out.append("right of")
    if a.y + a.side <= b.y:
        out.append("above")
    if b.y + b.side <= a.y:
        out.append("below")
    return out


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# A grounded spatial answer names each object and the cell its centre falls in, counting GROUND_CELLS
# equal columns (for "left of"/"right of") or rows (for "above"/"below"), then says yes or no:
# "is the red circle left of the blue square?" -> "red circle 1 blue square 5 yes".
GROUND_CELLS = 8
_GROUNDED = re.compile(r"([a-z]+ [a-z]+) ([0-9]) ([a-z]+ [a-z]+) ([0-9]) (yes|no)")


def ground_cell(obj: ShapeObject, relation: str, scene: _Canvas) -> int:
    """The column (for "left of"/"right of") or row (for "above"/"below") of obj's centre, 0..GROUND_CELLS - 1."""
    if relation not in _OPPOSITE:
        raise ValueError(f"relation {relation!r} is invalid: expected one of {tuple(_OPPOSITE)}")
    horizontal = relation in ("left of", "right of")
    start, length = (obj.x, scene.width) if horizontal else (obj.y, scene.height)
    return min(GROUND_CELLS - 1, int((start + obj.side / 2) * GROUND_CELLS // length))


def final_answer(text: str) -> str:
    """The answer a reply gives: the yes/no at the end of a grounded spatial answer, else the reply itself."""
    match = _GROUNDED.fullmatch(text)
    return match.group(5) if match else text
CANONICAL_WORDS: tuple[str, ...] = ("left of", "above")  # one word per axis: `questions(spatial_words=...)`


def caption(scene: Scene) -> str:
    """One-sentence caption listing objects left to right, e.g. "a small red circle and a large blue square."."""
    out = _join([_phrase(o) for o in _left_to_right(scene.objects)]) + "."
    if scene.text is not None:
        out += f" the text says {scene.text.lower()}."
    return out


def description(scene: Scene) -> str:
    """Text-only description for language-model pretraining: the count, then neighbours left to right."""
    objs = _left_to_right(scene.objects)
    n = len(objs)
    if n == 1:
        out = f"there is one object. it is {_phrase(objs[0])}."
    else:
        out = f"there are {NUMBER_WORDS[n]} objects."
        for i, (a, b) in enumerate(zip(objs, objs[1:])):
            rel = relations(a, b)[0]  # boxes never overlap, so some relation holds
            out += f" {_phrase(a, 'a' if i == 0 else 'the')} is {rel} {_phrase(b)}."
    if scene.text is not None:
        out += f" the text says {scene.text.lower()}."
    return out


def _as_rng(rng: "Rng | random.Random | int") -> Rng:
    return rng if isinstance(rng, Rng) else Rng(rng)


def questions(
    scene: Scene,
    rng: Rng | random.Random | int,
    skills: list[str] | tuple[str, ...] | None = None,
    config: ShapeWorldConfig | None = None,
    *,
    spatial_words: tuple[str, ...] | None = None,
    grounded: bool = False,
) -> list[QA]:
    """One unambiguous QA per requested image skill that the scene supports (in SKILLS order).

    spatial_words: the relation words a spatial question may use (default: all four, each
    answered "yes" half the time). CANONICAL_WORDS, ("left of", "above"), asks every pair
    one way only, so that "yes" means the first object is further left (or up).
    grounded: a spatial answer says where both objects are first ("red circle 1 blue square 5 yes",
    see `ground_cell`); `final_answer` reads its yes/no. Every other answer is one word either way.
    """
    skills = _check_skills(skills, SKILLS)
    spatial_words = _check_spatial_words(spatial_words)
    rng = _as_rng(rng)
    config = config or ShapeWorldConfig()
    objs = list(scene.objects)
    out: list[QA] = []
    for skill in SKILLS:
        if skill not in skills:
            continue
        if skill == "colour":
            unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
            if unique:
                o = rng.choice(unique)
                out.append(QA(f"what colour is the {o.shape}?", o.colour, skill))
        elif skill == "shape":
            unique = [o for o in objs if sum(p.colour == o.colour for p in objs) == 1]
            if unique:
                o = rng.choice(unique)
                out.append(QA(f"what shape is the {o.colour} object?", o.shape, skill))
        elif skill == "count":
            out.append(QA("how many objects are there?", NUMBER_WORDS[len(objs)], skill))
        elif skill == "spatial" and len(objs) >= 2:
            a, b = rng.sample(objs, 2)
            holds = relations(a, b)
            if spatial_words is not None:  # each relation that holds asked in the allowed word: itself or its opposite
                rel = rng.choice(holds)
                rel, answer = (rel, "yes") if rel in spatial_words else (_OPPOSITE[rel], "no")
            elif rng.random() < 0.5:
                rel, answer = rng.choice(holds), "yes"
            else:
                rel, answer = _OPPOSITE[rng.choice(holds)], "no"
            if grounded:
                answer = f"{a.name} {ground_cell(a, rel, scene)} {b.name} {ground_cell(b, rel, scene)} {answer}"
            out.append(QA(f"is the {a.name} {rel} the {b.name}?", answer, skill))
        elif skill == "existence":
            present = {(o.colour, o.shape) for o in objs}
            absent = [p for p in config.train_pairs() if p not in present]
            if rng.random() < 0.5 or not absent:
                o = rng.choice(objs)
                out.append(QA(f"is there {_a(o.colour)} {o.name}?", "yes", skill))
            else:
                colour, shape = rng.choice(absent)
                out.append(QA(f"is there {_a(colour)} {colour} {shape}?", "no", skill))
        elif skill == "reading" and scene.text is not None:
            out.append(QA("what does the text say?", scene.text.lower(), skill))
    return out


def asked_pair(question: str, answer: str) -> tuple[str, str]:
    """The (colour, shape) of the object a colour or shape question asks about, given its true answer.

    "what shape is the green object?", "circle" -> ("green", "circle"); "what colour is the circle?", "green" -> the same.
    """
    words = question.rstrip("?").split()
    if question.startswith("what shape is the ") and len(words) == 6:
        return words[-2], answer
    if question.startswith("what colour is the ") and len(words) == 5:
        return answer, words[-1]
    raise ValueError(f"question {question!r} is not a colour or shape question: expected 'what shape is the "
                     "<colour> object?' or 'what colour is the <shape>?'")


def _check_spatial_words(words) -> tuple[str, ...] | None:
    if words is None:
        return None
    words = tuple(words) if not isinstance(words, str) else (words,)
    bad = [w for w in words if w not in _OPPOSITE]
    if bad or not words:
        raise ValueError(f"spatial_words {words!r} is invalid: expected relation words from {tuple(_OPPOSITE)}")
    missing = [r for r in _OPPOSITE if r not in words and _OPPOSITE[r] not in words]
    if missing:
        raise ValueError(f"spatial_words {words!r} cannot ask about {missing[0]!r}: expected it or its opposite "
                         f"{_OPPOSITE[missing[0]]!r} among them")
    return None if len(words) == len(_OPPOSITE) else words


def _check_skills(skills, valid: tuple[str, ...]) -> tuple[str, ...]:
    if skills is None:
        return valid
    if isinstance(skills, str):
        skills = (skills,)
    bad = [s for s in skills if s not in valid]
    if bad or not skills:
        raise ValueError(f"skills {list(skills)!r} are invalid: expected a non-empty subset of {valid}")
    return tuple(skills)


def class_names(task: str = "shape", config: ShapeWorldConfig | None = None) -> list[str]:
    """Class names for the ViT: "shape", "colour" or "colour_shape" ("red circle", ...)."""
    config = config or ShapeWorldConfig()
    if task == "shape":
        return list(config.shapes)
    if task == "colour":
        return list(config.colours)
    if task == "colour_shape":
        return [f"{c} {s}" for c in config.colours for s in config.shapes]
    raise ValueError(f"task {task!r} is unknown: expected one of {CLASS_TASKS}")


def label(scene: Scene, task: str = "shape", config: ShapeWorldConfig | None = None) -> int:
    """Class index of a single-object scene for `task`."""
    if len(scene.objects) != 1:
        raise ValueError(f"scene has {len(scene.objects)} objects: class labels need exactly 1")
    o = scene.objects[0]
    name = {"shape": o.shape, "colour": o.colour, "colour_shape": o.name}.get(task, "")
    return class_names(task, config).index(name)


def patch_labels(scene: Scene, patch_size: int = 4, config: ShapeWorldConfig | None = None) -> np.ndarray:
    """What each patch shows, from the scene graph: (2, rows, cols) int64 of [shape, colour] class ids.

    A patch is labelled with the object whose bounding box holds the patch's centre pixel:
    1 + its index in `config.shapes` (plane 0) and in `config.colours` (plane 1); 0 means
    no object (background or rendered text). Boxes never overlap, so the object is unique.
    These are the targets of the image tower's dense head (chapter 05).
    """
    config = config or ShapeWorldConfig()
    s = scene.image_size
    if not isinstance(patch_size, int) or patch_size < 1 or s % patch_size:
        raise ValueError(f"patch_size {patch_size!r} does not divide the {s} px canvas: expected a divisor of {s}")
    grid = s // patch_size
    centres = np.arange(grid) * patch_size + patch_size // 2  # pixel at the centre of each patch row / column
    out = np.zeros((2, grid, grid), dtype=np.int64)
    for obj in scene.objects:
        if obj.shape not in config.shapes or obj.colour not in config.colours:
            raise ValueError(f"object {obj.name!r} is not in the config's shapes {config.shapes} and colours {config.colours}")
        rows = (centres >= obj.y) & (centres < obj.y + obj.side)  # (grid,)
        cols = (centres >= obj.x) & (centres < obj.x + obj.side)
        inside = rows[:, None] & cols[None, :]  # (grid, grid)
        out[0][inside] = config.shapes.index(obj.shape) + 1
        out[1][inside] = config.colours.index(obj.colour) + 1
    return out


# ----------------------------------------------------------------------------------
# Video clips


@dataclass(frozen=True)
class MovingObject(ShapeObject):
    """A shape in a clip: where it starts (x, y), its velocity in pixels per frame and the frame it appears."""

    dx: int
    dy: int
    appear: int

    @property
    def direction(self) -> str | None:
        """Direction of the first step ("left", "right", "up", "down"), None for a still object."""
        if self.dx:
            return "right" if self.dx > 0 else "left"
        if self.dy:
            return "down" if self.dy > 0 else "up"
        return None


@dataclass(frozen=True)
class Clip:
    """A short video: exactly one object moves (bouncing off walls); others stand still, some appear later."""

    objects: tuple[MovingObject, ...]
    num_frames: int
    image_size: int


def _bounce(p0: int, v: int, t: int, lo: int, hi: int) -> int:
    """Position at frame t of a point moving at v per frame, reflected between lo and hi."""
    span = hi - lo
    if span == 0 or v == 0:
        return p0
    q = (p0 - lo + v * t) % (2 * span)
    return lo + (q if q <= span else 2 * span - q)


def frame_scene(clip: Clip, t: int) -> Scene:
    """The scene graph of frame t: objects that have appeared, at their positions."""
    gap = max(1, clip.image_size // 32)
    objs = []
    for m in clip.objects:
        if m.appear > t:
            continue
        hi = clip.image_size - gap - m.side
        x = _bounce(m.x, m.dx, t - m.appear, gap, hi)
        y = _bounce(m.y, m.dy, t - m.appear, gap, hi)
        objs.append(ShapeObject(m.shape, m.colour, m.size, x, y, m.side))
    return Scene(tuple(objs), None, clip.image_size)


def _sample_clip(rng: Rng, num_frames: int, config: ShapeWorldConfig, split: str | None) -> Clip:
    if not 2 <= num_frames <= 256:
        raise ValueError(f"num_frames {num_frames} is invalid: expected 2 <= num_frames <= 256")
    if config.canvas is not None:
        raise ValueError(f"clips are drawn on a square image_size canvas: expected canvas None, got {config.canvas}")
    if config.snap != 1:
        raise ValueError(f"clips move their shapes a pixel at a time: expected snap 1, got {config.snap}")
    s, gap = config.image_size, config.gap
    most = min(config.max_objects, len(config.shapes), len(config.colours))
    for _ in range(_MAX_ATTEMPTS):
        n = rng.randint(min(config.min_objects, most), most)
        pairs = _pick_pairs(rng, config, n, split)
        if len({c for c, _ in pairs}) < n or len({sh for _, sh in pairs}) < n:
            continue  # in a clip, shapes and colours are each distinct, so a shape word names an object
        sizes = [rng.choice(SIZES) for _ in range(n)]
        # The mover goes first; the lane it sweeps is kept free of other objects.
        side = config.sides[sizes[0]]
        direction = rng.choice(DIRECTIONS)
        speed = rng.randint(1, 3) * gap
        lo, hi = gap, s - gap - side
        # Start at least two steps from the wall ahead, so the first moves show the direction.
        if direction in ("right", "down"):
            v, along = speed, rng.randint(lo, hi - 2 * speed)
        else:
            v, along = -speed, rng.randint(lo + 2 * speed, hi)
        across = rng.randint(lo, hi)
        if direction in ("left", "right"):
            x, y, dx, dy, lane = along, across, v, 0, (0, across, s, across + side)
        else:
            x, y, dx, dy, lane = across, along, 0, v, (across, 0, across + side, s)
        objects = [MovingObject(pairs[0][1], pairs[0][0], sizes[0], x, y, side, dx, dy, 0)]
        taken = [lane]
        for (colour, shape), size in zip(pairs[1:], sizes[1:]):
            side = config.sides[size]
            corner = _place(rng, side, side, taken, s, gap)
            if corner is None:
                break
            appear = rng.randint(1, max(1, (num_frames - 1) // 2)) if rng.random() < 0.5 else 0
            objects.append(MovingObject(shape, colour, size, corner[0], corner[1], side, 0, 0, appear))
            taken.append((corner[0], corner[1], corner[0] + side, corner[1] + side))
        else:
            return Clip(tuple(objects), num_frames, s)
    raise RuntimeError(f"could not place {config.max_objects} objects in a clip on {s} px; lower max_objects")


def generate_clip(
    seed: int, num_frames: int = 8, config: ShapeWorldConfig | None = None, split: str | None = None
) -> Clip:
    """The clip for a seed: one mover from frame 0 in a lane no other object touches; the rest still."""
    _check_split(split)
    return _sample_clip(Rng(seed), num_frames, config or ShapeWorldConfig(), split)


def render_clip(clip: Clip) -> np.ndarray:
    """Pixels of a clip: (T, H, W, 3) uint8."""
    return np.stack([render(frame_scene(clip, t)) for t in range(clip.num_frames)])


def clip_questions(
    clip: Clip, rng: Rng | random.Random | int, skills: list[str] | tuple[str, ...] | None = None
) -> list[QA]:
    """One QA per requested video skill that the clip supports (in VIDEO_SKILLS order)."""
    skills = _check_skills(skills, VIDEO_SKILLS)
    rng = _as_rng(rng)
    mover = next(m for m in clip.objects if m.direction is not None)
    out = []
    for skill in VIDEO_SKILLS:
        if skill not in skills:
            continue
        if skill == "direction":
            out.append(QA(f"which way does the {mover.name} move first?", mover.direction, skill))
        elif skill == "mover":
            if rng.random() < 0.5:
                out.append(QA("which shape moves?", mover.shape, skill))
            else:
                out.append(QA("what colour is the moving object?", mover.colour, skill))
        elif skill == "order":
            pairs = [(a, b) for a in clip.objects for b in clip.objects if a.appear < b.appear]
            if pairs:
                first, second = rng.choice(pairs)
                a, b = (first, second) if rng.random() < 0.5 else (second, first)
                out.append(QA(f"which appears first, the {a.name} or the {b.name}?", first.shape, skill))
        elif skill == "appearing":
            later = sum(m.appear > 0 for m in clip.objects)
            out.append(QA("how many objects appear after the first frame?", NUMBER_WORDS[later], skill))
    return out


# ----------------------------------------------------------------------------------
# Text corpus for the tokenizer


_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words(text: str) -> set[str]:
    """Words and punctuation marks of a text, as the corpus coverage is checked."""
    return set(_WORD.findall(text))


def text_corpus(num_scenes: int = 2000, seed: int = 0) -> list[str]:
    """Every kind of ShapeWorld text (captions, descriptions, QA, clip QA) plus a block covering the full vocabulary."""
    rng = Rng(seed)
    configs = [ShapeWorldConfig(), ShapeWorldConfig.preset(64), ShapeWorldConfig.preset(128)]
    lines: list[str] = []
    for i in range(num_scenes):
        config = configs[i % len(configs)]
        scene = _sample_scene(rng, config, None)
        lines.append(caption(scene))
        lines.append(description(scene))
        lines += [f"{qa.question} {qa.answer}" for qa in questions(scene, rng, config=config)]
        if i % 4 == 0:
            clip = _sample_clip(rng, rng.choice((4, 8, 16)), config, None)
            lines += [f"{qa.question} {qa.answer}" for qa in clip_questions(clip, rng)]
    # Coverage: every pair, size, number word, direction and reading character appears.
    for colour in COLOURS:
        for shape in SHAPES:
            for size in SIZES:
                lines.append(f"a {size} {colour} {shape}.")
    lines += [f"is there {_a(colour)} {colour} {shape}? yes" for colour in COLOURS for shape in SHAPES]
    lines += [f"how many objects are there? {w}" for w in NUMBER_WORDS]
    lines += [f"how many objects appear after the first frame? {w}" for w in NUMBER_WORDS]
    lines += [f"which way does the red circle move first? {d}" for d in DIRECTIONS]
    chars = TEXT_ALPHABET.lower()
    lines += [f"what does the text say? {chars[i:i + 3]}" for i in range(0, len(chars), 3)]
    return lines


# ----------------------------------------------------------------------------------
# PyTorch datasets: item i of a split comes from seed SPLIT_SEEDS[split][0] + offset + i
# (offset 0 unless a dataset asks for scenes of its own, past another's)


class _SplitDataset(Dataset):
    def __init__(self, split: str, size: int, config: ShapeWorldConfig | None, cache: bool, offset: int = 0) -> None:
        _check_split(split)
        start, stop = SPLIT_SEEDS[split]
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < stop - start:
            raise ValueError(f"offset {offset!r} is invalid for split {split!r}: expected an int in 0..{stop - start - 1}")
        if not isinstance(size, int) or not 1 <= size <= stop - start - offset:
            at = f" at offset {offset}" if offset else ""
            raise ValueError(f"size {size!r} is invalid for split {split!r}{at}: expected an int in 1..{stop - start - offset}")
        self.split, self.size, self.offset = split, size, offset
        self.config = config or ShapeWorldConfig()
        self._cache: dict[int, tuple] | None = {} if cache else None

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple:
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for a dataset of size {self.size}")
        i %= self.size
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        item = self._make(Rng(SPLIT_SEEDS[self.split][0] + self.offset + i), i)
        if self._cache is not None:
            self._cache[i] = item
        return item

    def _make(self, rng: Rng, i: int) -> tuple:
        raise NotImplementedError


class ShapeClassificationDataset(_SplitDataset):
    """(image (3, H, W), label) of single-object scenes; task "shape", "colour" or "colour_shape"."""

    def __init__(self, split: str, size: int, config: ShapeWorldConfig | None = None,
                 task: str = "shape", cache: bool = False) -> None:
        config = config or ShapeWorldConfig(max_objects=1, text_probability=0.0)
        if config.max_objects != 1:
            raise ValueError(f"max_objects {config.max_objects}: classification needs single-object scenes (1)")
        super().__init__(split, size, config, cache)
        self.classes = class_names(task, config)
        self.task = task

    def _make(self, rng, i):
        scene = _sample_scene(rng, self.config, self.split)
        return to_tensor(render(scene)), label(scene, self.task, self.config)


class CaptionDataset(_SplitDataset):
    """(image (3, H, W), caption) pairs for CLIP and captioning."""

    def __init__(self, split: str, size: int, config: ShapeWorldConfig | None = None, cache: bool = False) -> None:
        super().__init__(split, size, config, cache)

    def _make(self, rng, i):
        scene = self.scene(i)
        return to_tensor(render(scene)), caption(scene)

    def scene(self, i: int) -> Scene:
        """The scene graph behind item i (for labels the caption does not carry, such as `patch_labels`)."""
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for a dataset of size {self.size}")
        return _sample_scene(Rng(SPLIT_SEEDS[self.split][0] + i % self.size), self.config, self.split)


class VQADataset(_SplitDataset):
    """(image (3, H, W), question, answer, skill); skills cycle with the index so each is equally common.

    offset: item i comes from the split's seed offset + i, so two datasets of one split can hold
    different scenes (0: the same scenes as every other dataset of the split).
    grounded: spatial answers say where both objects are first (`questions`); the scenes and
    questions are the same as without it.
    """

    def __init__(self, split: str, size: int, config: ShapeWorldConfig | None = None,
                 skills: list[str] | tuple[str, ...] | None = None, cache: bool = False,
                 spatial_words: tuple[str, ...] | None = None, offset: int = 0, grounded: bool = False) -> None:
        super().__init__(split, size, config, cache, offset)
        if not isinstance(grounded, bool):
            raise ValueError(f"grounded {grounded!r} is invalid: expected True or False")
        self.grounded = grounded
        self.skills = _check_skills(skills, SKILLS)
        self.spatial_words = _check_spatial_words(spatial_words)
        if "reading" in self.skills and self.config.text_probability == 0:
            raise ValueError("skill 'reading' needs text: config.text_probability is 0, expected > 0")
        if "spatial" in self.skills and self.config.max_objects < 2:
            raise ValueError("skill 'spatial' needs two objects: config.max_objects is 1, expected >= 2")

    def _make(self, rng, i):
        skill = self.skills[i % len(self.skills)]
        for _ in range(_MAX_ATTEMPTS):  # re-sample from the same seed's stream until the skill applies
            scene = _sample_scene(rng, self.config, self.split)
            qas = questions(scene, rng, [skill], self.config, spatial_words=self.spatial_words, grounded=self.grounded)
            if qas:
                return to_tensor(render(scene)), qas[0].question, qas[0].answer, skill
        raise RuntimeError(f"no {skill!r} question found for item {i}")


class DescribedQADataset(_SplitDataset):
    """(blank image, description + question, answer, skill): a colour or shape question that the text itself answers.

    The scene is described ("there are two objects. a small green circle is left of ...") and never
    drawn, so the image is the empty canvas. all_pairs=True draws the objects from every (colour, shape)
    pair, the held-out ones included: text may name a green circle although no image shows one. In the
    images' questions "what shape is the green object?" is never "circle", and a model may learn that
    from the words alone; here it sometimes is (appendix A1, section 6, tests whether that helps). Scenes come from the split's seeds from `offset` on, so
    they can differ from every image dataset's; their text is off (descriptions stay short).
    """

    def __init__(self, split: str, size: int, config: ShapeWorldConfig | None = None,
                 skills: list[str] | tuple[str, ...] = ("colour", "shape"), cache: bool = False, offset: int = 0,
                 all_pairs: bool = True) -> None:
        super().__init__(split, size, config, cache, offset)
        if not isinstance(all_pairs, bool):
            raise ValueError(f"all_pairs {all_pairs!r} is invalid: expected True or False")
        self.skills = _check_skills(skills, ("colour", "shape"))
        self.all_pairs = all_pairs
        self.config = replace(self.config, text_probability=0.0)
        self._blank = to_tensor(render(Scene((), None, self.config.image_size, canvas=self.config.canvas)))

    def _make(self, rng, i):
        skill = self.skills[i % len(self.skills)]
        for _ in range(_MAX_ATTEMPTS):
            scene = _sample_scene(rng, self.config, None if self.all_pairs else self.split)
            qas = questions(scene, rng, [skill], self.config)
            if qas:
                return self._blank.clone(), f"{description(scene)} {qas[0].question}", qas[0].answer, skill
        raise RuntimeError(f"no {skill!r} question found for item {i}")


class TextDataset(_SplitDataset):
    """Text-only descriptions of scenes (never rendered) for language-model pretraining.

    questions=True follows each description with every question its scene supports and the
    answer ("... what colour is the circle? red is there a blue square? no ..."): text in
    which an LM learns the answers' words and when to say them.
    """

    def __init__(self, split: str, size: int, config: ShapeWorldConfig | None = None, cache: bool = False,
                 questions: bool = False) -> None:
        super().__init__(split, size, config, cache)
        self.questions = bool(questions)

    def __getitem__(self, i: int) -> str:
        return super().__getitem__(i)

    def _make(self, rng, i):
        scene = _sample_scene(rng, self.config, self.split)
        text = description(scene)
        if self.questions:
            text += "".join(f" {qa.question} {qa.answer}" for qa in questions(scene, rng, config=self.config))
        return text


class VideoQADataset(_SplitDataset):
    """(frames (T, 3, H, W), question, answer, skill) about moving-shape clips; skills cycle with the index."""

    def __init__(self, split: str, size: int, config: ShapeWorldConfig | None = None, num_frames: int = 8,
                 skills: list[str] | tuple[str, ...] | None = None, cache: bool = False) -> None:
        super().__init__(split, size, config, cache)
        self.skills = _check_skills(skills, VIDEO_SKILLS)
        self.num_frames = num_frames
        if "order" in self.skills and self.config.max_objects < 2:
            raise ValueError("skill 'order' needs two objects: config.max_objects is 1, expected >= 2")
        if not 2 <= num_frames <= 256:
            raise ValueError(f"num_frames {num_frames} is invalid: expected 2 <= num_frames <= 256")

    def _make(self, rng, i):
        skill = self.skills[i % len(self.skills)]
        for _ in range(_MAX_ATTEMPTS):
            clip = _sample_clip(rng, self.num_frames, self.config, self.split)
            qas = clip_questions(clip, rng, [skill])
            if qas:
                return to_tensor(render_clip(clip)), qas[0].question, qas[0].answer, skill
        raise RuntimeError(f"no {skill!r} question found for item {i}")
