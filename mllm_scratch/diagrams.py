"""Conceptual diagrams of the book's models, drawn with matplotlib from the configs the chapters use.

Each public function returns a `matplotlib.figure.Figure` of boxes and arrows. Where a
function takes a config, the shapes it prints are computed from that config, and
`tests/test_diagrams.py` checks them against what the package's model returns for the
same config, so a picture cannot drift from the code. One colour per kind of thing:

- blue: image things (pixels, patches, image tokens);
- green: text things (words, token ids, text embeddings);
- orange: modules that train in the setting drawn; grey: frozen (pretrained) modules;
- white circles: operations (+, ×); purple: outputs and losses.

In a notebook: `from mllm_scratch import diagrams; diagrams.vit(ViTConfig()); plt.show()`.
`python scripts/draw_diagrams.py` writes every diagram to PNG files for review.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mllm_scratch.clip import CLIPConfig
from mllm_scratch.gpt import GPTConfig
from mllm_scratch.hybrid import HybridConfig
from mllm_scratch.perceiver import ResamplerConfig
from mllm_scratch.vit import ViTConfig
from mllm_scratch.vlm import VLMConfig
from mllm_scratch.xattn import XAttnConfig

DPI = 100  # the figure's own resolution: 9 inches are 900 pixels in a notebook and in the PNG files

# (face, edge) colours
IMAGE = ("#dbe8f5", "#3d6d9e")
TEXT = ("#e0efd6", "#4a8538")
LEARNED = ("#fde2c2", "#bf7326")
FROZEN = ("#ececec", "#8a8a8a")
OP = ("#ffffff", "#555555")
OUTPUT = ("#ece3f3", "#77559a")
INK = "#2b2b2b"
MUTED = "#666666"

FONT = 8.5  # box labels
SMALL = 7.5  # shapes and notes
TITLE = 10


# ----------------------------------------------------------------------------------
# Drawing helpers: one axes whose data units are inches, so sizes and gaps read as on paper


def _canvas(width: float, height: float, title: str | None = None):
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_axis_off()
    if title:
        ax.text(0.1, height - 0.1, title, ha="left", va="top", fontsize=TITLE, weight="bold", color=INK)
    return fig, ax


def _finish(fig, ax):
    width, height = fig.get_size_inches()
    ax.set_xlim(0, width)  # imshow may have moved them
    ax.set_ylim(0, height)
    return fig


@dataclass
class _Box:
    x: float  # centre
    y: float
    w: float
    h: float

    @property
    def left(self) -> tuple[float, float]:
        return (self.x - self.w / 2, self.y)

    @property
    def right(self) -> tuple[float, float]:
        return (self.x + self.w / 2, self.y)

    @property
    def top(self) -> tuple[float, float]:
        return (self.x, self.y + self.h / 2)

    @property
    def bottom(self) -> tuple[float, float]:
        return (self.x, self.y - self.h / 2)


def _box(ax, x, y, w, h, label="", colours=LEARNED, size=FONT, stack=0, weight="normal", lw=1.0, dashed=False) -> _Box:
    """A rounded box centred at (x, y); `stack` > 0 draws that many boxes behind it (a repeated layer)."""
    from matplotlib.patches import FancyBboxPatch

    face, edge = colours
    for k in range(stack, -1, -1):
        dx = dy = 0.05 * k
        ax.add_patch(FancyBboxPatch((x - w / 2 + dx, y - h / 2 + dy), w, h, boxstyle="round,pad=0,rounding_size=0.06",
                                    facecolor=face, edgecolor=edge, linewidth=lw, linestyle="--" if dashed else "-",
                                    zorder=2 + (stack - k) * 0.01))
    if label:
        ax.text(x, y, label, ha="center", va="center", fontsize=size, color=INK, weight=weight, zorder=3,
                linespacing=1.25)
    return _Box(x, y, w, h)


def _op(ax, x, y, symbol="+", r=0.12, size=10) -> _Box:
    """A small circle with an operation in it (+ for a residual sum, × for a gate)."""
    from matplotlib.patches import Circle

    ax.add_patch(Circle((x, y), r, facecolor=OP[0], edgecolor=OP[1], linewidth=1.0, zorder=2))
    ax.text(x, y, symbol, ha="center", va="center_baseline", fontsize=size, color=INK, zorder=3)
    return _Box(x, y, 2 * r, 2 * r)


def _arrow(ax, start, end, color=INK, lw=1.0, rad=0.0, style="-|>", dashed=False, zorder=1.5):
    ax.annotate("", xy=end, xytext=start, zorder=zorder,
                arrowprops=dict(arrowstyle=style, color=color, lw=lw, shrinkA=0, shrinkB=0, mutation_scale=9,
                                linestyle="--" if dashed else "-", connectionstyle=f"arc3,rad={rad}"))


def _path(ax, points, color=INK, lw=1.0, arrow=True, dashed=False):
    """A polyline through points, with an arrow head on the last segment."""
    xs, ys = zip(*points)
    if len(points) > 2:
        ax.plot(xs[:-1], ys[:-1], color=color, lw=lw, solid_capstyle="butt", linestyle="--" if dashed else "-",
                zorder=1.5)
    if arrow:
        _arrow(ax, points[-2], points[-1], color=color, lw=lw, dashed=dashed)
    else:
        ax.plot(xs[-2:], ys[-2:], color=color, lw=lw, linestyle="--" if dashed else "-", zorder=1.5)


def _note(ax, x, y, text, size=SMALL, color=MUTED, ha="center", va="center", style="normal", **kw):
    return ax.text(x, y, text, ha=ha, va=va, fontsize=size, color=color, style=style, zorder=3, linespacing=1.2, **kw)


def _shape(*dims) -> str:
    """('B', 64, 48) -> '(B, 64, 48)', numbers with thousands separators."""
    return "(" + ", ".join(f"{d:,}" if isinstance(d, int) else str(d) for d in dims) + ")"


def _cells(ax, x0, y, w, h, n, colours, labels=None, size=SMALL, lw=0.8, hatch=None):
    """A row of n equal cells starting at x0 (left edge), centred on y; returns their centres."""
    from matplotlib.patches import Rectangle

    cw = w / n
    centres = []
    for i in range(n):
        face, edge = colours[i] if isinstance(colours, list) else colours
        ax.add_patch(Rectangle((x0 + i * cw, y - h / 2), cw, h, facecolor=face, edgecolor=edge, linewidth=lw,
                               zorder=2, hatch=hatch))
        centres.append(x0 + (i + 0.5) * cw)
        if labels is not None and labels[i]:
            ax.text(centres[-1], y, labels[i], ha="center", va="center", fontsize=size, color=INK, zorder=3)
    return centres


def _check_int(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int of at least {minimum}, got {value!r}")
    return value


def _check_config(name: str, config, kind: type, default):
    if config is None:
        return default()
    if not isinstance(config, kind):
        raise ValueError(f"{name} must be a {kind.__name__} (or None for the default), got {type(config).__name__}")
    return config


def _example_image(image_size: int, seed_index: int = 0) -> np.ndarray:
    """A ShapeWorld test scene (two or three objects, no text), as (H, W, 3) floats, at any size (nearest resize)."""
    from mllm_scratch.shapeworld import ShapeWorldConfig, generate_scene, render, split_seed

    side = min(max(image_size, 32), 256)
    scene = generate_scene(split_seed("test", seed_index), ShapeWorldConfig(image_size=side, min_objects=2,
                                                                           text_probability=0.0), "test")
    pixels = render(scene).astype(np.float32) / 255  # (side, side, 3)
    index = (np.arange(image_size) * side) // image_size
    return pixels[index][:, index]


def _object_image(shape: str, colour: str, image_size: int = 32) -> np.ndarray:
    """One large ShapeWorld object in the middle of the canvas, (H, W, 3) floats."""
    from mllm_scratch.shapeworld import Scene, ShapeObject, render

    side = image_size // 2
    start = (image_size - side) // 2
    scene = Scene((ShapeObject(shape, colour, "large", start, start, side),), None, image_size)
    return render(scene).astype(np.float32) / 255


def _image(ax, pixels, x0, y0, size, edge=IMAGE[1]):
    from matplotlib.patches import Rectangle

    ax.imshow(pixels, extent=(x0, x0 + size, y0, y0 + size), interpolation="nearest", aspect="auto", zorder=2)
    ax.add_patch(Rectangle((x0, y0), size, size, fill=False, edgecolor=edge, linewidth=0.8, zorder=3))


def _tokenizer():
    from mllm_scratch.tokenizer import load_tokenizer

    return load_tokenizer()


def _legend(ax, x, y, items, size=SMALL):
    """A row of small coloured squares with their meaning, left to right from (x, y)."""
    from matplotlib.patches import Rectangle

    for colours, label in items:
        ax.add_patch(Rectangle((x, y - 0.05), 0.1, 0.1, facecolor=colours[0], edgecolor=colours[1], linewidth=0.8,
                               zorder=2))
        ax.text(x + 0.15, y, label, ha="left", va="center", fontsize=size, color=MUTED, zorder=3)
        x += 0.3 + 0.062 * len(label)


def _piece(text: str) -> str:
    """A token's text as the figure shows it: a leading space as '␣'."""
    return text.replace(" ", "␣")


