"""Data-parallel training on several processes or GPUs, on PyTorch's own engine (`torch.distributed`).

`torchrun --nproc_per_node N ...` starts N copies of the same program and tells each, in
environment variables, who it is (RANK, WORLD_SIZE, LOCAL_RANK) and where to meet
(MASTER_ADDR, MASTER_PORT). `init_distributed` reads them and joins the process group:
NCCL between GPUs, gloo between CPU processes. Then every rank runs the same training loop
(`train(..., parallel=...)`) on its own shard of each global batch:

    global batch of B rows (what a single process would read: `batches(dataset, B)`)
    -> cut in order into A * W blocks of B / (A * W) rows (A micro-batches, W ranks)
    -> rank r reads blocks r, r + W, r + 2W, ...  (its A micro-batches; `batches(..., shard=(r, W))`)
    -> each rank: A forward/backward passes, gradients summed locally, loss / A
    -> DDP: gradients averaged over the W ranks (one all-reduce, on the last micro-batch)
    -> every rank takes the same AdamW step, so the copies stay equal

So the gradient of a step is that of the mean loss over the whole global batch (exactly, for
a loss that is a mean over examples; a mean over tokens weighs each micro-batch's tokens by
its own count), and W processes with A micro-batches each learn what one process learns
from batches of B. With FSDP2 (`strategy="fsdp"`, `fully_shard`) each rank keeps only 1/W of
every parameter and optimizer state, and of every gradient once it is reduced (with A > 1 it
holds full gradients until the last micro-batch), gathering a block's weights just before it
runs; the arithmetic is the same. Only rank 0 prints, shows progress and writes files.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Parallel:
    """Who this process is in a data-parallel run, and how the ranks share the model (the default: alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: Literal["ddp", "fsdp"] = "ddp"
    group: Any = field(default=None, compare=False, repr=False)  # a CPU (gloo) group for small agreements

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in 0..{self.world_size - 1}, got {self.rank}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, shows progress and writes checkpoints and outputs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: the model is wrapped and gradients are averaged."""
        return self.world_size > 1

    @property
    def shard(self) -> tuple[int, int] | None:
        """`batches(..., shard=...)` for this rank, or None alone."""
        return (self.rank, self.world_size) if self.active else None

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing to wait for alone)."""
        if self.active:
            dist.barrier(group=self.group)

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any of them (a Ctrl-C seen by one rank stops all at one step)."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over the ranks (each rank's mean loss -> the global batch's), in place."""
        if self.active:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (None elsewhere); alone, [obj]."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out


SINGLE = Parallel()


def env_ranks(env: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's environment variables, or None when not launched by it."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return None
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        raw = env.get(name, "0" if name == "LOCAL_RANK" else None)
        if raw is None:
            raise RuntimeError(f"WORLD_SIZE is set but {name} is not: launch with torchrun, which sets "
                               f"{', '.join(_ENV)}")
        try:
            values[name] = int(raw)
        except ValueError:
            raise RuntimeError(f"environment variable {name}={raw!r} is not a whole number") from None
    rank, world_size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world_size < 1 or not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} and WORLD_SIZE={world_size} do not fit: expected 0 <= RANK < WORLD_SIZE")
    return rank, world_size, local_rank


def init_distributed(
    device: torch.device | str | None = None, strategy: str = "ddp", env: Mapping[str, str] | None = None
) -> tuple[Parallel, torch.device]:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) and return this rank's `Parallel` and device.

    Without torchrun's variables (or with WORLD_SIZE=1) nothing is initialised: the run is
    the single-process one, `Parallel()`. On CUDA each rank takes GPU LOCAL_RANK.
    """
    from mllm_scratch.runtime import choose_device

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    device = choose_device(device) if not isinstance(device, torch.device) else device
    ranks = env_ranks(env)
    if ranks is None or ranks[1] == 1:
        return Parallel(strategy=strategy), device
    rank, world_size, local_rank = ranks
    env = os.environ if env is None else env
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} not set: launch with torchrun, which sets {', '.join(_ENV)}")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s): "
                               "start at most one process per GPU (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise RuntimeError(f"data-parallel training runs on cuda (NCCL) or cpu (gloo), not on {device.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    group = dist.new_group(backend="gloo") if backend != "gloo" else None  # CPU flags without a device sync
    return Parallel(rank, world_size, local_rank, strategy, group), device


def shutdown() -> None:
    """Leave the process group (a no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: torch.device | str | None = None, strategy: str = "ddp") -> Iterator[tuple[Parallel, torch.device]]:
    """`init_distributed` for the length of a `with` block, then every rank waits for the others and leaves the group.

    After an error the rank leaves at once (torchrun stops the others)."""
    parallel, device = init_distributed(device, strategy)
    try:
        yield parallel, device
        parallel.barrier()  # leave together: a rank that tears down while another still talks aborts gloo
    finally:
        if parallel.active:
            shutdown()


