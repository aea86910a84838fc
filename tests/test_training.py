import os
import signal
import types

import pytest
import torch

from conftest import spawn_ranks, tiny_gpt, write_tiny_checkpoint
from nanochat import common, training


def test_base_lr_schedule_reference_values():
    # pipeline spec §7.5 examples: n = 1000, warmup 40, warmdown ratio 0.65, final 0.05
    lrm = lambda it: training.base_lr_multiplier(it, 1000, 40, 0.65, 0.05)
    assert lrm(0) == pytest.approx(0.025)
    assert lrm(39) == pytest.approx(1.0)
    assert lrm(350) == 1.0
    assert lrm(351) == pytest.approx(0.99854, abs=1e-5)
    assert lrm(999) == pytest.approx(0.05146, abs=1e-5)
    values = [lrm(it) for it in range(40, 1000)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never increases after warmup


def test_base_momentum_and_weight_decay_schedules():
    mom = lambda it: training.base_muon_momentum(it, 1000, 0.65)
    assert mom(0) == pytest.approx(0.85)
    assert mom(200) == pytest.approx(0.91)
    assert mom(400) == pytest.approx(0.96462, abs=1e-5)  # already in the warmdown branch (it >= 350)
    assert training.base_muon_momentum(500, 2000, 0.5) == 0.97
    assert training.base_muon_momentum(1999, 2000, 0.5) == pytest.approx(0.97 - 0.07 * 999 / 1000)
    assert training.base_weight_decay(0, 100, 0.2) == pytest.approx(0.2)
    assert training.base_weight_decay(50, 100, 0.2) == pytest.approx(0.1)
    assert training.base_weight_decay(100, 100, 0.2) == pytest.approx(0.0, abs=1e-12)


def test_base_momentum_is_bitwise_the_references_interpolation():
    # the reference blends the endpoints, (1 - f) * a + f * b; a + (b - a) * f differs in the last bit at
    # about a quarter of the steps, which a side-by-side run with the reference would see
    n, warmdown = 1000, 650
    for it in range(n):
        if it < 400:
            f = it / 400
            expected = (1 - f) * 0.85 + f * 0.97
        elif it >= n - warmdown:
            p = (it - (n - warmdown)) / warmdown
            expected = 0.97 * (1 - p) + 0.90 * p
        else:
            expected = 0.97
        assert training.base_muon_momentum(it, n, 0.65) == expected, it


def test_sft_schedule():
    lrm = lambda p: training.sft_lr_multiplier(p, 0.0, 0.5, 0.0)
    assert lrm(0.0) == 1.0 and lrm(0.5) == 1.0
    assert lrm(0.75) == pytest.approx(0.5)
    assert lrm(1.0) == pytest.approx(0.0)
    assert training.sft_lr_multiplier(0.05, 0.1, 0.5, 0.0) == pytest.approx(0.5, rel=1e-6)
    assert training.sft_muon_momentum(0) == 0.85
    assert training.sft_muon_momentum(150) == pytest.approx(0.90)
    assert training.sft_muon_momentum(3000) == pytest.approx(0.95)


def test_apply_schedule_touches_the_right_groups():
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([dict(params=[p1], lr=0.1, kind="adamw"), dict(params=[p2], lr=0.2, kind="muon",
                                                                         momentum=0.95, weight_decay=0.3)])
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    training.apply_schedule(opt, 0.5, muon_momentum=0.9, muon_weight_decay=0.01)
    adamw, muon = opt.param_groups
    assert adamw["lr"] == pytest.approx(0.05) and "weight_decay" in adamw and adamw["weight_decay"] == 0
    assert muon["lr"] == pytest.approx(0.1) and muon["momentum"] == 0.9 and muon["weight_decay"] == 0.01
    training.apply_schedule(opt, 0.5)  # the next step, same multiplier: the same LR, not half of it again
    assert adamw["lr"] == pytest.approx(0.05) and muon["lr"] == pytest.approx(0.1)
    assert muon["momentum"] == 0.9 and muon["weight_decay"] == 0.01  # not given: left as they were


def test_grad_accum_steps():
    assert training.grad_accum_steps(524288, 32, 2048, 8) == 1
    assert training.grad_accum_steps(1048576, 16, 2048, 8) == 4
    with pytest.raises(ValueError, match="multiple"):
        training.grad_accum_steps(1000, 2, 64, 1)
    with pytest.raises(ValueError, match="= 512"):  # one micro-batch per rank is already 512 tokens
        training.grad_accum_steps(256, 2, 64, 4)
    assert training.eval_steps_for(100, 2, 64, 1) == 1
    assert training.eval_steps_for(80 * 524288, 32, 2048, 8) == 80


def test_loss_tracker_debias_and_timing():
    t = training.LossTracker()
    assert t.update(0, 4.0, 1.0) == pytest.approx(4.0)  # debiasing makes the first value exact
    assert t.update(1, 4.0, 1.0) == pytest.approx(4.0)
    assert t.total_training_time == 0  # steps 0..10 are not timed
    for step in range(2, 13):
        t.update(step, 4.0, 2.0)
    assert t.total_training_time == pytest.approx(4.0)  # steps 11 and 12
    assert t.eta_suffix(10, 100) == ""
    assert t.eta_suffix(12, 100) == f" | eta: {88 * 4.0 / 2 / 60:.1f}m"
    fresh = training.LossTracker()
    assert fresh.debiased(0) == 0.0
    smooth = [fresh.update(step, loss, 1.0) for step, loss in enumerate([3.0, 5.0])]
    assert fresh.debiased(2) == smooth[-1]  # a step without an update logs the last update's value


def test_cadence():
    assert training.every(0, 10, False, include_step_zero=True)
    assert not training.every(0, 10, False)
    assert training.every(20, 10, False) and not training.every(21, 10, False)
    assert training.every(21, 10, True)
    assert not training.every(21, -1, True)  # off means off, even at the end


def test_percent_of_peak():
    assert common.percent_of_peak(1e9, 1e10) == pytest.approx(10.0)
    assert common.percent_of_peak(1e9, float("inf")) == 0.0  # an unknown device's peak


def test_stop_flag_catches_sigterm_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with training.StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.signum == signal.SIGTERM  # still alive: the signal only set the flag
        signalled, non_finite = training.should_stop(flag, 1.0, "cpu")
        assert signalled and not non_finite
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_second_signal_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with training.StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # the user sent it again: no waiting for the step to end
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) == before  # a third one is handled as before the run
    assert signal.getsignal(signal.SIGTERM) == before


