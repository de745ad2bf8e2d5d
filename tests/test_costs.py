"""Cost accounting for chapter 08: FLOPs counted by hand equal FlopCounterMode's, and the memory measures see what they claim."""

import pytest
import torch

from mllm_scratch.costs import (
    Shapes,
    activation_bytes,
    block_flops,
    cost_batch,
    cost_models,
    counted_flops,
    method_flops,
    peak_bytes,
    tower_flops,
)
from mllm_scratch.gpt import GPTConfig
from mllm_scratch.hybrid import METHODS, method_loss
from mllm_scratch.vit import TransformerBlock, ViTConfig, VisionTransformer

SMALL = Shapes(vision=ViTConfig(image_size=16, patch_size=4, dim=16, depth=2, num_heads=2),
               lm=GPTConfig(context_length=40, dim=32, depth=2, num_heads=2), thumbnail_grid=2)


def test_block_flops_match_the_counter():
    block = TransformerBlock(24, 4)
    x = torch.randn(3, 11, 24)
    assert counted_flops(lambda: block(x)) == 3 * block_flops(11, 24, 96)
    assert counted_flops(lambda: block(x, causal=True)) == 3 * block_flops(11, 24, 96)  # the count ignores causality


def test_tower_flops_match_the_counter():
    tower = VisionTransformer(SMALL.vision)
    assert counted_flops(lambda: tower(torch.rand(2, 3, 16, 16))) == 2 * tower_flops(SMALL.vision)


@pytest.mark.parametrize("shapes", [SMALL, Shapes(vision=SMALL.vision, lm=SMALL.lm, every=2, thumbnail_grid=1),
                                    Shapes(vision=ViTConfig(image_size=32, patch_size=8, dim=16, depth=1, num_heads=2),
                                           lm=GPTConfig(context_length=40, dim=32, depth=3, num_heads=4))])
def test_method_flops_match_the_counter(shapes):
    models = cost_models(shapes)
    for method in METHODS:
        batch = cost_batch(method, shapes, 2, text_tokens=7)
        model = models[method].eval()
        with torch.no_grad():
            counted = counted_flops(lambda: model(batch.ids, batch.images))
        assert counted == 2 * method_flops(method, shapes, 7)["total"], method


def test_sequence_lengths_and_what_grows():
    small, big = SMALL, Shapes(vision=ViTConfig(image_size=64, patch_size=4, dim=16, depth=2, num_heads=2), lm=SMALL.lm,
                               thumbnail_grid=2)
    assert [small.sequence_length(m, 10) for m in METHODS] == [16 + 10, 1 + 10, 4 + 10]
    assert [big.sequence_length(m, 10) for m in METHODS] == [256 + 10, 1 + 10, 4 + 10]
    with pytest.raises(ValueError, match="method must be one of"):
        small.sequence_length("fuyu", 10)
    # A's LM work grows with the image; B's and H's LM self-attention does not
    assert method_flops("unified", big, 10)["lm"] > 10 * method_flops("unified", small, 10)["lm"]
    for m in ("cross", "hybrid"):
        assert method_flops(m, big, 10)["lm"] == method_flops(m, small, 10)["lm"]


def test_activation_bytes_count_saved_tensors_once_and_skip_parameters():
    layer = torch.nn.Linear(256, 256, bias=False)
    x = torch.randn(64, 256, requires_grad=True)
    # Linear saves its input (64 x 256 floats; the weight is a parameter); relu saves its output (64 x 256)
    got = activation_bytes(lambda: torch.relu(layer(x)).sum(), layer)
    assert got == 2 * 64 * 256 * 4


def test_activation_bytes_grow_with_image_tokens_for_a_much_faster():
    big = Shapes(vision=ViTConfig(image_size=32, patch_size=4, dim=16, depth=2, num_heads=2),
                 lm=GPTConfig(context_length=80, dim=32, depth=2, num_heads=2), thumbnail_grid=2)
    grow = {}
    for method in METHODS:
        sizes = []
        for shapes in (SMALL, big):
            model = cost_models(shapes)[method]
            batch = cost_batch(method, shapes, 2)
            sizes.append(activation_bytes(lambda: method_loss(model, batch), model))
        grow[method] = sizes[1] / sizes[0]
    assert grow["unified"] > grow["cross"] and grow["unified"] > grow["hybrid"]


def test_peak_bytes_sees_a_large_temporary():
    def fn():
        x = torch.ones(1024, 1024)  # 4 MiB, freed when fn returns
        return float(x.sum())

    assert peak_bytes(fn) >= 4 * 2**20