# ----------------------------------------------------------------------------------
# Chapter 01: images and text as tokens


def patch_tokens(image_size: int = 32, patch_size: int = 8, dim: int = 32, text: str = "a red circle",
                 in_channels: int = 3):
    """An image cut into patches, each flattened and projected by one shared Linear, beside text -> BPE ids -> embeddings."""
    from matplotlib.patches import Rectangle

    _check_int("image_size", image_size)
    _check_int("patch_size", patch_size)
    _check_int("dim", dim)
    _check_int("in_channels", in_channels)
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}: "
                         "the patches must tile the image exactly")
    tok = _tokenizer()
    ids = tok.encode_ordinary(text)
    if not 1 <= len(ids) <= 6:
        raise ValueError(f"text {text!r} is {len(ids)} tokens; the figure has room for 1 to 6")
    grid = image_size // patch_size
    n = grid * grid
    patch_dim = in_channels * patch_size**2

    fig, ax = _canvas(9.0, 3.2, "Images and text become the same thing: a sequence of vectors")
    y_img, y_txt = 2.0, 0.55

    # --- image row
    pixels = _example_image(image_size)
    _image(ax, pixels, 0.2, y_img - 0.5, 1.0)
    _note(ax, 0.7, y_img - 0.68, f"image {_shape(in_channels, image_size, image_size)}")
    # the patches, pulled apart
    gx0, gsize = 1.75, 1.0
    gap = 0.04 if grid <= 8 else 0.0
    cell = (gsize - gap * (grid - 1)) / grid
    for r in range(grid):
        for c in range(grid):
            patch = pixels[r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size]
            _image(ax, patch, gx0 + c * (cell + gap), y_img + 0.5 - (r + 1) * cell - r * gap, cell, edge="#ffffff")
    _arrow(ax, (1.25, y_img), (gx0 - 0.05, y_img))
    _note(ax, gx0 + gsize / 2, y_img - 0.68, f"{grid} × {grid} = {n} patches")
    # each patch flattened to a row of pixels
    sx0, sw = 3.25, 1.25
    shown = list(range(n)) if n <= 16 else [*range(11), n - 1]
    row_h = min(0.07, 0.95 / (len(shown) * 1.25 + 1))
    pitch = row_h * 1.25
    top = y_img + pitch * len(shown) / 2 + (pitch if n > 16 else 0) / 2
    for j, k in enumerate(shown):
        r, c = divmod(k, grid)
        patch = pixels[r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size]
        strip = patch.reshape(1, -1, 3)  # the patch's pixels in a row (each pixel = its 3 channel values)
        yy = top - (j + 1) * pitch + (0 if (n <= 16 or j < 11) else -pitch)
        ax.imshow(strip, extent=(sx0, sx0 + sw, yy, yy + row_h), interpolation="nearest", aspect="auto", zorder=2)
        ax.add_patch(Rectangle((sx0, yy), sw, row_h, fill=False, edgecolor=IMAGE[1], linewidth=0.5, zorder=3))
    if n > 16:
        _note(ax, sx0 + sw / 2, top - 12 * pitch + row_h / 2, "⋮", size=8, color=INK)
    _arrow(ax, (gx0 + gsize + 0.05, y_img), (sx0 - 0.05, y_img))
    _note(ax, (gx0 + gsize + sx0) / 2, y_img + 0.14, "flatten")
    _note(ax, sx0 + sw / 2, y_img - 0.68, f"{n} rows of {in_channels}·{patch_size}·{patch_size} = {patch_dim}")
    # the shared projection
    lin = _box(ax, 5.4, y_img, 1.45, 0.62, f"Linear {patch_dim} → {dim}\nshared by all patches")
    _note(ax, lin.x, y_img - 0.52, f"= Conv2d, kernel = stride = {patch_size}")
    _arrow(ax, (sx0 + sw + 0.05, y_img), lin.left)
    # image tokens
    tx0, tw = 6.45, 0.9
    rows = min(n, 16)
    th = min(0.09, 1.0 / rows / 1.3)
    for j in range(rows):
        yy = y_img + rows * th * 1.3 / 2 - (j + 1) * th * 1.3
        ax.add_patch(Rectangle((tx0, yy), tw, th, facecolor=IMAGE[0], edgecolor=IMAGE[1], linewidth=0.7, zorder=2))
    _arrow(ax, lin.right, (tx0 - 0.05, y_img))
    _note(ax, tx0 + tw / 2, y_img - 0.68, f"{_shape(n, dim)} image tokens" + ("" if rows == n else f"\n({rows} of {n} drawn)"),
          color=IMAGE[1], va="top" if rows != n else "center")

    # --- text row
    t = _box(ax, 0.75, y_txt, 1.1, 0.34, f'"{text}"', TEXT, size=FONT)
    pieces = [_piece(tok.decode([i])) for i in ids]
    px0, pw = 1.75, 2.75
    cw = pw / len(pieces)
    _arrow(ax, t.right, (px0 - 0.05, y_txt))
    _note(ax, (t.right[0] + px0) / 2, y_txt + 0.13, "BPE", color=INK)
    for i, (piece, token_id) in enumerate(zip(pieces, ids)):
        _box(ax, px0 + (i + 0.5) * cw, y_txt + 0.08, cw - 0.08, 0.26, piece, TEXT, size=SMALL)
        _note(ax, px0 + (i + 0.5) * cw, y_txt - 0.2, f"id {token_id}", color=TEXT[1])
    emb = _box(ax, 5.4, y_txt, 1.45, 0.5, f"Embedding {tok.vocab_size} × {dim}\nrow = token id")
    _arrow(ax, (px0 + pw + 0.05, y_txt), emb.left)
    th_t = 0.09
    for j in range(len(ids)):
        yy = y_txt + len(ids) * th_t * 1.3 / 2 - (j + 1) * th_t * 1.3
        ax.add_patch(Rectangle((tx0, yy), tw, th_t, facecolor=TEXT[0], edgecolor=TEXT[1], linewidth=0.7, zorder=2))
    _arrow(ax, emb.right, (tx0 - 0.05, y_txt))
    _note(ax, tx0 + tw / 2, y_txt - 0.42, f"{_shape(len(ids), dim)} text tokens", color=TEXT[1])

    # --- both: (tokens, dim)
    bx = tx0 + tw + 0.12
    ax.plot([bx, bx + 0.08, bx + 0.08, bx], [y_img + 0.55, y_img + 0.55, y_txt - 0.2, y_txt - 0.2], color=MUTED, lw=0.8)
    _note(ax, bx + 0.2, (y_img + y_txt) / 2 + 0.15, f"both: (tokens, {dim}),\none vector of\nwidth {dim} per token",
          color=INK, ha="left")
    return _finish(fig, ax)


