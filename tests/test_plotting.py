"""The shared figures: galleries mark each answer right or wrong, and refuse mismatched lists."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mllm_scratch.plotting import show_clip_gallery, show_gallery  # noqa: E402


def test_gallery_titles_say_answer_truth_and_verdict():
    images = [torch.rand(3, 32, 32) for _ in range(5)]
    fig = show_gallery(images, ["q"] * 5, ["red", "blue", "", "two", "yes"], ["red", "red", "red", "two", "no"], cols=3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 5 and len(fig.axes) == 6  # 2 rows x 3 columns, the spare one blank
    assert titles[0].endswith("model: red ✓\ntruth: red")
    assert "model: blue ✗" in titles[1] and "model: (nothing) ✗" in titles[2]
    plt.close(fig)


def test_a_grounded_reply_is_judged_by_its_final_answer_and_wrapped():
    reply = "purple diamond 6 yellow triangle 2 yes"
    fig = show_gallery([torch.rand(3, 32, 32)] * 2, ["is the purple diamond right of the yellow triangle?"] * 2,
                       [reply, reply.replace(" yes", " no")], ["yes", "yes"], cols=2)
    right, wrong = (ax.get_title() for ax in fig.axes)
    assert right.endswith("✓\ntruth: yes") and wrong.endswith("✗\ntruth: yes")
    assert all(len(line) <= 30 for line in right.splitlines())  # the long reply is wrapped to fit its panel
    plt.close(fig)


def test_clip_gallery_shows_a_strip_per_clip():
    clips = [torch.rand(8, 3, 32, 32) for _ in range(2)]
    fig = show_clip_gallery(clips, ["which way?", "which shape moves?"], ["left", "circle"], ["left", "square"], frames=4)
    assert len(fig.axes) == 2 * 5
    labels = [ax.get_xlabel() for ax in fig.axes[:4]]
    assert labels == ["t=0", "t=2", "t=5", "t=7"]  # evenly spaced over 8 frames, first and last included
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("model: circle ✗" in t and "truth: square" in t for t in texts)
    plt.close(fig)


def test_galleries_refuse_mismatched_lists():
    with pytest.raises(ValueError, match="2 images, 1 questions"):
        show_gallery([torch.rand(3, 8, 8)] * 2, ["q"], ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match=r"clip must have shape \(frames"):
        show_clip_gallery([torch.rand(3, 8, 8)], ["q"], ["a"], ["a"])
