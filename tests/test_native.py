"""Canvases of other sizes (ShapeWorld) and chapter 11's measurement helpers."""

import numpy as np
import pytest
import torch

from mllm_scratch.native import (
    NativeRecipe,
    VideoGridLM,
    VideoGridRecipe,
    accuracy,
    classify,
    leftmost_scenes,
    round_robin,
    train_native,
)
from mllm_scratch.shapeworld import ShapeWorldConfig, generate_scene, relations, render
from mllm_scratch.vit import ViTConfig, config_dict


@pytest.mark.parametrize("canvas", [(24, 24), (32, 64), (64, 16), (48, 48)])
def test_a_canvas_keeps_the_shapes_sizes_and_holds_every_object(canvas):
    config = ShapeWorldConfig(canvas=canvas, text_probability=0.0, max_objects=2)
    for seed in range(20):
        scene = generate_scene(seed, config)
        assert render(scene).shape == (*canvas, 3)
        for o in scene.objects:
            assert o.side in (8, 12)  # the sizes of a 32 px image, whatever the canvas
            assert 0 < o.x and o.x + o.side < canvas[1] and 0 < o.y and o.y + o.side < canvas[0]


def test_the_default_canvas_is_not_stored_and_changes_no_scene():
    assert "canvas" not in config_dict(ShapeWorldConfig()) and "canvas" not in repr(ShapeWorldConfig())
    assert "canvas=(32, 64)" in repr(ShapeWorldConfig(canvas=(32, 64), text_probability=0.0))
    assert generate_scene(7) == generate_scene(7, ShapeWorldConfig(canvas=None))
    square = generate_scene(7, ShapeWorldConfig(canvas=(32, 32)))  # the same canvas, spelled out
    assert np.array_equal(render(square), render(generate_scene(7)))


def test_canvas_errors_name_the_value():
    with pytest.raises(ValueError, match=r"canvas \(16, 64\) cannot hold a large object \(24 px plus gaps\)"):
        ShapeWorldConfig(image_size=64, canvas=(16, 64))  # a 64 px image's large shape is 24 px
    with pytest.raises(ValueError, match=r"canvas \(10, 32\) is invalid"):
        ShapeWorldConfig(canvas=(10, 32))
    with pytest.raises(ValueError, match="expected None or \\(height, width\\)"):
        ShapeWorldConfig(canvas=(32,))
    with pytest.raises(ValueError, match="cannot fit on a 24 x 24 px canvas"):
        ShapeWorldConfig(canvas=(24, 24), text_probability=0.0)  # three objects do not fit
    with pytest.raises(ValueError, match="clips are drawn on a square"):
        from mllm_scratch.shapeworld import generate_clip
        generate_clip(0, config=ShapeWorldConfig(canvas=(32, 64)))


def test_leftmost_labels_name_the_left_shape():
    images, labels = leftmost_scenes("test", 30, (32, 64))
    assert images.shape == (30, 3, 32, 64) and labels.shape == (30,)
    again, _ = leftmost_scenes("test", 30, (32, 64))
    assert torch.equal(images, again)  # the same call, the same scenes
    assert 0 <= int(labels.min()) and int(labels.max()) < 5


def test_native_recipe_refuses_a_test_canvas_in_training():
    with pytest.raises(ValueError, match="include the test canvas 48 px"):
        NativeRecipe(train_canvases=((32, 32), (48, 48)))
    with pytest.raises(ValueError, match="position must be one of"):
        NativeRecipe().model_config("alibi")


def test_round_robin_takes_the_streams_in_turn():
    it = round_robin([iter("aaa"), iter("bbb")])
    assert [next(it) for _ in range(4)] == ["a", "b", "a", "b"]


def test_a_short_mixed_size_run_learns_and_scores_any_canvas():
    recipe = NativeRecipe(train_scenes=400, steps=30, warmup_steps=5, train_canvases=((32, 32), (28, 44)),
                          vit=ViTConfig(dim=16, depth=1, num_heads=2, pool="mean", num_classes=5))
    torch.manual_seed(0)
    model, history = train_native("learned", recipe)
    assert history.loss[-1] < history.loss[0]
    images, labels = leftmost_scenes("test", 20, (48, 48))
    assert classify(model, images).shape == (20, 5)
    assert 0.0 <= accuracy(model, images, labels) <= 1.0


def test_video_grid_lm_positions():
    recipe = VideoGridRecipe(frames=2, grid=2, dim=16, depth=1, num_heads=2)
    rope = VideoGridLM(recipe, "rope", feature_dim=6, vocab_size=512)
    mrope = VideoGridLM(recipe, "mrope", feature_dim=6, vocab_size=512)
    assert rope.positions(3).tolist() == list(range(11))
    assert mrope.positions(3)[:, -3:].tolist() == [[2, 3, 4]] * 3  # text after the video: one past the largest index
    logits = mrope(torch.randn(2, 8, 6), torch.zeros(2, 3, dtype=torch.long))
    assert logits.shape == (2, 11, 512)
    with pytest.raises(ValueError, match=r"features must have shape \(batch, 8, dim\)"):
        mrope(torch.randn(2, 7, 6), torch.zeros(2, 3, dtype=torch.long))
