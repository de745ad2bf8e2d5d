"""Language-modelling data: many short texts -> one token stream -> fixed-length windows.

Pretraining does not pad. Every text is tokenized and followed by <|endoftext|>, the
texts are concatenated into one long stream, and the stream is cut into windows of
`seq_len + 1` tokens that overlap by one: the input is a window's first `seq_len`
tokens and the target the same window shifted left by one, so every token of the
stream is predicted exactly once (GPT-2, nanoGPT). The model learns that
<|endoftext|> means "a new, unrelated text starts here".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset


def pack_texts(texts: Sequence[str], tokenizer, *, eot_first: bool = True) -> torch.Tensor:
    """One 1-D stream of ids: [eot] text_1 [eot] text_2 [eot] ... text_n [eot]."""
    if not texts:
        raise ValueError("texts is empty: expected at least one text to pack")
    eot = tokenizer.eot_id
    stream = [eot] if eot_first else []
    for ids in tokenizer.encode_batch(list(texts)):
        stream.extend(ids)
        stream.append(eot)
    return torch.tensor(stream, dtype=torch.long)  # (num_tokens,)


class PackedTextDataset(Dataset):
    """(input ids, target ids) windows of `seq_len` tokens cut from one token stream; targets are inputs shifted by one."""

    def __init__(self, stream: torch.Tensor, seq_len: int) -> None:
        if stream.dim() != 1:
            raise ValueError(f"stream must be 1-D (num_tokens,), got shape {tuple(stream.shape)}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        num_windows = (len(stream) - 1) // seq_len
        if num_windows < 1:
            raise ValueError(f"a stream of {len(stream)} tokens is too short for one window of seq_len {seq_len} (+1 target)")
        self.seq_len = seq_len
        self.stream = stream[: num_windows * seq_len + 1]  # the tail that fills no window is dropped
        self.num_windows = num_windows

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range for {self.num_windows} windows")
        start = i * self.seq_len
        window = self.stream[start : start + self.seq_len + 1]  # (seq_len + 1,)
        return window[:-1], window[1:]  # (seq_len,), (seq_len,)

    @property
    def targets(self) -> torch.Tensor:
        """Every target token, in order: the stream without its first token."""
        return self.stream[1:]


def unigram_cross_entropy(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int, smoothing: float = 1.0) -> float:
    """Cross-entropy (nats per token) of `eval_ids` under token frequencies counted on `train_ids` (add-`smoothing`).

    The baseline a language model must beat: it knows which tokens are common, but
    nothing about context. exp() of it is the unigram perplexity.
    """
    if smoothing <= 0:
        raise ValueError(f"smoothing must be positive (else an unseen token has probability 0), got {smoothing}")
    counts = torch.bincount(train_ids.flatten(), minlength=vocab_size).double() + smoothing  # (vocab_size,)
    log_probs = counts.log() - counts.sum().log()
    return float(-log_probs[eval_ids.flatten()].mean())


def perplexity(cross_entropy: float) -> float:
    """exp(cross-entropy): the number of equally likely tokens the model is as unsure as."""
    return math.exp(cross_entropy)


__all__ = ["PackedTextDataset", "pack_texts", "perplexity", "unigram_cross_entropy"]
