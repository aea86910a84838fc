"""
Bits per byte: the validation metric that does not depend on the tokenizer's vocabulary.

bpb = sum of the per-token losses (nats) / (ln 2 * sum of the UTF-8 bytes of the target tokens),
over the positions whose target is a real token: ignored targets (-1) and special tokens
(token_bytes == 0, e.g. the BOS that starts the next packed document) count neither loss nor bytes.
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import progress


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    device = model.get_device()
    # float64: a float32 sum of 40M per-token losses drifts in the 5th digit (MPS has no float64)
    acc_dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
    total_nats = torch.zeros((), dtype=acc_dtype, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in progress(range(steps), desc="bpb", unit="batch"):
        x, y = next(batch_iter)
        loss = model(x, y, loss_reduction="none").reshape(-1)
        y = y.reshape(-1)
        # never index with a negative id; int32 because MPS has no int64 comparison kernel
        ignored = y.int() < 0
        nbytes = token_bytes[y.masked_fill(ignored, 0)]
        nbytes = nbytes.masked_fill(ignored, 0)
        total_nats += (loss.to(acc_dtype) * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_bytes = total_bytes.item()
    if total_bytes == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes)
