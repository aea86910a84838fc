"""
Compression (UTF-8 bytes per token) of our tokenizer against GPT-2 and GPT-4 on a few kinds of text.

    python -m scripts.tok_eval

The GPT-2/GPT-4 encodings come from tiktoken, which downloads them on first use (cached under
$TIKTOKEN_CACHE_DIR). Offline, each missing baseline is skipped with a warning and our own figures are
still reported.
"""

import argparse
import os

from nanochat.dataset import list_split_files, read_row_group
from nanochat.report import get_report
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer

GREEN, RED, RESET = "\033[92m", "\033[91m", "\033[0m"

SAMPLE_TEXTS = [
    ("news", "The city council voted 7\u20132 on Tuesday to extend the tram line by 4.5 km, a project "
             "officials say will cost \u20ac212 million. \u201cThis is the biggest investment in a generation,\u201d "
             "the mayor said, adding that construction should begin in the spring of 2027."),
    ("korean", "\ud55c\uad6d\uc5b4\ub294 \ud55c\uae00\ub85c \uc4f0\uba70, \ud55c\uae00\uc740 15\uc138\uae30\uc5d0 "
               "\ub9cc\ub4e4\uc5b4\uc9c4 \ubb38\uc790\uc774\ub2e4. \uc624\ub298 \ub0a0\uc528\uac00 \uc815\ub9d0 "
               "\uc88b\ub124\uc694."),
    ("code", "def merge_counts(a: dict, b: dict) -> dict:\n    out = dict(a)\n    for key, value in b.items():\n"
             "        out[key] = out.get(key, 0) + value\n    return out\n\nprint(merge_counts({'x': 1}, {'x': 2, 'y': 3}))\n"),
    ("math", "\\begin{theorem}\nFor every $\\epsilon > 0$ there is $N$ such that $|a_n - L| < \\epsilon$ for "
             "all $n \\geq N$. Hence $\\lim_{n\\to\\infty} a_n = L$ and $\\sum_{k=1}^{n} k^2 = \\frac{n(n+1)(2n+1)}{6}$.\n"
             "\\end{theorem}"),
    ("science", "Photosynthesis converts CO\u2082 and H\u2082O into C\u2086H\u2081\u2082O\u2086 and O\u2082, "
                "storing roughly 2.8 \u00d7 10\u00b3 kJ per mole of glucose; the quantum yield is about 0.1 at 680 nm."),
]

BASELINES = [("GPT-2", "gpt2"), ("GPT-4", "cl100k_base")]


def split_sample(split):
    """Newline-joined documents of the first row group of the split's first file, or None if there is none."""
    try:
        files = list_split_files(split)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"Skipping the {split} sample: {e}")
        return None
    texts = read_row_group(files[0], 0) if files else []
    return "\n".join(texts) if texts else None


def eval_texts():
    texts = list(SAMPLE_TEXTS)
    for name, split in (("climbmix-train", "train"), ("climbmix-val", "val")):
        text = split_sample(split)
        if text:
            texts.append((name, text))
    return texts


def compression(tokenizer, texts):
    """{name: (bytes, tokens, bytes per token)}; asserts the round trip."""
    results = {}
    for name, text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text, f"{name} does not round-trip"
        n_bytes = len(text.encode("utf-8"))
        results[name] = (n_bytes, len(ids), n_bytes / len(ids))
    return results


def load_baselines():
    baselines = {}
    for label, encoding in BASELINES:
        try:
            baselines[label] = RustBPETokenizer.from_pretrained(encoding)
        except Exception as e:  # offline: tiktoken cannot fetch the encoding file
            cache = os.environ.get("TIKTOKEN_CACHE_DIR", "<unset>")
            print(f"Warning: cannot load the {label} encoding '{encoding}' ({type(e).__name__}); "
                  f"skipping that comparison. Pre-seed TIKTOKEN_CACHE_DIR (now {cache}) to evaluate it offline.")
    return baselines


def print_ours(results):
    print(f"\n{'Text Type':<16} {'Bytes':>10} {'Ours Tokens':>12} {'Ours Ratio':>11}")
    for name, (n_bytes, tokens, ratio) in results.items():
        print(f"{name:<16} {n_bytes:>10} {tokens:>12} {ratio:>11.2f}")


def print_comparison(label, theirs, ours):
    print(f"\nComparison with {label}:")
    print("=" * 95)
    print(f"{'Text Type':<16} {'Bytes':>8} {label + ' Tokens':>14} {label + ' Ratio':>12} {'Ours Tokens':>12} "
          f"{'Ours Ratio':>11} {'Relative Diff %':>16}  Better")
    print("-" * 95)
    for name, (n_bytes, their_tokens, their_ratio) in theirs.items():
        _, our_tokens, our_ratio = ours[name]
        diff = (their_tokens - our_tokens) / their_tokens * 100  # positive: ours needs fewer tokens
        better = "Ours" if our_ratio > their_ratio else label if their_ratio > our_ratio else "Tie"
        their_color, our_color = (RED, GREEN) if better == "Ours" else (GREEN, RED) if better == label else ("", "")
        print(f"{name:<16} {n_bytes:>8} {their_color}{their_tokens:>14}{RESET} {their_color}{their_ratio:>12.2f}{RESET} "
              f"{our_color}{our_tokens:>12}{RESET} {our_color}{our_ratio:>11.2f}{RESET} {diff:>+15.1f}%  {better}")


def markdown_comparison(label, theirs, ours):
    lines = [f"### Comparison with {label}", "",
             f"| Text Type | Bytes | {label} Tokens | {label} Ratio | Ours Tokens | Ours Ratio | Relative Diff % |",
             "|-----------|-------|--------------|--------------|-------------|------------|-----------------|"]
    for name, (n_bytes, their_tokens, their_ratio) in theirs.items():
        _, our_tokens, our_ratio = ours[name]
        diff = (their_tokens - our_tokens) / their_tokens * 100
        lines.append(f"| {name} | {n_bytes} | {their_tokens} | {their_ratio:.2f} | {our_tokens} | {our_ratio:.2f} | {diff:+.1f}% |")
    return "\n".join(lines) + "\n\n"


def main():
    texts = eval_texts()
    ours_tok = get_tokenizer()
    baselines = load_baselines()
    ours = compression(ours_tok, texts)

    print("Vocab sizes:")
    for label, tok in baselines.items():
        print(f"{label}: {tok.get_vocab_size()}")
    print(f"Ours: {ours_tok.get_vocab_size()}")
    print_ours(ours)

    report_md = ""
    for label, tok in baselines.items():
        theirs = compression(tok, texts)
        print_comparison(label, theirs, ours)
        report_md += markdown_comparison(label, theirs, ours)
    if not baselines:
        report_md = "No baseline encodings could be loaded (offline); our compression:\n\n" + "".join(
            f"- {name}: {b} bytes, {t} tokens, ratio {r:.2f}\n" for name, (b, t, r) in ours.items())
    get_report().log(section="Tokenizer evaluation", data=[report_md])


def build_parser():
    """No flags: the texts and baselines are fixed; --help still describes the script."""
    return argparse.ArgumentParser(description="Compare the tokenizer's compression with GPT-2's and GPT-4's")


if __name__ == "__main__":
    build_parser().parse_args()
    main()
