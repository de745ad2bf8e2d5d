"""Figures the chapters share: an image with its patch grid, a row of images, galleries of answered questions."""

from __future__ import annotations

import torch


def _as_hwc(image: torch.Tensor):
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (channels, height, width) with 1 or 3 channels, got {tuple(image.shape)}")
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()  # (H, W, C) for imshow


def show_image(image: torch.Tensor, ax=None, patch_size: int | None = None, title: str | None = None, number: bool = False):
    """Draw a (C, H, W) image in [0, 1]; with `patch_size`, draw the patch grid (and number the patches)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    hwc = _as_hwc(image)
    h, w = hwc.shape[:2]
    ax.imshow(hwc.squeeze(-1) if hwc.shape[-1] == 1 else hwc, cmap="gray", interpolation="nearest", extent=(0, w, h, 0))
    if patch_size:
        for x in range(0, w + 1, patch_size):
            ax.axvline(x, color="white", lw=0.6, alpha=0.8)
        for y in range(0, h + 1, patch_size):
            ax.axhline(y, color="white", lw=0.6, alpha=0.8)
        if number:
            cols = w // patch_size
            for k in range((h // patch_size) * cols):
                r, c = divmod(k, cols)
                # in the patch's top-left corner, so the number hides as little of the patch as it can
                ax.text(c * patch_size + 0.6, r * patch_size + 0.6, str(k), color="white",
                        ha="left", va="top", fontsize=6,
                        bbox={"facecolor": "black", "alpha": 0.75, "pad": 0.6, "linewidth": 0})
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def show_row(images: list[torch.Tensor], titles: list[str] | None = None, size: float = 1.0):
    """A row of small images, e.g. the patches of one image in sequence order."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), size * 1.3), squeeze=False)
    for i, (ax, img) in enumerate(zip(axes[0], images)):
        show_image(img, ax=ax, title=None if titles is None else titles[i])
    fig.tight_layout()
    return fig


def _verdict(answer: str, truth: str) -> str:
    return "✓" if answer == truth else "✗"


def _check_cases(func: str, kind: str, n: int, questions: list, answers: list, truths: list) -> None:
    """A gallery needs one question, answer and truth per image (or clip), and at least one case."""
    if not n or not len(questions) == len(answers) == len(truths) == n:
        raise ValueError(f"{func} needs as many questions, answers and truths as {kind} (at least one), got "
                         f"{n} {kind}, {len(questions)} questions, {len(answers)} answers, {len(truths)} truths")


def show_gallery(images: list[torch.Tensor], questions: list[str], answers: list[str], truths: list[str],
                 cols: int = 4, size: float = 2.2):
    """Held-out cases in a grid: each image titled with its question, the model's answer, the truth and ✓ or ✗.

    A grounded spatial reply ("red circle 1 blue square 5 yes") is judged by its final yes/no (`final_answer`).
    """
    import textwrap

    import matplotlib.pyplot as plt

    from mllm_scratch.shapeworld import final_answer

    n = len(images)
    _check_cases("show_gallery", "images", n, questions, answers, truths)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * 1.45 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, image, q, a, t in zip(axes.flat, images, questions, answers, truths):
        show_image(image, ax=ax)
        wrapped = "\n".join(textwrap.wrap(q, 26))
        said = "\n".join(textwrap.wrap(f"model: {a or '(nothing)'} {_verdict(final_answer(a), final_answer(t))}", 30))
        truth = "\n".join(textwrap.wrap(f"truth: {t}", 30))
        ax.set_title(f"{wrapped}\n{said}\n{truth}", fontsize=8,
                     color="black" if final_answer(a) == final_answer(t) else "firebrick")
    fig.tight_layout()
    return fig


def show_clip_gallery(clips: list[torch.Tensor], questions: list[str], answers: list[str], truths: list[str],
                      frames: int = 4, size: float = 1.1):
    """Video cases, one row each: a strip of `frames` evenly spaced frames, then the question, answer, truth, ✓ or ✗."""
    import matplotlib.pyplot as plt

    n = len(clips)
    _check_cases("show_clip_gallery", "clips", n, questions, answers, truths)
    fig, axes = plt.subplots(n, frames + 1, figsize=(size * (frames + 3.5), size * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * frames + [3.5]})
    for row, clip, q, a, t in zip(axes, clips, questions, answers, truths):
        if clip.dim() != 4:
            raise ValueError(f"a clip must have shape (frames, channels, height, width), got {tuple(clip.shape)}")
        picks = torch.linspace(0, clip.shape[0] - 1, frames).round().long().tolist()
        for ax, k in zip(row[:frames], picks):
            show_image(clip[k], ax=ax)
            ax.set_xlabel(f"t={k}", fontsize=7, labelpad=1)
        text = row[frames]
        text.axis("off")
        text.text(0.02, 0.5, f"{q}\nmodel: {a or '(nothing)'} {_verdict(a, t)}   truth: {t}", fontsize=8, va="center",
                  color="black" if a == t else "firebrick", transform=text.transAxes)
    fig.tight_layout()
    return fig
