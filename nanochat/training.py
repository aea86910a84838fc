"""
Training-loop pieces shared by base_train, chat_sft and chat_rl. Above the run kit: batch geometry, the
schedules, the optimizer step (with the fp16 GradScaler path), the loss EMA and timing, the GC policy,
stopping (signals, non-finite losses), deterministic mode and wandb. The run kit at the end is what every
stage's loop is made of: one start, one optimizer set-up (fresh, resumed or warm-started), one checkpoint
of registered state restored as a whole, one micro-step loop, one eval/save cadence, one step log line
and one end of run.
Each function is pure or acts only on what it is given, so the schedules can be unit-tested.
"""

import contextlib
import gc
import math
import os
import shutil
import signal
import time
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import (get_checkpoints_dir, load_optimizer_state, lost_optimizer_shards,
                                         optimizer_shard_count, save_checkpoint)
from nanochat.common import (BadFileError, BadSettingError, DummyWandb, MissingFileError, agree_max,
                             agree_sum, autodetect_device_type, compute_cleanup, compute_init,
                             get_device_peak_flops, get_dist_info, is_ddp_initialized, percent_of_peak,
                             print0, rank_and_world)

# Steps 0..10 are compile and allocator warm-up: they are left out of the training time (and hence of
# the leaderboard number and the ETA), as in the reference.
WARMUP_STEPS_UNTIMED = 10
LR_KEYS = ("unembedding_lr", "embedding_lr", "matrix_lr", "scalar_lr")  # of GPT.setup_optimizer


# -----------------------------------------------------------------------------
# Batch geometry

def grad_accum_steps(total_batch_size, device_batch_size, seq_len, world_size):
    """Micro-steps per optimizer step, printed with the batch geometry, or ValueError when the total batch
    is not a whole number of them."""
    tokens = device_batch_size * seq_len
    unit = tokens * world_size
    if total_batch_size <= 0 or total_batch_size % unit != 0:
        raise BadSettingError(f"total_batch_size ({total_batch_size}) must be a positive multiple of "
                              f"device_batch_size * seq_len * world_size = {device_batch_size} * {seq_len} * "
                              f"{world_size} = {unit}. Fix: pass --total-batch-size="
                              f"{unit * max(1, round(total_batch_size / unit))} or another multiple of {unit}")
    accum = total_batch_size // unit
    print0(f"Tokens / micro-batch / rank: {device_batch_size} x {seq_len} = {tokens:,}")
    print0(f"Tokens / micro-batch: {tokens * world_size:,}")
    print0(f"Total batch size {total_batch_size:,} => gradient accumulation steps: {accum}")
    return accum


