"""
The GPU acceptance run behind dev/gpu_check.sh: every check, then ONE table (check | config | result).

    python -m dev.gpu_check               # on one CUDA GPU (H100: about 6-8 minutes)
    python -m dev.gpu_check --cpu-smoke   # every row end to end on CPU, tiny configs (about 1-2 minutes)

Rows: FA3 loaded and its probe result; FA3 vs SDPA max difference (training forward/backward and the
KV-cache prefill/decode calls); a compiled bf16 training step at d12 and d20 (tok/s, MFU, peak memory);
an fp8 training step; decode tok/s and MBU at batch 1/8/32 (scripts.infer_bench); the chat server at 16
and 64 concurrent streaming clients (dev.bench_serve, the server in its own process). The decode and server
rows run on a randomly initialised checkpoint (and a tokenizer trained on the committed sample) written to a
temporary NANOCHAT_BASE_DIR, so the check needs no download. With --cpu-smoke the training rows are a d2 model,
eager fp32 (compiling on a 2-core CPU takes minutes; tests/test_compile.py covers compilation), and the
rows that need CUDA print "n/a (no CUDA)". Exit status 1 if a row failed (its cell says why).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from types import SimpleNamespace

import torch

NA = "n/a (no CUDA)"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="GPU acceptance run: one table")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny configs on CPU, CUDA-only rows n/a")
    return parser.parse_args(argv)


def fa3_rows(cuda):
    if not cuda:
        return [("FA3 loaded + probe", "", NA), ("FA3 vs SDPA max diff", "", NA)]
    import nanochat.flash_attention as fa
    from dev.gpu_fa3_check import kvcache_diffs, randn, training_diffs
    backend = fa.decide_backend(torch.device("cuda"), 128)
    loaded = fa._fa3 is not None
    rows = [("FA3 loaded + probe", "head dim 128", f"loaded: {loaded}; {backend.describe()}")]
    if not loaded:
        return rows + [("FA3 vs SDPA max diff", "", "FA3 did not load")]
    B, T, H, D, window = 2, 1024, 6, 128, (512, 0)
    q, k, v = (randn((B, T, H, D), "cuda", seed=s) for s in range(3))
    fwd, grad = training_diffs(fa._fa3, q, k, v, window)
    prefill, decode = kvcache_diffs(fa._fa3, q, k, v, window)
    return rows + [("FA3 vs SDPA max diff", f"{B}x{T}x{H}x{D}, window 512",
                    f"train fwd {fwd:.1e} grad {grad:.1e}; kv prefill {prefill:.1e} decode {decode:.1e}")]


def train_row(name, depth, cuda, fp8=False):
    """tok/s, MFU and peak memory of training steps (forward, backward, optimizer) on random tokens."""
    from nanochat.common import get_device_peaks, percent_of_peak
    from nanochat.gpt import GPT, config_for_depth
    device = torch.device("cuda" if cuda else "cpu")
    T, B, vocab, warmup, steps = (2048, 16, 32768, 3, 10) if cuda else (64, 2, 512, 1, 3)
    config = config_for_depth(depth, sequence_len=T, vocab_size=vocab, head_dim=128 if cuda else 32,
                              window_pattern="SSSL" if cuda else "L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    optimizer = model.setup_optimizer()
    if fp8:
        from nanochat.fp8 import convert_to_float8_training
        # base_train's rule: the tiny gates would lose more to scaling overhead than they gain
        convert_to_float8_training(model, module_filter_fn=lambda m, _: min(m.weight.shape) >= 128)
    step_model = torch.compile(model, dynamic=False) if cuda else model
    x = torch.randint(0, vocab, (B, T + 1), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize() if cuda else None
            t0 = time.perf_counter()
        step_model(x[:, :-1], x[:, 1:]).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize() if cuda else None
    tok_per_sec = B * T * steps / (time.perf_counter() - t0)
    mfu = percent_of_peak(model.estimate_flops() * tok_per_sec, get_device_peaks(device.type)[0])
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "n/a on CPU"
    how = ("compiled " + ("fp8" if fp8 else "bf16")) if cuda else "eager fp32 (cpu smoke)"
    return (name, f"d{depth} B{B} T{T}, {how}", f"{tok_per_sec:,.0f} tok/s, MFU {mfu:.1f}%, peak {peak}")


def prepare_sample_base_dir(base, vocab_size, num_docs):
    """NANOCHAT_BASE_DIR=base holding the committed pretraining sample and a tokenizer (with its token
    bytes) trained on its first num_docs documents; returns the tokenizer."""
    from nanochat.dataset import install_sample, parquets_iter_batched
    from nanochat.tokenizer import RustBPETokenizer, compute_token_bytes
    os.environ["NANOCHAT_BASE_DIR"] = base
    install_sample()
    docs = [t for batch in parquets_iter_batched("train") for t in batch][:num_docs]
    tokenizer = RustBPETokenizer.train_from_iterator(iter(docs), vocab_size)
    tokenizer.save(os.path.join(base, "tokenizer"))
    torch.save(compute_token_bytes(tokenizer), os.path.join(base, "tokenizer", "token_bytes.pt"))
    return tokenizer


def write_checkpoint(base, cuda):
    """A random base checkpoint (d12 on CUDA, d2 on CPU) and a tokenizer trained on the committed sample."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, config_for_depth
    tokenizer = prepare_sample_base_dir(base, 8192 if cuda else 512, 2000 if cuda else 200)
    depth = 12 if cuda else 2
    config = config_for_depth(depth, sequence_len=2048 if cuda else 128,
                              vocab_size=tokenizer.get_vocab_size(), head_dim=128 if cuda else 32)
    model = GPT(config)
    model.init_weights()
    meta = {"step": 0, "val_bpb": None, "model_config": asdict(config), "user_config": {}}
    save_checkpoint(os.path.join(base, "base_checkpoints", f"d{depth}"), 0, model.state_dict(), None, meta)
    return f"random d{depth}, vocab {tokenizer.get_vocab_size()}"


