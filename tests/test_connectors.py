"""Connectors: pixel shuffle equal to a hand-written loop, token counts as promised, clear errors."""

import pytest
import torch

from mllm_scratch.connectors import KINDS, connector_tokens, grid_of, make_connector, pixel_shuffle, pixel_unshuffle


def pixel_shuffle_by_hand(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Loop over output tokens: concatenate the factor x factor block of patches, row-major within the block."""
    b, n, d = x.shape
    side = int(n**0.5)
    out = []
    for i in range(side // factor):
        for j in range(side // factor):
            block = [x[:, (i * factor + di) * side + (j * factor + dj)] for di in range(factor) for dj in range(factor)]
            out.append(torch.cat(block, dim=-1))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("side, factor", [(8, 2), (8, 4), (6, 3), (4, 1)])
def test_pixel_shuffle_equals_the_loop_and_round_trips(side, factor):
    x = torch.randn(2, side * side, 5)
    y = pixel_shuffle(x, factor)
    assert torch.equal(y, pixel_shuffle_by_hand(x, factor))
    assert y.shape == (2, (side // factor) ** 2, 5 * factor * factor)
    assert torch.equal(pixel_unshuffle(y, factor), x)


def test_pixel_shuffle_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="60 patch vectors do not form a square grid"):
        pixel_shuffle(torch.randn(1, 60, 4))
    with pytest.raises(ValueError, match="8 x 8 grid does not split into 3 x 3 blocks"):
        pixel_shuffle(torch.randn(1, 64, 4), 3)
    with pytest.raises(ValueError, match="factor 0 is invalid"):
        pixel_shuffle(torch.randn(1, 64, 4), 0)
    with pytest.raises(ValueError, match=r"\(batch, tokens, dim\)"):
        pixel_shuffle(torch.randn(64, 4))
    assert grid_of(64) == 8


@pytest.mark.parametrize("kind", KINDS)
def test_each_connector_gives_the_tokens_it_promises(kind):
    torch.manual_seed(0)
    connector = make_connector(kind, 48, 32)
    out = connector(torch.randn(3, 64, 48))
    assert out.shape == (3, connector_tokens(kind, 8), 32)
    out.sum().backward()  # every weight gets a gradient
    assert all(p.grad is not None for p in connector.parameters())


def test_the_token_budget_and_unknown_kinds():
    assert [connector_tokens(k, 8) for k in KINDS] == [64, 64, 16, 16, 16, 16]
    assert connector_tokens("pixelshuffle", 8, factor=4) == 4 and connector_tokens("queries", 8, num_queries=8) == 8
    with pytest.raises(ValueError, match="connector kind 'qformer' is unknown"):
        make_connector("qformer", 48, 32)
    with pytest.raises(ValueError, match="8 x 8 grid does not split into 3 x 3"):
        connector_tokens("avgpool", 8, factor=3)
    with pytest.raises(ValueError, match="cannot pool to 16 x 16"):
        make_connector("cabstractor", 48, 32, out_grid=16)(torch.randn(1, 64, 48))
