"""A VQ-VAE image tokenizer: a 32 px scene becomes a 4 x 4 grid of discrete codes, and back.

Chapter 13's first piece. An encoder of strided convolutions turns the image into a grid of
vectors, one per `cell` x `cell` pixels (8 x 8 pixels by default: a 4 x 4 grid); each vector is replaced by its nearest neighbour in a codebook of
`codebook_size` learned vectors (the quantiser); a decoder of transposed convolutions
paints the image back from the quantised grid. The indices of the chosen neighbours are the
image's tokens: a language model can read and write them like words (Emu3, Janus).

The tokenizer is a codec of pixels: it trains on scenes in which any colour-shape pair may
appear, so it can write the compositional split's held-out pairs too. What the chapter holds
out is the *language*: no drawing caption a model trains on names those pairs.

Rounding to the nearest code has no gradient, so training uses three tricks:
- the straight-through estimator: the forward pass uses the code, the backward pass copies
  the decoder's gradient onto the encoder's output as if the rounding were the identity;
- two extra losses: the codebook loss moves each used code towards the encoder outputs
  that chose it, the commitment loss (weight `beta`) keeps the encoder near its codes.
  With `ema=True` the codebook instead follows an exponential moving average of those
  outputs (VQ-VAE-2), and the codebook loss is dropped;
- dead-code restarts: a code no batch chose for `restart_after` steps is moved onto a
  random encoder output of the current batch, so the whole codebook stays in use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mllm_scratch.shapeworld import BACKGROUND, ShapeWorldConfig, generate_scene, render, split_seed, to_tensor
from mllm_scratch.train import History, TrainConfig, batches, train

CHECKPOINT_NAME = "vqvae"
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / "checkpoints" / f"{CHECKPOINT_NAME}.pt"
# Chapter 13's scenes: 1 to 3 objects on 32 px, no rendered text, corners on the codes' 8 px cells.
SCENES = ShapeWorldConfig(text_probability=0.0, snap=8)


# ----------------------------------------------------------------------------------
# The quantiser


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row for each vector: z (..., D), codebook (K, D) -> (...) long.

    Squared distance ||z||^2 - 2 z.e + ||e||^2, so the (N, K) distance matrix is one matmul;
    ||z||^2 is the same for every code and is left out.
    """
    if z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"vectors of size {z.shape[-1]} cannot be matched to codes of size {codebook.shape[1]}")
    flat = z.reshape(-1, z.shape[-1])  # (N, D)
    distance = codebook.pow(2).sum(1)[None, :] - 2 * flat @ codebook.t()  # (N, K)
    return distance.argmin(dim=1).reshape(z.shape[:-1])


