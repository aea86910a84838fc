"""
Evaluate a base model: the CORE metric, bits per byte on the train and val splits, and a few samples.

    python -m scripts.base_eval                                    # largest base checkpoint, every mode
    python -m scripts.base_eval --eval core --max-per-task 100     # a quick CORE estimate
    python -m scripts.base_eval --hf-path openai-community/gpt2    # a HuggingFace model (needs transformers)
    torchrun --nproc_per_node=8 -m scripts.base_eval

CORE results go to <base_dir>/base_eval/<model slug>.csv and to the report section "Base model evaluation".
"""

import argparse

from nanochat import autofit
from nanochat.checkpoint_manager import load_checkpoint_meta
from nanochat.common import autodetect_device_type, compute_cleanup, compute_init, exit_on_setup_error, print0
from nanochat.core_eval import (base_eval_report_items, ensure_eval_bundle, evaluate_core, format_core_metric,
                                greedy_samples, unconditioned_samples, write_core_csv)
from nanochat.hf_export import load_hf_model
from nanochat.loss_eval import run_bpb
from nanochat.report import get_report

EVAL_MODES = ("core", "bpb", "sample")


def build_parser():
    parser = argparse.ArgumentParser(description="Evaluate a base model")
    parser.add_argument("--eval", type=str, default="core,bpb,sample",
                        help="comma-separated modes: core, bpb, sample")
    parser.add_argument("--hf-path", type=str, default=None,
                        help="evaluate a HuggingFace causal LM instead (e.g. openai-community/gpt2)")
    parser.add_argument("--model-tag", type=str, default=None,
                        help="nanochat checkpoint tag (default: the largest model)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--max-per-task", type=int, default=-1, help="CORE examples per task (-1 = all)")
    parser.add_argument("--device-batch-size", type=autofit.batch_size_arg, default=32,
                        help="rows per bpb batch, or auto: the most that fit in memory")
    # the reference's 40 batches, where base_train's --eval-tokens is 80: their val bpb differ slightly
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
# The model and the three modes

def load_nanochat_model(device, model_tag, step):
    """(model, tokenizer, token_bytes, sequence_len, name, slug) for a base checkpoint."""
    from nanochat.checkpoint_manager import load_model
    from nanochat.tokenizer import get_token_bytes
    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=model_tag, step=step)
    step = meta["step"]
    return (model, tokenizer, get_token_bytes(device, tokenizer), meta["model_config"]["sequence_len"],
            f"base_model (step {step})", f"base_model_{step:06d}")


def show_samples(heading, texts):
    print0(heading)
    for text in texts:
        print0("-" * 80)
        print0(text)
    return texts


def evaluate(args, rank, world_size, device):
    if args.hf_path:
        loaded = load_hf_model(args.hf_path, device)
    else:
        loaded = load_nanochat_model(device, args.model_tag, args.step)
    model, tokenizer, token_bytes, sequence_len, name, slug = loaded
    print0(f"Evaluating model: {name}")
    print0(f"Eval modes: {', '.join(sorted(args.modes))}")
    samples, unconditioned, bpb, core = [], [], {}, None
    if "sample" in args.modes:
        if args.hf_path:
            print0("Skipping sampling for HuggingFace models (not supported)")
        elif rank == 0:
            print0("\n" + "=" * 80 + "\nModel Samples\n" + "=" * 80)
            samples = show_samples("\nConditioned samples:", greedy_samples(model, tokenizer))
            unconditioned = show_samples("\nUnconditioned samples:", unconditioned_samples(model, tokenizer))
    if "bpb" in args.modes:
        batch = autofit.device_batch_size(args.device_batch_size, model, sequence_len, 32, backward=False,
                                          max_rows=args.split_tokens // (sequence_len * world_size))
        bpb = run_bpb(model, tokenizer, token_bytes, device, batch, sequence_len,
                      args.split_tokens, world_size)
    if "core" in args.modes:
        core = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task)
        if rank == 0:
            print0(f"Results written to: {write_core_csv(slug, core)}")
        print0(f"CORE metric: {format_core_metric(core)}")
    report = get_report()
    chart = core and report.bar_chart_image("base-model-core-tasks", core["centered_results"],
                                            "centered accuracy (0 = chance, 1 = perfect)", f"CORE, {name}")
    items = base_eval_report_items(name, core, bpb, samples, unconditioned)
    report.log(section="Base model evaluation", data=items + [chart])
    return core


@exit_on_setup_error("base_eval")
def main(argv=None):
    args = parse_args(argv)
    device_type = args.device_type or autodetect_device_type()
    _, rank, _, world_size, device = compute_init(device_type)
    try:
        if "core" in args.modes:
            if not args.hf_path:  # a missing checkpoint is quicker to find than the bundle to obtain
                load_checkpoint_meta("base", args.model_tag, args.step)
            # before the model loads and the other modes run; rank 0 obtains it for every rank
            ensure_eval_bundle()
        return evaluate(args, rank, world_size, device)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    main()
