"""
Compression (UTF-8 bytes per token) of our tokenizer against GPT-2 and GPT-4 on a few kinds of text: the
samples in data/tok_eval_samples.json, then the first row group of the train and val splits.

    python -m scripts.tok_eval

The GPT-2/GPT-4 encodings come from tiktoken, which downloads them on first use (cached under
$TIKTOKEN_CACHE_DIR). Offline, each missing baseline is skipped with a warning and our own figures are
still reported.
"""

import argparse
import json
import os

from nanochat.common import REPO_DATA_DIR, exit_on_setup_error, setup_default_logging
from nanochat.dataset import list_split_files, read_row_group
from nanochat.report import get_report
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer

GREEN, RED, RESET = "\033[92m", "\033[91m", "\033[0m"
BASELINES = [("GPT-2", "gpt2"), ("GPT-4", "cl100k_base")]
MARKDOWN_RULE_WIDTHS = (11, 7, 14, 14, 13, 12, 17)  # dashes per column of the report table's separator row


def eval_texts():
    """(name, text) pairs: the committed samples, then each split's sample unless it has no data."""
    with open(os.path.join(REPO_DATA_DIR, "tok_eval_samples.json"), encoding="utf-8") as f:
        texts = list(json.load(f).items())
    # the reference's names (9822cc7), though the data is ClimbMix now (upstream later: climbmix-*)
    for name, split in (("fwe-train", "train"), ("fwe-val", "val")):
        try:
            files = list_split_files(split)
        except (FileNotFoundError, RuntimeError) as e:
            print(f"Skipping the {split} sample: {e}")
            continue
        text = "\n".join(read_row_group(files[0], 0))  # list_split_files raises rather than return []
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
            print(f"Warning: cannot load the {label} encoding '{encoding}' ({type(e).__name__}); skipping "
                  f"that comparison. Pre-seed TIKTOKEN_CACHE_DIR (now {cache}) to evaluate it offline.")
    return baselines


def compare(label, theirs, ours):
    """Print the table of ours against one baseline; return the same table in markdown for the report."""
    print(f"\nComparison with {label}:")
    print("=" * 95)
    print(f"{'Text Type':<16} {'Bytes':>8} {label + ' Tokens':>14} {label + ' Ratio':>12} "
          f"{'Ours Tokens':>12} {'Ours Ratio':>11} {'Relative Diff %':>16}  Better")
    print("-" * 95)
    columns = ["Text Type", "Bytes", f"{label} Tokens", f"{label} Ratio", "Ours Tokens", "Ours Ratio",
               "Relative Diff %"]
    rule = "|" + "|".join("-" * width for width in MARKDOWN_RULE_WIDTHS) + "|"
    markdown = [f"### Comparison with {label}", "", f"| {' | '.join(columns)} |", rule]
    for name, (n_bytes, their_tokens, their_ratio) in theirs.items():
        _, our_tokens, our_ratio = ours[name]
        diff = (their_tokens - our_tokens) / their_tokens * 100  # positive: ours needs fewer tokens
        better = "Ours" if our_ratio > their_ratio else label if their_ratio > our_ratio else "Tie"
        their_color, our_color = {"Ours": (RED, GREEN), label: (GREEN, RED)}.get(better, ("", ""))
        cells = [f"{their_color}{their_tokens:>14}{RESET}", f"{their_color}{their_ratio:>12.2f}{RESET}",
                 f"{our_color}{our_tokens:>12}{RESET}", f"{our_color}{our_ratio:>11.2f}{RESET}"]
        print(f"{name:<16} {n_bytes:>8} {' '.join(cells)} {diff:>+15.1f}%  {better}")
        markdown.append(f"| {name} | {n_bytes} | {their_tokens} | {their_ratio:.2f} | {our_tokens} | "
                        f"{our_ratio:.2f} | {diff:+.1f}% |")
    return "\n".join(markdown) + "\n\n"


@exit_on_setup_error("tok_eval")
def main():
    setup_default_logging()
    texts = eval_texts()
    ours_tok = get_tokenizer()
    baselines = load_baselines()
    ours = compression(ours_tok, texts)

    print("Vocab sizes:")
    for label, tok in baselines.items():
        print(f"{label}: {tok.get_vocab_size()}")
    print(f"Ours: {ours_tok.get_vocab_size()}")
    print(f"\n{'Text Type':<16} {'Bytes':>10} {'Ours Tokens':>12} {'Ours Ratio':>11}")
    for name, (n_bytes, tokens, ratio) in ours.items():
        print(f"{name:<16} {n_bytes:>10} {tokens:>12} {ratio:>11.2f}")

    report_md = "".join(compare(label, compression(tok, texts), ours) for label, tok in baselines.items())
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