@dataclass
class Quantised:
    """What the quantiser returns: the straight-through vectors, the chosen codes and the two losses."""

    z_q: torch.Tensor  # (B, D, H, W): the codes' vectors in the forward pass, the encoder's gradient path backward
    codes: torch.Tensor  # (B, H, W) long
    codebook_loss: torch.Tensor  # ||sg(z) - e||^2 (zero with EMA updates)
    commitment_loss: torch.Tensor  # ||z - sg(e)||^2


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup into a learned codebook, with the straight-through estimator."""

    def __init__(self, codebook_size: int, dim: int, ema: bool = False, decay: float = 0.99, restart_after: int = 0):
        super().__init__()
        if codebook_size < 2 or dim < 1:
            raise ValueError(f"codebook_size {codebook_size} and dim {dim}: expected at least 2 codes of size 1 or more")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay {decay} is invalid: expected a number between 0 and 1")
        self.codebook_size, self.dim, self.ema, self.decay = codebook_size, dim, ema, decay
        self.restart_after = restart_after  # steps unused before a code is restarted (0: never)
        self.codebook = nn.Parameter(torch.empty(codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size),
                                     requires_grad=not ema)
        self.register_buffer("ema_count", torch.ones(codebook_size))
        self.register_buffer("ema_sum", self.codebook.detach().clone())
        self.register_buffer("idle_steps", torch.zeros(codebook_size, dtype=torch.long))

    def forward(self, z: torch.Tensor) -> Quantised:
        """z (B, D, H, W) -> Quantised; in training mode also updates the EMA codebook and restarts dead codes."""
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"z must have shape (batch, {self.dim}, height, width), got {tuple(z.shape)}")
        z_last = z.permute(0, 2, 3, 1)  # (B, H, W, D)
        codes = nearest_codes(z_last.detach(), self.codebook.detach())  # (B, H, W)
        if self.training:
            self._update(z_last.detach().reshape(-1, self.dim), codes.reshape(-1))
        e = F.embedding(codes, self.codebook).permute(0, 3, 1, 2)  # (B, D, H, W)
        codebook_loss = z.new_zeros(()) if self.ema else F.mse_loss(e, z.detach())
        commitment_loss = F.mse_loss(z, e.detach())
        z_q = z + (e - z).detach()  # forward: e; backward: d z_q / d z = identity (straight through)
        return Quantised(z_q, codes, codebook_loss, commitment_loss)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        onehot = F.one_hot(codes, self.codebook_size).to(flat.dtype)  # (N, K)
        counts = onehot.sum(0)  # (K,)
        if self.ema:
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_sum.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + 1e-5) / (n + self.codebook_size * 1e-5) * n  # Laplace: no division by zero
            self.codebook.copy_(self.ema_sum / smoothed[:, None])
        if self.restart_after:
            self.idle_steps.add_(1).masked_fill_(counts > 0, 0)
            dead = (self.idle_steps >= self.restart_after).nonzero().flatten()
            if len(dead):
                picks = flat[torch.randint(len(flat), (len(dead),), device=flat.device)]
                self.codebook[dead] = picks
                self.ema_sum[dead] = picks
                self.ema_count[dead] = 1.0
                self.idle_steps[dead] = 0

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, H, W) -> their vectors (B, D, H, W); refuses indices outside the codebook."""
        if codes.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8) or codes.dim() != 3:
            raise ValueError(f"codes must be an integer tensor (batch, height, width), got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must be in 0..{self.codebook_size - 1}, got min {int(codes.min())} and max {int(codes.max())}")
        return F.embedding(codes.long(), self.codebook).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------
# The VQ-VAE


