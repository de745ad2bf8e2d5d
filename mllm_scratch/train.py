"""One small training loop that every chapter reuses, on CPU or GPU.

A chapter supplies the model, a stream of batches and a `loss_fn(model, batch)`; the loop
does the rest: AdamW with weight decay only on weight matrices, warm-up then cosine
decay, gradient clipping, a progress bar, periodic evaluation, and on a GPU bf16
autocast with no host-device synchronisation between log steps.

A long run can be stopped and continued: with `checkpoint=PATH` the loop saves everything
it needs to go on (model, optimizer, step, loss history, random states) every
`checkpoint_every` steps, when Ctrl-C is pressed (at the end of the step under way) and at
the end, each time by an atomic rename; `resume=True` continues from that file, and the
continued run ends with the same parameters, bit for bit on a CPU, as one never stopped.

Bigger batches than memory allows: with `grad_accum_steps=A` one optimizer step reads A
micro-batches, each loss divided by A, so the summed gradient is the gradient of the mean
loss over the A micro-batches. On several processes (`torchrun`, see `mllm_scratch.distributed`)
the same loop runs on every rank with `parallel=`: the model wrapped in DDP (or sharded
with FSDP2), gradients averaged over the ranks, only rank 0 logging and saving.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from mllm_scratch.checkpoints import CheckpointError, atomic_write
from mllm_scratch.runtime import choose_device


@dataclass
class TrainConfig:
    """How long and how fast to train; tiny CPU defaults."""

    steps: int = 300
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float | None = 1.0
    record_every: int = 10  # average the loss over this many steps into the history (the learning curve)
    log_every: int = 100  # print a log line every this many steps (0: never)
    eval_every: int = 0  # call `evaluate` every this many steps (0: only at the end)
    amp: bool = True  # bf16 autocast on a GPU that supports it; ignored on CPU
    compile: bool | str = False  # torch.compile the model for the training steps (True: inductor; or a backend name)
    progress: bool = True
    checkpoint_every: int = 0  # with train(checkpoint=...): save every this many steps (0: only on Ctrl-C and at the end)
    grad_accum_steps: int = 1  # micro-batches per optimizer step: the gradient of their mean loss, in less memory

    def __post_init__(self) -> None:
        if isinstance(self.grad_accum_steps, bool) or not isinstance(self.grad_accum_steps, int) or self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be a whole number of micro-batches, at least 1, "
                             f"got {self.grad_accum_steps!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be 0 (off) or a number of steps, got {self.checkpoint_every}")
        if self.record_every < 1:
            raise ValueError(f"record_every must be at least 1, got {self.record_every}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be between 0 and steps={self.steps}, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if isinstance(self.compile, str) and self.compile not in torch.compiler.list_backends(exclude_tags=()):
            raise ValueError(
                f"compile must be True, False or a torch.compile backend ({', '.join(torch.compiler.list_backends())}), "
                f"got {self.compile!r}"
            )


def run_overrides(log_every: int, progress: bool, steps: int | None = None, warmup_steps: int = 0) -> dict[str, Any]:
    """TrainConfig overrides for a recipe's run: logging and progress, and with `steps` a shorter run
    whose warm-up is cut to fit (the schedule follows the new length)."""
    overrides: dict[str, Any] = {"log_every": log_every, "progress": progress}
    if steps is not None:
        overrides.update(steps=steps, warmup_steps=min(warmup_steps, steps))
    return overrides


@dataclass
class History:
    """What happened during training: the loss curve and every evaluation."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    seconds: float = 0.0
    examples: int = 0

    @property
    def final_eval(self) -> dict[str, float]:
        return self.evals[-1][1] if self.evals else {}

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0


