"""
Train the BPE tokenizer on the pretraining data and write <base_dir>/tokenizer/{tokenizer.pkl,token_bytes.pt}.

    python -m scripts.tok_train                        # 2B characters, vocab 32768
    python -m scripts.tok_train --max-chars=20000000   # a small run (e.g. on the offline sample)
"""

import argparse
import os
import time

import torch

from nanochat.common import atomic_open, exit_on_setup_error, get_base_dir, setup_default_logging
from nanochat.dataset import text_iterator
from nanochat.report import get_report
from nanochat.tokenizer import SANITY_TEXT, SPECIAL_TOKENS, RustBPETokenizer, compute_token_bytes

# 256 byte tokens and the specials at least; ids must fit rustbpe's u32 (and the int32 training inputs)
MIN_VOCAB_SIZE, MAX_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS), 2**31


def build_parser():
    parser = argparse.ArgumentParser(description="Train a BPE tokenizer")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000,
                        help="stop after this many characters")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many chars")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocab size, including the specials")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, value in vars(args).items():
        if value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not MIN_VOCAB_SIZE <= args.vocab_size <= MAX_VOCAB_SIZE:
        parser.error(f"--vocab-size must be between {MIN_VOCAB_SIZE} (the 256 byte tokens and "
                     f"{len(SPECIAL_TOKENS)} special tokens) and {MAX_VOCAB_SIZE:,}, got {args.vocab_size:,}")
    return args


def token_bytes_stats(token_bytes):
    nonzero = token_bytes[token_bytes > 0].float()
    return {"token_bytes_min": int(nonzero.min()), "token_bytes_max": int(nonzero.max()),
            "token_bytes_mean": nonzero.mean().item(), "token_bytes_std": nonzero.std().item()}


@exit_on_setup_error("tok_train")
def main(argv=None):
    args = parse_args(argv)
    setup_default_logging()
    for name, value in vars(args).items():
        print(f"{name}: {value:,}")

    t0 = time.time()
    texts = text_iterator(args.max_chars, args.doc_cap)
    tokenizer = RustBPETokenizer.train_from_iterator(texts, args.vocab_size)
    train_time = time.time() - t0
    print(f"Training time: {train_time:.2f}s")

    tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    tokenizer.save(tokenizer_dir)
    assert tokenizer.decode(tokenizer.encode(SANITY_TEXT)) == SANITY_TEXT, "tokenizer does not round-trip"

    # bytes per token for bits-per-byte; special tokens count 0 so they drop out
    token_bytes = compute_token_bytes(tokenizer)
    token_bytes_path = os.path.join(tokenizer_dir, "token_bytes.pt")
    with atomic_open(token_bytes_path, "wb") as f:
        torch.save(token_bytes, f)
    print(f"Saved token_bytes to {token_bytes_path}")

    get_report().log(section="Tokenizer training", data=[
        vars(args),
        {"train_time": train_time},
        {"num_special_tokens": len(tokenizer.get_special_tokens())},
        token_bytes_stats(token_bytes),
    ])


if __name__ == "__main__":
    main()
