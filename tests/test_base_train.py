"""
base_train: the scaling rules as pure functions (against the spec's depth table), then real d2 runs on
the committed sample: checkpoint + report, exact resume after SIGTERM, and the NaN guard.
"""
import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
import torch
import torch.distributed as dist

import nanochat.flash_attention as fa
from nanochat import common, pretraining, training
from scripts import base_train

from conftest import exits_with_error, install_sample_base_dir, spawn_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# pipeline spec §7.3: reference architecture at T=2048, SSSL, vocab 32768, ratio 12
DEPTH_TABLE = [  # depth, model_dim, scaling params N, auto B, iterations, scaled wd
    (4, 256, 11_534_384, 262_144, 528, 1.8899),
    (6, 384, 23_199_852, 262_144, 1_062, 0.9396),
    (8, 512, 41_943_232, 262_144, 1_920, 0.5197),
    (12, 768, 110_100_912, 524_288, 2_520, 0.2800),
    (16, 1024, 234_881_792, 524_288, 5_376, 0.1313),
    (20, 1280, 435_160_240, 1_048_576, 4_980, 0.1002),
    (24, 1536, 729_810_624, 1_048_576, 8_352, 0.0597),
    (26, 1664, 918_423_532, 1_048_576, 10_510, 0.0475),
    (32, 2048, 1_677_724_672, 2_097_152, 9_600, 0.0368),
]


@pytest.mark.parametrize("depth,model_dim,n_scaling,batch,iters,wd", DEPTH_TABLE)
def test_depth_dial_matches_reference_table(depth, model_dim, n_scaling, batch, iters, wd):
    args = base_train.parse_args([f"--depth={depth}"])
    model = pretraining.build_model_meta(pretraining.model_config(args, depth, 32768))
    assert model.config.n_embd == model_dim
    assert model.config.n_embd // model.config.n_head == 128
    n = pretraining.scaling_params(model)
    assert n == n_scaling
    ref = pretraining.scaling_params(pretraining.build_model_meta(pretraining.model_config(args, 12, 32768)))
    target, reference = int(12 * n), 12 * ref
    B = pretraining.auto_total_batch_size(target, reference)
    assert B == batch
    assert pretraining.num_iterations_for(args, model.estimate_flops(), B, target) == iters
    assert pretraining.scaled_weight_decay(0.28, B, target, reference) == pytest.approx(wd, abs=5e-5)


def test_horizon_precedence_and_errors():
    args = base_train.parse_args(["--num-iterations=7", "--target-flops=1e18"])
    assert pretraining.num_iterations_for(args, 1e6, 1000, 10**9) == 7
    args = base_train.parse_args(["--target-flops=1e12"])
    assert pretraining.num_iterations_for(args, 1e6, 1000, 10**9) == 1000
    args = base_train.parse_args(["--target-param-data-ratio=-1"])
    with pytest.raises(ValueError, match="horizon"):
        pretraining.num_iterations_for(args, 1e6, 1000, -10**9)


@pytest.mark.parametrize("argv", [["--depth=0"], ["--window-pattern=SXL"], ["--target-param-data-ratio=0"],
                                  ["--warmdown-ratio=1.5"], ["--fp8", "--fp8-recipe=rowwise"],
                                  ["--num-iterations=0"], ["--num-iterations=-5"], ["--target-flops=0"],
                                  ["--total-batch-size=0"], ["--head-dim=7"], ["--warmup-steps=-1"],
                                  ["--mup-base-width=-64"], ["--l3-n-emb=-64"], ["--l3-lzw-tokens=0"]])
def test_bad_flags_are_rejected(argv, capsys):
    with pytest.raises(SystemExit) as e:
        base_train.parse_args(argv)
    assert e.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error" in last_line and argv[-1].split("=")[0] in last_line  # names the flag


