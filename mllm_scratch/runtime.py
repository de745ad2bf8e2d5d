"""Reproducible runs: seeding, deterministic mode, device choice, parameter counts.

Every notebook starts with `setup_notebook()`, so a reader who runs a chapter twice,
or on another machine, sees the same numbers as the book.
"""

from __future__ import annotations

import os
import platform
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

DEVICE_ENV_VAR = "MLLM_DEVICE"
_DEVICE_ORDER = ("cuda", "mps", "cpu")


def seed_everything(seed: int = 0) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and all GPUs) random generators."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def set_deterministic(enabled: bool = True) -> None:
    """Ask PyTorch for deterministic kernels (an error, not a silent difference, if one is missing)."""
    # cuBLAS needs this workspace setting before its first call to be deterministic.
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.deterministic = enabled
        torch.backends.cudnn.benchmark = not enabled


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return bool(mps is not None and mps.is_available())
    return kind == "cpu"


def choose_device(preferred: str | torch.device | None = None) -> torch.device:
    """Pick cuda, then mps, then cpu; `preferred` or $MLLM_DEVICE overrides the order."""
    wanted = preferred if preferred is not None else os.environ.get(DEVICE_ENV_VAR) or None
    if wanted is None:
        return torch.device(next(k for k in _DEVICE_ORDER if _available(k)))
    try:
        device = torch.device(wanted)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in _DEVICE_ORDER:
        raise ValueError(f"device {str(wanted)!r} is not supported: expected one of {', '.join(_DEVICE_ORDER)}")
    if not _available(device.type):
        source = f"${DEVICE_ENV_VAR}" if preferred is None else "the requested device"
        raise RuntimeError(f"{source} is {str(wanted)!r}, but PyTorch cannot use {device.type} on this machine")
    return device


def check_positive_ints(config: object, *names: str) -> None:
    """Raise ValueError naming the first of `config`'s fields `names` that is not a positive int (bools are not ints here)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def checked_on_host(t: torch.Tensor) -> bool:
    """Whether to run a data-dependent check on `t` now: on the CPU, always; on a GPU, never.

    A check such as "every row holds 64 <|image|> tokens" reads a value computed on the
    device, so on a GPU Python must wait for every queued kernel to finish (a host-device
    sync) at each step. The book's collators build correct batches, so the models check on
    the CPU, where the tests and the notebooks run, and trust the batch on a GPU. Under
    `torch.compile` they do not check either: reading a value splits the compiled graph in two.
    """
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


@dataclass(frozen=True)
class NotebookContext:
    """What `setup_notebook` chose, so a chapter can print it and pass `device` on."""

    seed: int
    device: torch.device
    threads: int
    deterministic: bool


def setup_notebook(
    seed: int = 0,
    threads: int | None = 1,
    deterministic: bool = True,
    device: str | torch.device | None = None,
) -> NotebookContext:
    """One call at the top of every chapter: seed, threads, deterministic mode, device, print options."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1 (or None to keep PyTorch's default), got {threads}")
        # One thread makes CPU results repeatable and lets tests run notebooks side by side.
        torch.set_num_threads(threads)
    seed_everything(seed)
    set_deterministic(deterministic)
    chosen = choose_device(device)
    torch.set_printoptions(precision=4, sci_mode=False, linewidth=100)
    np.set_printoptions(precision=4, suppress=True, linewidth=100)
    try:  # small, crisp PNG figures in notebooks; matplotlib is optional for the package
        import matplotlib

        matplotlib.rcParams.update({"figure.dpi": 80, "savefig.dpi": 80, "figure.figsize": (6, 3.5)})
    except ImportError:  # pragma: no cover - matplotlib is in requirements.txt
        pass
    return NotebookContext(seed=seed, device=chosen, threads=torch.get_num_threads(), deterministic=deterministic)


def versions() -> dict[str, str]:
    """Versions of Python and the libraries the book depends on, for a notebook's version cell."""
    out = {"python": platform.python_version(), "platform": sys.platform, "torch": torch.__version__, "numpy": np.__version__}
    for name in ("matplotlib", "PIL", "tiktoken"):
        try:
            module = __import__(name)
            out["pillow" if name == "PIL" else name] = getattr(module, "__version__", "?")
        except ImportError:
            out[name] = "not installed"
    return out
