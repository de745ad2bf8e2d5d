"""Video plumbing: frame sampling, collation, the video encoder, both decoders, feature caching."""

import random

import pytest
import torch

from mllm_scratch.gpt import GPT, GPTConfig
from mllm_scratch.perceiver import PerceiverResampler, ResamplerConfig
from mllm_scratch.tokenizer import load_tokenizer
from mllm_scratch.video import (
    AnswerReadout,
    FeatureEncoder,
    FeatureQA,
    VideoFacts,
    pretrain_resampler,
    question_skill,
    readout_accuracy,
    train_video_model,
    trained_parts,
    with_motion,
    VideoCollator,
    VideoEncoder,
    VideoRecipe,
    _feature_view,
    answer_options,
    build_video_model,
    chance_accuracy,
    direction_features,
    direction_probe,
    pad_clips,
    sample_frames,
    video_data,
    video_loss,
)
from mllm_scratch.vit import ViTConfig, VisionTransformer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tower = VisionTransformer(ViTConfig(dim=16, depth=1, num_heads=2)).eval()
    lm = GPT(GPTConfig(dim=32, depth=2, num_heads=2, context_length=64)).eval()
    return tower, lm


def tiny_recipe(**kw) -> VideoRecipe:
    return VideoRecipe(**{"num_latents": 4, "dim": 16, "depth": 1, "train_clips": 8, "batch_size": 4, **kw})


def test_sample_frames_even_and_inclusive():
    assert sample_frames(16, 8) == [0, 2, 4, 6, 9, 11, 13, 15]
    assert sample_frames(16, 16) == list(range(16))
    assert sample_frames(16, 1) == [7]
    rng = random.Random(0)
    for _ in range(100):
        total = rng.randint(1, 200)
        n = rng.randint(1, total)
        idx = sample_frames(total, n)
        assert len(idx) == n and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < total
        if n > 1:
            assert idx[0] == 0 and idx[-1] == total - 1


@pytest.mark.parametrize("total,n", [(8, 9), (8, 0), (0, 1)])
def test_sample_frames_errors(total, n):
    with pytest.raises(ValueError):
        sample_frames(total, n)


def test_video_data_subsamples():
    data = video_data("test", 4, VideoRecipe(source_frames=16, frames=8))
    frames, question, answer, skill = data[0]
    assert frames.shape == (8, 3, 32, 32)
    full = data.dataset[0][0]
    torch.testing.assert_close(frames, full[sample_frames(16, 8)])


def test_pad_clips():
    clips = [torch.rand(3, 3, 4, 4), torch.rand(5, 3, 4, 4)]
    frames, mask = pad_clips(clips)
    assert frames.shape == (2, 5, 3, 4, 4)
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert frames[0, 3:].abs().sum() == 0


def test_collator(tok):
    items = [(torch.rand(4, 3, 32, 32), "which shape moves?", "circle", "mover"),
             (torch.rand(6, 3, 32, 32), "how many objects appear after the first frame?", "one", "appearing")]
    for n in (1, 5):
        batch = VideoCollator(tok, media_tokens=n)(items)
        assert batch.images.shape == (2, 6, 3, 32, 32)
        assert (batch.ids == tok.video_id).sum(1).tolist() == [n, n]
        scored = [tok.decode([t for t in row.tolist() if t != -100]) for row in batch.labels]
        assert scored == [" circle<|endoftext|>", " one<|endoftext|>"]
        assert batch.frame_mask.sum(1).tolist() == [4, 6]


def test_encoder_shapes_for_any_frame_count(parts):
    tower, _ = parts
    torch.manual_seed(0)
    enc = VideoEncoder(tower, PerceiverResampler(ResamplerConfig(media_dim=16, dim=8, num_latents=3, depth=1, num_heads=2)))
    rng = random.Random(0)
    with torch.no_grad():
        for _ in range(6):
            b, t = rng.randint(1, 3), rng.randint(1, 12)
            assert enc(torch.rand(b, t, 3, 32, 32)).shape == (b, 3, 8)
    with pytest.raises(ValueError, match="frames must have shape"):
        enc(torch.rand(2, 3, 32, 32))


@pytest.mark.parametrize("decoder", ["xattn", "unified"])
def test_both_decoders_train_and_generate(tok, parts, decoder):
    tower, lm = parts
    recipe = tiny_recipe(decoder=decoder)
    model = build_video_model(recipe, tok, tower=tower, lm=lm)
    assert not any(p.requires_grad for p in model.parameters())
    data = video_data("train", 4, recipe)
    batch = VideoCollator(tok, 1 if decoder == "xattn" else recipe.num_latents)([data[i] for i in range(4)])
    loss = video_loss(model, batch)
    assert torch.isfinite(loss)
    answers = model.generate(tok, batch.images, [data[i][1] for i in range(4)], max_new_tokens=2)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("decoder", ["xattn", "unified"])