def test_stop_flag_outside_the_main_thread_leaves_signals_alone():
    # a training loop started from a worker thread (a notebook, a test) runs without signal handling
    import threading
    before, outcome = signal.getsignal(signal.SIGTERM), []

    def run():
        try:
            with training.StopFlag() as flag:
                outcome.append(flag.signum)
        except ValueError as e:
            outcome.append(e)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert outcome == [None] and signal.getsignal(signal.SIGTERM) == before


def test_should_stop_sees_non_finite_loss():
    with training.StopFlag() as flag:
        assert training.should_stop(flag, 2.0, "cpu") == (False, False)
        assert training.should_stop(flag, float("nan"), "cpu") == (False, True)
        assert training.should_stop(flag, float("inf"), "cpu") == (False, True)


def test_grad_scaler_only_for_fp16():
    assert training.make_grad_scaler(torch.float32, "cpu") is None
    assert training.make_grad_scaler(torch.bfloat16, "cpu") is None
    scaler = training.make_grad_scaler(torch.float16, "cpu")
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()


def test_exit_after_signal_saves_then_exits_with_the_signal_code(capsys):
    saved = []
    with pytest.raises(SystemExit) as e:
        training.exit_after_signal(saved.append, 7, signal.SIGTERM)
    assert e.value.code == 128 + signal.SIGTERM and saved == [7]
    assert "resume with --resume-from-step=7" in capsys.readouterr().out


def test_agree_max_without_process_group():
    assert common.agree_max([0.5, 0, 1], "cpu") == [0.5, 0.0, 1.0]


# -----------------------------------------------------------------------------
# Micro-batches without a supervised token (SFT), on a tiny GPT perturbed away from its zero-initialised
# projections so that every weight gets a gradient

def micro_batch(seed, masked=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (2, 16), generator=g)
    y = torch.randint(0, 64, (2, 16), generator=g)
    y[:, :5] = -1  # a prompt: not supervised
    if masked:
        y[:] = -1  # all padding / a prompt cut before its answer
    return x, y