def no_weight_decay(param: nn.Parameter) -> nn.Parameter:
    """Mark a parameter (a temperature, a gate, a position table) as exempt from weight decay."""
    param._no_weight_decay = True  # type: ignore[attr-defined]
    return param


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.01, device: torch.device | None = None
) -> torch.optim.AdamW:
    """AdamW that decays weight matrices only: not biases, norms, or parameters marked `no_weight_decay`."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters: unfreeze something before training")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device is not None and device.type == "cuda"  # one kernel for the whole update on a GPU
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused or None)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from `lr` to `lr * min_lr_ratio`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to `device`; leave strings and numbers alone."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU that supports it; a no-op elsewhere (CPU results stay exact)."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batches(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    collate_fn: Callable | None = None,
    drop_last: bool = True,
    device: torch.device | None = None,
    micro_batches: int = 1,
    shard: tuple[int, int] | None = None,
) -> Iterator[Any]:
    """An endless stream of batches from `dataset`, reshuffled (reproducibly) every epoch.

    `batch_size` is the global batch: what one optimizer step learns from. With
    `micro_batches=A` (train's `grad_accum_steps`) and `shard=(rank, world_size)` (W processes),
    each global batch is cut, in order, into A * W blocks of batch_size / (A * W) rows, and
    this process reads blocks rank, rank + W, rank + 2W, ...: its micro-batch j is block
    j * W + rank. The union over ranks and micro-batches of one step is exactly the batch a
    single process reads with the defaults, so the global batch never depends on the launch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(dataset) < batch_size and drop_last:  # type: ignore[arg-type]
        raise ValueError(f"dataset has {len(dataset)} examples, fewer than one batch of {batch_size}")  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    pin = device is not None and device.type == "cuda"  # page-locked memory makes the copy asynchronous
    if micro_batches == 1 and shard is None:
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
            collate_fn=collate_fn, drop_last=drop_last, pin_memory=pin,
        )
    else:
        # The same sampler and generator as above (so the same global batches), then this process's blocks.
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        rank, world_size = shard if shard is not None else (0, 1)
        blocks = BlockSampler(BatchSampler(sampler, batch_size, drop_last), micro_batches, rank, world_size)
        loader = DataLoader(dataset, batch_sampler=blocks, generator=generator, collate_fn=collate_fn, pin_memory=pin)
    while True:
        yield from loader


class BlockSampler(Sampler[list[int]]):
    """This process's micro-batches of each global batch: block j * world_size + rank for j < micro_batches."""

    def __init__(self, global_batches: BatchSampler, micro_batches: int = 1, rank: int = 0, world_size: int = 1):
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches must be a whole number, at least 1, got {micro_batches!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a whole number of processes, at least 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1} for world_size {world_size}, got {rank!r}")
        parts = micro_batches * world_size
        if global_batches.batch_size % parts:
            raise ValueError(
                f"batch_size {global_batches.batch_size} does not split into {micro_batches} micro-batch"
                f"{'es' * (micro_batches != 1)} x {world_size} process{'es' * (world_size != 1)}: "
                f"expected a multiple of {parts}")
        if not global_batches.drop_last:
            raise ValueError("micro-batches and shards need drop_last=True: a short last batch would not split evenly")
        self.global_batches, self.micro_batches, self.rank, self.world_size = global_batches, micro_batches, rank, world_size
        self.rows = global_batches.batch_size // parts  # rows per micro-batch on each process

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.global_batches:
            for j in range(self.micro_batches):
                start = (j * self.world_size + self.rank) * self.rows
                yield indices[start : start + self.rows]

    def __len__(self) -> int:
        return len(self.global_batches) * self.micro_batches


# What a resumed run must agree on with the run that wrote the checkpoint: everything in
# TrainConfig that changes the parameters (not logging, progress or how often it saves).
_RUN_ONLY = ("log_every", "progress", "checkpoint_every", "eval_every")
CHECKPOINT_FORMAT = "mllm_scratch.train-state/1"


# Fields added since the first checkpoint format: left out of the fingerprint at their default,
# so a checkpoint written before they existed still resumes.
_ADDED_DEFAULTS = {"grad_accum_steps": 1}


def _fingerprint(config: TrainConfig, run: dict[str, Any] | None, parallel: Any = None) -> dict[str, Any]:
    fields = {k: v for k, v in asdict(config).items()
              if k not in _RUN_ONLY and not (k in _ADDED_DEFAULTS and v == _ADDED_DEFAULTS[k])}
    fingerprint = {"train_config": {k: repr(v) for k, v in fields.items()},
                   "run": {k: repr(v) for k, v in (run or {}).items()}}
    if parallel is not None and parallel.world_size > 1:  # each rank's data position and random state
        fingerprint["parallel"] = {"world_size": repr(parallel.world_size), "strategy": repr(parallel.strategy)}
    return fingerprint


def _rng_states() -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint written by `train(checkpoint=...)`; a clear CheckpointError if it is not one."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a file cut short (a crash mid-copy, a full disk) fails here, never half-loads
        raise CheckpointError(
            f"{path} is not a complete training checkpoint ({type(exc).__name__}: {exc}); "
            "delete it to start the run over, or put back an earlier copy"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of train(checkpoint=...): expected format "
                              f"{CHECKPOINT_FORMAT!r}, got {state.get('format') if isinstance(state, dict) else type(state).__name__!r}")
    return state