def test_feature_view_equals_frames(tok, parts, decoder):
    tower, lm = parts
    recipe = tiny_recipe(decoder=decoder)
    model = build_video_model(recipe, tok, tower=tower, lm=lm)
    with torch.no_grad():
        for p in model.parameters():  # open the gates so the video matters
            p.add_(0.1 * torch.randn_like(p))
    data = video_data("train", 4, recipe)
    collate = VideoCollator(tok, 1 if decoder == "xattn" else recipe.num_latents)
    by_frames = video_loss(model, collate([data[i] for i in range(4)]))
    by_features = video_loss(_feature_view(model), collate([FeatureQA(data, model.encoder)[i] for i in range(4)]))
    torch.testing.assert_close(by_features, by_frames)


def test_answer_options_and_chance():
    assert answer_options("which way does the red circle move first?") == 4
    assert answer_options("which appears first, the red circle or the blue square?") == 2
    with pytest.raises(ValueError):
        answer_options("what is this?")
    chance = chance_accuracy(video_data("test", 40, VideoRecipe()))
    assert chance["direction"] == 0.25 and chance["order"] == 0.5 and chance["appearing"] == pytest.approx(1 / 3)


def test_recipe_validation():
    with pytest.raises(ValueError):
        VideoRecipe(decoder="fuyu")
    with pytest.raises(ValueError):
        VideoRecipe(frames=17, source_frames=16)


def test_feature_view_shares_modules(tok, parts):
    tower, lm = parts
    model = build_video_model(tiny_recipe(), tok, tower=tower, lm=lm)
    view = _feature_view(model)
    assert view.xattn is model.xattn and view.encoder.encoder is model.encoder and view.lm is model.lm
    assert isinstance(view.encoder, FeatureEncoder)


def test_with_motion():
    x = torch.randn(2, 4, 3, 5)
    m = with_motion(x)
    assert m.shape == (2, 4, 3, 10)
    torch.testing.assert_close(m[..., :5], x)
    assert m[:, 0, :, 5:].abs().max() == 0  # frame 0 has no previous frame
    torch.testing.assert_close(m[:, 1:, :, 5:], x[:, 1:] - x[:, :-1])
    # Padding at the end never changes a real frame's vectors.
    padded = torch.cat([x, torch.full((2, 2, 3, 5), 9.0)], dim=1)
    torch.testing.assert_close(with_motion(padded)[:, :4], m)


def test_motion_encoder_masked_padding_equals_unpadded(parts):
    tower, _ = parts
    torch.manual_seed(0)
    config = ResamplerConfig(media_dim=32, dim=16, num_latents=3, depth=1, num_heads=2, spatial_pos=True)
    enc = VideoEncoder(tower, PerceiverResampler(config), motion=True).eval()
    clip = torch.rand(1, 5, 3, 32, 32)
    padded, mask = pad_clips([clip[0], torch.rand(7, 3, 32, 32)])
    with torch.no_grad():
        torch.testing.assert_close(enc(padded, mask)[:1], enc(clip), rtol=1e-5, atol=1e-5)


def test_recipe_resampler_width_follows_motion():
    assert VideoRecipe(motion=True).resampler_config(48).media_dim == 96
    assert VideoRecipe(motion=False).resampler_config(48).media_dim == 48
    assert VideoRecipe().stage1_key() == VideoRecipe(decoder="unified", steps=5, lr=0.1).stage1_key()
    assert VideoRecipe().stage1_key() != VideoRecipe(frames=1).stage1_key()


def test_video_facts_match_video_data():
    recipe = VideoRecipe(source_frames=8, frames=4)
    facts, qa = VideoFacts("test", 6, recipe), video_data("test", 6, recipe)
    for i in range(6):
        frames, questions, answers = facts[i]
        assert frames.shape == (4, 3, 32, 32) and len(questions) == len(answers) >= 3
        assert {question_skill(q) for q in questions} >= {"direction", "mover", "appearing"}
    # Item 0 asks about skill "direction", whose clip is the first drawn from seed 0: the same clip.
    torch.testing.assert_close(facts[0][0], qa[0][0])
    assert qa[0][2] == facts[0][2][facts[0][1].index(qa[0][1])]
    with pytest.raises(IndexError):
        facts[6]


def test_answer_readout_allows_only_the_questions_answers():
    pairs = [("which way does the red circle move first?", "left"), ("which way does the blue square move first?", "up"),
             ("which shape moves?", "circle"), ("how many objects appear after the first frame?", "one")]
    readout = AnswerReadout.for_pairs(8, pairs)
    assert readout.answers == ["circle", "left", "one", "up"]
    template, answer = readout.targets([q for q, _ in pairs], [a for _, a in pairs])
    logits = readout(torch.randn(4, 3, 8), template)
    allowed = torch.isfinite(logits)
    assert allowed.tolist()[0] == [False, True, False, True]  # a direction question: left or up only
    assert allowed.tolist()[2] == [True, False, False, False]
    assert (logits.argmax(-1) == answer)[2:].all()  # one allowed answer: always right