@dataclass(frozen=True)
class VQConfig:
    """Shape of the VQ-VAE: stride-2 convolutions take 32 px to a grid of codes, one per cell (default 8 px: 4 x 4)."""

    image_size: int = 32
    cell: int = 8  # pixels per code along each side: 8 gives a 4 x 4 grid of codes, 4 an 8 x 8 grid
    channels: int = 96  # width of the convolutional trunk
    code_dim: int = 32  # size of each codebook vector
    codebook_size: int = 256
    beta: float = 0.25  # commitment weight (VQ-VAE's value)
    ema: bool = False  # codebook updated by moving averages instead of by its loss
    decay: float = 0.99
    restart_after: int = 50  # steps a code may go unused before it is restarted (0: never)
    foreground_weight: float = 10.0  # weight of the reconstruction error on pixels that are not background

    def __post_init__(self) -> None:
        if self.cell not in (2, 4, 8, 16):
            raise ValueError(f"cell {self.cell} is invalid: expected 2, 4, 8 or 16 pixels (one stride-2 convolution per halving)")
        if self.image_size % self.cell or self.image_size < 2 * self.cell:
            raise ValueError(f"image_size {self.image_size} must be a multiple of the cell {self.cell}, at least two cells")
        for name in ("channels", "code_dim", "codebook_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def grid(self) -> int:
        return self.image_size // self.cell

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class VQVAE(nn.Module):
    """Images (B, 3, 32, 32) in [0, 1] <-> codes (B, grid, grid) in 0..codebook_size - 1."""

    def __init__(self, config: VQConfig | None = None):
        super().__init__()
        self.config = c = config or VQConfig()
        halvings = c.cell.bit_length() - 1  # stride-2 convolutions: 32 px -> 32 / cell cells per side
        down: list[nn.Module] = [nn.Conv2d(3, c.channels // 2, 4, stride=2, padding=1), nn.ReLU()]
        for i in range(1, halvings):
            down += [nn.Conv2d(c.channels // 2 if i == 1 else c.channels, c.channels, 4, stride=2, padding=1), nn.ReLU()]
        if halvings == 1:
            down += [nn.Conv2d(c.channels // 2, c.channels, 3, padding=1)]
        self.encoder = nn.Sequential(
            *down, ResBlock(c.channels), ResBlock(c.channels), nn.ReLU(),
            nn.Conv2d(c.channels, c.code_dim, 1),
        )
        self.quantizer = VectorQuantizer(c.codebook_size, c.code_dim, c.ema, c.decay, c.restart_after)
        up: list[nn.Module] = []
        for i in range(halvings - 1):
            up += [nn.ConvTranspose2d(c.channels, c.channels, 4, stride=2, padding=1), nn.ReLU()]
        self.decoder = nn.Sequential(
            nn.Conv2d(c.code_dim, c.channels, 3, padding=1),
            ResBlock(c.channels), ResBlock(c.channels), nn.ReLU(),
            *up,
            nn.ConvTranspose2d(c.channels, c.channels // 2, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c.channels // 2, 3, 4, stride=2, padding=1),  # the last doubling, to image_size
        )

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"images must have shape (batch, 3, {s}, {s}), got {tuple(images.shape)}")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Quantised]:
        """Images -> (reconstruction (B, 3, H, W), Quantised)."""
        self._check_images(images)
        q = self.quantizer(self.encoder(images))
        return self.decoder(q.z_q), q

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, 32, 32) -> codes (B, grid, grid): the image's tokens."""
        self._check_images(images)
        return nearest_codes(self.encoder(images).permute(0, 2, 3, 1), self.quantizer.codebook)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, grid, grid) -> images (B, 3, 32, 32) clamped to [0, 1]."""
        g = self.config.grid
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (g, g):
            raise ValueError(f"codes must have shape (batch, {g}, {g}), got {tuple(codes.shape)}")
        return self.decoder(self.quantizer.lookup(codes)).clamp(0, 1)


def foreground(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) mask of the pixels that differ from ShapeWorld's background colour."""
    background = torch.tensor(BACKGROUND, dtype=images.dtype, device=images.device).div(255)[:, None, None]
    return ((images - background).abs().amax(dim=1, keepdim=True) > 0.02).to(images.dtype)


def vq_loss(model: VQVAE, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reconstruction error + codebook loss + beta * commitment loss; also returns the parts.

    The reconstruction error is the MSE with the shapes' pixels weighted `foreground_weight` times
    the background's: the shapes cover a tenth of a scene, and their edges are what tell a cross
    from a diamond.
    """
    recon, q = model(images)
    weight = 1 + (model.config.foreground_weight - 1) * foreground(images)
    error = (weight * (recon - images) ** 2).mean() / weight.mean()
    parts = {"reconstruction": error, "codebook": q.codebook_loss, "commitment": q.commitment_loss}
    return parts["reconstruction"] + parts["codebook"] + model.config.beta * parts["commitment"], parts


# ----------------------------------------------------------------------------------
# Measurements


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1], over the whole batch: 10 log10(1 / MSE)."""
    mse = F.mse_loss(images.float(), reference.float()).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def code_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """How much of the codebook the codes use: share of codes used, and the perplexity exp(H) of their frequencies."""
    counts = torch.bincount(codes.flatten().long(), minlength=codebook_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"used": float((counts > 0).float().mean()), "perplexity": float(entropy.exp())}


def scene_images(split: str, n: int, start: int = 0, config: ShapeWorldConfig = SCENES,
                 any_pair: bool = False) -> tuple[torch.Tensor, list]:
    """n scenes of a split (items start.. start + n - 1): (images (n, 3, 32, 32), scene graphs).

    any_pair: the split's seeds, but any colour-shape pair may appear (no held-out rule).
    """
    scenes = [generate_scene(split_seed(split, start + i), config, None if any_pair else split) for i in range(n)]
    return torch.stack([to_tensor(render(s)) for s in scenes]), scenes


# ----------------------------------------------------------------------------------
# Training: the recipe the chapter and the shipped checkpoint share


@dataclass(frozen=True)
class VQRecipe:
    model: VQConfig = VQConfig()
    train_scenes: int = 20_000
    batch_size: int = 64
    steps: int = 4000
    lr: float = 2e-3
    warmup_steps: int = 50
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["model"] = self.model.to_dict()
        return out


def train_vqvae(recipe: VQRecipe | None = None, images: torch.Tensor | None = None, *, steps: int | None = None,
                log_every: int = 0, progress: bool = False) -> tuple[VQVAE, History]:
    """Train a VQ-VAE on the recipe's training scenes (or `images`); returns it in eval mode and its History."""
    recipe = recipe or VQRecipe()
    if images is None:
        images, _ = scene_images("train", recipe.train_scenes, any_pair=True)
    torch.manual_seed(recipe.seed)
    model = VQVAE(recipe.model)
    history = train(
        model,
        batches(torch.utils.data.TensorDataset(images), recipe.batch_size, seed=recipe.seed),
        lambda m, batch: vq_loss(m, batch[0])[0],
        TrainConfig(steps=steps or recipe.steps, lr=recipe.lr, warmup_steps=min(recipe.warmup_steps, steps or recipe.steps),
                    weight_decay=0.0, log_every=log_every, progress=progress),
        device="cpu",
    )
    return model.eval(), history


def pretrained_vqvae(path: str | Path | None = None) -> VQVAE:
    """The shipped VQ-VAE (eval mode), verified against its manifest and recipe."""
    from mllm_scratch.checkpoints import load_state_dict_strict, load_verified
    from mllm_scratch.gpt import tokenizer_sha256

    recipe = VQRecipe()
    saved, state_dict, path, rebuild = load_verified(
        CHECKPOINT_NAME, path, DEFAULT_PATH, expected_config=recipe.model.to_dict(), recipe=recipe.to_dict(),
        recipe_owner="mllm_scratch.vq.VQRecipe()", tokenizer_sha256=tokenizer_sha256(),
    )
    model = VQVAE(VQConfig(**saved))
    load_state_dict_strict(model, state_dict, path, rebuild)
    return model.eval()


def build_checkpoint(out: Path) -> dict:
    """Train `VQRecipe()` and save out/vqvae.pt + its manifest (what `build_checkpoints.py vqvae` calls)."""
    from mllm_scratch.checkpoints import save_checkpoint
    from mllm_scratch.gpt import tokenizer_sha256

    recipe = VQRecipe()
    model, history = train_vqvae(recipe, log_every=500)
    images, _ = scene_images("test", 1000)
    with torch.no_grad():
        recon = model.decode(model.encode(images))
    metrics = {"test_psnr_db": round(psnr(recon, images), 2), **{k: round(v, 3) for k, v in
               code_usage(model.encode(images), recipe.model.codebook_size).items()},
               "train_seconds": round(history.seconds, 1)}
    print("vqvae:", metrics)
    return save_checkpoint(
        Path(out) / f"{CHECKPOINT_NAME}.pt", model, recipe.model.to_dict(), name=CHECKPOINT_NAME,
        recipe=recipe.to_dict(), metrics=metrics, dtype=torch.float16,
        extra={"trained_by": "mllm_scratch.vq.train_vqvae(VQRecipe()) on one CPU thread",
               "tokenizer_sha256": tokenizer_sha256(), "loader": "mllm_scratch.vq.pretrained_vqvae"},
    )
