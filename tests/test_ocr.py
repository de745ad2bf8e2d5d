"""Teaching the tower to read: character labels per pixel and per patch, the tile data set, a short training run."""

import numpy as np
import pytest
import torch

from mllm_scratch.ocr import (
    CHAR_CLASSES,
    ReadingTowerRecipe,
    char_accuracy,
    char_map,
    ocr_dataset,
    patch_char_labels,
    train_reading_tower,
)
from mllm_scratch.shapeworld import BACKGROUND, TEXT_ALPHABET, ShapeWorldConfig, generate_scene, render

TEXT = ShapeWorldConfig(image_size=64, max_objects=3, text_probability=1.0)


def test_every_inked_pixel_of_the_text_lies_in_its_characters_cell():
    for seed in range(40):
        scene = generate_scene(seed, TEXT, "train")
        chars = char_map(scene)
        x0, y0, x1, y1 = scene.text_box
        ink = (render(scene)[y0:y1, x0:x1] != np.array(BACKGROUND, dtype=np.uint8)).any(-1)
        assert ink.any() and (chars[y0:y1, x0:x1][ink] > 0).all()
        assert (chars > 0).sum() == (x1 - x0) * (y1 - y0)  # the cells tile the text's box, and nothing outside it
        assert (chars[y0:y1, x0:x1] > 0).all()
        first = chars[y0, x0]
        assert TEXT_ALPHABET[first - 1] == scene.text[0]


def test_patch_labels_are_the_majority_character_of_each_patch():
    for seed in range(20):
        scene = generate_scene(seed, TEXT, "train")
        chars = char_map(scene)
        labels = patch_char_labels(scene, 4)
        expected = np.zeros_like(labels)
        for r in range(labels.shape[0]):
            for c in range(labels.shape[1]):
                block = chars[4 * r : 4 * r + 4, 4 * c : 4 * c + 4].ravel()
                counts = np.bincount(block[block > 0], minlength=CHAR_CLASSES)
                if counts.max() >= 4:  # the most common character covers a quarter of the patch (ties: the first)
                    expected[r, c] = counts.argmax()
        assert np.array_equal(labels, expected)
        assert set(np.unique(labels)) - {0} <= {TEXT_ALPHABET.index(ch) + 1 for ch in scene.text}


def test_a_scene_without_text_has_no_labels_and_bad_input_is_named():
    scene = generate_scene(0, ShapeWorldConfig(text_probability=0.0), "train")
    assert char_map(scene).sum() == 0 and patch_char_labels(scene).sum() == 0
    with pytest.raises(ValueError, match="patch_size 5 does not divide the 32 x 32 px canvas"):
        patch_char_labels(scene, 5)
    with pytest.raises(ValueError, match="patch_size 0 is invalid"):
        patch_char_labels(scene, 0)
    with pytest.raises(ValueError, match="expected a shapeworld.Scene"):
        char_map("abc")


def test_the_tile_data_set_keeps_only_tiles_that_show_text():
    data = ocr_dataset("val", 30)
    tiles, labels = data.tensors
    assert tiles.shape[1:] == (3, 32, 32) and labels.shape[1:] == (64,)
    assert (labels > 0).any(dim=1).all() and labels.max() < CHAR_CLASSES
    assert 30 <= len(data) <= 120  # every scene has text, in 1 to 4 of its tiles
    with pytest.raises(ValueError, match="split"):
        ocr_dataset("nope", 3)


def test_a_probe_of_the_frozen_tower_leaves_it_unchanged_and_bad_input_is_named():
    from mllm_scratch.clip import pretrained_image_tower

    tower = pretrained_image_tower()
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    model, _ = train_reading_tower(ReadingTowerRecipe(scenes=50, steps=5), tower, frozen=True, progress=False, log_every=0)
    assert all(torch.equal(v, model.tower.state_dict()[k]) for k, v in before.items())  # only the head trained
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in before.items())  # and the caller's tower is a copy
    with pytest.raises(ValueError, match="frozen must be True or False, got 'yes'"):
        train_reading_tower(ReadingTowerRecipe(scenes=5, steps=1), frozen="yes")
    with pytest.raises(ValueError, match="tile_size 24 does not divide image_size 64"):
        ReadingTowerRecipe(tile_size=24)
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        ReadingTowerRecipe(steps=0)


def test_a_short_run_teaches_the_head_something():
    recipe = ReadingTowerRecipe(scenes=200, steps=60)
    model, history = train_reading_tower(recipe, progress=False, log_every=0)
    assert history.loss[-1] < 0.5 * history.loss[0]
    assert not model.training
    empty = torch.utils.data.TensorDataset(torch.zeros(2, 3, 32, 32), torch.zeros(2, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="no patch that shows a character"):
        char_accuracy(model, empty)
