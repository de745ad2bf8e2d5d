"""Linear shape probes (chapter 06's diagnosis): windows land on their objects, and the probe measures what it claims."""

import pytest
import torch

from mllm_scratch.patches import patchify
from mllm_scratch.probes import linear_probe, object_windows, shape_probe
from mllm_scratch.shapeworld import SHAPES, ShapeWorldConfig, generate_scene, split_seed

ONE = ShapeWorldConfig(max_objects=1, text_probability=0.0)
CROWDED = ShapeWorldConfig(text_probability=0.0)


def pixels(images):
    return patchify(images, 4)  # (n, 64, 48): raw pixel patches


def test_one_window_per_object_with_its_shape():
    arrangement, mean, labels = object_windows("val", 20, pixels, CROWDED)
    scenes = [generate_scene(split_seed("val", i), CROWDED, "val") for i in range(20)]
    expected = [SHAPES.index(o.shape) for s in scenes for o in s.objects]
    assert labels.tolist() == expected and len(expected) > 20  # crowded: more objects than scenes
    assert arrangement.shape == (len(expected), 16 * 48) and mean.shape == (len(expected), 48)


def test_the_window_starts_at_the_objects_top_left_patch():
    # The first patch of each window holds the object's top-left pixel, so it is never blank.
    arrangement, _, _ = object_windows("val", 30, pixels, ONE)
    first_patch = arrangement[:, :48]
    assert (first_patch.abs().sum(1) > 0).all()


def test_windows_past_the_edge_are_zero_padded():
    def ramp(images):  # patch vector = its own grid index, so a window's content says where it was cut
        return torch.arange(64, dtype=torch.float)[None, :, None].expand(len(images), 64, 1) + 1
    arrangement, _, _ = object_windows("val", 40, ramp, ONE)
    windows = arrangement.reshape(-1, 4, 4)
    scenes = [generate_scene(split_seed("val", i), ONE, "val") for i in range(40)]
    for w, s in zip(windows, scenes):
        row, col = s.objects[0].y // 4, s.objects[0].x // 4
        assert w[0, 0] == row * 8 + col + 1
        assert (w[max(0, 8 - row):] == 0).all() and (w[:, max(0, 8 - col):] == 0).all()


def test_probe_reads_a_separable_code_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (400,), generator=g)
    codes = torch.eye(5)[y] * 3 + 0.1 * torch.randn(400, 5, generator=g)
    noise = torch.randn(400, 5, generator=g)
    assert linear_probe(codes[:300], y[:300], codes[300:], y[300:]) == 1.0
    assert linear_probe(noise[:300], y[:300], noise[300:], y[300:]) < 0.4  # 5 classes: chance 0.2


def test_shape_lives_in_the_arrangement_of_raw_pixels():
    acc = shape_probe(pixels, ONE, n_train=400, n_val=150)
    assert acc["arrangement"] > 0.75 and acc["arrangement"] > acc["mean"] + 0.2


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="square grid"):
        object_windows("val", 4, lambda im: torch.zeros(len(im), 60, 3), ONE)
    with pytest.raises(ValueError, match="differ in length"):
        linear_probe(torch.zeros(5, 2), torch.zeros(4, dtype=torch.long), torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 1"):
        object_windows("val", 0, pixels, ONE)
