"""
Host syncs in base_train's training step. On a GPU, reading a tensor's value on the host (.item(),
.tolist(), bool(t), float(t), .cpu(), .numpy(), using it as an index) waits for every queued kernel: one
of them between logging points stalls the step. This counts them, on CPU, in N real steps of
scripts.base_train.main (a tiny d2 run on the committed sample), so a GPU run does not discover them.
"""
import collections
import traceback

from torch.overrides import TorchFunctionMode

from nanochat import training

from test_base_train import TRAIN_FLAGS, base_dir, run_main  # noqa: F401 (base_dir is a fixture)

# the Tensor methods and torch functions that copy a value to the host (TorchFunctionMode sees them all)
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero"}


class HostReadCounter(TorchFunctionMode):
    """Counts host reads of tensor values by the code line that asked for them."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            frame = traceback.extract_stack(limit=2)[0]
            self.sites[f"{name} at {frame.filename.rsplit('/', 1)[-1]}:{frame.name}"] += 1
        return func(*args, **(kwargs or {}))


def count_train_step_reads(monkeypatch, capsys, steps=4):
    """Host reads of base_train's training step, from the first micro-step (training.train_micro_steps) to
    the end of the update (training.finish_step: optimizer step, loss read, stop agreement), over `steps`
    steps, by site. The step's log line comes after it: a logging point."""
    counter = HostReadCounter()
    real_micro_steps, real_finish_step = training.train_micro_steps, training.finish_step

    def counted_micro_steps(*args, **kwargs):
        counter.__enter__()
        return real_micro_steps(*args, **kwargs)

    def counted_finish_step(*args, **kwargs):
        try:
            return real_finish_step(*args, **kwargs)
        finally:
            counter.__exit__(None, None, None)
    monkeypatch.setattr(training, "train_micro_steps", counted_micro_steps)
    monkeypatch.setattr(training, "finish_step", counted_finish_step)
    run_main(TRAIN_FLAGS + [f"--num-iterations={steps}", "--eval-every=-1", "--model-tag=t_sync"], capsys)
    return counter.sites


def test_train_step_reads_the_host_only_to_log(base_dir, monkeypatch, capsys):
    steps, accum = 4, 256 // (2 * 64)  # TRAIN_FLAGS: total batch 256 tokens, 2 rows of 64 per micro-batch
    sites = count_train_step_reads(monkeypatch, capsys, steps)
    assert sites == {
        # the loss of the step's log line (and the non-finite check): the one read the loop needs
        "item at training.py:finish_step": steps,
        # the loader filling its next batch in a host staging buffer (pinned on CUDA), not device memory
        "numpy at dataloader.py:next_rows": steps * accum,
    }, "a host read of a tensor inside the training step: on a GPU it waits for every queued kernel"
