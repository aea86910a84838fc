"""
Bits per byte: the validation metric that does not depend on the tokenizer's vocabulary.

bpb = sum of the per-token losses (nats) / (ln 2 * sum of the UTF-8 bytes of the target tokens),
over the positions whose target is a real token: ignored targets (-1) and special tokens
(token_bytes == 0, e.g. the BOS that starts the next packed document) count neither loss nor bytes.
"""

import math

import torch

from nanochat.common import SetupError, agree_sum, print0, progress


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
    total_nats, total_bytes = agree_sum([total_nats, total_bytes], device)
    if total_bytes == 0:
        return float("inf")
    return total_nats / (math.log(2) * total_bytes)


# -----------------------------------------------------------------------------
# bpb over a split of the pretraining data (base_train's validation, base_eval's train and val)

def split_bpb(model, tokenizer, token_bytes, split, device_batch_size, seq_len, steps, device):
    """bpb of `model` over `steps` batches of the pretraining `split` (each rank its own shards)."""
    from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
    loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, device_batch_size, seq_len, split,
                                                            device=device)
    try:
        return evaluate_bpb(model, loader, steps, token_bytes)
    finally:
        loader.close()  # stops its tokenizer thread now rather than at garbage collection


def bpb_steps(split_tokens, tokens_per_step):
    """(split_tokens rounded down to whole steps, number of steps)."""
    if split_tokens < tokens_per_step:
        raise SetupError(f"--split-tokens={split_tokens} is less than one batch "
                         f"(device batch size * sequence length * world size = {tokens_per_step})")
    if split_tokens % tokens_per_step:
        split_tokens = split_tokens // tokens_per_step * tokens_per_step
        print0(f"Adjusted split_tokens to {split_tokens} (must be divisible by {tokens_per_step})")
    return split_tokens, split_tokens // tokens_per_step


def run_bpb(model, tokenizer, token_bytes, device, device_batch_size, sequence_len, split_tokens, world_size):
    """{split: bits per byte} for train and val, each over split_tokens tokens."""
    _, steps = bpb_steps(split_tokens, device_batch_size * sequence_len * world_size)
    bpb = {}
    for split in ("train", "val"):
        bpb[split] = split_bpb(model, tokenizer, token_bytes, split, device_batch_size, sequence_len, steps,
                               device)
        print0(f"{split} bpb: {bpb[split]:.6f}")
    return bpb
