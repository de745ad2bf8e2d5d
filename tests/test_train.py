import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from mllm_scratch.train import TrainConfig, batches, lr_at, make_optimizer, no_weight_decay, to_device, train


def test_loss_falls_on_a_learnable_problem():
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    model = nn.Linear(4, 1)
    data = batches(TensorDataset(x, y), 32, seed=0)
    loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]).squeeze(-1), b[1])  # noqa: E731
    evaluate = lambda m: {"mse": nn.functional.mse_loss(m(x).squeeze(-1), y)}  # noqa: E731
    cfg = TrainConfig(steps=200, lr=0.05, warmup_steps=10, log_every=0, progress=False, weight_decay=0.0)
    hist = train(model, data, loss_fn, cfg, evaluate=evaluate, device="cpu", batch_size_of=lambda b: len(b[0]))
    assert hist.loss[-1] < 0.01 * hist.loss[0]
    assert hist.final_eval["mse"] < 0.01
    assert hist.examples == 200 * 32 and hist.examples_per_second > 0
    assert hist.steps[-1] == 200 and len(hist.steps) == 20
    assert not model.training


def test_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_weight_decay_skips_biases_norms_and_marked_parameters():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model.scale = no_weight_decay(nn.Parameter(torch.ones(2, 2)))
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(model, lr=1e-3)


def test_batches_are_reproducible_and_endless():
    ds = TensorDataset(torch.arange(10))
    a = [b[0].tolist() for _, b in zip(range(7), batches(ds, 3, seed=1))]
    b = [b[0].tolist() for _, b in zip(range(7), batches(ds, 3, seed=1))]
    assert a == b and len(a) == 7
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(batches(ds, 11))


def test_to_device_keeps_structure():
    batch = {"x": torch.ones(2), "text": ["a", "b"], "pair": (torch.zeros(1), 3)}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["text"] == ["a", "b"] and moved["pair"][1] == 3 and isinstance(moved["pair"], tuple)


def test_config_errors():
    with pytest.raises(ValueError, match="steps must be at least 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="warmup_steps must be between 0 and steps=10"):
        TrainConfig(steps=10, warmup_steps=20)


def test_compile_option_trains_the_same_model():
    # The "eager" backend traces with dynamo but runs the ops unchanged: the plumbing is tested
    # in a second, and the losses and weights must equal an uncompiled run's exactly.
    def run(compile_flag):
        torch.manual_seed(0)
        x = torch.randn(64, 4)
        model = nn.Linear(4, 1)
        data = batches(TensorDataset(x, x.sum(dim=1)), 16, seed=0)
        loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]).squeeze(-1), b[1])  # noqa: E731
        cfg = TrainConfig(steps=6, lr=0.05, warmup_steps=0, record_every=1, log_every=0, progress=False,
                          compile=compile_flag)
        return train(model, data, loss_fn, cfg, device="cpu"), model

    (plain, m1), (compiled, m2) = run(False), run("eager")
    assert plain.loss == compiled.loss
    torch.testing.assert_close(m1.weight, m2.weight, rtol=0, atol=0)
    assert type(m2) is nn.Linear  # the caller keeps its own module, not the compiled wrapper


def test_compile_option_rejects_unknown_backend():
    with pytest.raises(ValueError, match="torch.compile backend.*'nope'"):
        TrainConfig(compile="nope")


def test_train_is_adamw_with_the_schedule_and_clipping():
    # train() takes exactly the steps of a plain loop: AdamW (decay on weight matrices only), lr_at's
    # warm-up and cosine, gradients clipped to a norm of grad_clip; the losses and weights agree bit for bit
    def fresh():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    torch.manual_seed(1)
    x = torch.randn(64, 4)
    y = (x**2).sum(1)
    cfg = TrainConfig(steps=12, lr=0.05, warmup_steps=3, weight_decay=0.1, grad_clip=0.5, record_every=1,
                      log_every=0, progress=False)
    loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]).squeeze(-1), b[1])  # noqa: E731
    model = fresh()
    history = train(model, batches(TensorDataset(x, y), 16, seed=0), loss_fn, cfg, device="cpu")

    ref = fresh()
    decay = [p for p in ref.parameters() if p.dim() >= 2]
    rest = [p for p in ref.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=0.05)
    data = batches(TensorDataset(x, y), 16, seed=0)
    losses = []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = 0.05 * (lr_at(step, cfg) / 0.05)
        loss = loss_fn(ref, next(data))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        losses.append(loss.item())
    assert history.loss == losses
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)



# --- long runs: checkpoints, Ctrl-C and resume --------------------------------------------

RESUME_CONFIG = TrainConfig(steps=24, lr=0.01, warmup_steps=4, record_every=4, checkpoint_every=5,
                            log_every=0, progress=False)


