"""
torch.profiler breakdown of one base_train training step on the current device: model forward+backward,
optimizer, data (fetching the next batch) and host reads of tensor values (aten::_local_scalar_dense:
.item(), .tolist()), then the profiler's top 15 operations. The loss is meant to be the step's one host
read (tests/test_host_sync.py); on CPU the count also holds the eager AdamW's reads of its 0-d CPU
hyperparameters (alpha=), one per parameter update, which wait for nothing.

    python -m dev.profile_step                # issue 16's CPU config: d4, ctx 512, 8192/step, vocab 4096
    python -m dev.profile_step --depth=2 --max-seq-len=128 --device-batch-size=4 --total-batch-size=512

It runs the real scripts.base_train (as `python -m` would; extra arguments are its flags) on the committed
pretraining sample with a tokenizer trained on it, in a temporary NANOCHAT_BASE_DIR, labels the package
functions a step calls (record_function) and profiles the third step (the first two warm up allocator and
caches).
"""

import runpy
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from dev.gpu_check import prepare_sample_base_dir
from nanochat import dataloader, training

DEFAULT_FLAGS = ["--depth=4", "--head-dim=64", "--window-pattern=L", "--max-seq-len=512",
                 "--device-batch-size=16", "--total-batch-size=8192", "--eval-every=-1",
                 "--core-metric-every=-1", "--sample-every=-1", "--num-iterations=4", "--model-tag=profile"]
# (owner, attribute, label): the step's parts, wrapped in a profiler range of that label
PARTS = [(training, "masked_micro_step", "model fwd+bwd"), (training, "optimizer_step", "optimizer"),
         (dataloader.PrefetchedPretrainBatches, "advance", "data (next batch)")]


def labelled(fn, label):
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def main(argv=None):
    flags = DEFAULT_FLAGS + list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(flags):  # the flags are base_train's: its help, before any data is prepared
        print(__doc__)
        sys.argv = ["scripts.base_train", "--help"]
        runpy.run_module("scripts.base_train", run_name="__main__")
    for owner, name, label in PARTS:
        setattr(owner, name, labelled(getattr(owner, name), label))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as base, \
            profile(activities=activities, schedule=schedule(wait=2, warmup=0, active=1)) as prof:
        prepare_sample_base_dir(base, 4096, 2000)
        # a step runs from its first micro-step (train_micro_steps) to the end of finish_step
        step_range, micro_steps, finish_step = record_function("step"), training.train_micro_steps, \
            training.finish_step

        def profiled_micro_steps(*args, **kwargs):
            step_range.__enter__()
            return micro_steps(*args, **kwargs)

        def profiled_finish_step(*args, **kwargs):
            result = finish_step(*args, **kwargs)
            step_range.__exit__(None, None, None)
            prof.step()
            return result
        training.train_micro_steps, training.finish_step = profiled_micro_steps, profiled_finish_step
        sys.argv = ["scripts.base_train"] + flags
        runpy.run_module("scripts.base_train", run_name="__main__")
    events = {e.key: e for e in prof.key_averages()}
    step_ms = events["step"].cpu_time_total / 1e3
    print(f"\none training step (profiled step 2), {step_ms:.1f} ms wall on the host:")
    parts = [label for _, _, label in PARTS] + ["aten::_local_scalar_dense"]  # .item()/.tolist(): host reads
    for label in parts:
        ms, calls = (events[label].cpu_time_total / 1e3, events[label].count) if label in events else (0.0, 0)
        print(f"  {label:<28} {ms:9.1f} ms  {100 * ms / step_ms:5.1f}%  ({calls} calls)")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
