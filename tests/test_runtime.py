import random

import numpy as np
import pytest
import torch
from torch import nn

from mllm_scratch import choose_device, count_parameters, seed_everything, setup_notebook


def draw():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_seed_everything_repeats_all_three_generators():
    seed_everything(123)
    a = draw()
    seed_everything(123)
    assert draw() == a
    seed_everything(124)
    assert draw() != a


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_seed_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        seed_everything(bad)


def test_choose_device_defaults_and_override(monkeypatch):
    monkeypatch.delenv("MLLM_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert choose_device().type == expected
    assert choose_device("cpu").type == "cpu"
    monkeypatch.setenv("MLLM_DEVICE", "cpu")
    assert choose_device().type == "cpu"


def test_choose_device_errors(monkeypatch):
    with pytest.raises(ValueError, match="'tpu' is not supported"):
        choose_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cannot use cuda"):
            choose_device("cuda")
        monkeypatch.setenv("MLLM_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match=r"\$MLLM_DEVICE is 'cuda'"):
            choose_device()


def test_count_parameters_counts_shared_weights_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied, as in GPT-2
    model = nn.ModuleList([emb, head])
    assert count_parameters(model) == 40
    emb.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 0


def test_setup_notebook_is_repeatable_and_single_threaded():
    before = torch.get_num_threads()
    try:
        ctx = setup_notebook(seed=7, device="cpu")
        a = torch.randn(4)
        setup_notebook(seed=7, device="cpu")
        assert torch.equal(torch.randn(4), a)
        assert ctx.threads == 1 and torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
        with pytest.raises(ValueError, match="threads must be at least 1"):
            setup_notebook(threads=0)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(before)
