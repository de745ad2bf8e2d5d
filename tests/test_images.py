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


def test_an_upscaled_scene_reads_back_exactly(tmp_path):
    from mllm_scratch.images import save_image
    from mllm_scratch.shapeworld import generate_scene, render, to_tensor

    pixels = render(generate_scene(1))  # (32, 32, 3)
    path = save_image(pixels, tmp_path / "scene.png", size=256)
    assert Image.open(path).size == (256, 256)
    assert torch.equal(load_image(path, 32), to_tensor(pixels))  # whole-number factor: a block average, exact
    assert load_image(path, 48).shape == (3, 48, 48)  # any other size: bicubic
    with pytest.raises(ValueError, match="size 16 is smaller than the image"):
        save_image(pixels, tmp_path / "small.png", size=16)


def test_gif_round_trip_keeps_every_frame_even_repeated_ones(tmp_path):
    from mllm_scratch.images import load_frames, save_gif

    rng = np.random.default_rng(0)
    frames = rng.choice([0, 128, 255], size=(5, 8, 8, 3)).astype(np.uint8)
    frames[2] = frames[1]  # Pillow merges a repeated frame into one shown twice as long
    frames[3] = frames[1]
    for size in (None, 32):
        path = save_gif(frames, tmp_path / "clip.gif", size=size)
        back = load_frames(path, 8)
        assert back.shape == (5, 3, 8, 8)
        assert torch.equal(back, torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255)
    many = rng.integers(0, 256, size=(2, 20, 20, 3), dtype=np.uint8)  # 800 colours
    with pytest.raises(ValueError, match="colours: a GIF holds at most 256"):
        save_gif(many, tmp_path / "many.gif")


def test_a_folder_of_frames_in_natural_order(tmp_path):
    from mllm_scratch.images import frame_files, load_frames

    for t in (10, 2, 1):  # frame_2 comes before frame_10, though "10" < "2" as text
        Image.fromarray(np.full((4, 6, 3), t, dtype=np.uint8)).save(tmp_path / f"frame_{t}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / ".hidden.png").write_text("skipped")
    assert [p.name for p in frame_files(tmp_path)] == ["frame_1.png", "frame_2.png", "frame_10.png"]
    frames = load_frames(tmp_path)
    assert frames.shape == (3, 3, 4, 6) and [round(v * 255) for v in frames[:, 0, 0, 0].tolist()] == [1, 2, 10]
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / "frame_11.png")
    with pytest.raises(ValueError, match="differ in size"):
        load_frames(tmp_path)
    assert load_frames(tmp_path, 4).shape == (4, 3, 4, 4)


def test_frame_errors_name_the_file(tmp_path):
    from mllm_scratch.images import load_frames

    with pytest.raises(FileNotFoundError, match="expected an animated GIF or a folder of frames"):
        load_frames(tmp_path / "none.gif")
    with pytest.raises(ValueError, match="holds no frames"):
        load_frames(tmp_path)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"frame '.*b\.png' cannot be read"):
        load_frames(tmp_path)
