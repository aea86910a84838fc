"""
Flash Attention 3 against PyTorch SDPA on a CUDA GPU: loads FA3 the way training does (nanochat's
attention switch), then runs both kernels on the same bf16 inputs, through both entry points, and prints
one table row per shape: max abs differences (training forward, q/k/v gradients, KV-cache prefill and
one decode step) and the time of a training forward + backward with each kernel.

    python -m dev.gpu_fa3_check                 # on a Hopper GPU
    python -m dev.gpu_fa3_check --head-dim 64

Without a CUDA GPU it says so and exits 0. Exit status 1: FA3 did not load, or a difference is above
the tolerance of two correct bf16 kernels.
"""

import argparse
import time

import torch

import nanochat.flash_attention as fa

FWD_TOL = 2e-2  # outputs: a few bf16 ulps of values of order 1
GRAD_TOL = 5e-2  # gradients accumulate more rounding


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="FA3 vs SDPA: differences and timings on a CUDA GPU")
    parser.add_argument("--head-dim", type=int, default=128, help="the model's head dim (128 by default)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward + backward calls per kernel")
    return parser.parse_args(argv)


def cases():
    """(name, B, T, H, Hkv, window): full and sliding-window causal attention, GQA, the d12 shapes."""
    return [
        ("causal, full context", 4, 2048, 6, 6, (-1, 0)),
        ("sliding window 512", 4, 2048, 6, 6, (512, 0)),  # the S layers of SSSL at T=2048
        ("GQA 8 q / 2 kv heads", 2, 1024, 8, 2, (-1, 0)),
        ("short sequence", 8, 256, 6, 6, (64, 0)),
    ]


def randn(shape, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def training_diffs(kernel, q, k, v, window):
    """(output diff, largest q/k/v gradient diff) of FA3 vs SDPA on one forward + backward."""
    grad_out = randn(q.shape, q.device, seed=9)
    results = []
    for run in (lambda *a: fa._first(kernel.flash_attn_func(*a, causal=True, window_size=window)),
                lambda *a: fa._sdpa_func(*a, causal=True, window_size=window)):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        y = run(*leaves)
        y.backward(grad_out)
        results.append((y.detach(), [t.grad for t in leaves]))
    (y_fa3, g_fa3), (y_sdpa, g_sdpa) = results
    return max_diff(y_fa3, y_sdpa), max(max_diff(a, b) for a, b in zip(g_fa3, g_sdpa))


def kvcache_diffs(kernel, q, k, v, window):
    """(prefill diff, decode diff): half the sequence into an empty cache, then one token."""
    B, T, _, D = q.shape
    prefill = T // 2
    outputs = []
    for run in (lambda *a, **kw: fa._first(kernel.flash_attn_with_kvcache(*a, **kw)), fa._sdpa_with_kvcache):
        k_cache = torch.zeros(B, T, k.size(2), D, device=q.device, dtype=q.dtype)
        v_cache = torch.zeros_like(k_cache)
        seqlens = torch.zeros(B, dtype=torch.int32, device=q.device)
        step_outputs = []
        for start, end in ((0, prefill), (prefill, prefill + 1)):
            s = slice(start, end)
            step_outputs.append(run(q[:, s], k_cache, v_cache, k=k[:, s], v=v[:, s], cache_seqlens=seqlens,
                                    causal=True, window_size=window))
            seqlens += end - start
        outputs.append(step_outputs)
    return tuple(max_diff(a, b) for a, b in zip(*outputs))


def time_training(run, q, k, v, repeats):
    """Milliseconds per forward + backward."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    for _ in range(2):  # warm-up: kernel selection, allocator
        run(*leaves).sum().backward()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        run(*leaves).sum().backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1e3


def check_case(kernel, case, head_dim, repeats, device):
    name, B, T, H, Hkv, window = case
    q = randn((B, T, H, head_dim), device, seed=0)
    k, v = randn((B, T, Hkv, head_dim), device, seed=1), randn((B, T, Hkv, head_dim), device, seed=2)
    fwd, grad = training_diffs(kernel, q, k, v, window)
    prefill, decode = kvcache_diffs(kernel, q, k, v, window)
    fa3_ms = time_training(lambda *a: fa._first(kernel.flash_attn_func(*a, causal=True, window_size=window)),
                           q, k, v, repeats)
    sdpa_ms = time_training(lambda *a: fa._sdpa_func(*a, causal=True, window_size=window), q, k, v, repeats)
    ok = max(fwd, prefill, decode) <= FWD_TOL and grad <= GRAD_TOL
    return [name, f"{B}x{T}x{H}/{Hkv}", f"{fwd:.2e}", f"{grad:.2e}", f"{prefill:.2e}", f"{decode:.2e}",
            f"{fa3_ms:.2f}", f"{sdpa_ms:.2f}", f"{sdpa_ms / fa3_ms:.2f}x", "ok" if ok else "MISMATCH"], ok


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA GPU on this machine: nothing to check (FA3 runs on Hopper GPUs only).")
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability(device)
    print(f"GPU: {torch.cuda.get_device_name(device)} (sm{major}{minor}), torch {torch.__version__}")
    backend = fa.decide_backend(device, args.head_dim)  # prints the start-up line training prints
    kernel = fa._fa3
    if kernel is None:  # not chosen (e.g. not Hopper): still try loading it, to say why or to compare
        kernel, reason = fa._load_flash_attention_3()
        if kernel is None:
            print(f"FA3 ({fa.FA3_SOURCE}) did not load: {reason}")
            return 1
    print(f"attention switch: training {backend.train}, KV cache {backend.kvcache}; "
          f"comparing {fa.FA3_SOURCE} with SDPA")
    header = ["case", "BxTxH/Hkv", "fwd diff", "grad diff", "prefill diff", "decode diff", "fa3 ms",
              "sdpa ms", "speedup", "status"]
    rows, all_ok = [], True
    for case in cases():
        row, ok = check_case(kernel, case, args.head_dim, args.repeats, device)
        rows.append(row)
        all_ok &= ok
    print_table(header, rows)
    print(f"tolerances: outputs {FWD_TOL}, gradients {GRAD_TOL}; times are training forward + backward")
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