# ----------------------------------------------------------------------------------
# Chapter 02: attention


def qkv(words: tuple[str, ...] = ("a", "red", "circle", "moves"), query: int = 2,
        scores: tuple[float, ...] = (0.4, 2.2, 1.3, 1.9)):
    """One token's query against every key, softmax weights, a weighted sum of values; the causal mask beside it."""
    import torch
    from matplotlib.patches import Rectangle

    n = len(words)
    if not 2 <= n <= 6:
        raise ValueError(f"qkv draws 2 to 6 tokens, got {n}")
    if not isinstance(query, int) or not 0 <= query < n:
        raise ValueError(f"query must be a token index in 0..{n - 1}, got {query!r}")
    if len(scores) != n:
        raise ValueError(f"scores needs one score per token ({n}), got {len(scores)}")
    masked = torch.tensor(scores, dtype=torch.float64).masked_fill(torch.arange(n) > query, float("-inf"))
    weights = torch.softmax(masked, dim=0).tolist()  # what the figure prints is this softmax

    fig, ax = _canvas(9.0, 3.4, "Attention: one query against every key")
    ys = [2.45 - i * 0.46 for i in range(n)]
    xw, xk, xs, xp, xv = 0.6, 1.75, 3.05, 4.3, 5.75
    _note(ax, xw, 2.85, "tokens X", color=INK)
    _note(ax, xk, 2.85, "keys  K = X W_k", color=INK)
    _note(ax, xs, 2.85, "score  q·k / √d", color=INK)
    _note(ax, xp, 2.85, "softmax", color=INK)
    _note(ax, xv, 2.85, "values  V = X W_v", color=INK)
    for i, (word, y) in enumerate(zip(words, ys)):
        future = i > query
        _box(ax, xw, y, 0.8, 0.3, word, TEXT, weight="bold" if i == query else "normal")
        _arrow(ax, (xw + 0.45, y), (xk - 0.42, y), color=MUTED)
        _box(ax, xk, y, 0.75, 0.26, f"k{i}", TEXT, size=SMALL)
        if future:
            _note(ax, xs, y, "−∞ (future)", color=OUTPUT[1])
        else:
            _note(ax, xs, y, f"{masked[i]:.1f}", color=INK, size=FONT)
        bar = 0.9 * weights[i]
        ax.add_patch(Rectangle((xp - 0.45, y - 0.09), max(bar, 0.004), 0.18, facecolor=OUTPUT[0], edgecolor=OUTPUT[1],
                               linewidth=0.8, zorder=2))
        _note(ax, xp + 0.52, y, f"{weights[i]:.2f}", color=INK, ha="left")
        _box(ax, xv, y, 0.75, 0.26, f"v{i}", TEXT, size=SMALL)
        _note(ax, xv + 0.5, y, f"× {weights[i]:.2f}", color=MUTED, ha="left")
    # the query
    _box(ax, xw, 0.22, 1.15, 0.3, f"q{query} = x{query} W_q", TEXT, size=SMALL)
    _path(ax, [(xw + 0.6, 0.22), (xs, 0.22), (xs, ys[-1] - 0.22)], color=TEXT[1])
    _note(ax, (xw + xs) / 2 + 0.35, 0.35, f"the query of “{words[query]}”", color=TEXT[1])
    # the weighted sum
    ox = 7.25
    top, bottom = ys[0] + 0.15, ys[-1] - 0.15
    ax.plot([xv + 1.08, xv + 1.16, xv + 1.16, xv + 1.08], [top, top, bottom, bottom], color=MUTED, lw=0.8)
    out = _box(ax, ox, (top + bottom) / 2, 0.95, 0.5, f"z{query} = Σ w·v\nnew “{words[query]}”", OUTPUT, size=SMALL)
    _arrow(ax, (xv + 1.18, out.y), out.left)
    _note(ax, ox, out.y - 0.42, "weights sum to 1", color=MUTED)
    # the causal mask
    mx, size = 8.0, 0.85
    c = size / n
    my = 1.95
    for i in range(n):
        for j in range(n):
            allowed = j <= i
            face = (OUTPUT[0] if i == query else TEXT[0]) if allowed else "#f6f6f6"
            ax.add_patch(Rectangle((mx + j * c, my - (i + 1) * c), c, c, facecolor=face,
                                   edgecolor=OUTPUT[1] if i == query else "#bbbbbb", linewidth=0.6, zorder=2))
    _note(ax, mx + size / 2, my + 0.12, "causal mask", color=INK)
    _note(ax, mx + size / 2, my - size - 0.14, "row: query,\ncolumn: key;\nwhite = −∞", color=MUTED, va="top")
    return _finish(fig, ax)


# ----------------------------------------------------------------------------------
# Chapter 03: the pre-norm block and the ViT


def _width_of(config) -> tuple[int, int, float]:
    if isinstance(config, (ViTConfig, GPTConfig)):
        return config.dim, config.num_heads, config.mlp_ratio
    raise ValueError(f"config must be a ViTConfig or a GPTConfig (or None), got {type(config).__name__}")


