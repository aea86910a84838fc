"""
Training-step throughput and MFU of a GPT config on the current device.

    python -m dev.bench_model --depth 4 --seq-len 512 --batch-size 8
    python -m dev.bench_model --depth 12 --seq-len 2048 --batch-size 32 --compile   # on a GPU

One step = forward + backward + optimizer step on random tokens. MFU uses the model's
estimate_flops() (6 * matmul params + attention, per token) against the device's peak:
the datasheet bf16 number on CUDA, a measured fp32 estimate on CPU (nanochat.common.measure_cpu_flops).
"""

import argparse
import time

import torch

from nanochat import common
from nanochat.common import autodetect_device_type, get_device_peak_flops
from nanochat.gpt import GPT, config_for_depth


def parse_args():
    parser = argparse.ArgumentParser(description="GPT training-step throughput and MFU")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--aspect-ratio", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--window-pattern", type=str, default="L")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    return parser.parse_args()


def sync(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()


def main():
    args = parse_args()
    device_type = args.device_type or autodetect_device_type()
    device = torch.device(device_type)
    torch.manual_seed(0)
    config = config_for_depth(args.depth, args.aspect_ratio, args.head_dim, args.seq_len, args.vocab_size,
                              window_pattern=args.window_pattern)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    optimizer = model.setup_optimizer()
    flops_per_token = model.estimate_flops()
    n_params = sum(p.numel() for p in model.parameters())
    step_model = torch.compile(model, dynamic=False) if args.compile else model

    B, T = args.batch_size, args.seq_len
    x = torch.randint(0, args.vocab_size, (B, T), device=device)
    y = torch.roll(x, -1, dims=1)

    def train_step():
        loss = step_model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        train_step()
    sync(device_type)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step()
    loss.item()
    sync(device_type)
    dt = (time.perf_counter() - t0) / args.steps

    tok_per_sec = B * T / dt
    peak = get_device_peak_flops(device_type)
    mfu = common.percent_of_peak(flops_per_token * tok_per_sec, peak)
    device_name = (torch.cuda.get_device_name(0) if device_type == "cuda"
                   else f"{device_type} ({torch.get_num_threads()} threads)")
    print(f"device: {device_name} | dtype: {common.COMPUTE_DTYPE} | compile: {args.compile}")
    print(f"config: depth={config.n_layer} n_embd={config.n_embd} n_head={config.n_head} seq_len={T} "
          f"batch={B} vocab={config.vocab_size} window={args.window_pattern} params={n_params:,}")
    print(f"step: {dt * 1000:.1f} ms | tok/s: {tok_per_sec:,.0f} | FLOPs/token: {flops_per_token:.3e} | "
          f"peak: {peak:.3e} FLOP/s | MFU: {mfu:.2f}%")


if __name__ == "__main__":
    main()
