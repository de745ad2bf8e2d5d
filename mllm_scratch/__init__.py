"""Multimodal LLMs From Scratch: the finished modules the book's chapters build."""

from mllm_scratch.attention import KVCache, MultiHeadAttention, causal_mask, reference_attention
from mllm_scratch.checkpoints import CheckpointError
from mllm_scratch.gpt import GPT, GPTConfig, PretrainRecipe, generate, lm_loss, pretrain_gpt, pretrained_gpt
from mllm_scratch.images import load_image, sample_photo
from mllm_scratch.patches import PatchEmbedding, conv_to_linear, linear_to_conv, num_patches, patchify, unpatchify
from mllm_scratch.runtime import (
    choose_device,
    count_parameters,
    seed_everything,
    set_deterministic,
    setup_notebook,
    versions,
)
from mllm_scratch.shapeworld import (
    CaptionDataset,
    ShapeClassificationDataset,
    ShapeWorldConfig,
    TextDataset,
    VideoQADataset,
    VQADataset,
    caption,
    generate_clip,
    generate_scene,
    render,
    render_clip,
    to_tensor,
)
from mllm_scratch.text import PackedTextDataset, pack_texts, perplexity, unigram_cross_entropy
from mllm_scratch.tokenizer import Tokenizer, load_tokenizer
from mllm_scratch.train import History, TrainConfig, batches, make_optimizer, no_weight_decay, train

from mllm_scratch.vit import (
    TransformerBlock,
    ViTClassifier,
    ViTConfig,
    VisionTransformer,
    load_vit,
    save_vit,
    sincos_2d_position_embedding,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "GPT",
    "GPTConfig",
    "PackedTextDataset",
    "PretrainRecipe",
    "TransformerBlock",
    "ViTClassifier",
    "ViTConfig",
    "VisionTransformer",
    "generate",
    "lm_loss",
    "load_vit",
    "pack_texts",
    "perplexity",
    "pretrain_gpt",
    "pretrained_gpt",
    "save_vit",
    "sincos_2d_position_embedding",
    "unigram_cross_entropy",
    "CaptionDataset",
    "ShapeClassificationDataset",
    "ShapeWorldConfig",
    "TextDataset",
    "Tokenizer",
    "VQADataset",
    "VideoQADataset",
    "caption",
    "generate_clip",
    "generate_scene",
    "load_image",
    "load_tokenizer",
    "render",
    "render_clip",
    "sample_photo",
    "to_tensor",
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