def test_l3_tables_that_do_not_split_over_the_ranks_are_refused(monkeypatch, capsys):
    # torchrun's environment for rank 0 of 2: each rank updates an equal slice of the table rows
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)
    assert base_train.parse_args(["--l3-after-layers=0", "--l3-n-emb=64"]).l3_n_emb == 64
    with pytest.raises(SystemExit):
        base_train.parse_args(["--l3-after-layers=0", "--l3-n-emb=65"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--l3-n-emb must be a multiple of the number of ranks (2), got 65")


def test_no_warmup_is_a_valid_setting():
    # the reference accepts --warmup-steps=0: the LR multiplier is 1 from the first step
    args = base_train.parse_args(["--warmup-steps=0"])
    assert training.base_lr_multiplier(0, 100, args.warmup_steps, 0.5, 0.05) == 1.0


def test_model_dim_rounds_up_to_whole_heads():
    args = base_train.parse_args(["--depth=25"])
    cfg = pretraining.model_config(args, 25, 32768)
    assert (cfg.n_embd, cfg.n_head) == (1664, 13)  # 25 * 64 = 1600 -> 13 heads of 128


# -----------------------------------------------------------------------------
# Real runs on the committed sample

TRAIN_FLAGS = ["--device-type=cpu", "--depth=2", "--head-dim=64", "--max-seq-len=64", "--device-batch-size=2",
               "--total-batch-size=256", "--eval-tokens=256", "--core-metric-every=-1", "--sample-every=-1",
               "--window-pattern=L", "--warmup-steps=2", "--embedding-lr=3", "--unembedding-lr=0.5",
               "--matrix-lr=0.5"]  # large LRs for the tiny batch: the weights visibly move every step


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, sample_tokenizer):
    with pytest.MonkeyPatch.context() as mp:
        yield install_sample_base_dir(mp, tmp_path_factory.mktemp("nanochat_base"), sample_tokenizer)


def run_main(argv, capsys):
    """base_train.main in this process; the GC policy and deterministic mode it sets are undone afterwards."""
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        base_train.main(argv)
    finally:
        gc.enable()
        gc.unfreeze()
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    return capsys.readouterr().out


def step_losses(out):
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^step (\d+)/\d+ .*? loss: ([\d.]+)", out, re.M)}


def test_train_writes_checkpoint_meta_and_report(base_dir, capsys):
    out = run_main(TRAIN_FLAGS + ["--num-iterations=4", "--eval-every=2", "--model-tag=t_basic"], capsys)
    ckpt = os.path.join(base_dir, "base_checkpoints", "t_basic")
    assert sorted(os.listdir(ckpt)) == ["meta_000004.json", "model_000004.pt", "optim_000004_rank0.pt"]
    with open(os.path.join(ckpt, "meta_000004.json")) as f:
        meta = json.load(f)
    for key in ["step", "val_bpb", "model_config", "user_config", "device_batch_size", "max_seq_len",
                "total_batch_size", "dataloader_state_dict", "loop_state"]:
        assert key in meta
    assert meta["step"] == 4 and meta["model_config"]["n_layer"] == 2 and meta["max_seq_len"] == 64
    assert {"min_val_bpb", "smooth_train_loss", "total_training_time"} <= set(meta["loop_state"])
    assert len(re.findall(r"Validation bpb: ", out)) == 3  # steps 0, 2, 4
    assert len(step_losses(out)) == 4
    report_dir = os.path.join(base_dir, "report")
    assert "Calculated number of iterations: 4" in open(os.path.join(report_dir, "base-model-training.md")).read()
    assert os.path.exists(os.path.join(report_dir, "base-model-loss.png"))
    loss_md = open(os.path.join(report_dir, "base-model-loss.md")).read()
    # train loss (nats/token) and val bpb (bits/byte) are named apart and plotted on panels of their own
    assert "- train loss (last): " in loss_md and "- val bpb (min): " in loss_md and "bpb loss" not in loss_md
    assert loss_md.index("- train loss (last)") < loss_md.index("- val bpb (last)")  # the panels' order
    # the checkpoint loads back into a model with the same weights
    from nanochat.checkpoint_manager import load_model
    model, tokenizer, meta2 = load_model("base", torch.device("cpu"), phase="eval", model_tag="t_basic")
    saved = torch.load(os.path.join(ckpt, "model_000004.pt"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())
    assert meta2["step"] == 4


def test_a_horizon_of_zero_steps_evaluates_saves_and_reports(base_dir, capsys):
    # a FLOPs budget below one step: the reference reaches the report with its MFU never set (NameError)
    out = run_main(TRAIN_FLAGS + ["--target-flops=1", "--model-tag=t_zero"], capsys)
    assert "Calculated number of iterations from target FLOPs: 0" in out and "Validation bpb: " in out
    assert os.listdir(os.path.join(base_dir, "base_checkpoints", "t_zero")) != []
    section = open(os.path.join(base_dir, "report", "base-model-training.md")).read()
    assert "- MFU %: 0.00%" in section


def test_resume_after_sigterm_matches_uninterrupted_run(base_dir, capsys):
    n = 8
    straight = run_main(TRAIN_FLAGS + [f"--num-iterations={n}", "--eval-every=-1", "--model-tag=t_straight"], capsys)
    # the same run in a subprocess, stopped by SIGTERM part-way through
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "scripts.base_train"] + TRAIN_FLAGS + [
        f"--num-iterations={n}", "--eval-every=-1", "--model-tag=t_resumed"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 00002/"):
            proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    interrupted = "".join(lines)
    assert proc.returncode == 128 + signal.SIGTERM, interrupted
    match = re.search(r"resume with --resume-from-step=(\d+)", interrupted)
    assert match, interrupted
    stop_step = int(match.group(1))
    assert 3 <= stop_step < n
    ckpt = os.path.join(base_dir, "base_checkpoints", "t_resumed")
    assert os.path.exists(os.path.join(ckpt, f"meta_{stop_step:06d}.json"))
    resumed = run_main(TRAIN_FLAGS + [f"--num-iterations={n}", "--eval-every=-1", "--model-tag=t_resumed",
                                      f"--resume-from-step={stop_step}"], capsys)
    # exact: the printed (smoothed) losses agree to every printed digit, and the final weights bitwise
    losses_straight, losses_resumed = step_losses(straight), step_losses(resumed)
    assert sorted(losses_resumed) == list(range(stop_step, n))
    assert all(losses_resumed[s] == losses_straight[s] for s in losses_resumed), (losses_straight, losses_resumed)
    a = torch.load(os.path.join(base_dir, "base_checkpoints", "t_straight", f"model_{n:06d}.pt"))
    b = torch.load(os.path.join(ckpt, f"model_{n:06d}.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(base_dir, capsys):
    tag = "t_nan"
    flags = TRAIN_FLAGS + ["--num-iterations=6", "--eval-every=-1", f"--model-tag={tag}", "--save-every=1"]
    # LRs that overflow float32: the weights become inf, the loss NaN
    flags = [f for f in flags if not f.startswith(("--embedding-lr", "--matrix-lr"))] + ["--embedding-lr=1e38", "--matrix-lr=1e38"]
    from nanochat.training import NonFiniteLossError
    with pytest.raises(NonFiniteLossError, match="last good"):
        run_main(flags, capsys)
    ckpt = os.path.join(base_dir, "base_checkpoints", tag)
    from nanochat.checkpoint_manager import find_last_step
    last = find_last_step(ckpt)
    state = torch.load(os.path.join(ckpt, f"model_{last:06d}.pt"))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# -----------------------------------------------------------------------------
# wandb: a resume continues the same run

class FakeWandbRun:
    def __init__(self, kwargs):
        self.id = kwargs.get("id") or f"run{len(FakeWandb.calls)}"
        self.logged = []

    def log(self, data):
        self.logged.append(data)

    def finish(self):
        pass


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package (a dependency): records what init was called with."""
    calls = []

    def __init__(self):
        super().__init__("wandb")

    def init(self, **kwargs):
        FakeWandb.calls.append(kwargs)
        return FakeWandbRun(kwargs)


def test_resume_continues_the_same_wandb_run(base_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    FakeWandb.calls.clear()
    flags = TRAIN_FLAGS + ["--num-iterations=4", "--eval-every=-1", "--model-tag=t_wandb", "--run=myrun",
                           "--save-every=2"]
    run_main(flags, capsys)
    first = FakeWandb.calls[0]
    assert first["name"] == "myrun" and "id" not in first
    with open(os.path.join(base_dir, "base_checkpoints", "t_wandb", "meta_000002.json")) as f:
        assert json.load(f)["wandb_run_id"] == "run1"
    run_main(flags + ["--resume-from-step=2"], capsys)
    resumed = FakeWandb.calls[1]
    assert resumed["id"] == "run1" and resumed["resume"] in ("allow", "must") and resumed["name"] == "myrun"


def test_resume_of_a_checkpoint_with_the_older_curve_keys_keeps_its_curve(base_dir, capsys):
    # checkpoints saved before the curve used the report's series names kept {"train": ..., "val": ...}
    flags = TRAIN_FLAGS + ["--num-iterations=4", "--eval-every=2", "--model-tag=t_curve", "--save-every=2"]
    run_main(flags, capsys)
    meta_path = os.path.join(base_dir, "base_checkpoints", "t_curve", "meta_000002.json")
    with open(meta_path) as f:
        meta = json.load(f)
    curve = meta["loop_state"]["curve"]
    assert curve["steps"] == [0, 1, 2]
    meta["loop_state"]["curve"] = {"steps": curve["steps"], "train": curve.pop("train loss"),
                                   "val": curve.pop("val bpb")}
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    run_main(flags + ["--resume-from-step=2"], capsys)
    loss_md = open(os.path.join(base_dir, "report", "base-model-loss.md")).read()
    stats = dict(re.findall(r"^- (.+?): ([\d.]+)$", loss_md, re.M))
    assert set(stats) == {f"{name} ({stat})" for name in ("train loss", "val bpb") for stat in ("last", "min")}
    with open(os.path.join(base_dir, "base_checkpoints", "t_curve", "meta_000004.json")) as f:
        resumed = json.load(f)["loop_state"]["curve"]
    assert resumed["steps"] == [0, 1, 2, 3, 4] and set(resumed) == {"steps", "train loss", "val bpb"}
    assert resumed["val bpb"][:3] == meta["loop_state"]["curve"]["val"]


# -----------------------------------------------------------------------------
# Determinism: the same command twice gives the same weights, bit for bit

def test_two_identical_compiled_cpu_runs_end_with_identical_weights(base_dir):
    # torch.compile is on (as in a default run): its CPU embedding backward summed shared rows with atomic
    # adds in thread-timing order, so two runs drifted apart (backout_lambda by 0.48 after 40 steps)
    env = dict(os.environ, NANOCHAT_COMPILE="1", OMP_NUM_THREADS="2")
    env.pop("NANOCHAT_DETERMINISTIC", None)
    procs = []
    for tag in ("t_det_a", "t_det_b"):
        cmd = [sys.executable, "-m", "scripts.base_train"] + TRAIN_FLAGS + [
            "--num-iterations=3", "--eval-every=-1", f"--model-tag={tag}"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outs
    a, b = (torch.load(os.path.join(base_dir, "base_checkpoints", tag, "model_000003.pt"))
            for tag in ("t_det_a", "t_det_b"))
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
    assert all("Deterministic mode on (cpu" in out for out in outs)


def test_deterministic_switch():
    from nanochat.training import deterministic_wanted
    assert deterministic_wanted("cpu") and not deterministic_wanted("cuda")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_DETERMINISTIC", "1")
        assert deterministic_wanted("cuda")
        mp.setenv("NANOCHAT_DETERMINISTIC", "0")
        assert not deterministic_wanted("cpu")
        mp.setenv("NANOCHAT_DETERMINISTIC", "yes")
        with pytest.raises(ValueError, match="NANOCHAT_DETERMINISTIC"):
            deterministic_wanted("cpu")


# -----------------------------------------------------------------------------
# The loader's tokenising thread ends with the loader

def tokenizer_threads():
    return [t for t in threading.enumerate() if t.name == "dataloader-tokenizer"]


def test_closing_the_loader_joins_its_tokenizer_thread(base_dir):
    from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit
    from nanochat.tokenizer import get_tokenizer
    assert not tokenizer_threads()
    loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(get_tokenizer(), 2, 32, "train",
                                                                       device="cpu")
    next(loader)
    assert len(tokenizer_threads()) == 1
    loader.close()
    # joined, not merely told to stop: a thread left inside native code at interpreter exit aborts the
    # process ("terminate called without an active exception")
    assert not tokenizer_threads()



def test_each_rank_resumes_its_own_loader_state():
    from nanochat.dataloader import state_for_rank

    def state(rank, world):
        return {"pq_idx": 0, "rg_idx": rank, "epoch": 1, "cursor": [1, 0, rank + world, 0], "buffer": [],
                "rank": rank, "world_size": world}
    meta = {"dataloader_state_dict": state(0, 2), "dataloader_state_dicts": [state(0, 2), state(1, 2)]}
    assert state_for_rank(meta, 1, 2) == state(1, 2) and state_for_rank(meta, 0, 2) == state(0, 2)
    # another world size, or a checkpoint with rank 0's state only: approximate for the ranks without their own
    assert state_for_rank(meta, 0, 1) == {"pq_idx": 0, "rg_idx": 0, "epoch": 1}
    old = {"dataloader_state_dict": state(0, 2)}
    assert state_for_rank(old, 0, 2) == state(0, 2)
    assert state_for_rank(old, 1, 2) == {"pq_idx": 0, "rg_idx": 0, "epoch": 1}


class RecordingWandb:
    """Stands in for the wandb package (an external service): keeps what the run logs."""

    def __init__(self):
        self.logged = []

    def init(self, **kwargs):
        return self

    def log(self, data):
        self.logged.append(data)

    def finish(self):
        pass


def test_base_train_labels_a_core_over_the_21_committed_tasks(tmp_path, monkeypatch, capsys,
                                                                  sample_tokenizer):
    # its own base dir: the module's base_dir keeps the other runs' checkpoints and reports
    base_dir = install_sample_base_dir(monkeypatch, tmp_path / "base", sample_tokenizer)
    wandb = RecordingWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    try:
        base_train.main(["--device-type=cpu", "--depth=2", "--head-dim=64", "--max-seq-len=512",
                         "--device-batch-size=1", "--total-batch-size=512", "--num-iterations=1", "--eval-every=-1",
                         "--core-metric-every=999999", "--core-metric-max-per-task=1", "--sample-every=-1",
                         "--window-pattern=L", "--run=core_label_test"])
    finally:
        gc.enable()
        gc.unfreeze()
    out = capsys.readouterr().out
    line = re.search(r"^Step 00001 \| CORE metric: (.*)$", out, re.M).group(1)
    assert re.fullmatch(r"-?\d\.\d{4} \(21 of 22 tasks, missing coqa\)", line)
    core_logs = [entry for entry in wandb.logged if "centered_results" in entry]
    assert len(core_logs) == 1 and "core_metric" not in core_logs[0] and "core_metric_21of22_tasks" in core_logs[0]
    report = open(os.path.join(base_dir, "report", "base-model-training.md")).read()
    assert f"- CORE metric estimate: {line}\n" in report


def test_resume_refuses_a_feature_the_checkpoint_was_trained_without():
    from dataclasses import asdict, replace
    from nanochat.checkpoint_manager import portable_model_config
    from nanochat.gpt import GPTConfig
    plain = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    meta = {"model_config": portable_model_config(asdict(plain)), "user_config": {}, "num_iterations": 4,
            "step": 2}
    assert "mup_base_width" not in meta["model_config"]  # a plain meta has the reference's keys only
    pretraining.check_resume_architecture(meta, plain)  # the same model resumes
    for changed in [replace(plain, mup_base_width=64), replace(plain, l3_after_layers="1", l3_n_emb=16),
                    replace(plain, n_embd=256)]:
        with pytest.raises(ValueError, match="model config differs"):
            pretraining.check_resume_architecture(meta, changed)
    mup = replace(plain, mup_base_width=64)
    muP_meta = dict(meta, model_config=portable_model_config(asdict(mup)))
    with pytest.raises(ValueError, match="mup_base_width"):
        pretraining.check_resume_architecture(muP_meta, plain)
    older = dict(meta, model_config={k: v for k, v in meta["model_config"].items() if k != "window_pattern"})
    pretraining.check_resume_architecture(older, plain)  # keys an older meta lacks are not compared


# -----------------------------------------------------------------------------
# L3: the bounds come from the first training tokens, are the same on every rank, and a resume keeps them

L3_FLAGS = ["--l3-after-layers=1", "--l3-lzw-tokens=2000"]  # --l3-n-emb 0: 4 * vocab = 2048 rows
L3_BOUNDS = "l3_layers.1.bounds"


def lzw_bounds_of_first_tokens(tokenizer, limit):
    """The bounds the LZW allocation gives the first `limit` training tokens, each document read with BOS."""
    from nanochat.dataset import parquets_iter_batched
    from nanochat.l3 import allocation_to_bounds, compute_lzw_allocation
    seqs, left = [], limit
    for texts in parquets_iter_batched("train"):
        for text in texts:
            if left > 0:
                seqs.append(tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())[:left])
                left -= len(seqs[-1])
    assert sum(map(len, seqs)) == limit  # the sample holds more than `limit` tokens
    return allocation_to_bounds(compute_lzw_allocation(seqs, tokenizer.get_vocab_size(), 4 * 512, 32))


def test_l3_run_takes_its_bounds_from_the_data_and_resumes_exactly(base_dir, capsys):
    from nanochat.tokenizer import get_tokenizer
    flags = TRAIN_FLAGS + L3_FLAGS + ["--num-iterations=4", "--eval-every=-1", "--save-every=2",
                                      "--model-tag=t_l3"]
    out = run_main(flags, capsys)
    assert "L3 allocation: n_emb=2,048, max per token 32" in out and "2,000 tokens scanned" in out
    ckpt = os.path.join(base_dir, "base_checkpoints", "t_l3")
    straight = torch.load(os.path.join(ckpt, "model_000004.pt"))
    expected = lzw_bounds_of_first_tokens(get_tokenizer(), 2000)
    assert torch.equal(straight[L3_BOUNDS], expected)
    assert torch.equal(torch.load(os.path.join(ckpt, "model_000002.pt"))[L3_BOUNDS], expected)
    # the resume takes the bounds from the checkpoint (no second LZW pass) and ends bit for bit the same
    resumed = run_main(flags + ["--resume-from-step=2"], capsys)
    assert "L3 allocation" not in resumed
    again = torch.load(os.path.join(ckpt, "model_000004.pt"))
    different = [k for k in straight if not torch.equal(straight[k], again[k])]
    assert not different, different


def _l3_rank_worker(rank, init_file, out_dir):
    from nanochat.tokenizer import get_tokenizer
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        args = base_train.parse_args(TRAIN_FLAGS + L3_FLAGS)
        model, _, _ = pretraining.build_model(args, get_tokenizer(), torch.device("cpu"), rank, out_dir)
        torch.save(model.state_dict()[L3_BOUNDS], os.path.join(out_dir, f"bounds{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Tearing gloo down here aborted a rank twice in CI ("terminate called without an active exception"),
    # a barrier before it notwithstanding. The bounds are on disk: once both ranks are past the barrier
    # (said through files, not gloo), leave without running gloo's destructors.
    open(os.path.join(out_dir, f"done{rank}"), "w").close()
    while not os.path.exists(os.path.join(out_dir, f"done{1 - rank}")):
        time.sleep(0.01)
    os._exit(0)


def test_every_rank_gets_the_l3_bounds_rank_0_computed(base_dir, tmp_path):
    # only rank 0 reads the data (the ranks read different shards): the others receive its bounds
    from nanochat.tokenizer import get_tokenizer
    spawn_ranks(_l3_rank_worker, str(tmp_path / "pg"), str(tmp_path))
    expected = lzw_bounds_of_first_tokens(get_tokenizer(), 2000)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"bounds{rank}.pt"), expected), f"rank {rank}"


# -----------------------------------------------------------------------------
# CORE that cannot run: at the last step the finished run survives it; before, it stops the run

def test_core_failing_at_the_last_step_keeps_the_finished_run(tmp_path, monkeypatch, capsys,
                                                               sample_tokenizer):
    import shutil
    from nanochat.core_eval import ensure_eval_bundle
    base_dir = install_sample_base_dir(monkeypatch, tmp_path / "base", sample_tokenizer)
    shutil.rmtree(os.path.join(ensure_eval_bundle(), "eval_data"))  # a bundle without any task file
    flags = TRAIN_FLAGS + ["--eval-every=-1", "--core-metric-max-per-task=1"]  # a later flag wins
    out = run_main(flags + ["--num-iterations=1", "--core-metric-every=999999", "--model-tag=t_core_last"],
                   capsys)
    assert re.search(r"^Step 00001 \| CORE evaluation failed \(None of the \d+ CORE task files exist under .*"
                     r"\); the checkpoint is saved$", out, re.M), out[-2000:]
    assert os.path.exists(os.path.join(base_dir, "base_checkpoints", "t_core_last", "model_000001.pt"))
    report = open(os.path.join(base_dir, "report", "base-model-training.md")).read()
    assert "- CORE metric estimate: None\n" in report
    with exits_with_error(capsys, "^base_train: error: None of the"):  # mid-run: the failure is not hidden
        run_main(flags + ["--num-iterations=2", "--core-metric-every=1", "--model-tag=t_core_mid"], capsys)


def test_resume_warns_when_the_flags_change_the_trajectory(capsys):
    from dataclasses import asdict
    from nanochat.gpt import GPTConfig
    config = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    saved = {"depth": 2, "matrix_lr": 0.02, "run": "a", "eval_every": 250}
    meta = {"model_config": asdict(config), "user_config": saved, "num_iterations": 4, "step": 2}
    # a new run name and eval cadence leave the trajectory as it was: no warning
    pretraining.check_resume_config(meta, dict(saved, run="b", eval_every=10), 4)
    assert "Warning" not in capsys.readouterr().out
    pretraining.check_resume_config(meta, dict(saved, matrix_lr=0.04), 6)
    out = capsys.readouterr().out
    assert ("Warning: resuming with different settings than the saved run (saved, now): "
            "{'matrix_lr': (0.02, 0.04)}; the result will not match an uninterrupted run") in out
    assert "Warning: the horizon changed from 4 to 6 steps on resume" in out


def test_fp8_on_cpu_is_ignored_and_samples_are_printed(base_dir, capsys):
    from nanochat.core_eval import SAMPLE_PROMPTS
    out = run_main(TRAIN_FLAGS + ["--num-iterations=2", "--eval-every=-1", "--sample-every=2", "--fp8",
                                  "--model-tag=t_fp8_samples"], capsys)
    assert "Warning: FP8 training requires CUDA, ignoring --fp8 flag" in out
    # the greedy samples, at the last step only (not at step 0): each prompt once, with a completion
    for prompt in SAMPLE_PROMPTS:
        assert len(re.findall(rf"^<\|bos\|>{re.escape(prompt)}.+$", out, re.M)) == 1, prompt
    assert out.index("step 00001/") < out.index(f"<|bos|>{SAMPLE_PROMPTS[0]}")


@pytest.mark.parametrize("depth,model_dim,n_scaling,batch,iters,wd", [DEPTH_TABLE[i] for i in (0, 3, 5)])
def test_default_total_batch_size_is_the_auto_one(depth, model_dim, n_scaling, batch, iters, wd, capsys):
    args = base_train.parse_args([f"--depth={depth}"])  # --total-batch-size -1: auto
    model = pretraining.build_model_meta(pretraining.model_config(args, depth, 32768))
    scale = pretraining.apply_scaling_rules(args, model, 32768)
    assert (scale.total_batch_size, scale.num_scaling) == (batch, n_scaling)
    assert scale.weight_decay == pytest.approx(wd, abs=5e-5)
    assert scale.batch_lr_scale == pytest.approx((batch / 2 ** 19) ** 0.5)  # the LRs scale as sqrt(B)
    out = capsys.readouterr().out
    assert f"Auto-computed optimal batch size: {batch:,} tokens" in out
    assert ("Scaling LRs by" in out) == (batch != 2 ** 19)  # not at the d12 reference batch


def test_sdpa_with_sliding_windows_warns_about_speed(capsys):
    sdpa = types.SimpleNamespace(train="sdpa")
    pretraining.print_attention_notice(sdpa, "L")
    assert "sliding-window" not in capsys.readouterr().out
    pretraining.print_attention_notice(sdpa, "SSSL")
    assert ("WARNING: SDPA has no efficient sliding-window support (--window-pattern SSSL): GPU utilisation "
            "will be poor. Use --window-pattern L") in capsys.readouterr().out


def test_a_resume_with_another_architecture_or_past_the_horizon_is_refused(base_dir, capsys):
    run_main(TRAIN_FLAGS + ["--num-iterations=2", "--eval-every=-1", "--model-tag=t_refuse"], capsys)
    resume = TRAIN_FLAGS + ["--eval-every=-1", "--model-tag=t_refuse", "--resume-from-step=2"]
    # before the weights load: the mismatch is named, not load_state_dict's list of shapes
    with exits_with_error(capsys, r"model config differs from these flags: \{.*'n_layer': \(2, 3\)"):
        run_main(resume + ["--num-iterations=2", "--depth=3"], capsys)
    # the loop ends at step == horizon: from step 2 with a horizon of 1 it would never end
    with exits_with_error(capsys, r"--resume-from-step=2 is past this run's horizon of 1 steps"):
        run_main(resume + ["--num-iterations=1"], capsys)
    run_main(resume + ["--num-iterations=3"], capsys)  # a longer horizon resumes
    assert os.path.exists(os.path.join(base_dir, "base_checkpoints", "t_refuse", "meta_000003.json"))


@pytest.mark.parametrize("flags, says", [
    (["--l3-after-layers=5", "--l3-n-emb=1024"], r"The model flags describe no model: ValueError: "
                                                 r"l3_after_layers index 5 out of range \[0, 1\]"),
    (["--total-batch-size=300"], r"total_batch_size \(300\) must be a positive multiple of .* = 128\. "
                                 r"Fix: pass --total-batch-size=256 or another multiple of 128$"),
])
def test_flags_that_cannot_work_together_end_with_one_line(flags, says, base_dir, capsys):
    with exits_with_error(capsys, "^base_train: error: " + says):
        run_main(TRAIN_FLAGS + ["--num-iterations=1"] + flags, capsys)


@pytest.mark.parametrize("variable, value, allowed, reference_type", [
    ("NANOCHAT_DTYPE", "fp16x", "bfloat16, float16, float32", KeyError),  # the dtype is decided at the start
    ("NANOCHAT_ATTN", "fa4", "fa3, sdpa", ValueError),  # the attention backend once the model is built
])
def test_an_unknown_dtype_or_attention_backend_ends_with_one_line(variable, value, allowed, reference_type,
                                                                  base_dir, undecided, monkeypatch, capsys):
    monkeypatch.setattr(common, "_compute_dtype_cache", None)  # both are decided once per process: undo that
    monkeypatch.setattr(fa, "_override_impl", fa._FROM_ENV)
    monkeypatch.setenv(variable, value)
    says = rf"{variable}='{value}' is not one of {allowed}: set one of those, or unset {variable}"
    with exits_with_error(capsys, "^base_train: error: " + says):
        run_main(TRAIN_FLAGS + ["--num-iterations=1"], capsys)
    with pytest.raises(reference_type):  # still the type the reference raises, for code that catches it
        (common._detect_compute_dtype if variable == "NANOCHAT_DTYPE" else fa._env_override)()