def test_stage_one_trains_the_resampler_and_its_loss_falls(parts):
    tower, lm = parts
    recipe = tiny_recipe(frames=4, batch_size=8, readout_lr=3e-3)
    tok = load_tokenizer()
    model = build_video_model(recipe, tok, tower=tower, lm=lm)
    facts = FeatureQA(VideoFacts("train", 16, recipe), model.encoder)
    before = {k: v.clone() for k, v in model.encoder.resampler.state_dict().items()}
    history, readout = pretrain_resampler(model.encoder, facts, recipe, steps=40, log_every=0, progress=False)
    assert history.loss[-1] < history.loss[0]
    assert any(not torch.equal(v, before[k]) for k, v in model.encoder.resampler.state_dict().items())
    assert not any(p.requires_grad for p in model.encoder.resampler.parameters())
    acc = readout_accuracy(model.encoder, readout, facts)
    assert set(acc) >= {"direction", "mover", "appearing", "all"} and 0 <= acc["all"] <= 1


def test_train_video_model_runs_both_stages(tok, parts):
    tower, lm = parts
    recipe = tiny_recipe(frames=2)
    model = build_video_model(recipe, tok, tower=tower, lm=lm)
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    out = train_video_model(model, recipe, tok, steps=3, readout_steps=3, log_every=0, progress=False,
                            cache_features=True)
    assert len(out["readout"].loss) >= 1 and len(out["decoder"].loss) >= 1
    assert all(torch.equal(v, lm_before[k]) for k, v in model.lm.state_dict().items())
    assert train_video_model(model, recipe, tok, steps=2, readout_steps=0, log_every=0, progress=False)["readout"] is None


def test_question_skill():
    assert question_skill("what colour is the moving object?") == "mover"
    assert question_skill("which appears first, the red circle or the blue square?") == "order"
    with pytest.raises(ValueError):
        question_skill("what is this?")


def test_train_lm_tunes_a_copy_of_the_lm(tok, parts):
    tower, lm = parts
    shared = {k: v.clone() for k, v in lm.state_dict().items()}
    recipe = tiny_recipe(decoder="unified", train_lm=True, frames=2)
    model = build_video_model(recipe, tok, tower=tower, lm=lm)
    assert model.lm is not lm
    assert set(trained_parts(model, True)) == {"resampler", "connector", "lm"}
    assert set(trained_parts(model)) == {"resampler", "connector"}
    train_video_model(model, recipe, tok, steps=3, readout_steps=0, log_every=0, progress=False)
    assert any(not torch.equal(v, shared[k]) for k, v in model.lm.state_dict().items())  # the copy trained
    assert all(torch.equal(v, shared[k]) for k, v in lm.state_dict().items())  # the shared LM did not
    assert VideoRecipe(train_lm=True).stage1_key() == VideoRecipe().stage1_key()


def test_direction_probe_features_curve_and_errors(parts):
    """Features of direction clips, and a probe whose curve is reproducible from its seed and that learns a planted signal."""
    tower, _ = parts
    feats, labels = direction_features(tower, "train", 6)
    assert feats.shape == (6, 2, 64, 16) and labels.shape == (6,) and set(labels.tolist()) <= {0, 1, 2, 3}
    torch.manual_seed(0)
    x = torch.randn(64, 2, 4, 8)
    y = torch.arange(64) % 4
    x[torch.arange(64), 1, 0, y] += 3.0  # the label, planted in frame 1's first patch
    recipe = tiny_recipe()
    curve = direction_probe((x, y), (x, y), spatial_pos=True, motion=True, steps=60, lr=1e-2, seed=3, eval_every=20,
                            recipe=recipe)
    assert list(curve) == [20, 40, 60] and curve[60] > 0.5
    again = direction_probe((x, y), (x, y), spatial_pos=True, motion=True, steps=60, lr=1e-2, seed=3, eval_every=20,
                            recipe=recipe)
    assert again == curve
    with pytest.raises(ValueError, match="frames among 0..7, got n=2, frames=\\[0, 8\\]"):
        direction_features(tower, "train", 2, frames=(0, 8))
    with pytest.raises(ValueError, match="steps, batch_size and eval_every must be positive, got 0"):
        direction_probe((x, y), (x, y), spatial_pos=False, motion=False, steps=0)


def test_round_to_stored_matches_the_float16_file(parts, tmp_path):
    """The model `build_checkpoint` scores is the model the float16 file holds."""
    from mllm_scratch.checkpoints import load_checkpoint, save_checkpoint
    from mllm_scratch.video import STORED_DTYPE, round_to_stored

    tower, lm = parts
    model = build_video_model(tiny_recipe(), load_tokenizer(), tower=tower, lm=lm)
    part = trained_parts(model)
    before = {k: v.clone() for k, v in part.state_dict().items()}
    round_to_stored(part)
    for k, v in part.state_dict().items():
        torch.testing.assert_close(v, before[k].to(STORED_DTYPE).float(), rtol=0, atol=0)
    save_checkpoint(tmp_path / "v.pt", part, {}, name="v", dtype=STORED_DTYPE)
    _, state_dict, _ = load_checkpoint(tmp_path / "v.pt")
    for k, v in part.state_dict().items():
        assert torch.equal(state_dict[k].float(), v), k