def grads_after(model, batches, step_fn):
    model.zero_grad(set_to_none=True)
    step_fn(model, batches)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def masked_step(model, batches):
    """What chat_sft does for one optimizer step; returns the micro-step losses."""
    losses = [training.masked_micro_step(model, x, y, bool((y >= 0).any()), len(batches)) for x, y in batches]
    n_with_targets = sum(loss is not None for loss in losses)
    n_counted = training.renormalise_accumulated_grads(model, n_with_targets, len(batches), "cpu")
    assert n_counted == n_with_targets
    return losses


def reference_step(model, batches):
    """The reference's formula: mean cross-entropy of each micro-batch / accum, backward."""
    for x, y in batches:
        (model(x, y) / len(batches)).backward()


def test_a_normal_step_is_bitwise_the_reference_formula():
    model = tiny_gpt(vocab_size=64, perturb=0.01)
    batches = [micro_batch(1), micro_batch(2), micro_batch(3)]
    ours, reference = grads_after(model, batches, masked_step), grads_after(model, batches, reference_step)
    assert all(torch.equal(ours[n], reference[n]) for n in ours)


def test_a_fully_masked_micro_batch_adds_no_gradient_and_leaves_the_mean():
    model = tiny_gpt(vocab_size=64, perturb=0.01)
    a, b, empty = micro_batch(1), micro_batch(2), micro_batch(4, masked=True)
    assert torch.isnan(model(*empty))  # the plain mean is 0/0: what poisoned the reference's weights
    losses = []
    with_empty = grads_after(model, [a, empty, b], lambda m, bs: losses.extend(masked_step(m, bs)))
    assert losses[1] is None and all(torch.isfinite(loss) for loss in (losses[0], losses[2]))
    assert all(torch.isfinite(g).all() for g in with_empty.values())
    # the step is the mean over the two micro-batches with targets, as if the empty one was never there
    without = grads_after(model, [a, b], reference_step)
    assert all(torch.allclose(with_empty[n], without[n], rtol=1e-5, atol=1e-6) for n in without)
    # and the empty micro-batch's own contribution is exactly zero
    model.zero_grad(set_to_none=True)
    assert training.masked_micro_step(model, *empty, has_targets=False, accum=3) is None
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_a_step_with_no_supervised_token_leaves_the_weights_unchanged():
    model = tiny_gpt(vocab_size=64, perturb=0.01)
    optimizer = model.setup_optimizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [micro_batch(5, masked=True), micro_batch(6, masked=True)]
    losses = [training.masked_micro_step(model, x, y, False, 2) for x, y in batches]
    assert losses == [None, None]
    assert training.renormalise_accumulated_grads(model, 0, 2, "cpu") == 0
    timer = training.StepTimer("cpu")
    timer.start()
    with training.StopFlag() as flag:
        loss, _, _ = training.finish_step(optimizer, model, None, torch.tensor(2.5), timer, flag, "cpu", 0,
                                          "dir", update=False)
    assert loss == 2.5
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())  # the next step does not add onto these grads


# -----------------------------------------------------------------------------
# The run kit

