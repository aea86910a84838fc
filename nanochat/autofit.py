"""
Fit the GPU you have: a batch-size flag set to `auto` finds the largest micro-batch that fits in memory.

Each try runs the run's step at its sequence length on rows of zeros: forward and backward for training
(holding room for the optimizer state that the first real step creates), forward only for evaluation.
Candidates are powers of two; for training they divide the rows of one optimizer step, so gradient
accumulation keeps the total batch. From the configured batch the search doubles while a try fits and
halves while one runs out of memory, freeing the cache between tries; every rank then takes the smallest
rank's answer. A resume keeps its checkpoint's batch (exact resume). Only CUDA and MPS report running out
of memory as an error: on CPU the configured batch stays. NANOCHAT_AUTOFIT_TOKEN_LIMIT=N makes a try of
more than N tokens (rows x sequence length) run out of memory as a device that small would: the tests
drive the search with it, and it rehearses a smaller GPU on any machine.
"""
import argparse
import contextlib
import gc
import os

import torch
import torch.distributed as dist

from nanochat.common import agree, print0, rank_and_world

AUTO = "auto"
TOKEN_LIMIT_ENV = "NANOCHAT_AUTOFIT_TOKEN_LIMIT"
MAX_ROWS = 1024  # the bound of an evaluation's search: past it the passes are few anyway


class OutOfMemory(RuntimeError):
    """The device ran out of memory; the message says which flag to change."""


def batch_size_arg(text):
    """The argparse type of a batch-size flag: a positive integer, or 'auto'."""
    if text == AUTO:
        return AUTO
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer or '{AUTO}', got {text!r}")
    return int(text)


def is_out_of_memory(error):
    # MPS and some kernels raise a plain RuntimeError that says so instead of torch.OutOfMemoryError
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


@contextlib.contextmanager
def oom_advice(flag, value):
    """Running out of memory inside the block ends with the flag that sizes the micro-batch."""
    try:
        yield
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(f"the device ran out of memory: lower {flag} (now {value}) "
                          f"or use {flag} {AUTO}") from e


def _step(model, rows, seq_len, backward, reserve_bytes):
    """One step of rows x seq_len tokens while reserve_bytes are held; its tensors die when it returns."""
    limit = int(os.environ.get(TOKEN_LIMIT_ENV) or 0)
    if limit and rows * seq_len > limit:
        raise torch.OutOfMemoryError(f"{rows} x {seq_len} tokens is over {TOKEN_LIMIT_ENV}={limit}")
    device = model.get_device()
    reserve = torch.empty(reserve_bytes, dtype=torch.uint8, device=device)  # noqa: F841 (held, not read)
    x = torch.zeros((rows, seq_len), dtype=torch.long, device=device)
    with torch.set_grad_enabled(backward):
        loss = model(x, x)
    if backward:
        loss.backward()


def try_batch(model, rows, seq_len, backward, reserve_bytes=0):
    """(whether a step of `rows` rows fits, a note saying how it went); the model is left as it was."""
    device = model.get_device()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    fits = True
    try:
        _step(model, rows, seq_len, backward, reserve_bytes)
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        fits = False  # out of the except clause the traceback, and with it the step's tensors, are freed
    peak = f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB" if cuda else None
    model.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
    if fits:
        return True, f"{rows} fits" + (f" (peak {peak})" if peak else "")
    return False, f"{rows} ran out of memory" + (f" at {peak}" if peak else "")


def search(fits, candidates, start):
    """The largest of the ascending candidates that fits(), or None (below one that fits, all fit):
    from the largest candidate <= start, up while they fit, down while they do not."""
    i = max([j for j, b in enumerate(candidates) if b <= start], default=0)
    if fits(candidates[i]):
        while i + 1 < len(candidates) and fits(candidates[i + 1]):
            i += 1
        return candidates[i]
    return next((b for b in reversed(candidates[:i]) if fits(b)), None)


def device_batch_size(value, model, seq_len, start, total_tokens=None, max_rows=MAX_ROWS, backward=True,
                      saved=None):
    """
    The micro-batch of a run whose batch-size flag is `value`: an integer is returned as it is; 'auto'
    is the checkpoint's `saved` batch on a resume, else the search's answer (module docstring), printed
    with the reason. With total_tokens (training) the candidates divide the rows of one optimizer step,
    total_tokens // (seq_len * world size); otherwise they are at most max_rows.
    """
    if value != AUTO:
        return value
    if saved:
        print0(f"Device batch size {saved} (auto): the checkpoint's, so that the resume continues exactly")
        return saved
    device = model.get_device()
    limit = int(os.environ.get(TOKEN_LIMIT_ENV) or 0)
    if device.type == "cpu" and not limit:
        print0(f"Device batch size {start} (auto): the CPU does not report running out of memory, "
               f"so the configured batch stays")
        return start
    world_size = rank_and_world()[1]
    rows = total_tokens // (seq_len * world_size) if total_tokens else max_rows
    candidates = [2 ** k for k in range(rows.bit_length()) if not total_tokens or rows % 2 ** k == 0]
    if not candidates:
        return start  # less than a row per rank: the run's batch geometry check says so
    # the optimizer state, created by the first real step: at most two buffers the size of each
    # parameter (AdamW's moments), sharded over the ranks
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    reserve = 2 * param_bytes // world_size if backward else 0
    notes = []

    def fits(rows_tried):
        ok, note = try_batch(model, rows_tried, seq_len, backward, reserve)
        notes.append(note)
        return ok

    found = search(fits, candidates, start) or 0
    batch = int(agree([found], device, dist.ReduceOp.MIN)[0])  # a batch that fits on every rank
    why = "; ".join(notes)
    if batch == 0:
        raise OutOfMemory(f"auto batch size: not even one row of {seq_len} tokens fits on every rank "
                          f"({why}); use a smaller model or shorter sequences")
    if batch < found:
        why += f"; {batch} on every rank (another rank fits less)"
    if found == candidates[-1]:
        why += (f"; no larger power of two divides the {rows} rows of a step" if total_tokens
                else f"; the search stops at {rows} rows")
    if total_tokens:
        why += f"; gradient accumulation {rows // batch} keeps the total batch {total_tokens:,} tokens"
    injected = f", {TOKEN_LIMIT_ENV}={limit}" if limit else ""
    print0(f"Device batch size {batch} (auto, rows of {seq_len} tokens{injected}): {why}")
    return batch
