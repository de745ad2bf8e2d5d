import numpy as np
import pytest
import torch
from PIL import Image

from mllm_scratch.images import load_image, sample_photo


def test_load_resizes_and_converts_any_mode(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((10, 20), 128, dtype=np.uint8), mode="L").save(grey)
    img = load_image(grey, size=(8, 16))
    assert img.shape == (3, 8, 16) and img.dtype == torch.float32
    assert torch.allclose(img, torch.full_like(img, 128 / 255))
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.zeros((5, 5, 4), dtype=np.uint8), mode="RGBA").save(rgba)
    assert load_image(rgba).shape == (3, 5, 5)


def test_sample_photo_is_offline_and_in_range():
    photo = sample_photo(64)
    assert photo.shape == (3, 64, 64)
    assert 0.0 <= photo.min() and photo.max() <= 1.0 and photo.std() > 0.05


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not an image file Pillow can read"):
        load_image(bad)