def decode_rows(cuda, what):
    prompt, decode = (512, 128) if cuda else (16, 8)
    cmd = [sys.executable, "-m", "scripts.infer_bench", "-i", "base", f"--prompt-tokens={prompt}",
           f"--decode-tokens={decode}", "--batch-sizes=1,8,32", "-t", "3" if cuda else "1",
           f"--device-type={'cuda' if cuda else 'cpu'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    sweep = json.loads(out.strip().splitlines()[-1])["sweep"]
    return [(f"decode batch {r['batch_size']}", f"{what}, prompt {prompt}",
             f"{r['tok_per_sec']:,.0f} tok/s, MBU {r['mbu_percent']:.1f}%, tpot {1e3 * r['tpot_sec']:.2f} ms")
            for r in sweep]


def serve_rows(cuda, what):
    from dev.bench_serve import make_requests, run_clients, start_local_server
    args = SimpleNamespace(source="base", max_batch_size=16, concurrency="16,64", model_tag=None, step=None,
                           device_type="cuda" if cuda else "cpu", max_tokens=64 if cuda else 8,
                           temperature=0.8, batch_invariant=False)
    url, stop = start_local_server(args)
    rows = []
    try:
        run_clients(url, make_requests(args, 2), 1, 600)  # warm-up
        for clients in (16, 64):
            wall, results = run_clients(url, make_requests(args, clients), clients, 600)
            tokens = sum(n for _, _, n in results)
            rows.append((f"server {clients} clients", f"{what}, max_tokens {args.max_tokens}",
                         f"{tokens / wall:,.0f} out tok/s, {len(results) / wall:.2f} req/s"))
    finally:
        stop()
    return rows


def run_row(rows, failures, fn, *args, name=""):
    """Run one check; a failure becomes its row (with the error's last line) instead of ending the run.
    Returns whether the check succeeded."""
    try:
        result = fn(*args)
        rows.extend(result if isinstance(result, list) else [result])
        return True
    except Exception as e:  # noqa: BLE001 - every failure is reported in the table
        traceback.print_exc()
        failures.append(name)
        last_line = (str(e).strip().splitlines() or [""])[-1]
        rows.append((name, "", f"FAILED: {type(e).__name__}" + (f": {last_line}" if last_line else "")))
        return False


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("No CUDA GPU: run with --cpu-smoke to check the script itself on CPU")
        return 1
    rows, failures = [], []
    run_row(rows, failures, fa3_rows, cuda, name="FA3")
    for name, depth in (("train step d12", 12), ("train step d20", 20)):
        run_row(rows, failures, train_row, name, depth if cuda else 2, cuda, name=name)
    if cuda:
        run_row(rows, failures, train_row, "fp8 train step", 12, cuda, True, name="fp8 train step")
    else:
        rows.append(("fp8 train step", "", NA))
    with tempfile.TemporaryDirectory() as base:
        written = []  # what the checkpoint is, or its FAILED row: the decode and server rows need it
        if run_row(written, failures, write_checkpoint, base, cuda, name="checkpoint"):
            run_row(rows, failures, decode_rows, cuda, written[0], name="decode")
            run_row(rows, failures, serve_rows, cuda, written[0], name="server")
        else:
            rows.extend(written)
    widths = [max(len(r[i]) for r in rows + [("check", "config", "result")]) for i in range(3)]
    device = torch.cuda.get_device_name(0) if cuda else "cpu (smoke)"
    print(f"\ngpu_check on {device}, torch {torch.__version__}")
    for row in [("check", "config", "result")] + rows:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
