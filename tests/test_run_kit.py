"""
The run kit's loop pieces in nanochat/training.py that every training stage shares: the run state a
checkpoint keeps (restore_run_state), the step boundary (evaluate_and_save) and eval_mode.
"""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from nanochat import training
from nanochat.common import DummyWandb
from nanochat.gpt import GPTConfig


def run_state(tmp_path, meta, scaler=None):
    model = torch.nn.Linear(4, 4)
    ckpt = training.Checkpointer(str(tmp_path / "ckpt"), model, torch.optim.SGD(model.parameters(), lr=0.1), 0)
    geometry = {"device_batch_size": 2, "live": lambda: [1, 2]}
    run = training.restore_run_state(ckpt, meta, GPTConfig(n_layer=2), {"depth": 2}, geometry, scaler,
                                     DummyWandb(), loop_extra={"loader_states": lambda: ["rank0"]},
                                     epoch=1, curve={"steps": []})
    return run, ckpt


def test_restore_run_state_saves_the_counters_and_gives_them_back(tmp_path):
    run, ckpt = run_state(tmp_path, {})
    assert (run.val_bpb, run.min_val_bpb, run.epoch, run.curve) == (None, math.inf, 1, {"steps": []})
    run.val_bpb = run.min_val_bpb = 1.5
    run.epoch = 3  # the loop rebinds its counters: the checkpoint reads them at save time
    run.curve["steps"].append(0)
    run.tracker.update(0, 2.0, 0.25)
    meta = json.loads(json.dumps(ckpt.meta(7)))
    assert list(meta) == ["step", "val_bpb", "model_config", "user_config", "device_batch_size", "live",
                          "loop_state", "grad_scaler", "wandb_run_id"]
    assert meta["model_config"]["n_layer"] == 2 and meta["user_config"] == {"depth": 2}
    assert (meta["step"], meta["val_bpb"], meta["live"], meta["wandb_run_id"]) == (7, 1.5, [1, 2], None)
    assert meta["loop_state"] == {"min_val_bpb": 1.5, "smooth_train_loss": pytest.approx(0.2),
                                  "total_training_time": 0.0, "epoch": 3, "curve": {"steps": [0]},
                                  "loader_states": ["rank0"]}
    resumed, _ = run_state(tmp_path, meta)
    assert (resumed.val_bpb, resumed.min_val_bpb, resumed.epoch, resumed.curve) == (1.5, 1.5, 3, {"steps": [0]})
    assert resumed.tracker.smooth_loss == run.tracker.smooth_loss


def test_restore_run_state_restores_the_grad_scaler(tmp_path):
    saved = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _, ckpt = run_state(tmp_path, {}, saved)
    meta = ckpt.meta(1)
    scaler = torch.amp.GradScaler("cpu")
    run_state(tmp_path, meta, scaler)
    assert scaler.get_scale() == 1024.0


def boundary(eval_every, last, val_at_last_step=False):
    """The order of what evaluate_and_save does over steps 0..last, as a list of (what, step)."""
    calls = []
    ckpt = SimpleNamespace(save=lambda step: calls.append(("save", step)), warn_if_no_room=lambda: None)
    args = SimpleNamespace(eval_every=eval_every, save_every=-1, resume_from_step=-1)
    for step in range(last + 1):
        training.evaluate_and_save(step, step == last, ckpt, args, lambda s: calls.append(("val", s)),
                                   [(3, lambda s, last_step: calls.append(("late", s)))],
                                   val_at_last_step=val_at_last_step)
    return calls


def test_evaluate_and_save_runs_val_then_save_then_late_evals():
    assert boundary(2, 4) == [("val", 0), ("val", 2), ("late", 3), ("val", 4), ("save", 4), ("late", 4)]
    # with its period off, val runs only at the last step when the stage asks for it (chat_sft)
    assert boundary(-1, 4) == [("late", 3), ("save", 4), ("late", 4)]
    assert boundary(-1, 4, val_at_last_step=True) == [("late", 3), ("val", 4), ("save", 4), ("late", 4)]


def test_a_failing_late_eval_comes_after_the_final_save():
    saved = []
    ckpt = SimpleNamespace(save=saved.append, warn_if_no_room=lambda: None)
    args = SimpleNamespace(eval_every=-1, save_every=-1, resume_from_step=-1)

    def failing(step, last_step):
        raise RuntimeError("eval failed")

    with pytest.raises(RuntimeError, match="eval failed"):
        training.evaluate_and_save(5, True, ckpt, args, None, [(10, failing)])
    assert saved == [5]


def test_a_checkpoint_without_room_on_its_disk_is_announced_once_after_the_first_step(tmp_path, monkeypatch,
                                                                                      capsys):
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    args = SimpleNamespace(eval_every=-1, save_every=-1, resume_from_step=-1)
    ckpt_dir = tmp_path / "base_checkpoints" / "d2"  # not there yet: its first save creates it
    weights = sum(p.numel() * 4 for p in model.parameters())
    shard = 2 * weights + 8  # AdamW's two moments and its two step counters

    def warning(ranks, size, free):
        return (f"Warning: a checkpoint of this run (weights and {ranks} optimizer shard(s)) takes "
                f"{size / 2**20:,.1f} MiB, and {ckpt_dir} has {free / 2**20:,.1f} MiB free: the saves will "
                f"fail. Make room there, or stop and set NANOCHAT_BASE_DIR to a disk with room\n")

    disks = []
    monkeypatch.setattr(training.shutil, "disk_usage",
                        lambda path: disks.append(path) or SimpleNamespace(free=weights + shard - 1))
    ckpt = training.Checkpointer(str(ckpt_dir), model, optimizer, 0)
    training.evaluate_and_save(0, False, ckpt, args, None)  # no optimizer state yet: nothing to measure
    assert disks == [] and capsys.readouterr().out == ""
    model(torch.ones(1, 64)).sum().backward()
    optimizer.step()
    for step in (1, 2):
        training.evaluate_and_save(step, False, ckpt, args, None)
    assert disks == [str(tmp_path)]  # once, on the nearest folder that exists
    assert capsys.readouterr().out == warning(1, weights + shard, weights + shard - 1)
    # rank 0 counts every rank's shard, each the size of its own; the other ranks say nothing
    monkeypatch.setattr(training, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(training.shutil, "disk_usage", lambda path: SimpleNamespace(free=weights + shard))
    new_run = lambda rank: training.Checkpointer(str(ckpt_dir), model, optimizer, rank)  # noqa: E731
    training.evaluate_and_save(3, False, new_run(0), args, None)
    assert capsys.readouterr().out == warning(2, weights + 2 * shard, weights + shard)
    training.evaluate_and_save(3, False, new_run(1), args, None)
    monkeypatch.setattr(training, "rank_and_world", lambda: (0, 1))
    training.evaluate_and_save(3, False, new_run(0), args, None)
    assert capsys.readouterr().out == ""  # it fits


def test_eval_mode_switches_back_to_training_even_after_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    with training.eval_mode(model):
        assert not model.training and not model[1].training
    assert model.training and model[1].training
    with pytest.raises(ValueError):
        with training.eval_mode(model):
            raise ValueError("boom")
    assert model.training