class _Counter:
    """A registered object with state_dict/load_state_dict, as a loader or scaler is."""

    def __init__(self, value=0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def test_checkpointer_writes_reference_files_and_restores_registered_state(tmp_path):
    import json
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    counter, loop = _Counter(7), {"min_val_bpb": 1.5}
    ckpt = training.Checkpointer(str(tmp_path), model, optimizer, rank=0)
    ckpt.register("val_bpb", lambda: loop["min_val_bpb"])  # read at save time
    ckpt.register("user_config", {"depth": 2})
    ckpt.register("loader", counter)
    ckpt.register("grad_scaler", None)
    loop["min_val_bpb"] = 1.25
    ckpt.save(3)
    assert sorted(os.listdir(tmp_path)) == ["meta_000003.json", "model_000003.pt", "optim_000003_rank0.pt"]
    with open(tmp_path / "meta_000003.json") as f:
        meta = json.load(f)
    assert list(meta) == ["step", "val_bpb", "user_config", "loader", "grad_scaler"]
    assert meta == {"step": 3, "val_bpb": 1.25, "user_config": {"depth": 2}, "loader": {"value": 7},
                    "grad_scaler": None}
    saved_model = torch.load(tmp_path / "model_000003.pt")
    assert all(torch.equal(saved_model[k], v) for k, v in model.state_dict().items())
    assert torch.load(tmp_path / "optim_000003_rank0.pt")["state"][0]["momentum_buffer"] is not None
    fresh = _Counter()
    restorer = training.Checkpointer(str(tmp_path), model, optimizer, rank=0)
    restorer.register("loader", fresh)
    restorer.register("grad_scaler", None)
    restorer.restore(meta)
    assert fresh.value == 7
    restorer.restore({"loader": None})  # saved without it (a bf16 run's grad_scaler): left as it is
    assert fresh.value == 7


def saved_steps(steps, last, save_every, resume_from_step):
    """The steps evaluate_and_save checkpoints over `steps` (val and late evals off)."""
    saved = []
    args = types.SimpleNamespace(eval_every=-1, save_every=save_every, resume_from_step=resume_from_step)
    ckpt = types.SimpleNamespace(save=saved.append, warn_if_no_room=lambda: None)
    for s in steps:
        training.evaluate_and_save(s, s == last, ckpt, args, None)
    return saved


def test_save_cadence():
    assert saved_steps(range(0, 13), 12, save_every=5, resume_from_step=-1) == [5, 10, 12]
    # the step just resumed from is already on disk
    assert saved_steps(range(5, 13), 12, save_every=5, resume_from_step=5) == [10, 12]
    assert saved_steps(range(13), 12, -1, -1) == [12]


class _Batches:
    def __init__(self, batches):
        self.batches, self.i, self.current = batches, 0, batches[0]

    def advance(self):
        self.i += 1
        self.current = self.batches[self.i] if self.i < len(self.batches) else None
        return self.i


def test_train_micro_steps_accumulates_the_mean_and_advances_after_each_forward():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)

    def forward(x, y, loss_reduction="mean"):
        err = (model(x).squeeze(-1) - y) ** 2
        err = err[y >= 0]
        return err.sum() if loss_reduction == "sum" else err.mean()

    x = torch.randn(3, 2, 4)
    y = torch.tensor([[1.0, 2.0], [-1.0, -1.0], [0.5, 3.0]])  # the middle micro-batch has no target
    batches = _Batches([(x[i], y[i], bool((y[i] >= 0).any())) for i in range(3)])
    loss, n_with_targets, advanced = training.train_micro_steps(forward, batches, accum=3)
    assert n_with_targets == 2 and advanced == [1, 2, 3]
    assert torch.equal(loss, forward(x[2], y[2]).detach())  # the last micro-batch that had targets
    assert not loss.requires_grad  # kept for logging: it must not keep the step's graph alive
    expected = torch.autograd.grad((forward(x[0], y[0]) + forward(x[2], y[2])) / 3, model.weight)[0]
    assert torch.allclose(model.weight.grad, expected)


def test_step_logger_prints_the_stage_line_and_logs_wandb_every_n_steps(capsys):
    tracker = training.LossTracker(total_training_time=120.0)
    logged = []
    wandb_run = types.SimpleNamespace(log=logged.append)
    # 250 tokens per step at 1e9 FLOPs per token in 0.25 s on one device of 1e12 peak FLOPS: 100% MFU
    logger = training.StepLogger(250, 1e9, 1e12, 1, wandb_run, 4, mfu_label="bf16_mfu")
    for step in (11, 12):
        mfu = logger.log(step, "/00020 (60.00%)", 3.5, 0.5, 0.25, tracker, "epoch: 1 pq: 0 rg: 2",
                         "1 pq: 0 rg: 2", " | eta: 1.0m")
    assert mfu == pytest.approx(100.0)
    assert capsys.readouterr().out.splitlines()[-1] == (
        "step 00012/00020 (60.00%) | loss: 3.500000 | lrm: 0.50 | dt: 250.00ms | tok/sec: 1,000 | "
        "bf16_mfu: 100.00 | epoch: 1 pq: 0 rg: 2 | total time: 2.00m | eta: 1.0m")
    assert logged == [{"step": 12, "total_training_flops": 1e9 * 250 * 12, "total_training_time": 120.0,
                       "train/loss": 3.5, "train/lrm": 0.5, "train/dt": 0.25, "train/tok_per_sec": 1000,
                       "train/mfu": pytest.approx(100.0), "train/epoch": "1 pq: 0 rg: 2"}]
    assert training.LossTracker(0.5, 3.0).state_dict() == {"smooth_train_loss": 0.5, "total_training_time": 3.0}
    # SFT numbers its line after the step: wandb's FLOPs count the steps done; MFU is per device
    logger = training.StepLogger(250, 1e9, 1e12, 2, wandb_run, 4)
    assert logger.log(12, "", 3.5, 0.5, 0.25, tracker, "", 1, steps_done=11) == pytest.approx(50.0)
    assert logged[-1]["total_training_flops"] == 1e9 * 250 * 11


