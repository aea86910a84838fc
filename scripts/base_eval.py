"""
Evaluate a base model: the CORE metric, bits per byte on the train and val splits, and a few samples.

    python -m scripts.base_eval                                    # largest base checkpoint, every mode
    python -m scripts.base_eval --eval core --max-per-task 100     # a quick CORE estimate
    python -m scripts.base_eval --hf-path openai-community/gpt2    # a HuggingFace model (needs transformers)
    torchrun --nproc_per_node=8 -m scripts.base_eval

CORE results go to <base_dir>/base_eval/<model slug>.csv and to the report section "Base model evaluation".
"""

import argparse
import os

import torch
import torch.nn.functional as F

from nanochat.common import (atomic_open, autodetect_device_type, compute_cleanup, compute_init,
                             get_base_dir, print0)
# evaluate_core lives in the library; it is re-exported here because the reference's base_train imports it
# from scripts.base_eval
from nanochat.core_eval import (EvalBundleError, core_task_note, ensure_eval_bundle,  # noqa: F401
                                evaluate_core, format_core_metric, greedy_samples)
from nanochat.data_source import RankZeroFailed
from nanochat.report import get_report

EVAL_MODES = ("core", "bpb", "sample")

class SetupError(RuntimeError):
    """Something the requested evaluation needs is not available (e.g. the transformers package)."""


def build_parser():
    parser = argparse.ArgumentParser(description="Evaluate a base model")
    parser.add_argument("--eval", type=str, default="core,bpb,sample", help="comma-separated modes: core, bpb, sample")
    parser.add_argument("--hf-path", type=str, default=None,
                        help="evaluate a HuggingFace causal LM instead (e.g. openai-community/gpt2)")
    parser.add_argument("--model-tag", type=str, default=None,
                        help="nanochat checkpoint tag (default: the largest model)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--max-per-task", type=int, default=-1, help="CORE examples per task (-1 = all)")
    parser.add_argument("--device-batch-size", type=int, default=32, help="rows per bpb batch")
    parser.add_argument("--split-tokens", type=int, default=40 * 524288, help="tokens per split for bpb")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.modes = {mode.strip() for mode in args.eval.split(",")}
    invalid = args.modes - set(EVAL_MODES)
    if invalid:
        parser.error(f"Invalid eval modes: {', '.join(sorted(repr(m) for m in invalid))}. "
                     f"Valid modes: {', '.join(EVAL_MODES)}")
    return args


# -----------------------------------------------------------------------------
# HuggingFace models

class ModelWrapper:
    """Gives a HuggingFace causal LM the call signature of nanochat's GPT."""

    def __init__(self, model, max_seq_len=None):
        self.model = model
        self.max_seq_len = max_seq_len  # core_eval crops prompts to it; None = no limit

    def __call__(self, input_ids, targets=None, loss_reduction="mean"):
        logits = self.model(input_ids).logits
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)

    def get_device(self):
        return next(self.model.parameters()).device


def get_hf_token_bytes(tokenizer, device="cpu"):
    """
    (vocab_size,) int64: the UTF-8 length of each token decoded on its own. Special tokens count as the
    length of their text ("<|endoftext|>" = 13) and a token holding part of a UTF-8 character as its
    replacement character (3): this is the table the published HF baseline bpb numbers were computed with.
    """
    vocab_size = tokenizer.get_vocab_size()
    counts = [len(tokenizer.decode([token_id]).encode("utf-8")) for token_id in range(vocab_size)]
    return torch.tensor(counts, dtype=torch.int64, device=device)


