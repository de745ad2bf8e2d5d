"""Multimodal LLMs From Scratch: the finished modules the book's chapters build."""

from mllm_scratch.attention import KVCache, MultiHeadAttention, causal_mask, reference_attention
from mllm_scratch.patches import PatchEmbedding, conv_to_linear, linear_to_conv, num_patches, patchify, unpatchify
from mllm_scratch.runtime import (
    choose_device,
    count_parameters,
    seed_everything,
    set_deterministic,
    setup_notebook,
    versions,
)
from mllm_scratch.train import History, TrainConfig, batches, make_optimizer, no_weight_decay, train

__version__ = "0.1.0"

__all__ = [
    "History",
    "KVCache",
    "MultiHeadAttention",
    "TrainConfig",
    "batches",
    "causal_mask",
    "make_optimizer",
    "no_weight_decay",
    "reference_attention",
    "train",
    "PatchEmbedding",
    "choose_device",
    "conv_to_linear",
    "count_parameters",
    "linear_to_conv",
    "num_patches",
    "patchify",
    "seed_everything",
    "set_deterministic",
    "setup_notebook",
    "unpatchify",
    "versions",
]