class _StopRequest:
    """Turns Ctrl-C into a request that the loop honours at the end of the step under way.

    Under torchrun a Ctrl-C reaches each process twice (from the terminal, then forwarded by
    torchrun), so with `coalesce` a second SIGINT within that many seconds counts as the same press.
    """

    def __init__(self, active: bool, coalesce: float = 0.0) -> None:
        self.active = active and threading.current_thread() is threading.main_thread()
        self.coalesce = coalesce
        self.requested = False
        self.previous = None
        self.first = 0.0

    def __enter__(self) -> "_StopRequest":
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if time.monotonic() - self.first < self.coalesce:
                return
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once, as without a checkpoint
        self.requested = True
        self.first = time.monotonic()
        print("\nCtrl-C: saving a checkpoint at the end of this step (press again to stop at once)", flush=True)

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)


def train(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    config: TrainConfig | None = None,
    *,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
    batch_size_of: Callable[[Any], int] | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    run: dict[str, Any] | None = None,
    parallel: Any = None,
) -> History:
    """Train `model` for `config.steps` steps of `loss_fn(model, batch)` over batches from `data`.

    `evaluate(model)` returns metrics; it runs in eval mode without gradients every
    `eval_every` steps and at the end. Returns the `History`.

    Each step reads `config.grad_accum_steps` batches from `data` (micro-batches) and
    steps on the gradient of their mean loss. With `parallel` (a `distributed.Parallel` of
    several processes) every rank runs this loop on its own stream (`batches(..., shard=...)`):
    the model is wrapped in DDP or sharded with FSDP2 for the run, the logged loss is the mean
    over the ranks, and only rank 0 prints and writes the checkpoint.

    With `checkpoint`, the training state is saved there (see the module's docstring);
    `resume=True` continues from it (or starts afresh if the file does not exist yet). `data`
    must then be a fresh stream that yields the same batches as the first run's (the loop
    skips the micro-batches already used); `run` (any picklable description of the recipe) and
    the TrainConfig must equal the saved ones, or the resume is refused.
    """
    from mllm_scratch.distributed import SINGLE, Replicas

    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=PATH: the file to continue from")
    config = config or TrainConfig()
    parallel = parallel or SINGLE
    main = parallel.is_main
    accum = config.grad_accum_steps
    device = choose_device(device) if not isinstance(device, torch.device) else device
    model.to(device)
    # Start from clean gradients: a parameter trained by an earlier call and frozen now keeps its last
    # .grad (this call's optimizer does not hold it, so its zero_grad never clears it), and the clipping
    # norm below, taken over all the model's parameters, would count that stale gradient at every step.
    model.zero_grad(set_to_none=True)
    optimizer = optimizer or make_optimizer(model, config.lr, config.weight_decay, device)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # groups may have their own rates (e.g. pretrained parts)
    history = History()
    stream = iter(data)
    progress = None
    if config.progress and main:
        import warnings

        from tqdm import TqdmWarning

        with warnings.catch_warnings():
            # Without ipywidgets, tqdm.auto warns once and falls back to the text bar, which works as well.
            warnings.simplefilter("ignore", TqdmWarning)
            from tqdm.auto import tqdm

        progress = tqdm(total=config.steps, desc="train", leave=False)

    fingerprint = _fingerprint(config, run, parallel) if checkpoint is not None else None
    state = None
    if resume and Path(checkpoint).exists():
        state = load_train_state(checkpoint)
        if state["fingerprint"] != fingerprint:
            theirs, ours = state["fingerprint"], fingerprint
            differ = sorted({f"{part}.{k}" for part in set(ours) | set(theirs)
                             for k in set(ours.get(part, {})) | set(theirs.get(part, {}))
                             if ours.get(part, {}).get(k) != theirs.get(part, {}).get(k)})
            raise CheckpointError(f"{checkpoint} was written by a different run (differs in: {', '.join(differ)}); "
                                  "resume with the same recipe, or pass another checkpoint path to start a new run")
        model.load_state_dict(state["model"])  # before the ranks wrap or shard it

    # For several processes: the model in DDP, or an FSDP2-sharded copy (the caller's module gets the weights back).
    replicas = Replicas(model, optimizer, parallel, device)

    def run_eval(step: int) -> None:
        if evaluate is None:
            return
        replicas.full_state(optimizer_too=False)  # with FSDP: the current weights into the caller's module
        was_training = model.training
        model.eval()
        with torch.no_grad(), autocast(device, config.amp):
            metrics = {k: float(v) for k, v in evaluate(model).items()}
        model.train(was_training)
        history.evals.append((step, metrics))
        if config.log_every and main:
            print(f"step {step:5d} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    # torch.compile traces the model once (seconds to minutes) and then runs fused kernels; the
    # compiled wrapper shares the model's parameters, so the optimizer and the caller see one model.
    step_model = replicas.step_model
    if config.compile:
        backend = "inductor" if config.compile is True else config.compile
        step_model = torch.compile(step_model, backend=backend)
    step_model.train()
    running = torch.zeros((), device=device)  # summed on the device: no sync until we log
    since_log = 0
    first_step = 0
    if state is not None:
        replicas.load_optimizer(state["optimizer"])
        for key, value in state["history"].items():
            setattr(history, key, value)
        running.fill_(state["running"])
        since_log, first_step = state["since_log"], state["step"]
        for _ in range(first_step * accum if first_step < config.steps else 0):  # the data position, in micro-batches
            next(stream)
        rng = state["rng"]
        _set_rng_states(rng[parallel.rank] if isinstance(rng, list) else rng)
        if config.log_every and main:
            print(f"resumed from {checkpoint} at step {first_step}")
        if progress is not None:
            progress.update(first_step)
    elif resume and config.log_every and main:
        print(f"no checkpoint at {checkpoint} yet: starting at step 0")

    def save(done: int) -> None:
        optimizer_state = replicas.full_state()  # every rank takes part (FSDP gathers); rank 0 writes
        rng = _rng_states() if not parallel.active else parallel.gather(_rng_states())
        if main:
            state = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "step": done,
                     "model": model.state_dict(), "optimizer": optimizer_state,
                     "history": {"steps": history.steps, "loss": history.loss, "evals": history.evals,
                                 "seconds": history.seconds + time.perf_counter() - start, "examples": history.examples},
                     "running": running.item(), "since_log": since_log, "rng": rng}
            atomic_write(Path(checkpoint), lambda f: torch.save(state, f))
        parallel.barrier()  # no rank leaves (or is stopped by torchrun) before the file is written

    start = time.perf_counter()
    stop = _StopRequest(active=checkpoint is not None, coalesce=2.0 if parallel.active else 0.0)
    with stop:
        for step in range(first_step, config.steps):
            scale = lr_at(step, config) / config.lr
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * scale
            optimizer.zero_grad(set_to_none=True)
            step_loss = None
            for micro in range(accum):
                batch = to_device(next(stream), device)
                with replicas.sync(micro == accum - 1):  # average over the ranks once, after the last micro-batch
                    with autocast(device, config.amp):
                        loss = loss_fn(step_model, batch)
                    (loss / accum if accum > 1 else loss).backward()
                detached = loss.detach().float()
                step_loss = detached if step_loss is None else step_loss + detached
                if batch_size_of is not None:
                    history.examples += batch_size_of(batch) * parallel.world_size
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(replicas.parameters_to_clip, config.grad_clip)
            optimizer.step()
            running += step_loss / accum if accum > 1 else step_loss
            since_log += 1
            done = step + 1
            if done % config.record_every == 0 or done == config.steps:
                mean = parallel.mean(running / since_log).item()  # the only host-device sync, once per record_every steps
                history.steps.append(done)
                history.loss.append(mean)
                running.zero_()
                since_log = 0
                if config.log_every and main and (done % config.log_every == 0 or done == config.steps):
                    print(f"step {done:5d} | loss {mean:.4f} | lr {optimizer.param_groups[0]['lr']:.2e}")
                if progress is not None:
                    progress.set_postfix(loss=f"{mean:.3f}")
            if progress is not None:
                progress.update(1)
            if config.eval_every and done % config.eval_every == 0 and done != config.steps:
                run_eval(done)
            stopping = parallel.any(stop.requested) if checkpoint is not None else False  # all ranks stop at one step
            if checkpoint is not None and (stopping or done == config.steps
                                           or (config.checkpoint_every and done % config.checkpoint_every == 0)):
                save(done)
                if stopping and done != config.steps:
                    if progress is not None:
                        progress.close()
                    if main:
                        print(f"saved {checkpoint} at step {done}; continue with resume=True", flush=True)
                    raise KeyboardInterrupt
    if progress is not None:
        progress.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    history.seconds += time.perf_counter() - start
    replicas.finish()  # the caller's module holds the trained weights, unwrapped
    run_eval(config.steps)
    model.eval()
    return history