def load_hf_model(hf_path, device):
    """(model, tokenizer, token_bytes, sequence_len, name, slug) for a HuggingFace causal LM."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise SetupError("--hf-path needs the `transformers` package: pip install transformers "
                         "(or `uv sync --extra hf`)") from e
    from nanochat.hf_export import EXPORT_MODEL_TYPE, export_token_bytes
    from nanochat.tokenizer import HuggingFaceTokenizer
    print0(f"Loading HuggingFace model from: {hf_path}")
    # a local directory, such as a scripts.export_hf export, runs the modeling code it ships with
    local = os.path.isdir(hf_path)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_path, trust_remote_code=local).to(device).eval()
    max_seq_len = 1024 if "gpt2" in hf_path else None  # GPT-2's position table has 1024 rows
    load_tokenizer = HuggingFaceTokenizer.from_directory if local else HuggingFaceTokenizer.from_pretrained
    tokenizer = load_tokenizer(hf_path)
    slug = hf_path.replace("/", "-")
    if hf_model.config.model_type == EXPORT_MODEL_TYPE:  # our own model: our bpb table and context
        sequence_len, token_bytes = hf_model.config.sequence_len, export_token_bytes(tokenizer, device)
    else:
        sequence_len, token_bytes = max_seq_len or 1024, get_hf_token_bytes(tokenizer, device)
    return ModelWrapper(hf_model, max_seq_len), tokenizer, token_bytes, sequence_len, hf_path, slug


def load_nanochat_model(device, model_tag, step):
    """(model, tokenizer, token_bytes, sequence_len, name, slug) for a base checkpoint."""
    from nanochat.checkpoint_manager import load_model
    from nanochat.tokenizer import get_token_bytes
    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=model_tag, step=step)
    step = meta["step"]
    return (model, tokenizer, get_token_bytes(device), meta["model_config"]["sequence_len"],
            f"base_model (step {step})", f"base_model_{step:06d}")


# -----------------------------------------------------------------------------
# The three modes

def run_samples(model, tokenizer):
    """Greedy completions of SAMPLE_PROMPTS and 8 unconditioned samples (rank 0 only); returns both text lists."""
    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)
    bos = tokenizer.get_bos_token_id()
    print0("\n" + "=" * 80)
    print0("Model Samples")
    print0("=" * 80)
    print0("\nConditioned samples:")
    samples = greedy_samples(model, tokenizer)
    for text in samples:
        print0("-" * 80)
        print0(text)
    print0("\nUnconditioned samples:")
    results, _ = engine.generate_batch([bos], num_samples=8, max_tokens=128, temperature=1.0)
    unconditioned = [tokenizer.decode(tokens) for tokens in results]
    for text in unconditioned:
        print0("-" * 80)
        print0(text)
    return samples, unconditioned


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
    from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
    from nanochat.loss_eval import evaluate_bpb
    _, steps = bpb_steps(split_tokens, device_batch_size * sequence_len * world_size)
    bpb = {}
    for split in ("train", "val"):
        loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, device_batch_size, sequence_len, split,
                                                                device=device)
        try:
            bpb[split] = evaluate_bpb(model, loader, steps, token_bytes)
        finally:
            loader.close()  # stops the loader's tokenising thread
        print0(f"{split} bpb: {bpb[split]:.6f}")
    return bpb


def format_core_csv(core):
    """Header, one line per task, then the CORE line; fields joined by ', ' and padded to 35, 10, 10."""
    def line(task, accuracy, centered):
        return f"{task:<35}, {accuracy:<10}, {centered:<10}\n"
    lines = [line("Task", "Accuracy", "Centered")]
    for label, accuracy in core["results"].items():
        lines.append(line(label, f"{accuracy:.6f}", f"{core['centered_results'][label]:.6f}"))
    note = core_task_note(core)  # a CORE over fewer than the 22 tasks says so in its row name
    lines.append(line(f"CORE {note}" if note else "CORE", "", f"{core['core_metric']:.6f}"))
    return "".join(lines)


def write_core_csv(slug, core):
    out_dir = os.path.join(get_base_dir(), "base_eval")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{slug}.csv")
    with atomic_open(path) as f:
        f.write(format_core_csv(core))
    return path


def report_items(name, core, bpb, samples, unconditioned):
    """The items of the "Base model evaluation" report section."""
    summary = {"model": name}
    if core is not None:
        # a CORE over fewer than the 22 tasks is reported with its task count beside the value
        summary["CORE metric"] = format_core_metric(core) if core_task_note(core) else core["core_metric"]
    if bpb:
        summary["train bpb"], summary["val bpb"] = bpb["train"], bpb["val"]
    items = [summary]
    if core is not None:
        items.append(core["centered_results"])
    items.extend({f"sample {i}": text} for i, text in enumerate(samples))
    items.extend({f"unconditioned {i}": text} for i, text in enumerate(unconditioned))
    return items


def evaluate(args, rank, world_size, device):
    if args.hf_path:
        model, tokenizer, token_bytes, sequence_len, name, slug = load_hf_model(args.hf_path, device)
    else:
        model, tokenizer, token_bytes, sequence_len, name, slug = load_nanochat_model(device, args.model_tag, args.step)
    print0(f"Evaluating model: {name}")
    print0(f"Eval modes: {', '.join(sorted(args.modes))}")
    samples, unconditioned, bpb, core = [], [], {}, None
    if "sample" in args.modes:
        if args.hf_path:
            print0("Skipping sampling for HuggingFace models (not supported)")
        elif rank == 0:
            samples, unconditioned = run_samples(model, tokenizer)
    if "bpb" in args.modes:
        bpb = run_bpb(model, tokenizer, token_bytes, device, args.device_batch_size, sequence_len,
                      args.split_tokens, world_size)
    if "core" in args.modes:
        core = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task)
        if rank == 0:
            print0(f"Results written to: {write_core_csv(slug, core)}")
        print0(f"CORE metric: {format_core_metric(core)}")
    get_report().log(section="Base model evaluation", data=report_items(name, core, bpb, samples, unconditioned))
    return core


def main(argv=None):
    args = parse_args(argv)
    device_type = args.device_type or autodetect_device_type()
    try:
        _, rank, _, world_size, device = compute_init(device_type)
        try:
            if "core" in args.modes:
                # before the model loads and the other modes run; rank 0 obtains it for every rank
                ensure_eval_bundle()
            return evaluate(args, rank, world_size, device)
        finally:
            compute_cleanup()
    except (EvalBundleError, SetupError, RankZeroFailed) as e:
        raise SystemExit(f"base_eval: {e}")


if __name__ == "__main__":
    main()