def eval_steps_for(eval_tokens, device_batch_size, seq_len, world_size):
    """Batches per evaluation so that about eval_tokens are seen across all ranks (at least one)."""
    return max(1, eval_tokens // (device_batch_size * seq_len * world_size))


# -----------------------------------------------------------------------------
# Schedules. `it` counts optimizer steps from 0, n is the number of steps.

def base_lr_multiplier(it, n, warmup_steps, warmdown_ratio, final_lr_frac):
    """Linear warmup, constant, then a linear warmdown towards final_lr_frac (reached at it == n)."""
    warmdown = round(warmdown_ratio * n)
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if it <= n - warmdown:
        return 1.0
    progress = (n - it) / warmdown
    return progress + (1 - progress) * final_lr_frac


def base_muon_momentum(it, n, warmdown_ratio):
    """0.85 -> 0.97 over the first 400 steps, 0.97, then 0.97 -> 0.90 over the warmdown (the first wins).
    Written as the reference blends the endpoints, so the values agree to the last bit."""
    warmdown = round(warmdown_ratio * n)
    if it < 400:
        frac = it / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if it >= n - warmdown:
        progress = (it - (n - warmdown)) / warmdown
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def base_weight_decay(it, n, weight_decay):
    """Cosine from weight_decay to 0 over the run (Muon groups only)."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / n))


def sft_lr_multiplier(progress, warmup_ratio, warmdown_ratio, final_lr_frac):
    """The SFT schedule over progress in [0, 1]: warmup, constant, linear warmdown to final_lr_frac."""
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1 - warmdown_ratio:
        return 1.0
    u = (progress - (1 - warmdown_ratio)) / warmdown_ratio
    return (1 - u) + u * final_lr_frac


def sft_muon_momentum(step):
    return 0.85 + 0.10 * min(step / 300, 1)


def apply_schedule(optimizer, lrm, muon_momentum=None, muon_weight_decay=None):
    """lr = initial_lr * lrm for every group; momentum and weight decay for the Muon groups when given."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group.get("kind") == "muon":
            if muon_momentum is not None:
                group["momentum"] = muon_momentum
            if muon_weight_decay is not None:
                group["weight_decay"] = muon_weight_decay


# -----------------------------------------------------------------------------
# Optimizer step

def make_grad_scaler(compute_dtype, device_type="cuda"):
    """fp16 needs loss scaling (its exponent range underflows small gradients); bf16 and fp32 do not."""
    if compute_dtype != torch.float16:
        return None
    print0("GradScaler enabled for fp16 training")
    return torch.amp.GradScaler(device_type)


def optimizer_step(optimizer, scaler=None):
    """One optimizer step. With a GradScaler, every rank skips the step if any rank saw inf/nan grads."""
    if scaler is None:
        optimizer.step()
        return
    scaler.unscale_(optimizer)
    if is_ddp_initialized():
        # the scaler keeps one found-inf tensor per device; ranks must agree or their weights diverge
        for found_inf in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
    scaler.step(optimizer)
    scaler.update()


# -----------------------------------------------------------------------------
# Loss EMA, timing and the log line pieces

class LossTracker:
    """EMA (beta 0.9) of the training loss, debiased like Adam's moments, and the timed training seconds."""

    def __init__(self, smooth_loss=0.0, total_training_time=0.0):
        self.smooth_loss = smooth_loss
        self.total_training_time = total_training_time

    def state_dict(self):
        return {"smooth_train_loss": self.smooth_loss, "total_training_time": self.total_training_time}

    def update(self, step, loss, dt):
        """Record step `step`'s loss and duration; returns the debiased smoothed loss."""
        self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * loss
        if step > WARMUP_STEPS_UNTIMED:
            self.total_training_time += dt
        return self.debiased(step + 1)

    def debiased(self, step):
        """The debiased smoothed loss as of the updates of steps 0 .. step - 1 (for a step not recorded)."""
        return self.smooth_loss / (1 - 0.9 ** step) if step > 0 else 0.0

    def eta_suffix(self, step, num_steps):
        timed_steps = step - WARMUP_STEPS_UNTIMED
        if timed_steps <= 0:
            return ""
        return f" | eta: {(num_steps - step) * self.total_training_time / timed_steps / 60:.1f}m"


class StepTimer:
    """Wall time of one step; synchronises CUDA so the time covers the kernels, not just their launch."""

    def __init__(self, device_type):
        self.sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
        self.t0 = None

    def start(self):
        self.sync()
        self.t0 = time.time()

    def stop(self):
        self.sync()
        return time.time() - self.t0


def gc_after_step(done, resume_from_step):
    """
    After the first step of a run (the step from 0 or from resume_from_step, which brought it to `done`
    steps): collect, freeze what survived and disable the collector (the reference measured ~500 ms
    pauses from the cyclic GC scanning long-lived objects). Collect every 5000 steps.
    Code added to the loop that creates reference cycles leaks until the next periodic collection.
    """
    if done - 1 in (0, resume_from_step):
        gc.collect()
        gc.freeze()
        gc.disable()
    elif done % 5000 == 0:
        gc.collect()


# -----------------------------------------------------------------------------
# Cadence

def every(step, period, last_step, include_step_zero=False):
    """True on multiples of period (> 0) and at the last step; step 0 only when include_step_zero."""
    if period <= 0:
        return False
    if last_step:
        return True
    return step % period == 0 and (include_step_zero or step > 0)


# -----------------------------------------------------------------------------
# Stopping: signals and non-finite losses

class NonFiniteLossError(RuntimeError):
    pass


class StopFlag:
    """
    SIGTERM/SIGINT set a flag instead of killing the process, so the loop can finish its step, save a
    checkpoint and exit. A second signal of the same kind restores the default behaviour (hard stop).
    Use as a context manager: the previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handler(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signum = signum
        print0(f"\nReceived {signal.Signals(signum).name}: saving a checkpoint after this step, then exiting "
               f"(send it again to stop immediately)")

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def should_stop(stop_flag, loss_value, device):
    """
    (signalled, non_finite) agreed by every rank: one all-reduce (MAX) of two flags, so a signal or a NaN
    seen by any rank stops all of them at the same step instead of leaving the others in a collective.
    """
    signalled, non_finite = agree_max([stop_flag.signum is not None, not math.isfinite(loss_value)], device)
    return bool(signalled), bool(non_finite)


def exit_after_signal(save, step, signum):
    """Checkpoint `step` with save(step), say how to resume, and exit with the shell's code for death by
    that signal (128 + signum), so job schedulers see an interrupted run rather than a finished one."""
    save(step)
    print0(f"Stopped by signal after step {step}; resume with --resume-from-step={step}")
    compute_cleanup()
    raise SystemExit(128 + signum)


def finish_step(optimizer, model, scaler, train_loss, timer, stop_flag, device, step, checkpoint_dir,
                update=True):
    """
    The end of every training step: optimizer step (skipped when update is False), zero the grads, read
    the loss, stop the timer, and agree across ranks on stopping. Returns (loss value, seconds,
    signalled). A non-finite loss raises NonFiniteLossError before anything is saved, so the last good
    checkpoint stays the newest one.
    """
    if update:
        optimizer_step(optimizer, scaler)
    model.zero_grad(set_to_none=True)
    loss_value = train_loss.item()
    dt = timer.stop()
    signalled, non_finite = should_stop(stop_flag, loss_value, device)
    if non_finite:
        raise NonFiniteLossError(
            f"Non-finite training loss ({loss_value}) at step {step}; not saving. The last good checkpoint "
            f"in {checkpoint_dir} is untouched: resume from it with a lower LR or a fix")
    return loss_value, dt, signalled


# -----------------------------------------------------------------------------
# Gradient accumulation over micro-batches that may have no supervised token (SFT)

def masked_micro_step(model, x, y, has_targets, accum, scaler=None):
    """
    Forward and backward of one micro-batch of a step of `accum`. With supervised tokens: the mean
    cross-entropy / accum, as always; returns the (detached) mean loss. Without any (every target -1,
    e.g. a row that is all padding or a prompt cut before the answer), the mean would be 0/0 = NaN and
    poison the weights: the summed loss over no targets is exactly 0, and its backward through the same
    graph adds exactly zero to every gradient (so every rank still has a gradient for every parameter,
    which the distributed optimizer needs); returns None.
    """
    if has_targets:
        loss = model(x, y)
        scaled = loss / accum
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return loss.detach()
    loss = model(x, y, loss_reduction="sum")
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return None


def renormalise_accumulated_grads(model, n_with_targets, n_micro, device):
    """
    After a step's micro-batches (each backward divided by accum): the gradient is the mean over the
    micro-batches of every rank that had supervised tokens. n_with_targets of this rank's n_micro had
    some; returns how many had some on all ranks together (0: the step must not update the weights).
    When every micro-batch had targets (the usual case) nothing is touched, so the step is exactly the
    plain mean of the micro-batch losses.
    """
    with_targets, total = agree_sum([n_with_targets, n_micro], device)
    if 0 < with_targets < total:
        factor = total / with_targets
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
    return int(with_targets)


# -----------------------------------------------------------------------------
# Determinism

def deterministic_wanted(device_type):
    """NANOCHAT_DETERMINISTIC=1/0 forces it on/off; by default it is on for CPU runs only."""
    value = os.environ.get("NANOCHAT_DETERMINISTIC", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"NANOCHAT_DETERMINISTIC must be 0 or 1, got {value!r}")
    return device_type == "cpu" if value == "" else value == "1"


def configure_determinism(device_type):
    """
    Make the same command on the same machine give bitwise-identical weights. The source of run-to-run
    differences on CPU is torch.compile: Inductor lowers the embedding backward (an index_put with
    accumulate) to a parallel loop of atomic adds, so rows that several positions share are summed in
    thread-timing order. torch's deterministic mode makes Inductor fall back to the ordered kernel (and
    fills uninitialised memory, so a stray read cannot leak garbage into a run). The cost on CPU is small,
    hence the default. On CUDA it also costs speed and FA3's backward stays non-deterministic, so it is
    opt-in (NANOCHAT_DETERMINISTIC=1, with NANOCHAT_ATTN=sdpa for the attention). Results still depend on
    the number of intra-op threads (OMP_NUM_THREADS): keep it fixed between runs that must agree.
    """
    enabled = deterministic_wanted(device_type)
    if enabled and device_type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS makes its handle
        torch.backends.cudnn.benchmark = False
    # warn_only: an op without a deterministic kernel warns instead of stopping a long run
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    if enabled:
        print0(f"Deterministic mode on ({device_type}; NANOCHAT_DETERMINISTIC=0 turns it off)")


# -----------------------------------------------------------------------------
# wandb: a resumed run continues the run that wrote the checkpoint

def init_wandb(project, run, config, meta):
    """
    The wandb run of this process (a DummyWandb off rank 0 or with run == 'dummy'). A resume (meta: the
    checkpoint's, {} for a fresh run) continues the run whose id the meta keeps, its charts extended
    rather than restarted.
    """
    if run == "dummy" or get_dist_info()[1] != 0:
        return DummyWandb()
    import wandb
    resume_id = meta.get("wandb_run_id")
    if resume_id:
        print0(f"Continuing wandb run {resume_id}")
        return wandb.init(project=project, name=run, config=config, id=resume_id, resume="allow")
    return wandb.init(project=project, name=run, config=config)


# -----------------------------------------------------------------------------
# The run kit: what every training stage starts with, saves, logs and ends with

def start_run(device_type):
    """
    (device_type, rank, world_size, device, peak FLOPS) of this process: compute initialised on the
    device asked for ('' = autodetect), deterministic mode as that device wants, the compute dtype and,
    on CUDA, the GPU and its peak FLOPS (the MFU denominator) printed.
    """
    device_type = device_type or autodetect_device_type()
    _, rank, _, world_size, device = compute_init(device_type)
    configure_determinism(device_type)
    from nanochat.common import COMPUTE_DTYPE, COMPUTE_DTYPE_REASON
    peak_flops = get_device_peak_flops(device_type)
    if device_type == "cuda":
        print0(f"GPU: {torch.cuda.get_device_name(0)} | Peak FLOPS (BF16): {peak_flops:.2e}")
    print0(f"COMPUTE_DTYPE: {COMPUTE_DTYPE} ({COMPUTE_DTYPE_REASON})")
    return device_type, rank, world_size, device, peak_flops  # the attention backend: when the model is built


def check_world_size(source, model_tag, step, resuming=True):
    """Whether a checkpoint's optimizer shards fit this run: each rank saved its own shard, which fits only
    the same world size. A resume refuses another (it would fail inside the optimizer); a warm start
    (resuming=False) says so and returns False, to go on with a fresh optimizer."""
    shards, world_size = optimizer_shard_count(source, model_tag, step), get_dist_info()[3]
    lost = lost_optimizer_shards(source, model_tag, step) if shards else []  # none: saved without one
    if shards in (0, world_size) and not lost:
        return True
    if not resuming:
        print0(f"WARNING: the {source} checkpoint's optimizer state was saved by {shards} rank(s) and this "
               f"run has {world_size}{' (a shard is lost)' if lost else ''}; starting the optimizer fresh")
        return False
    if lost:
        raise BadFileError(f"--resume-from-step={step}: {', '.join(lost)} is missing (the step's meta holds "
                           f"the loader state of every rank that saved a shard); restore it, or resume "
                           f"from another step")
    files = os.path.join(get_checkpoints_dir(source), model_tag, f"optim_{step:06d}_rank*.pt")
    raise BadSettingError(f"--resume-from-step={step}: {files} holds the optimizer shards of {shards} "
                          f"rank(s) and this run has {world_size}; resume with the world size that saved it "
                          f"(torchrun --nproc_per_node={shards})")


def check_resume_horizon(step, num_steps, horizon_flags):
    """A resumed step past the horizon would never meet the last step (the loop ends at step == horizon):
    the run would go on forever with a negative LR multiplier. Refuse it, naming the flags that set it."""
    if step > num_steps:
        raise BadSettingError(f"--resume-from-step={step} is past this run's horizon of {num_steps} steps; "
                              f"pass {horizon_flags} for at least {step} steps")


def warm_start_optimizer(optimizer, state):
    """
    Load only the per-parameter state (momentum and second-moment buffers) of a pretraining optimizer.
    load_state_dict also overwrites every group hyperparameter (LR, weight decay, betas, momentum) with
    the pretraining values; the reference restored just the LR, so its explicit weight_decay=0.0 was
    lost. Here all of this run's group settings are put back.
    """
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, saved in zip(optimizer.param_groups, settings):
        group.update(saved)


def setup_optimizer(model, lrs, weight_decay, device, rank, resume, init_lr_frac=1.0, warm_from=None):
    """
    A stage's optimizer at the LRs of `lrs` (a mapping; the LR_KEYS it lacks keep the model's defaults).
    resume = (source, tag, step), step -1 for a fresh run: LRs, initial LRs and buffers all come from
    that checkpoint (this rank's shard of it). Otherwise every LR starts at init_lr_frac of its value, the
    buffers warm-started from warm_from = (source, tag, step) when it has them in as many shards as this
    run has ranks.
    """
    optimizer = model.setup_optimizer(weight_decay=weight_decay, **{k: lrs[k] for k in LR_KEYS if k in lrs})
    source, tag, step = resume
    if step >= 0:
        check_world_size(source, tag, step)
        state = load_optimizer_state(source, device, rank, model_tag=tag, step=step)
        if state is None:
            raise MissingFileError(f"--resume-from-step={step}: the {source} checkpoint {tag} has no "
                                   f"optimizer state for rank {rank}; resume from a step that has it")
        optimizer.load_state_dict(state)
        return optimizer
    if warm_from is not None and check_world_size(*warm_from, resuming=False):
        source, tag, step = warm_from
        state = load_optimizer_state(source, device, rank, model_tag=tag, step=step)
        if state is None:
            print0(f"WARNING: no optimizer state in the {source} checkpoint; starting the optimizer fresh")
        else:
            warm_start_optimizer(optimizer, state)
            print0("Loaded optimizer state from pretrained checkpoint (momentum buffers only, LRs reset)")
    for group in optimizer.param_groups:
        group["lr"] *= init_lr_frac
        group["initial_lr"] = group["lr"]
    return optimizer


def warn_on_changed_config(saved_user_config, user_config, free_keys):
    changed = {k: (saved_user_config.get(k), v) for k, v in user_config.items()
               if k not in free_keys and saved_user_config.get(k, v) != v}
    if changed:
        print0(f"Warning: resuming with different settings than the saved run (saved, now): {changed}; "
               f"the result will not match an uninterrupted run")


class Checkpointer:
    """
    A stage's checkpoint as one whole: the model's weights (model_<step>.pt), this rank's optimizer
    shard (optim_<step>_rank<r>.pt) and the meta JSON, whose keys are registered once with
    register(key, source). A source is an object with state_dict() (which restore() gives back its
    load_state_dict), a zero-argument function read at save time (counters that the loop rebinds), or a
    plain value. Keys are written in registration order after "step", so each stage keeps its layout.
    """

    def __init__(self, checkpoint_dir, model, optimizer, rank):
        self.checkpoint_dir, self.model, self.optimizer, self.rank = checkpoint_dir, model, optimizer, rank
        self.sources, self.room_checked = {}, False

    def register(self, key, source):
        self.sources[key] = source

    def meta(self, step):
        return {"step": step, **{key: _current_state(source) for key, source in self.sources.items()}}

    def save(self, step):
        save_checkpoint(self.checkpoint_dir, step, self.model.state_dict(), self.optimizer.state_dict(),
                        self.meta(step), rank=self.rank)

    def warn_if_no_room(self):
        """
        Once the optimizer holds its state (after the first step, or a resume), rank 0 warns if a checkpoint
        (the weights and every rank's optimizer shard, each the size of its own, all on one disk as on one
        node) would not fit in the free space of its disk: hours before a save would fail.
        """
        if self.rank != 0 or self.room_checked or not self.optimizer.state:
            return
        self.room_checked = True
        world_size = rank_and_world()[1]
        shard, weights = (sum(t.numel() * t.element_size() for t in _tensors_in(part))
                          for part in (self.optimizer.state_dict(), self.model.state_dict()))
        size = weights + world_size * shard
        folder = os.path.abspath(self.checkpoint_dir)
        while not os.path.isdir(folder):  # the first save creates it: ask its nearest existing parent
            folder = os.path.dirname(folder)
        free = shutil.disk_usage(folder).free
        if size > free:
            print(f"Warning: a checkpoint of this run (weights and {world_size} optimizer shard(s)) takes "
                  f"{size / 2**20:,.1f} MiB, and {self.checkpoint_dir} has {free / 2**20:,.1f} MiB free: the "
                  f"saves will fail. Make room there, or stop and set NANOCHAT_BASE_DIR to a disk with room",
                  flush=True)

    def restore(self, meta):
        """Give each registered object with load_state_dict its saved state (where one was saved)."""
        for key, source in self.sources.items():
            if hasattr(source, "load_state_dict") and meta.get(key):
                source.load_state_dict(meta[key])


def _tensors_in(state):
    """The tensors in a state dict's nested dicts, lists and tuples (a state dict's values)."""
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        state = state.values()
    elif not isinstance(state, (list, tuple)):
        return []  # a number or a string (hyperparameters)
    return [t for item in state for t in _tensors_in(item)]


def _current_state(source):
    if hasattr(source, "state_dict"):
        return source.state_dict()
    return source() if callable(source) else source


def restore_run_state(ckpt, meta, config, user_config, stage_keys, scaler, wandb_run, loop_extra=None,
                      **saved):
    """
    A stage's run state, registered with `ckpt` and restored from the meta being resumed ({} for a fresh
    run). Returns the loop's counters: val_bpb, min_val_bpb, the loss tracker and each counter in `saved`
    (name=fresh value, e.g. chat_sft's progress=0.0, epoch=1), which the loop may rebind. The meta keys in
    order: val_bpb, model_config (of the GPTConfig `config`), user_config, stage_keys (key -> source, e.g.
    the batch geometry), loop_state (the counters plus loop_extra: key -> function read at save time, e.g.
    every rank's loader state), grad_scaler (restored into `scaler`) and wandb_run_id.
    """
    loop = meta.get("loop_state", {})
    tracker = LossTracker(loop.get("smooth_train_loss", 0.0), loop.get("total_training_time", 0.0))
    run = SimpleNamespace(val_bpb=meta.get("val_bpb"), min_val_bpb=loop.get("min_val_bpb", float("inf")),
                          tracker=tracker, **{key: loop.get(key, fresh) for key, fresh in saved.items()})
    fixed = {"model_config": asdict(config), "user_config": user_config, **stage_keys}
    for key, source in {"val_bpb": lambda: run.val_bpb, **fixed}.items():
        ckpt.register(key, source)
    ckpt.register("loop_state", lambda: {"min_val_bpb": run.min_val_bpb, **run.tracker.state_dict(),
                                         **{key: getattr(run, key) for key in saved},
                                         **{key: read() for key, read in (loop_extra or {}).items()}})
    ckpt.register("grad_scaler", scaler)
    ckpt.register("wandb_run_id", getattr(wandb_run, "id", None))  # None for a DummyWandb
    ckpt.restore(meta)
    return run


def evaluate_and_save(step, last_step, ckpt, args, val_eval, late_evals=(), val_at_last_step=False):
    """
    What is due at the boundary before step `step`, in order: val_eval(step) every args.eval_every steps
    (step 0 and the last included; val_at_last_step: the last even when off), the save (every
    args.save_every steps and at the last, never the step just resumed from: it is on disk), then
    fn(step, last_step) of each (period, fn) of late_evals: after the save, so a failing eval cannot lose
    the run.
    """
    ckpt.warn_if_no_room()
    if every(step, args.eval_every, last_step, include_step_zero=True) or (val_at_last_step and last_step):
        val_eval(step)
    if last_step or (step != args.resume_from_step and every(step, args.save_every, False)):
        ckpt.save(step)
    for period, evaluate in late_evals:
        if every(step, period, last_step):
            evaluate(step, last_step)


def train_micro_steps(model, batches, accum, scaler=None):
    """
    The micro-steps of one optimizer step: forward and backward of batches.current (x, y, has_targets, ...)
    then batches.advance(), `accum` times. Returns (the last loss that had targets, or None; how many
    micro-batches had targets; the advance() results in order). The logged loss is the last micro-step's,
    not the mean over them, as the reference logs it (the printed and plotted numbers stay its).
    """
    train_loss, n_with_targets, advanced = None, 0, []
    for _ in range(accum):
        x, y, has_targets = batches.current[:3]
        loss = masked_micro_step(model, x, y, has_targets, accum, scaler)
        if loss is not None:
            train_loss, n_with_targets = loss, n_with_targets + 1
        advanced.append(batches.advance())
    return train_loss, n_with_targets, advanced


class StepLogger:
    """The line every training step prints and, every wandb_every steps, the step's wandb metrics."""

    def __init__(self, tokens_per_step, flops_per_token, peak_flops, world_size, wandb_run, wandb_every,
                 mfu_label="mfu"):
        self.tokens, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self.world_size, self.wandb_run, self.wandb_every = world_size, wandb_run, wandb_every
        self.mfu_label = mfu_label

    def flops_at(self, steps_done):
        """total_training_flops in wandb: the FLOPs of `steps_done` optimizer steps."""
        return self.flops_per_token * self.tokens * steps_done

    def log(self, step, progress, smooth, lrm, dt, tracker, position, epoch, eta="", steps_done=None):
        """Step `step`'s line (progress already formatted: "/00020 (60.00%)"); returns its MFU (%).
        wandb's FLOPs count `steps_done` steps (default `step`): SFT numbers its line after the step."""
        tok_per_sec = int(self.tokens / dt)
        mfu = percent_of_peak(self.flops_per_token * self.tokens / dt / self.world_size, self.peak_flops)
        print0(f"step {step:05d}{progress} | loss: {smooth:.6f} | lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | "
               f"tok/sec: {tok_per_sec:,} | {self.mfu_label}: {mfu:.2f} | {position} | "
               f"total time: {tracker.total_training_time / 60:.2f}m{eta}")
        if step % self.wandb_every == 0:
            flops = self.flops_at(step if steps_done is None else steps_done)
            self.wandb_run.log({"step": step, "total_training_flops": flops,
                                "total_training_time": tracker.total_training_time, "train/loss": smooth,
                                "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec,
                                "train/mfu": mfu, "train/epoch": epoch})
        return mfu


def print_run_end(device_type, tracker):
    """The end-of-run lines every stage prints; returns the peak memory (MiB) for the report."""
    peak_mem = torch.cuda.max_memory_allocated() / 1024 / 1024 if device_type == "cuda" else 0
    print0(f"Peak memory usage: {peak_mem:.2f}MiB")
    print0(f"Total training time: {tracker.total_training_time / 60:.2f}m")
    return peak_mem


def close_run(wandb_run):
    wandb_run.finish()
    compute_cleanup()


@contextlib.contextmanager
def eval_mode(model):
    """`model` in eval mode, its FP8 layers swapped for plain ones, for the block; in training mode after."""
    from nanochat.fp8 import disable_fp8
    model.eval()
    try:
        with disable_fp8(model):
            yield model
    finally:
        model.train()