def prenorm_block(config: ViTConfig | GPTConfig | None = None, causal: bool | None = None):
    """A pre-norm Transformer block: x + attention(LayerNorm(x)), then + MLP(LayerNorm(x)); widths from the config."""
    config = ViTConfig() if config is None else config
    dim, heads, ratio = _width_of(config)
    causal = isinstance(config, GPTConfig) if causal is None else causal
    hidden = int(dim * ratio)
    fig, ax = _canvas(9.0, 2.5, "A pre-norm Transformer block" + (" (causal)" if causal else ""))
    ys, yb = 1.55, 0.8  # the residual stream on top, the two branches below it
    _note(ax, 0.3, ys, "x", size=FONT + 1, color=INK)
    _note(ax, 0.3, ys - 0.25, _shape("B", "T", dim))
    add1, add2 = _op(ax, 4.05, ys), _op(ax, 7.85, ys)
    _note(ax, 8.6, ys, "out", size=FONT + 1, color=INK)
    _note(ax, 8.6, ys - 0.25, _shape("B", "T", dim))
    _arrow(ax, (0.45, ys), (add1.x - 0.12, ys))
    _arrow(ax, (add1.x + 0.12, ys), (add2.x - 0.12, ys))
    _arrow(ax, (add2.x + 0.12, ys), (8.4, ys))
    ln1 = _box(ax, 1.45, yb, 0.9, 0.42, "LayerNorm")
    att = _box(ax, 2.85, yb, 1.45, 0.6, ("masked (causal)\n" if causal else "") + f"self-attention\n{heads} heads")
    ln2 = _box(ax, 5.15, yb, 0.9, 0.42, "LayerNorm")
    mlp = _box(ax, 6.7, yb, 1.8, 0.6, f"MLP: Linear {dim} → {hidden}\nGELU, Linear {hidden} → {dim}")
    for fork, ln, branch, add in ((0.75, ln1, att, add1), (4.45, ln2, mlp, add2)):
        _path(ax, [(fork, ys), (fork, yb), ln.left])
        _arrow(ax, ln.right, branch.left)
        _path(ax, [branch.right, (add.x, yb), (add.x, ys - 0.12)])
    _note(ax, (0.45 + add1.x) / 2, ys + 0.2, "x + attention(LayerNorm(x))", color=INK)
    _note(ax, (add1.x + add2.x) / 2, ys + 0.2, "x + MLP(LayerNorm(x))", color=INK)
    _note(ax, 4.5, 0.2, "The top line is the residual stream: it carries x unchanged, and each branch adds what it computed. "
          + ("A token sees itself and the tokens before it." if causal else "Every token sees every token."))
    return _finish(fig, ax)


def vit(config: ViTConfig | None = None):
    """The ViT of chapter 03: patches -> embedding, [CLS] and positions -> blocks -> LayerNorm -> pooled -> head."""
    c = _check_config("config", config, ViTConfig, ViTConfig)
    n, d = c.num_patches, c.dim
    prefix = 1 if c.pool == "cls" else 0
    fig, ax = _canvas(9.0, 2.8, "The Vision Transformer (ViT)")
    y = 1.5
    below = y - 0.47  # shape labels sit under the arrows, below the boxes
    pixels = _object_image("cross", "purple", c.image_size)  # chapter 03's task: one object, which shape?
    _image(ax, pixels, 0.15, y - 0.3, 0.6)
    _note(ax, 0.45, below, _shape("B", c.in_channels, c.image_size, c.image_size))
    pe = _box(ax, 1.7, y, 1.1, 0.62, f"patch embedding\nConv2d {c.patch_size}×{c.patch_size},\nstride {c.patch_size}")
    _arrow(ax, (0.8, y), pe.left)
    pos_kind = {"learned": "learned", "sincos": "2-D sin-cos", "rope2d": "2-D RoPE, in\nevery block"}[c.pos_embedding]
    pos_label = (f"prepend [CLS]\n+ positions\n({pos_kind})" if prefix else f"+ positions\n({pos_kind})")
    pos = _box(ax, 3.2, y, 1.1, 0.62, pos_label, LEARNED if c.pos_embedding == "learned" else FROZEN)
    _arrow(ax, pe.right, pos.left)
    _note(ax, (pe.right[0] + pos.left[0]) / 2, below, _shape("B", n, d))
    blocks = _box(ax, 4.7, y, 1.1, 0.62, f"pre-norm block\n× {c.depth}", stack=min(c.depth, 3) - 1)
    _arrow(ax, pos.right, blocks.left)
    _note(ax, (pos.right[0] + blocks.left[0]) / 2, below, _shape("B", prefix + n, d))
    norm = _box(ax, 6.0, y, 0.85, 0.42, "LayerNorm")
    _arrow(ax, (blocks.right[0] + 0.1, y), norm.left)
    pool = _box(ax, 7.1, y, 0.9, 0.5, "[CLS] token" if prefix else f"mean of\n{n} patches", OP)
    _arrow(ax, norm.right, pool.left)
    # the per-patch outputs, which the VLM chapters read
    _path(ax, [(norm.x, y - 0.21), (norm.x, 0.45), (norm.x + 0.45, 0.45)], color=IMAGE[1])
    _note(ax, norm.x + 0.52, 0.45, f"patch vectors {_shape('B', n, d)}: what a VLM reads", color=IMAGE[1], ha="left")
    if c.num_classes is not None:
        head = _box(ax, 8.45, y, 0.85, 0.5, f"head\nLinear {d} → {c.num_classes}")
        _arrow(ax, pool.right, head.left)
        _note(ax, (pool.right[0] + head.left[0]) / 2, below, _shape("B", d))
        _note(ax, head.x, y + 0.42, f"logits {_shape('B', c.num_classes)}", color=OUTPUT[1])
    else:
        _arrow(ax, pool.right, (8.05, y))
        _note(ax, 8.5, y, f"pooled\n{_shape('B', d)}", color=OUTPUT[1])
    _note(ax, 4.5, 2.35, f"{c.image_size} px image, {c.patch_size} px patches: {c.grid_size} × {c.grid_size} = {n} tokens"
          + (", plus [CLS]" if prefix else "") + f"; width {d}, {c.num_heads} heads", color=INK)
    return _finish(fig, ax)


# ----------------------------------------------------------------------------------
# Chapter 04: the GPT


def gpt(config: GPTConfig | None = None, text: str = "a red circle is"):
    """The GPT of chapter 04: ids -> token + position embeddings -> causal blocks -> LayerNorm -> head -> logits."""
    c = _check_config("config", config, GPTConfig, GPTConfig)
    tok = _tokenizer()
    ids = tok.encode_ordinary(text)
    if not 1 <= len(ids) <= 5:
        raise ValueError(f"text {text!r} is {len(ids)} tokens; the figure has room for 1 to 5")
    d, v = c.dim, c.vocab_size
    fig, ax = _canvas(9.0, 2.9, "The GPT: a decoder-only language model")
    y = 1.45
    pieces = [_piece(tok.decode([i])) for i in ids]
    ch = 0.22
    top = y + len(ids) * ch / 2
    for j, (piece, token_id) in enumerate(zip(pieces, ids)):
        _box(ax, 0.55, top - (j + 0.5) * ch, 0.8, ch - 0.03, f"{piece}  {token_id}", TEXT, size=SMALL)
    _note(ax, 0.55, top + 0.15, "ids " + _shape("B", "T"), color=INK)
    te = _box(ax, 1.95, y, 1.2, 0.55, f"token embedding\n{v} × {d}")
    _arrow(ax, (0.98, y), te.left)
    add = _op(ax, 3.0, y)
    _arrow(ax, te.right, (add.x - 0.12, y))
    pe = _box(ax, 3.0, 0.5, 1.3, 0.5, f"position embedding\n{c.context_length} × {d}")
    _arrow(ax, pe.top, (add.x, y - 0.12))
    _note(ax, 3.85, 0.5, "row t for\nposition t", ha="left")
    blocks = _box(ax, 4.3, y, 1.2, 0.62, f"causal pre-norm\nblock × {c.depth}", stack=min(c.depth, 3) - 1)
    _arrow(ax, (add.x + 0.12, y), blocks.left)
    _note(ax, (add.x + blocks.left[0]) / 2 + 0.02, y + 0.2, _shape("B", "T", d), size=SMALL - 0.5)
    norm = _box(ax, 5.6, y, 0.85, 0.45, "LayerNorm")
    _arrow(ax, (blocks.right[0] + 0.1, y), norm.left)
    head = _box(ax, 6.85, y, 1.15, 0.55, f"LM head\nLinear {d} → {v}")
    _arrow(ax, norm.right, head.left)
    _arrow(ax, head.right, (7.75, y))
    _note(ax, 8.35, y + 0.08, f"logits\n{_shape('B', 'T', v)}", color=OUTPUT[1])
    _note(ax, 8.35, y - 0.38, "row t scores\ntoken t + 1", color=MUTED)
    if c.tie_weights:
        _path(ax, [(te.x, y + 0.28), (te.x, 2.3), (head.x, 2.3), (head.x, y + 0.28)], color=LEARNED[1], dashed=True,
              arrow=False)
        _note(ax, (te.x + head.x) / 2, 2.42, f"tied: the head reuses the token embedding's {v} × {d} matrix",
              color=LEARNED[1])
    return _finish(fig, ax)