# -----------------------------------------------------------------------------
# A checkpoint without optimizer state: a resume refuses it, a warm start goes on with a fresh optimizer

def test_a_checkpoint_without_optimizer_state_cannot_be_resumed_but_can_seed(tiny_base_dir, capsys):
    _, model = write_tiny_checkpoint(tiny_base_dir, "base", step=5)  # model and meta only
    message = "--resume-from-step=5: the base checkpoint d2 has no optimizer state for rank 0; resume from"
    with pytest.raises(FileNotFoundError, match=message + " a step that has it"):
        training.setup_optimizer(model, {}, 0.0, "cpu", 0, ("base", "d2", 5))
    optimizer = training.setup_optimizer(model, {"matrix_lr": 0.01}, 0.0, "cpu", 0, ("sft", "d2", -1),
                                         init_lr_frac=0.5, warm_from=("base", "d2", 5))
    out = capsys.readouterr().out
    assert "WARNING: no optimizer state in the base checkpoint; starting the optimizer fresh" in out
    assert not optimizer.state and optimizer.param_groups[-1]["lr"] == 0.005
    assert optimizer.param_groups[-1]["initial_lr"] == 0.005  # what the schedule scales from every step


@pytest.mark.parametrize("per_rank_states", [{"dataloader_state_dicts": [{}, {}]},  # base_train's meta
                                             {"loop_state": {"loader_states": [{}, {}]}},  # chat_sft's
                                             {"loop_state": {"world_size": 2}}])  # chat_rl's
def test_a_lost_optimizer_shard_is_not_read_as_a_smaller_world(tiny_base_dir, capsys, per_rank_states):
    import json
    from conftest import write_tiny_checkpoint
    ckpt, model = write_tiny_checkpoint(tiny_base_dir, "base", step=5, optimizer_state={"state": {}})
    with open(os.path.join(ckpt, "meta_000005.json")) as f:  # two ranks saved it; rank 1's shard is lost
        meta = json.load(f) | per_rank_states
    with open(os.path.join(ckpt, "meta_000005.json"), "w") as f:
        json.dump(meta, f)
    lost = os.path.join(ckpt, "optim_000005_rank1.pt")
    with pytest.raises(common.BadFileError, match=f"{lost} is missing .*; restore it, or resume from another"):
        training.setup_optimizer(model, {}, 0.0, "cpu", 0, ("base", "d2", 5))  # on one rank
    optimizer = training.setup_optimizer(model, {}, 0.0, "cpu", 0, ("sft", "d2", -1),
                                         warm_from=("base", "d2", 5))
    assert "saved by 1 rank(s) and this run has 1 (a shard is lost); starting the optimizer fresh" in \
        capsys.readouterr().out
    assert not optimizer.state
    torch.save({"state": {}}, lost)  # both shards there: the usual refusal of another world size
    with pytest.raises(common.BadSettingError, match=r"shards of 2 rank.*\(torchrun --nproc_per_node=2\)"):
        training.setup_optimizer(model, {}, 0.0, "cpu", 0, ("base", "d2", 5))


def test_a_resume_may_start_at_the_horizon_but_not_past_it():
    # the loop ends at step == horizon: resuming the last checkpoint just runs the final evaluations again
    for step in (0, 7, 10):
        training.check_resume_horizon(step, 10, "--num-steps")
    # past it, the loop would never meet its last step
    with pytest.raises(common.BadSettingError, match="^--resume-from-step=11 is past this run's horizon of "
                                                     "10 steps; pass --num-steps for at least 11 steps$"):
        training.check_resume_horizon(11, 10, "--num-steps")


def checkpoint_with_a_trained_optimizer(base):
    """(model, optimizer state) of base checkpoint d2 step 5, whose optimizer shard is a run's stopped
    mid-way: one step taken (non-zero buffers), then every LR and the Muon momentum and weight decay moved
    by the schedule away from where a fresh optimizer starts."""
    from conftest import write_tiny_checkpoint
    _, model = write_tiny_checkpoint(base, "base", step=5)
    optimizer = model.setup_optimizer(weight_decay=0.2)
    x = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(x, x).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    training.apply_schedule(optimizer, 0.25, muon_momentum=0.9, muon_weight_decay=0.05)
    write_tiny_checkpoint(base, "base", step=5, optimizer_state=optimizer.state_dict())
    return model, optimizer.state_dict()


