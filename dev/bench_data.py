"""
Data-pipeline throughput on the committed offline sample (runs in a scratch base dir, offline):
tokenizer training time, encode throughput, and dataloader throughput + token utilisation.

    python -m dev.bench_data                       # vocab 32768, T = 2048 and 512
    python -m dev.bench_data --vocab-size 4096 --batches 20
"""

import argparse
import os
import tempfile
import time


def parse_args():
    parser = argparse.ArgumentParser(description="Tokenizer and dataloader throughput on the offline sample")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--batches", type=int, default=40, help="loader batches timed per setting")
    parser.add_argument("--threads", type=int, default=2, help="tokenizer threads")
    parser.add_argument("--base-dir", type=str, default="", help="scratch base dir (default: a temp dir)")
    return parser.parse_args()


def bench_tokenizer(vocab_size, threads):
    from nanochat.dataset import parquets_iter_batched
    from nanochat.tokenizer import RustBPETokenizer
    docs = [d for batch in parquets_iter_batched("train") for d in batch]
    chars = sum(len(d) for d in docs)
    t0 = time.perf_counter()
    tok = RustBPETokenizer.train_from_iterator(iter(docs), vocab_size)
    train_s = time.perf_counter() - t0
    print(f"tokenizer training: {len(docs):,} docs, {chars:,} chars, vocab {vocab_size}: {train_s:.1f} s")

    t0 = time.perf_counter()
    ids = tok.encode(docs, num_threads=threads)
    batch_s = time.perf_counter() - t0
    n_tokens = sum(len(x) for x in ids)
    t0 = time.perf_counter()
    for d in docs[:200]:
        tok.encode(d)
    single_s = time.perf_counter() - t0
    single_tokens = sum(len(x) for x in ids[:200])
    print(f"encode, batch of {len(docs)} docs, {threads} threads: {n_tokens / batch_s:,.0f} tok/s "
          f"({chars / n_tokens:.2f} chars/token)")
    print(f"encode, one doc at a time: {single_tokens / single_s:,.0f} tok/s")
    return tok


def bench_loader(tok, B, T, batches, threads):
    from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit
    loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tok, B, T, "train", tokenizer_threads=threads, device="cpu")
    next(loader)  # the first batch fills the 1000-document buffer
    t0 = time.perf_counter()
    for _ in range(batches):
        _, _, state = next(loader)
    dt = time.perf_counter() - t0
    used, cropped = state["tokens_used"], state["tokens_cropped"]
    print(f"loader B={B} T={T}: {batches * B * T / dt:,.0f} tok/s, {1000 * dt / batches:.1f} ms/batch, "
          f"tokens kept {100 * used / (used + cropped):.1f}% "
          f"(cropped {100 * cropped / (used + cropped):.1f}%)")


def main():
    args = parse_args()
    base_dir = args.base_dir or tempfile.mkdtemp(prefix="nanochat_bench_")
    os.environ["NANOCHAT_BASE_DIR"] = base_dir
    from nanochat.dataset import install_sample
    install_sample()
    print(f"base dir: {base_dir}")
    tok = bench_tokenizer(args.vocab_size, args.threads)
    bench_loader(tok, 8, 2048, args.batches, args.threads)
    bench_loader(tok, 32, 512, args.batches, args.threads)


if __name__ == "__main__":
    main()