# ----------------------------------------------------------------------------------
# Chapter 05: CLIP's contrastive matrix

_CLIP_OBJECTS = (("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "diamond"),
                 ("purple", "cross"))


def clip_matrix(n: int = 4, config: CLIPConfig | None = None):
    """N images and N captions through two towers to unit vectors; the N × N similarities, positives on the diagonal."""
    from matplotlib.patches import Rectangle

    embed_dim = _check_config("config", config, CLIPConfig, CLIPConfig).embed_dim
    if not isinstance(n, int) or isinstance(n, bool) or not 2 <= n <= len(_CLIP_OBJECTS):
        raise ValueError(f"n must be an int from 2 to {len(_CLIP_OBJECTS)} (the pairs the figure has room for), got {n!r}")
    objects = _CLIP_OBJECTS[:n]
    fig, ax = _canvas(9.0, 3.55, f"CLIP: {n} images, {n} captions, {n} × {n} similarities")
    cell = min(0.5, 2.0 / n)
    mx0, my_top = 2.2, 2.3  # the matrix's top-left corner
    rows_y = [my_top - (i + 0.5) * cell for i in range(n)]
    cols_x = [mx0 + (j + 0.5) * cell for j in range(n)]
    bottom = my_top - n * cell
    # images down the left, through the image tower, to unit vectors
    isz = cell * 0.75
    for (colour, shape), y in zip(objects, rows_y):
        _image(ax, _object_image(shape, colour), 0.2, y - isz / 2, isz)
    tower_i = _box(ax, 1.0 + isz / 2, my_top - n * cell / 2, 0.45, n * cell, "image\ntower", LEARNED, size=SMALL)
    for i, y in enumerate(rows_y):
        _arrow(ax, (0.22 + isz, y), (tower_i.left[0], y), color=IMAGE[1], lw=0.8)
        _box(ax, 1.85, y, 0.3, cell * 0.55, f"i{i + 1}", IMAGE, size=SMALL - 0.5)
        _arrow(ax, (tower_i.right[0], y), (1.7, y), color=IMAGE[1], lw=0.8)
    # captions along the top, through the text tower, to unit vectors
    for (colour, shape), x in zip(objects, cols_x):
        _note(ax, x, 3.05, f"a {colour}\n{shape}" if cell >= 0.5 else f"{colour}\n{shape}", color=TEXT[1],
              size=SMALL - 0.5 if cell >= 0.5 else SMALL - 1)
    _box(ax, mx0 + n * cell / 2, 2.72, n * cell, 0.22, "text tower", LEARNED, size=SMALL)
    for j, x in enumerate(cols_x):
        _box(ax, x, my_top + 0.15, cell * 0.7, 0.17, f"t{j + 1}", TEXT, size=SMALL - 1)
    # the matrix
    for i, y in enumerate(rows_y):
        for j, x in enumerate(cols_x):
            pos = i == j
            ax.add_patch(Rectangle((x - cell / 2, y - cell / 2), cell, cell, facecolor=OUTPUT[0] if pos else "#fafafa",
                                   edgecolor=OUTPUT[1] if pos else "#bbbbbb", linewidth=1.2 if pos else 0.6, zorder=2))
            _note(ax, x, y, f"i{i + 1}·t{j + 1}", size=SMALL - 1 if cell < 0.5 else SMALL - 0.5,
                  color=INK if pos else MUTED)
    # the two cross-entropies
    rx = mx0 + n * cell + 0.15
    _arrow(ax, (rx, rows_y[0]), (rx + 0.45, rows_y[0]), color=OUTPUT[1])
    _note(ax, rx + 0.55, rows_y[0], "each row: cross-entropy over the captions, target on the diagonal\n"
          "(image → text: which caption is this image's?)", color=INK, ha="left")
    _arrow(ax, (cols_x[0], bottom - 0.05), (cols_x[0], bottom - 0.3), color=OUTPUT[1])
    _note(ax, cols_x[0] + 0.15, bottom - 0.2, "each column: cross-entropy over the images, target on the diagonal "
          "(text → image: which image is this caption's?)", color=INK, ha="left")
    loss = _box(ax, rx + 2.3, my_top - n * cell / 2 + 0.05, 3.2, 0.34, "loss = (image → text + text → image) / 2",
                OUTPUT, size=FONT)
    _note(ax, loss.x, loss.y - 0.5, f"logit = scale × cosine: both towers end in unit vectors\n"
          f"of width {embed_dim}. Chance for a row: 1 in {n}, a loss of ln {n} = {math.log(n):.2f}.", color=MUTED)
    return _finish(fig, ax)



# ----------------------------------------------------------------------------------
# Chapter 06: the unified-embedding decoder (method A)


def _token_cells(ax, x0, y, pieces, colours, h=0.28, size=SMALL, unit=0.068, pad=0.16, minimum=0.34):
    """A row of token cells, each as wide as its text; returns [(centre x, width)]."""
    out = []
    x = x0
    for piece, colour in zip(pieces, colours):
        w = max(minimum, unit * len(piece) + pad)
        _box(ax, x + w / 2, y, w - 0.04, h, piece, colour, size=size)
        out.append((x + w / 2, w))
        x += w
    return out


def unified_decoder(config: VLMConfig | None = None, question: str = "what colour is the triangle?",
                    answer: str = "purple"):
    """Method A: image -> frozen tower -> projector -> image tokens written over <|image|> -> the LM; loss on the answer."""
    from matplotlib.patches import Rectangle

    c = _check_config("config", config, VLMConfig, VLMConfig)
    tok = _tokenizer()
    q_ids, a_ids = tok.encode_ordinary(question), tok.encode_ordinary(" " + answer)
    if len(q_ids) + len(a_ids) > 9:
        raise ValueError(f"question and answer are {len(q_ids) + len(a_ids)} tokens; the figure has room for 9")
    n, d_img, d_lm = c.num_image_tokens, c.image_dim, c.lm.dim
    fig, ax = _canvas(9.0, 3.35, "Method A, the unified-embedding decoder: image tokens in the text sequence")
    y1, y2, y3, y4 = 2.55, 1.67, 1.02, 0.5  # image path, sequence, LM, labels

    # the image path
    _image(ax, _example_image(c.vision.image_size), 0.25, y1 - 0.27, 0.54)
    if c.encoder == "vit":
        enc = _box(ax, 1.75, y1, 1.15, 0.5, "image tower\n(ViT, frozen)", FROZEN)
    else:
        enc = _box(ax, 1.75, y1, 1.15, 0.5, "raw patches\n(no tower: Fuyu)", OP)
    _arrow(ax, (0.85, y1), enc.left)
    proj_text = (f"projector: Linear {d_img} → {d_lm},\nGELU, Linear {d_lm} → {d_lm}" if c.projector == "mlp"
                 else f"projector:\nLinear {d_img} → {d_lm}")
    proj = _box(ax, 4.05, y1, 1.9, 0.5, proj_text)
    _arrow(ax, enc.right, proj.left)
    _note(ax, (enc.right[0] + proj.left[0]) / 2, y1 + 0.17, _shape("B", n, d_img))
    _note(ax, proj.right[0] + 0.1, y1 + 0.02, f"{n} image tokens {_shape('B', n, d_lm)}", color=IMAGE[1], ha="left")

    # the sequence: n <|image|> slots, the question, the answer, <|endoftext|>
    _note(ax, 0.5, y2, "sequence", color=INK)
    sx0, slot_w = 1.0, 2.0
    cw = slot_w / 8  # two slots at each end, the rest as one labelled stretch
    for left, width in ((0, cw), (cw, cw), (2 * cw, 4 * cw), (6 * cw, cw), (7 * cw, cw)):
        ax.add_patch(Rectangle((sx0 + left, y2 - 0.14), width, 0.28, facecolor=IMAGE[0], edgecolor=IMAGE[1],
                               linewidth=0.7, zorder=2))
    _note(ax, sx0 + slot_w / 2, y2, f"{n} × <|image|>", color=IMAGE[1], size=SMALL)
    _path(ax, [(proj.x, y1 - 0.25), (proj.x, y1 - 0.45), (sx0 + slot_w / 2, y1 - 0.45), (sx0 + slot_w / 2, y2 + 0.16)],
          color=IMAGE[1], lw=1.4)
    _note(ax, sx0 + slot_w / 2 + 0.1, y1 - 0.6, "splice: the image tokens replace the <|image|> embeddings",
          color=IMAGE[1], ha="left")
    pieces = [_piece(tok.decode([i])) for i in q_ids + a_ids] + ["<|endoftext|>"]
    kinds = [TEXT] * len(q_ids) + [OUTPUT] * (len(a_ids) + 1)
    cells = _token_cells(ax, sx0 + slot_w + 0.02, y2, pieces, kinds)
    end = cells[-1][0] + cells[-1][1] / 2
    _note(ax, end + 0.12, y2, f"T = {n} + {len(q_ids)} + {len(a_ids) + 1}\n= {n + len(q_ids) + len(a_ids) + 1} tokens",
          ha="left", color=INK)

    # the LM, position by position
    lm = _box(ax, (sx0 + end) / 2, y3, end - sx0, 0.42,
              f"the chapter-04 GPT: {c.lm.depth} causal blocks, width {d_lm} (frozen in stage 1, trained in stage 2)",
              FROZEN)
    _arrow(ax, (lm.x, y2 - 0.15), lm.top)
    _arrow(ax, lm.right, (end + 0.3, y3))
    _note(ax, end + 0.35, y3, f"logits\n{_shape('B', 'T', c.lm.vocab_size)}", ha="left", color=OUTPUT[1])

    # the labels: -100 wherever the loss does not look
    _note(ax, 0.5, y4, "labels", color=INK)
    _note(ax, sx0 + slot_w / 2, y4, f"−100 × {n}", color=MUTED)
    labels = ["−100"] * len(q_ids) + [str(i) for i in a_ids] + [str(tok.eot_id)]
    for (x, _), label, kind in zip(cells, labels, kinds):
        _note(ax, x, y4, label, color=OUTPUT[1] if kind is OUTPUT else MUTED, weight="bold" if kind is OUTPUT else None)
    _note(ax, end + 0.12, y4, "loss only where\nthe label is not −100", ha="left", color=OUTPUT[1])
    _legend(ax, 0.2, 0.14, ((LEARNED, "trained"), (FROZEN, "frozen"), (IMAGE, "image"), (TEXT, "text"),
                           (OUTPUT, "scored")))
    return _finish(fig, ax)


# ----------------------------------------------------------------------------------
# Chapters 07 and 08: method A against method B, and the gated block


_LM_X0, _LM_W = 3.35, 4.95  # where the LM row of the method diagrams starts, and how wide it is


def _lm_slots(depth: int) -> tuple[list[float], float]:
    """Centres of the LM row's boxes (LM blocks and gated blocks alternate) and their width."""
    pitch = _LM_W / (2 * depth)
    return [_LM_X0 + (k + 0.5) * pitch for k in range(2 * depth)], min(0.56, pitch - 0.07)


def _image_path(ax, vision: ViTConfig, y: float, last: str) -> _Box:
    """image -> frozen tower -> a trained connector box (returned)."""
    _image(ax, _example_image(vision.image_size), 0.2, y - 0.17, 0.34)
    tower = _box(ax, 1.15, y, 0.9, 0.34, "image tower", FROZEN, size=SMALL)
    _arrow(ax, (0.58, y), tower.left, color=IMAGE[1])
    proj = _box(ax, 2.35, y, 1.05, 0.34, last, LEARNED, size=SMALL)
    _arrow(ax, tower.right, proj.left, color=IMAGE[1])
    return proj


def _sequence(ax, y: float, first: str, first_w: float, note: str) -> tuple[float, float]:
    """[first | question] at the left of the row; returns (centre of the first cell, right end)."""
    _box(ax, 0.2 + first_w / 2, y, first_w - 0.03, 0.3, first, IMAGE, size=SMALL)
    qw = 1.35
    _box(ax, 0.2 + first_w + qw / 2, y, qw - 0.03, 0.3, "question", TEXT, size=SMALL)
    _note(ax, 0.2 + (first_w + qw) / 2, y - 0.3, note, color=INK)
    return 0.2 + first_w / 2, 0.2 + first_w + qw


def _lm_row(ax, y: float, depth: int, start: float, gated_after: set[int]) -> tuple[float, list[_Box]]:
    """LM blocks (frozen), with a gated block after each block in `gated_after`; ends in the answer."""
    slots, box_w = _lm_slots(depth)
    prev, gated = start, []
    for k in range(depth):
        block = _box(ax, slots[2 * k], y, box_w, 0.42, f"LM\nblock {k + 1}", FROZEN, size=SMALL - 0.5)
        _arrow(ax, (prev, y), block.left)
        prev = block.right[0]
        if k in gated_after:
            g = _box(ax, slots[2 * k + 1], y, box_w, 0.42, "gated\nx-attn", LEARNED, size=SMALL - 0.5)
            _arrow(ax, (prev, y), g.left)
            prev = g.right[0]
            gated.append(g)
    _arrow(ax, (prev, y), (8.42, y))
    _note(ax, 8.47, y, "“purple”", ha="left", color=OUTPUT[1])
    return prev, gated


def _media_bus(ax, start: tuple[float, float], gated: list[_Box], y_row: float, label: str) -> None:
    """The projected image tokens, carried along a line, down into every gated block as its keys and values."""
    _path(ax, [start, (gated[-1].x, start[1])], color=IMAGE[1], lw=1.6, arrow=False)
    for g in gated:
        _arrow(ax, (g.x, start[1]), (g.x, y_row + 0.21), color=IMAGE[1], lw=1.2)
    _note(ax, start[0] + 0.1, start[1] + 0.13, label, color=IMAGE[1], ha="left")


def unified_vs_cross(vision: ViTConfig | None = None, lm: GPTConfig | None = None, every: int = 1,
                     question: str = "what colour is the triangle?"):
    """Method A (image tokens in the sequence) above method B (a marker in the sequence, the image through gated cross-attention)."""
    vision = _check_config("vision", vision, ViTConfig, ViTConfig)
    lm = _check_config("lm", lm, GPTConfig, GPTConfig)
    xc = XAttnConfig(lm=lm, media_dim=vision.dim, media_tokens=vision.num_patches, every=every)  # checks every
    VLMConfig(vision=vision, lm=lm)  # checks that the image tokens fit the LM's context
    q = len(_tokenizer().encode_ordinary(question))
    n = vision.num_patches
    fig, ax = _canvas(9.0, 3.7)

    # --- A
    ya_img, ya = 3.0, 2.15
    ax.text(0.1, 3.6, "A  unified decoder (chapter 06): the image travels in the sequence", ha="left", va="top",
            fontsize=TITLE - 0.5, weight="bold", color=INK)
    _legend(ax, 6.2, 3.47, ((LEARNED, "trained"), (FROZEN, "frozen"), (IMAGE, "image"), (TEXT, "text")))
    proj = _image_path(ax, vision, ya_img, f"projector\n→ {n} tokens")
    slot_x, end = _sequence(ax, ya, f"{n} image tokens", 1.3, f"{n} + {q} = {n + q} tokens in every block")
    _path(ax, [(proj.x, ya_img - 0.17), (proj.x, ya_img - 0.38), (slot_x, ya_img - 0.38), (slot_x, ya + 0.16)],
          color=IMAGE[1], lw=1.6)
    _lm_row(ax, ya, lm.depth, end + 0.03, set())  # at the places of B's LM blocks: B inserts its gated blocks between
    _note(ax, _LM_X0 + _LM_W / 2, ya - 0.36, "self-attention reads image and text together in every block; "
          "the LM trains in stage 2", color=MUTED)
    ax.plot([0.1, 8.9], [1.72, 1.72], color="#cccccc", lw=0.8)

    # --- B
    yb_img, yb = 1.17, 0.5
    ax.text(0.1, 1.62, "B  cross-attention decoder (chapter 07): the image travels beside the sequence", ha="left",
            va="top", fontsize=TITLE - 0.5, weight="bold", color=INK)
    proj = _image_path(ax, vision, yb_img, f"projection\n→ {n} tokens")
    _, end = _sequence(ax, yb, "<|image|>", 0.75, f"1 + {q} = {q + 1} tokens in every block")
    _, gated = _lm_row(ax, yb, lm.depth, end + 0.03, set(xc.layers))
    _media_bus(ax, proj.right, gated, yb, f"keys and values of every gated block: {n} image tokens")
    _note(ax, _LM_X0 + _LM_W / 2, yb - 0.36, "the LM stays frozen in both stages: only the projection and the gated "
          "blocks train", color=MUTED)
    return _finish(fig, ax)


def hybrid(config: HybridConfig | None = None, question: str = "what colour is the triangle?"):
    """NVLM-H: a pooled thumbnail of the patch grid in the sequence, all patches through gated cross-attention."""
    c = _check_config("config", config, HybridConfig,
                      lambda: HybridConfig(lm=GPTConfig(), media_dim=48, media_tokens=64))
    vision = c.vision or ViTConfig()
    q = len(_tokenizer().encode_ordinary(question))
    n, g = c.media_tokens, c.thumbnail_grid
    side = math.isqrt(n)
    fig, ax = _canvas(9.0, 2.55)
    ax.text(0.1, 2.45, "H  hybrid (NVLM-H): a thumbnail in the sequence, every patch beside it", ha="left", va="top",
            fontsize=TITLE - 0.5, weight="bold", color=INK)
    y_img, y_thumb, y = 1.75, 1.2, 0.5
    proj = _image_path(ax, vision, y_img, f"projection\n→ {n} tokens")
    # the thumbnail: the tower's patch grid, average-pooled, through the projector, into the sequence
    pool = _box(ax, 2.0, y_thumb, 0.95, 0.34, f"pool {side}×{side} → {g}×{g}", OP, size=SMALL - 0.5)
    _path(ax, [(1.15, y_img - 0.17), (1.15, y_thumb), pool.left], color=IMAGE[1], lw=1.2)
    thumb = _box(ax, 3.05, y_thumb, 0.85, 0.34, f"projector\n→ {g * g} tokens", LEARNED, size=SMALL - 0.5)
    _arrow(ax, pool.right, thumb.left, color=IMAGE[1], lw=1.2)
    slot_x, end = _sequence(ax, y, f"{g * g} thumbnail tokens", 1.3, f"{g * g} + {q} = {g * g + q} tokens in every block")
    _path(ax, [(thumb.x, y_thumb - 0.17), (thumb.x, y_thumb - 0.32), (slot_x, y_thumb - 0.32), (slot_x, y + 0.16)],
          color=IMAGE[1], lw=1.6)
    _, gated = _lm_row(ax, y, c.lm.depth, end + 0.03, set(c.layers))
    _media_bus(ax, proj.right, gated, y, f"keys and values of every gated block: all {n} image tokens")
    _legend(ax, 6.2, 2.32, ((LEARNED, "trained"), (FROZEN, "frozen"), (IMAGE, "image"), (TEXT, "text")))
    _note(ax, _LM_X0 + _LM_W / 2, y - 0.36, "self-attention reads the coarse thumbnail with the text; cross-attention "
          "reads every patch", color=MUTED)
    return _finish(fig, ax)


def gated_block(config: XAttnConfig | None = None):
    """Flamingo's gated cross-attention block beside a frozen LM block: each branch × tanh(gate), the gates start at 0."""
    c = _check_config("config", config, XAttnConfig,
                      lambda: XAttnConfig(lm=GPTConfig(), media_dim=48, media_tokens=64))
    d, m = c.lm.dim, c.media_tokens
    hidden = int(d * c.mlp_ratio)
    fig, ax = _canvas(9.0, 2.9, "A gated cross-attention block (Flamingo's GATED XATTN-DENSE)")
    ys, yb, ym = 1.95, 1.2, 0.35  # residual stream, branches, media

    x = 0.55
    _note(ax, 0.3, ys, "x", size=FONT + 1, color=INK)
    _note(ax, 0.3, ys - 0.25, _shape("B", "T", d), color=TEXT[1])

    def lm_block(x):
        b = _box(ax, x + 0.55, ys, 1.0, 0.46, f"LM block i\n(frozen)", FROZEN, size=SMALL)
        _arrow(ax, (x, ys), b.left)
        return b.right[0]

    def gated(x):
        fork1 = x + 0.2
        ln1 = _box(ax, fork1 + 0.5, yb, 0.62, 0.36, "LayerNorm", size=SMALL - 0.5)
        att = _box(ax, fork1 + 1.65, yb, 1.35, 0.52, "cross-attention\nQ: text, K and V: image", size=SMALL)
        g1 = _op(ax, fork1 + 2.75, yb, "×", r=0.11, size=9)
        add1 = _op(ax, g1.x, ys)
        fork2 = g1.x + 0.35
        ln2 = _box(ax, fork2 + 0.5, yb, 0.62, 0.36, "LayerNorm", size=SMALL - 0.5)
        mlp = _box(ax, fork2 + 1.35, yb, 0.85, 0.52, f"MLP\n{d} → {hidden} → {d}", size=SMALL)
        g2 = _op(ax, fork2 + 2.25, yb, "×", r=0.11, size=9)
        add2 = _op(ax, g2.x, ys)
        _arrow(ax, (x, ys), (add1.x - 0.12, ys))
        _arrow(ax, (add1.x + 0.12, ys), (add2.x - 0.12, ys))
        for fork, ln, branch, g, add in ((fork1, ln1, att, g1, add1), (fork2, ln2, mlp, g2, add2)):
            _path(ax, [(fork, ys), (fork, yb), ln.left])
            _arrow(ax, ln.right, branch.left)
            _arrow(ax, branch.right, (g.x - 0.11, yb))
            _arrow(ax, (g.x, yb + 0.11), (add.x, ys - 0.12))
        _note(ax, g1.x, yb - 0.27, "tanh(α_attn)", color=LEARNED[1])
        _note(ax, g2.x, yb - 0.27, "tanh(α_mlp)", color=LEARNED[1])
        media = _box(ax, att.x, ym, 2.4, 0.32, f"image tokens, projected {_shape('B', m, d)}", IMAGE, size=SMALL)
        _arrow(ax, media.top, att.bottom, color=IMAGE[1], lw=1.3)
        return add2.x + 0.12

    if c.placement == "after":
        x = gated(lm_block(x))
    else:
        x = lm_block(gated(x))
    _arrow(ax, (x, ys), (x + 0.35, ys))
    _note(ax, x + 0.45, ys, "out", size=FONT + 1, color=INK, ha="left")
    _note(ax, 4.5, 2.42, "α_attn = α_mlp = 0 at the start: tanh(0) = 0, so both branches add nothing and the model "
          "is exactly the LM. Training opens the gates.", color=INK)
    _note(ax, 8.9, ym, "a token with no image before it:\nboth updates × 0 (no attention at all)", ha="right")
    return _finish(fig, ax)


# ----------------------------------------------------------------------------------
# Chapter 09: the Perceiver Resampler


def _example_frames(count: int, image_size: int = 32) -> np.ndarray:
    from mllm_scratch.shapeworld import ShapeWorldConfig, generate_clip, render_clip, split_seed

    clip = generate_clip(split_seed("test", 1), max(count, 2), ShapeWorldConfig(image_size=max(32, image_size), min_objects=2,
                                                                        text_probability=0.0), "test")
    return render_clip(clip)[:count].astype(np.float32) / 255  # (T, H, W, 3)


def resampler(config: ResamplerConfig | None = None, frames: int = 8, tokens_per_frame: int = 64,
              compare: tuple[int, ...] = (4, 64)):
    """Flamingo's Perceiver Resampler: T frames of patch vectors + time embeddings -> a fixed number of latents."""
    c = _check_config("config", config, ResamplerConfig, ResamplerConfig)
    _check_int("tokens_per_frame", tokens_per_frame)
    for t in (frames, *compare):
        if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= c.max_frames:
            raise ValueError(f"frames must be ints from 1 to max_frames {c.max_frames}, got {t!r}")
    s, L, d = tokens_per_frame, c.num_latents, c.dim
    media = frames * s
    fig, ax = _canvas(9.0, 3.2, "The Perceiver Resampler: any number of frames in, a fixed number of tokens out")
    y = 1.6

    # the frames, stacked
    pics = _example_frames(min(frames, 4))
    for k in range(len(pics) - 1, -1, -1):
        _image(ax, pics[k], 0.2 + 0.09 * k, y - 0.25 - 0.09 * k + 0.15, 0.5)
    _note(ax, 0.58, y - 0.62, f"T = {frames} frames", color=IMAGE[1])
    tower = _box(ax, 1.75, y, 0.95, 0.5, "image tower,\neach frame", FROZEN, size=SMALL)
    _arrow(ax, (1.05, y), tower.left)
    x = tower.right[0]
    _note(ax, tower.x, y - 0.4, _shape("B", frames, s, c.media_dim), size=SMALL - 0.5)
    if c.media_dim != d:
        lin = _box(ax, x + 0.8, y, 0.72, 0.4, f"Linear\n{c.media_dim} → {d}", size=SMALL)
        _arrow(ax, (x, y), lin.left)
        x = lin.right[0]
    add = _op(ax, x + 0.35, y)
    _arrow(ax, (x, y), (add.x - 0.12, y))
    time = _box(ax, add.x, 0.78, 1.2, 0.42, "time embedding\nrow t → frame t", size=SMALL)
    _arrow(ax, time.top, (add.x, y - 0.12))
    x = add.x + 0.12
    if c.spatial_pos:
        add2 = _op(ax, x + 0.4, y)
        _arrow(ax, (x, y), (add2.x - 0.12, y))
        place = _box(ax, add2.x, 2.58, 1.25, 0.4, "2-D place code\nof each patch (fixed)", FROZEN, size=SMALL - 0.5)
        _arrow(ax, (add2.x, place.bottom[1]), (add2.x, y + 0.12))
        x = add2.x + 0.12
    res_x = x + 0.75
    _arrow(ax, (x, y), (res_x, y))
    _note(ax, (x + res_x) / 2, y + 0.3, "flatten", color=INK)
    _note(ax, (x + res_x) / 2, y - 0.3, f"media\n{_shape('B', media, d)}", size=SMALL - 0.5)

    # the resampler: latents read [media; latents], depth times
    body = _box(ax, res_x + 1.05, y, 2.1, 0.86, f"resampler layer × {c.depth}\nQ: latents\nK, V: [media; latents]\n"
                f"{_shape('B', media + L, d)}, then MLP", stack=min(c.depth, 3) - 1, size=SMALL)
    latents = _box(ax, body.x, 2.58, 1.55, 0.34, f"{L} latents × {d} (learned)", size=SMALL)
    _arrow(ax, latents.bottom, (body.x, body.top[1]))
    norm = _box(ax, body.right[0] + 0.55, y, 0.72, 0.38, "LayerNorm", size=SMALL)
    _arrow(ax, (body.right[0] + 0.1, y), norm.left)
    _arrow(ax, norm.right, (norm.right[0] + 0.25, y))
    _note(ax, norm.right[0] + 0.3, y, f"{L} visual\ntokens\n{_shape('B', L, d)}", ha="left", color=OUTPUT[1])
    # the same L tokens for any T
    rows = "   ".join(f"T = {t}: {t * s:,} media tokens → {L}" for t in sorted({*compare, frames}))
    _note(ax, 8.9, 0.25, rows, color=INK, ha="right")
    return _finish(fig, ax)


__all__ = [
    "clip_matrix",
    "gated_block",
    "gpt",
    "hybrid",
    "patch_tokens",
    "prenorm_block",
    "qkv",
    "resampler",
    "unified_decoder",
    "unified_vs_cross",
    "vit",
]