def group_settings(optimizer_state):
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer_state["param_groups"]]


def assert_same_buffers(state, saved):
    assert saved["state"] and state["state"].keys() == saved["state"].keys()
    for key, buffers in saved["state"].items():
        assert state["state"][key].keys() == buffers.keys()
        for name, value in buffers.items():
            assert torch.equal(torch.as_tensor(state["state"][key][name]), torch.as_tensor(value)), name


def test_a_resumed_optimizer_has_the_saved_buffers_and_the_schedules_settings(tiny_base_dir):
    model, saved = checkpoint_with_a_trained_optimizer(tiny_base_dir)
    # the flags would start a fresh optimizer elsewhere: a resume continues the saved one
    resumed = training.setup_optimizer(model, {"matrix_lr": 0.5}, 0.0, "cpu", 0, ("base", "d2", 5))
    assert group_settings(resumed.state_dict()) == group_settings(saved)
    assert_same_buffers(resumed.state_dict(), saved)


def test_a_warm_start_loads_the_buffers_but_keeps_this_runs_settings(tiny_base_dir):
    model, saved = checkpoint_with_a_trained_optimizer(tiny_base_dir)  # pretraining's, mid-schedule
    warm = training.setup_optimizer(model, {"matrix_lr": 0.01}, 0.0, "cpu", 0, ("sft", "d2", -1),
                                    init_lr_frac=0.5, warm_from=("base", "d2", 5))
    # this run's settings (weight_decay=0.0 for the Muon groups) at init_lr_frac of its LRs
    expected = group_settings(model.setup_optimizer(matrix_lr=0.01, weight_decay=0.0).state_dict())
    for group in expected:
        group["lr"] = group["initial_lr"] = group["lr"] * 0.5
    assert group_settings(warm.state_dict()) == expected
    assert {g["weight_decay"] for g in warm.param_groups if g["kind"] == "muon"} == {0.0}
    assert_same_buffers(warm.state_dict(), saved)


def test_the_collector_off_during_training_still_runs_every_5000_steps():
    import gc
    import weakref

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)
    enabled = gc.isenabled()
    gc.disable()  # as after the first step
    try:
        ref = cycle()
        training.gc_after_step(4999, -1)
        assert ref() is not None  # an ordinary step leaves the cycle
        training.gc_after_step(5000, -1)
        assert ref() is None
        gc.enable()
        training.gc_after_step(8, 7)  # the first step of a run resumed from step 7
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


# -----------------------------------------------------------------------------
# fp16 (NANOCHAT_DTYPE=float16, also on CPU): a step with inf/nan gradients is skipped, on every rank

def scaled_step(grad):
    """(parameter after training.optimizer_step with a CPU GradScaler and this (scaled) gradient, scale)."""
    p = torch.nn.Parameter(torch.ones(2))
    optimizer, scaler = torch.optim.SGD([p], lr=0.5), torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # scaling the loss creates the scale
    p.grad = grad
    training.optimizer_step(optimizer, scaler)
    return p.detach(), scaler.get_scale()


def test_a_step_with_inf_gradients_is_skipped_and_the_scale_backs_off():
    p, scale = scaled_step(torch.tensor([4.0, 8.0]))
    assert p.tolist() == [0.5, 0.0] and scale == 4.0  # unscaled grad [1, 2], lr 0.5
    p, scale = scaled_step(torch.tensor([4.0, float("inf")]))
    assert p.tolist() == [1.0, 1.0] and scale == 2.0


def _scaled_step_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        grad = torch.tensor([4.0, float("inf") if rank == 1 else 8.0])  # only rank 1 overflowed
        torch.save(scaled_step(grad), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_every_rank_skips_the_step_one_rank_overflowed(tmp_path):
    spawn_ranks(_scaled_step_worker, str(tmp_path / "pg"), str(tmp_path))
    for rank in range(2):
        p, scale = torch.load(tmp_path / f"rank{rank}.pt")
        assert p.tolist() == [1.0, 1.0] and scale == 2.0, rank
