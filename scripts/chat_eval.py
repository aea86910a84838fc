"""
Evaluate a chat model on six tasks and summarise them as ChatCORE.

    python -m scripts.chat_eval -i sft                              # all six tasks
    python -m scripts.chat_eval -i sft -a "ARC-Easy|GSM8K" -x 100   # two tasks, 100 problems each
    torchrun --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Logs the report section "Chat evaluation <source>" (per-task accuracies in [0, 1], and "ChatCORE metric"
when all six tasks ran). How each task is scored, and ChatCORE itself, is told in nanochat/chat_core.py.
"""

import argparse

from nanochat import autofit
from nanochat.chat_core import TASKS, chatcore, run_chat_evals
from nanochat.checkpoint_manager import load_model
from nanochat.common import autodetect_device_type, compute_cleanup, compute_init, exit_on_setup_error, print0
from nanochat.report import get_report


def build_parser():
    parser = argparse.ArgumentParser(description="Evaluate a chat model on the ChatCORE tasks")
    parser.add_argument("-i", "--source", type=str, required=True, choices=["sft", "rl", "base"],
                        help="checkpoint family to load: sft|rl (base also works)")
    parser.add_argument("-a", "--task-name", type=str, default=None,
                        help=f"task(s) joined by '|' (default: all of {'|'.join(TASKS)})")
    parser.add_argument("-t", "--temperature", type=float, default=0.0,
                        help="sampling temperature (generative)")
    parser.add_argument("-m", "--max-new-tokens", type=int, default=512,
                        help="completion length limit (generative)")
    parser.add_argument("-n", "--num-samples", type=int, default=1,
                        help="samples per problem, for pass@k (generative)")
    parser.add_argument("-k", "--top-k", type=int, default=50,
                        help="top-k sampling (generative; 0 = full vocab)")
    parser.add_argument("-b", "--batch-size", type=autofit.batch_size_arg, default=8,
                        help="prompts per forward pass (categorical), or auto: the most that fit")
    parser.add_argument("-g", "--model-tag", type=str, default=None,
                        help="checkpoint tag (default: the largest model)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("-x", "--max-problems", type=int, default=None,
                        help="problems per task (default: all)")
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"],
                        metavar="DEVICE", help="cuda|cpu|mps (empty = autodetect)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.task_name.split("|")] if args.task_name else list(TASKS)
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(map(repr, unknown))}; choose from {'|'.join(TASKS)}")
    args.task_names = list(dict.fromkeys(names))  # duplicates dropped, order kept
    least = {"--max-new-tokens": (args.max_new_tokens, 1), "--num-samples": (args.num_samples, 1),
             "--max-problems": (args.max_problems, 1), "--temperature": (args.temperature, 0),
             "--top-k": (args.top_k, 0)}
    for flag, (value, minimum) in least.items():
        if value is not None and value < minimum:  # --max-problems is None for all
            parser.error(f"{flag} must be >= {minimum}, got {value}")
    return args


def log_results(args, results):
    """Print ChatCORE and log the report section. ChatCORE goes to the report only when all six tasks ran:
    the report summary would otherwise show an average over fewer tasks under the same name."""
    chatcore_item = {}
    if set(results) == set(TASKS):
        chatcore_item = {"ChatCORE metric": chatcore(results)}
        print0(f"ChatCORE metric: {chatcore_item['ChatCORE metric']:.4f}")
    else:
        print0(f"ChatCORE over the {len(results)} evaluated task(s), not reported (needs all {len(TASKS)}): "
               f"{chatcore(results):.4f}")
    cli_args = {k: v for k, v in vars(args).items() if k != "task_names"}
    # args first: a later line mentioning a task name (its accuracy) wins in the report summary's extraction
    get_report().log(section=f"Chat evaluation {args.source}", data=[cli_args, results, chatcore_item])


@exit_on_setup_error("chat_eval")
def main(argv=None):
    args = parse_args(argv)
    device_type = args.device_type or autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    try:
        model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag,
                                         step=args.step)
        # prompts are at most the model's context long
        args.batch_size = autofit.device_batch_size(args.batch_size, model, model.config.sequence_len, 8,
                                                    backward=False)
        results = run_chat_evals(model, tokenizer, dict.fromkeys(args.task_names, args.max_problems),
                                 batch_size=args.batch_size, num_samples=args.num_samples,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k)
        log_results(args, results)
        return results
    finally:
        compute_cleanup()


if __name__ == "__main__":
    main()