def local_batch_size(global_batch: int, parallel: Parallel = SINGLE, grad_accum_steps: int = 1) -> int:
    """Rows per micro-batch on each rank: global_batch / (world_size * grad_accum_steps), which must be whole."""
    parts = parallel.world_size * grad_accum_steps
    if global_batch % parts:
        raise ValueError(f"the global batch of {global_batch} does not split over {parallel.world_size} process"
                         f"{'es' * (parallel.world_size != 1)} x {grad_accum_steps} micro-batch"
                         f"{'es' * (grad_accum_steps != 1)}: expected a multiple of {parts}")
    return global_batch // parts


# ----------------------------------------------------------------------------------
# The model as the ranks run it


class Replicas:
    """The caller's model as the ranks train it: wrapped in DDP, or an FSDP2-sharded copy.

    `step_model` is what the loop calls; `sync(flag)` turns the gradient all-reduce off for
    all but the last micro-batch; `full_state` brings the trained weights back into the
    caller's own module (FSDP) and returns the optimizer's state as a checkpoint keeps it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, parallel: Parallel, device: torch.device):
        self.model, self.optimizer, self.parallel, self.device = model, optimizer, parallel, device
        self.step_model: nn.Module = model
        if not parallel.active:
            return
        if parallel.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.step_model = DistributedDataParallel(model, device_ids=ids)
        else:
            self.step_model = self._fully_shard()

    def _fully_shard(self) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if self.optimizer.state:
            raise ValueError("FSDP needs a fresh optimizer: its parameters are replaced by their shards")
        names = {id(p): name for name, p in self.model.named_parameters()}
        sharded = copy.deepcopy(self.model)  # the caller keeps an ordinary module; it gets the weights back at the end
        self.model.to("cpu")  # while the shards train, the full copy waits in host memory
        mesh = init_device_mesh(self.device.type, (self.parallel.world_size,))
        for module in list(sharded.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:  # each Transformer block is one unit: gathered just before it runs
                    fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        shards = dict(sharded.named_parameters())
        for group in self.optimizer.param_groups:
            group["params"] = [shards[names[id(p)]] for p in group["params"]]
        return sharded

    @property
    def parameters_to_clip(self) -> Iterator[nn.Parameter]:
        return self.step_model.parameters() if self.parallel.strategy == "fsdp" else self.model.parameters()

    def sync(self, flag: bool) -> contextlib.AbstractContextManager:
        """Within it, backward averages gradients over the ranks only if `flag` (the last micro-batch of a step)."""
        if not self.parallel.active:
            return contextlib.nullcontext()
        if self.parallel.strategy == "fsdp":
            self.step_model.set_requires_gradient_sync(flag)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if flag else self.step_model.no_sync()

    def full_state(self, optimizer_too: bool = True) -> dict | None:
        """Copy the trained weights into the caller's module (all ranks must call it); the optimizer's state dict."""
        if self.step_model is self.model or self.parallel.strategy != "fsdp":  # the caller's module is the one trained
            return self.optimizer.state_dict() if optimizer_too else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        weights = get_model_state_dict(self.step_model, options=StateDictOptions(full_state_dict=True))  # on every rank
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                if name in weights:  # a tied weight is listed once; its twin is the same tensor
                    tensor.copy_(weights[name])
        if not optimizer_too:
            return None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.step_model, self.optimizer, options=options)

    def load_optimizer(self, state: dict) -> None:
        """Load an optimizer state saved by `full_state` (a plain state dict alone or with DDP)."""
        if not (self.parallel.active and self.parallel.strategy == "fsdp"):
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.step_model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))

    def finish(self) -> None:
        """The caller's module holds the trained weights, on the device, with no hooks of DDP or FSDP left on it."""
        if not self.parallel.active:
            return
        if self.parallel.strategy == "fsdp":
            self.full_state(optimizer_too=False)
            self.model.to(self.device)
            names = {id(p): name for name, p in self.step_model.named_parameters()}
            own = dict(self.model.named_parameters())
            for group in self.optimizer.param_groups:  # the optimizer points at the caller's parameters again
                group["params"] = [own[names[id(p)]] for p in group["params"]]
            self.optimizer.state.clear()
        else:
            self.step_model._remove_autograd_hooks()  # so a later wrap (the next stage) is the only reducer
        self.step_model = self.model


__all__ = ["SINGLE", "STRATEGIES", "Parallel", "Replicas", "distributed", "env_ranks", "init_distributed",
           "local_batch_size", "shutdown"]
