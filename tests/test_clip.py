"""CLIP (chapter 05): the losses against independent computations, the temperature, the towers, the shipped checkpoint."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from mllm_scratch.checkpoints import CheckpointError, manifest_path, sha256_file
from mllm_scratch.clip import (
    CLIP,
    DEFAULT_CHECKPOINT,
    CLIPConfig,
    CLIPHistory,
    CLIPRecipe,
    batch_loss,
    clip_loss,
    pretrain_clip,
    pretrained_clip,
    pretrained_image_tower,
    retrieval_recall,
    siglip_loss,
    tokenize_captions,
    zero_shot_classifier,
)
from mllm_scratch.gpt import GPTConfig
from mllm_scratch.tokenizer import load_tokenizer
from mllm_scratch.train import TrainConfig, batches, make_optimizer, train
from mllm_scratch.vit import ViTConfig, VisionTransformer

TINY = CLIPConfig(
    vision=ViTConfig(image_size=32, patch_size=8, dim=16, depth=1, num_heads=2),
    text=GPTConfig(vocab_size=512, context_length=16, dim=16, depth=1, num_heads=2),
    embed_dim=8,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def random_batch(n: int, seed: int = 0, eot: int = 500):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=g)
    ids = torch.randint(0, 500, (n, 6), generator=g)
    ids[:, 4] = eot
    ids[:, 5] = 501  # padding after <|endoftext|>
    return images, ids


# ---------------------------------------------------------------- losses


def infonce_by_hand(logits: torch.Tensor) -> torch.Tensor:
    """-1/(2N) sum_i [log softmax_row(i)_ii + log softmax_col(i)_ii], written out with explicit sums."""
    logits = logits.double()
    n = logits.shape[0]
    total = 0.0
    for i in range(n):
        row = logits[i, i] - torch.log(torch.exp(logits[i]).sum())
        col = logits[i, i] - torch.log(torch.exp(logits[:, i]).sum())
        total = total - row - col
    return total / (2 * n)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 12), seed=st.integers(0, 10_000), scale=st.floats(0.1, 30.0))
def test_clip_loss_matches_independent_computations(n, seed, scale):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, n, generator=g)
    target = torch.arange(n)
    expected_ce = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(clip_loss(logits), expected_ce)
    torch.testing.assert_close(clip_loss(logits).double(), infonce_by_hand(logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [2, 7, 64])
def test_clip_loss_is_ln_n_for_uninformative_embeddings(n):
    model = CLIP(TINY)
    same = F.normalize(torch.randn(1, TINY.embed_dim), dim=-1).expand(n, -1)  # every image and caption identical
    loss = clip_loss(model.logits(same, same))
    torch.testing.assert_close(loss, torch.tensor(math.log(n)))


def test_batch_of_one_is_rejected():
    with pytest.raises(ValueError, match="at least 2 pairs, got 1"):
        clip_loss(torch.randn(1, 1))
    with pytest.raises(ValueError, match="at least 2 pairs, got 1"):
        siglip_loss(torch.randn(1, 1))
    with pytest.raises(ValueError, match=r"square \(N, N\).*\(3, 4\)"):
        clip_loss(torch.randn(3, 4))


def siglip_by_hand(logits: torch.Tensor) -> torch.Tensor:
    """-1/N sum_ij log sigmoid(z_ij * logit_ij), z = +1 for matches, -1 otherwise, written with log(1 + exp)."""
    logits = logits.double()
    n = logits.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total + torch.log1p(torch.exp(-z * logits[i, j]))
    return total / n


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 10), seed=st.integers(0, 10_000))
def test_siglip_loss_matches_independent_computation(n, seed):
    g = torch.Generator().manual_seed(seed)
    logits = 10 * torch.randn(n, n, generator=g) - 5
    torch.testing.assert_close(siglip_loss(logits).double(), siglip_by_hand(logits), rtol=1e-5, atol=1e-5)
    labels = torch.eye(n)
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / n
    torch.testing.assert_close(siglip_loss(logits), bce)


def test_siglip_initialisation_follows_the_paper():
    model = CLIP(CLIPConfig(vision=TINY.vision, text=TINY.text, embed_dim=8, loss="sigmoid"))
    assert model.logit_scale.item() == pytest.approx(math.log(10))
    assert model.logit_bias.item() == -10.0
    clip = CLIP(TINY)
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert not hasattr(clip, "logit_bias")


# ---------------------------------------------------------------- temperature


def test_temperature_clamp_holds_after_training_steps():
    torch.manual_seed(0)
    model = CLIP(TINY)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1e6))  # far past the cap
    images, ids = random_batch(8)
    config = TrainConfig(steps=3, lr=0.5, warmup_steps=0, log_every=0, progress=False)
    train(model, batches(TensorDataset(images, ids), 4, seed=0), batch_loss, config, device="cpu")
    assert model.scale.item() <= 100.0 + 1e-4
    logits = model(images, ids)  # every forward clamps the stored log scale first
    assert model.logit_scale.item() <= math.log(100.0) + 1e-6
    assert logits.abs().max().item() <= 100.0 + 1e-3  # cosines are in [-1, 1]


def test_record_scale_keeps_training_bit_identical_and_logs_the_temperature():
    images, ids = random_batch(16)
    data = TensorDataset(images, ids)
    recipe = CLIPRecipe(batch_size=4, steps=20, warmup_steps=2, lr=3e-2, model=TINY)
    runs = {}
    for record in (False, True):
        torch.manual_seed(0)
        runs[record] = pretrain_clip(recipe, dataset=data, model=CLIP(TINY), log_every=0, progress=False,
                                     device="cpu", record_every=5, record_scale=record)
    (plain, plain_history), (logged, history) = runs[False], runs[True]
    for a, b in zip(plain.state_dict().values(), logged.state_dict().values()):
        assert torch.equal(a, b)  # reading the temperature changes nothing
    assert type(plain_history).__name__ == "History" and isinstance(history, CLIPHistory)
    assert history.steps == plain_history.steps == [5, 10, 15, 20] and history.loss == plain_history.loss
    assert len(history.scale) == len(history.steps)
    assert history.scale[-1] == pytest.approx(logged.scale.item())  # the scale after the last step
    assert history.scale != [history.scale[0]] * 4  # it is learned: it moved


def test_temperature_is_excluded_from_weight_decay():
    model = CLIP(CLIPConfig(vision=TINY.vision, text=TINY.text, embed_dim=8, loss="sigmoid"))
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.logit_scale) in no_decay and id(model.logit_bias) in no_decay
    assert getattr(model.logit_scale, "_no_weight_decay", False)
    assert id(model.image_proj.weight) in decay and id(model.text_proj.weight) in decay


# ---------------------------------------------------------------- towers


def test_text_tower_pools_at_endoftext_and_ignores_padding(tokenizer):
    torch.manual_seed(0)
    model = CLIP(TINY).eval()
    short = tokenize_captions(["a small red circle."], tokenizer)  # no padding
    padded = tokenize_captions(["a small red circle.", "a large blue square and a small green cross."], tokenizer)
    assert padded.shape[1] > short.shape[1] and padded[0, short.shape[1]] == tokenizer.pad_id
    torch.testing.assert_close(model.encode_text(short)[0], model.encode_text(padded)[0])
    other = padded.clone()
    other[0, short.shape[1]:] = 7  # anything after <|endoftext|> is never seen by it
    torch.testing.assert_close(model.encode_text(other)[0], model.encode_text(padded)[0])
    with pytest.raises(ValueError, match="no <\\|endoftext\\|>"):
        model.encode_text(torch.zeros(1, 4, dtype=torch.long))


def test_embeddings_are_unit_vectors_and_logits_are_scaled_cosines():
    torch.manual_seed(0)
    model = CLIP(TINY)
    images, ids = random_batch(5)
    img, txt = model.encode_image(images), model.encode_text(ids)
    assert img.shape == txt.shape == (5, 8)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(model(images, ids), (1 / 0.07) * img @ txt.T)


def test_a_few_steps_lower_the_loss_below_chance():
    torch.manual_seed(0)
    model = CLIP(TINY)
    images, ids = random_batch(8)
    ids[:, :4] = torch.arange(8)[:, None] * 10 + torch.arange(4)  # 8 distinct captions
    config = TrainConfig(steps=60, lr=1e-2, warmup_steps=0, log_every=0, progress=False)
    history = train(model, batches(TensorDataset(images, ids), 8, seed=0), batch_loss, config, device="cpu")
    assert history.loss[0] > 0.9 * math.log(8) - 0.3
    assert history.loss[-1] < 0.6 * math.log(8)


def test_zero_shot_classifier_and_recall(tokenizer):
    torch.manual_seed(0)
    model = CLIP(TINY)
    clf = zero_shot_classifier(model, ["a small red circle.", ["a small blue square.", "a large blue square."]], tokenizer)
    assert clf.shape == (2, 8)
    torch.testing.assert_close(clf.norm(dim=-1), torch.ones(2))
    emb = F.normalize(torch.randn(6, 4), dim=-1)
    perfect = retrieval_recall(emb, emb)
    assert perfect == {k: 1.0 for k in perfect} and len(perfect) == 4
    shifted = retrieval_recall(emb, emb.roll(1, dims=0), ks=(1,))
    assert shifted["image_to_text_R@1"] <= 1 / 6 + 1e-9
    collapsed = torch.ones(6, 4) / 2  # every image and text embedding the same: nothing is retrieved
    assert retrieval_recall(collapsed, collapsed, ks=(1, 5)) == {k: 0.0 for k in perfect}


def test_config_round_trip_and_errors():
    config = CLIPRecipe().model
    assert CLIPConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="loss must be one of"):
        CLIPConfig(loss="softmax")
    with pytest.raises(ValueError, match="unknown CLIPConfig fields"):
        CLIPConfig.from_dict({**config.to_dict(), "heads": 3})


# ---------------------------------------------------------------- the shipped checkpoint


def test_shipped_checkpoint_loads_with_matching_sha_and_config():
    manifest = json.loads(manifest_path(DEFAULT_CHECKPOINT).read_text())
    assert sha256_file(DEFAULT_CHECKPOINT) == manifest["sha256"]
    assert manifest["config"] == CLIPRecipe().model.to_dict()
    assert manifest["recipe"] == CLIPRecipe().to_dict()
    assert DEFAULT_CHECKPOINT.stat().st_size < 3 * 2**20
    model = pretrained_clip()
    assert model.config == CLIPRecipe().model and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tower = pretrained_image_tower()
    assert isinstance(tower, VisionTransformer)
    out = tower(torch.zeros(2, 3, 32, 32))
    assert out.patches.shape == (2, 64, 48) and out.pooled.shape == (2, 48)
    assert manifest["metrics"]["test_zero_shot_acc"] > 0.4


def test_mismatched_config_or_corrupt_file_fails_clearly(tmp_path: Path):
    copy = tmp_path / "clip.pt"
    shutil.copy(DEFAULT_CHECKPOINT, copy)
    shutil.copy(manifest_path(DEFAULT_CHECKPOINT), manifest_path(copy))
    wrong = CLIPConfig(embed_dim=32)
    with pytest.raises(CheckpointError, match="embed_dim: 64 in the file, 32 expected"):
        pretrained_clip(copy, config=wrong)
    assert pretrained_clip(copy).config == CLIPRecipe().model  # its own config: fine
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256.*build_checkpoints.py clip"):
        pretrained_clip(copy)


# ----------------------------------------------------------------------------------
# The dense head and the book's image tower


def test_patch_labels_name_the_object_under_each_patch_centre():
    from mllm_scratch.shapeworld import COLOURS, SHAPES, Scene, ShapeObject, patch_labels

    # A small red circle whose box covers pixels 8..15 both ways: patch centres 10 and 14 fall inside.
    scene = Scene((ShapeObject("circle", "red", "small", 8, 8, 8), ShapeObject("cross", "blue", "large", 20, 0, 12)), None, 32)
    labels = patch_labels(scene)
    assert labels.shape == (2, 8, 8)
    assert (labels[0, 2:4, 2:4] == SHAPES.index("circle") + 1).all() and (labels[1, 2:4, 2:4] == COLOURS.index("red") + 1).all()
    # the cross's box is x 20..31, y 0..11: columns 5-7, rows 0-2
    assert (labels[0, 0:3, 5:8] == SHAPES.index("cross") + 1).all()
    assert int((labels[0] > 0).sum()) == 4 + 9 and ((labels[0] > 0) == (labels[1] > 0)).all()
    with pytest.raises(ValueError, match="patch_size 5 does not divide the 32 px canvas"):
        patch_labels(scene, 5)


def test_caption_dataset_scene_is_the_scene_of_the_item():
    from mllm_scratch.shapeworld import CaptionDataset, caption, render, to_tensor

    data = CaptionDataset("val", 5)
    for i in range(5):
        image, text = data[i]
        assert text == caption(data.scene(i)) and torch.equal(image, to_tensor(render(data.scene(i))))
    with pytest.raises(IndexError):
        data.scene(5)


def test_batch_loss_without_labels_is_the_contrastive_loss_and_labels_add_the_weighted_dense_loss():
    from mllm_scratch.clip import dense_loss

    torch.manual_seed(0)
    plain = CLIP(TINY)
    dense = CLIP(CLIPConfig(**{**TINY.to_dict(), "dense_weight": 3.0}))
    dense.load_state_dict({**dense.state_dict(), **plain.state_dict()})
    images, ids = torch.rand(4, 3, 32, 32), torch.full((4, 5), 500)
    labels = torch.randint(0, 6, (4, 2, 4, 4))
    expected = clip_loss(plain(images, ids))
    torch.testing.assert_close(batch_loss(plain, (images, ids)), expected)
    torch.testing.assert_close(batch_loss(dense, (images, ids)), expected)
    with_dense = batch_loss(dense, (images, ids, labels))
    torch.testing.assert_close(with_dense, expected + 3.0 * dense_loss(dense, dense.vision(images).patches, labels))
    # the dense loss is the mean of the two heads' cross-entropies, computed here independently
    shape_logits, colour_logits = dense.patch_logits(dense.vision(images).patches)
    flat = labels.flatten(2)
    manual = (F.cross_entropy(shape_logits.reshape(-1, 6), flat[:, 0].reshape(-1))
              + F.cross_entropy(colour_logits.reshape(-1, 7), flat[:, 1].reshape(-1))) / 2
    torch.testing.assert_close(dense_loss(dense, dense.vision(images).patches, labels), manual)
    with pytest.raises(ValueError, match=r"labels of shape \(4, 2, 3, 3\) do not fit 16 patches"):
        dense_loss(dense, dense.vision(images).patches, labels[:, :, :3, :3])
    with pytest.raises(ValueError, match="no dense head"):
        plain.patch_logits(plain.vision(images).patches)
    with pytest.raises(ValueError, match="dense_weight must be a number >= 0, got -1"):
        CLIPConfig(dense_weight=-1)


def test_infonce_never_reaches_the_final_patch_vectors_of_a_cls_tower():
    # With [CLS] pooling the loss reads only token 0 of the last block's output, so the patch
    # vectors there (the ones the VLMs read) get exactly zero gradient from it, while [CLS] gets some:
    # the reason the book's tower adds a dense head.
    torch.manual_seed(0)
    model = CLIP(TINY)
    outputs = []
    model.vision.blocks[-1].register_forward_hook(lambda module, args, out: outputs.append(out) or out.retain_grad())
    batch_loss(model, (torch.rand(4, 3, 32, 32), torch.full((4, 5), 500))).backward()
    grad = outputs[0].grad  # (4, 1 + 16, dim)
    assert torch.count_nonzero(grad[:, 1:]) == 0 and torch.count_nonzero(grad[:, 0]) > 0


def test_tower_from_clip_keeps_the_clip_and_adds_a_fresh_head():
    from mllm_scratch.clip import tower_from_clip

    torch.manual_seed(0)
    clip = CLIP(TINY)
    tower = tower_from_clip(clip, 2.0)
    assert tower.config.dense_weight == 2.0 and hasattr(tower, "patch_head")
    for name, value in clip.state_dict().items():
        assert torch.equal(tower.state_dict()[name], value), name


def test_shipped_tower_reads_shape_and_colour_per_patch():
    from mllm_scratch.clip import TOWER_CHECKPOINT, TowerRecipe, pretrained_tower

    tower = pretrained_tower()
    manifest = json.loads(manifest_path(TOWER_CHECKPOINT).read_text())
    assert manifest["recipe"] == TowerRecipe().to_dict() and tower.config == TowerRecipe().model_config()
    assert manifest["metrics"]["test_patch_shape_acc"] > 0.95 and manifest["metrics"]["test_patch_colour_acc"] > 0.95
    # the VLM chapters' tower is this checkpoint's ViT
    image = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(pretrained_image_tower()(image).patches, tower.vision(image).patches)