def _resume_problem():
    """A small classifier with dropout (so the random state matters) and its endless batch stream."""
    torch.manual_seed(0)
    x, y = torch.randn(200, 6), torch.randint(0, 3, (200,))
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 3))
    return model, batches(TensorDataset(x, y), 16, seed=3)  # 12 batches a pass: the run crosses a reshuffle


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _failing_at(call: int, error: BaseException | None = None):
    """A loss that fails on its `call`-th use (1-based), as a crash or a Ctrl-C would."""
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        if len(calls) == call:
            if error is None:
                import signal

                signal.raise_signal(signal.SIGINT)  # the loop finishes this step, saves, then stops
            else:
                raise error
        return _loss(model, batch)

    return loss_fn


def _uninterrupted():
    model, data = _resume_problem()
    history = train(model, data, _loss, RESUME_CONFIG, device="cpu")
    return model, history


def _assert_same_run(model, history, reference_model, reference_history):
    for (name, a), b in zip(model.state_dict().items(), reference_model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert history.steps == reference_history.steps and history.loss == reference_history.loss


def test_checkpointing_does_not_change_the_run(tmp_path):
    reference_model, reference_history = _uninterrupted()
    model, data = _resume_problem()
    history = train(model, data, _loss, RESUME_CONFIG, device="cpu", checkpoint=tmp_path / "run.pt")
    _assert_same_run(model, history, reference_model, reference_history)


def test_a_crashed_run_resumes_bit_identical_from_its_last_checkpoint(tmp_path):
    reference_model, reference_history = _uninterrupted()
    path = tmp_path / "run.pt"
    model, data = _resume_problem()
    with pytest.raises(RuntimeError, match="power cut"):  # step 13 fails; the last checkpoint is step 10
        train(model, data, _failing_at(13, RuntimeError("power cut")), RESUME_CONFIG, device="cpu", checkpoint=path)
    from mllm_scratch.train import load_train_state

    assert load_train_state(path)["step"] == 10
    model, data = _resume_problem()  # a fresh process: new model, new stream, and other random draws since
    torch.manual_seed(1234)
    history = train(model, data, _loss, RESUME_CONFIG, device="cpu", checkpoint=path, resume=True)
    _assert_same_run(model, history, reference_model, reference_history)
    assert load_train_state(path)["step"] == RESUME_CONFIG.steps


def test_ctrl_c_saves_the_step_under_way_then_resume_finishes_the_run(tmp_path):
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("Ctrl-C is caught only in the main thread")
    reference_model, reference_history = _uninterrupted()
    path = tmp_path / "run.pt"
    model, data = _resume_problem()
    with pytest.raises(KeyboardInterrupt):
        train(model, data, _failing_at(8), RESUME_CONFIG, device="cpu", checkpoint=path)
    from mllm_scratch.train import load_train_state

    assert load_train_state(path)["step"] == 8  # not a periodic step: saved because of the Ctrl-C
    model, data = _resume_problem()
    history = train(model, data, _loss, RESUME_CONFIG, device="cpu", checkpoint=path, resume=True)
    _assert_same_run(model, history, reference_model, reference_history)


def test_a_checkpoint_cut_short_is_refused_and_a_failed_write_keeps_the_last_one(tmp_path, monkeypatch):
    from mllm_scratch.checkpoints import CheckpointError
    from mllm_scratch.train import load_train_state

    path = tmp_path / "run.pt"
    model, data = _resume_problem()
    with pytest.raises(RuntimeError, match="power cut"):
        train(model, data, _failing_at(7, RuntimeError("power cut")), RESUME_CONFIG, device="cpu", checkpoint=path)
    good = path.read_bytes()  # step 5

    # a write that dies halfway (a full disk, a kill) leaves the previous checkpoint as it was, and no stray file
    real_save = torch.save

    def dying_save(obj, f):
        real_save(obj, f)
        f.truncate(100)
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    model, data = _resume_problem()
    with pytest.raises(OSError, match="no space"):
        train(model, data, _loss, RESUME_CONFIG, device="cpu", checkpoint=path, resume=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]
    assert load_train_state(path)["step"] == 5

    # a file cut short by other means (a copy that stopped) is refused with a clear error, never half-loaded
    path.write_bytes(good[: len(good) // 2])
    model, data = _resume_problem()
    with pytest.raises(CheckpointError, match="not a complete training checkpoint"):
        train(model, data, _loss, RESUME_CONFIG, device="cpu", checkpoint=path, resume=True)


def test_resuming_another_runs_checkpoint_is_refused(tmp_path):
    from dataclasses import replace

    from mllm_scratch.checkpoints import CheckpointError

    path = tmp_path / "run.pt"
    model, data = _resume_problem()
    with pytest.raises(RuntimeError):
        train(model, data, _failing_at(7, RuntimeError("stop")), RESUME_CONFIG, device="cpu", checkpoint=path,
              run={"seed": 0})
    model, data = _resume_problem()
    with pytest.raises(CheckpointError, match=r"train_config\.lr"):
        train(model, data, _loss, replace(RESUME_CONFIG, lr=0.02), device="cpu", checkpoint=path, resume=True,
              run={"seed": 0})
    with pytest.raises(CheckpointError, match=r"run\.seed"):
        train(model, data, _loss, RESUME_CONFIG, device="cpu", checkpoint=path, resume=True, run={"seed": 1})
    # logging and how often to save are not part of the recipe: changing them is fine
    history = train(model, data, _loss, replace(RESUME_CONFIG, checkpoint_every=3), device="cpu", checkpoint=path,
                    resume=True, run={"seed": 0})
    assert history.steps[-1] == RESUME_CONFIG.steps


def test_resume_needs_a_checkpoint_path_and_starts_afresh_without_a_file(tmp_path):
    model, data = _resume_problem()
    with pytest.raises(ValueError, match="resume=True needs checkpoint"):
        train(model, data, _loss, RESUME_CONFIG, device="cpu", resume=True)
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainConfig(checkpoint_every=-1)
    reference_model, reference_history = _uninterrupted()
    model, data = _resume_problem()
    history = train(model, data, _loss, RESUME_CONFIG, device="cpu", checkpoint=tmp_path / "new.pt", resume=True)
    _assert_same_run(model, history, reference_model, reference_history)


# --- gradient accumulation ----------------------------------------------------------------


def test_two_micro_batches_of_8_step_as_one_batch_of_16():
    def run(batch_size, accum):
        torch.manual_seed(0)
        x = torch.randn(64, 4)
        y = (x**2).sum(1)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        cfg = TrainConfig(steps=10, lr=0.05, warmup_steps=2, weight_decay=0.1, grad_clip=0.5, record_every=1,
                          log_every=0, progress=False, grad_accum_steps=accum)
        data = batches(TensorDataset(x, y), 16, seed=0, micro_batches=accum)  # the global batch of 16, cut in `accum`
        loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]).squeeze(-1), b[1])  # noqa: E731
        history = train(model, data, loss_fn, cfg, device="cpu", batch_size_of=lambda b: len(b[0]))
        return model, history

    (one, h1), (two, h2) = run(16, 1), run(8, 2)
    for a, b in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert h2.loss == pytest.approx(h1.loss, rel=1e-6)  # the step's loss: the mean over its micro-batches
    assert h1.examples == h2.examples == 10 * 16


def test_micro_batches_are_the_global_batch_in_order_and_resume_counts_them(tmp_path):
    data = TensorDataset(torch.arange(40))
    whole = [b[0] for _, b in zip(range(6), batches(data, 8, seed=1))]
    micro = batches(data, 8, seed=1, micro_batches=2)
    assert all(torch.equal(torch.cat([next(micro)[0], next(micro)[0]]), w) for w in whole)
    with pytest.raises(ValueError, match="grad_accum_steps must be a whole number of micro-batches, at least 1, got 0"):
        TrainConfig(grad_accum_steps=0)
    with pytest.raises(ValueError, match="got 1.5"):
        TrainConfig(grad_accum_steps=1.5)

    from dataclasses import replace

    config = replace(RESUME_CONFIG, grad_accum_steps=2)

    def problem():
        torch.manual_seed(0)
        x, y = torch.randn(200, 6), torch.randint(0, 3, (200,))
        model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 3))
        return model, batches(TensorDataset(x, y), 16, seed=3, micro_batches=2)

    reference, data = problem()
    ref_history = train(reference, data, _loss, config, device="cpu")
    path = tmp_path / "run.pt"
    model, data = problem()
    with pytest.raises(RuntimeError, match="power cut"):  # micro-batch 25 is in step 13; the checkpoint holds step 10
        train(model, data, _failing_at(25, RuntimeError("power cut")), config, device="cpu", checkpoint=path)
    model, data = problem()
    history = train(model, data, _loss, config, device="cpu", checkpoint=path, resume=True)
    _assert_same_run(model, history, reference, ref_history)
    model, data = problem()
    from mllm_scratch.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match=r"train_config\.grad_accum_steps"):
        train(model, data, _loss, RESUME_CONFIG, device="cpu", checkpoint=path, resume=True)


def test_a_frozen_parameters_stale_gradient_does_not_enter_the_clipping_norm():
    """A part trained by an earlier call, then frozen, keeps its last .grad; train() clears it first,
    so the clipping norm (over every parameter) is the trained part's own."""
    def run(stale: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.ModuleDict({"frozen": nn.Linear(4, 4), "trained": nn.Linear(4, 1)})
        model["frozen"].requires_grad_(False)
        if stale:  # what an earlier stage that trained it leaves behind
            model["frozen"].weight.grad = torch.full((4, 4), 100.0)
        x, y = torch.randn(8, 4), torch.randn(8)
        optimizer = torch.optim.SGD(model["trained"].parameters(), lr=0.1)  # plain SGD: clipping shows in the step
        cfg = TrainConfig(steps=1, lr=0.1, warmup_steps=0, grad_clip=1.0, log_every=0, progress=False)
        train(model, [(x, y)], lambda m, b: nn.functional.mse_loss(m["trained"](b[0]).squeeze(-1), b[1]),
              cfg, optimizer=optimizer, device="cpu")
        assert model["frozen"].weight.grad is None
        return model["trained"].weight.detach().clone()

    torch.testing.assert_close(run(stale=True), run(stale=False), rtol=0, atol=0)
