"""
Evaluate a chat model on six tasks and summarise them as ChatCORE.

    python -m scripts.chat_eval -i sft                              # all six tasks
    python -m scripts.chat_eval -i sft -a "ARC-Easy|GSM8K" -x 100   # two tasks, 100 problems each
    torchrun --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Two kinds of evaluation:
- categorical (ARC-Easy, ARC-Challenge, MMLU): one forward pass per batch of prompts. The prediction is
  the answer letter with the highest logit at the last prompt position (<|assistant_start|>), among the
  problem's own letters only, so the model never has to produce the letter by itself.
- generative (GSM8K, HumanEval, SpellingBee): the Engine samples completions (calculator tool included)
  and the task grades them; a problem passes if any of its num_samples completions passes (pass@k).
Under torchrun each rank takes every world_size-th problem (or batch) and the counts are summed.

ChatCORE = mean over the six tasks of (accuracy - baseline) / (1 - baseline): 0 at chance, 1 when perfect.
The CLI logs the report section "Chat evaluation <source>" (per-task accuracies in [0, 1], and
"ChatCORE metric" when all six tasks ran).

Library use (chat_sft): run_chat_eval(task_name, model, tokenizer, engine, ...) -> accuracy in [0, 1];
chatcore(results) for the summary. Importing this module does no work.
"""

import argparse
import math
import sys

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import load_model
from nanochat.common import autodetect_device_type, compute_cleanup, compute_init, is_ddp_initialized, print0
from nanochat.engine import Engine
from nanochat.report import get_report
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee

# name -> task constructor, in the order the CLI evaluates them
TASKS = {
    "ARC-Easy": lambda: ARC(subset="ARC-Easy", split="test"),
    "ARC-Challenge": lambda: ARC(subset="ARC-Challenge", split="test"),
    "MMLU": lambda: MMLU(subset="all", split="test"),
    "GSM8K": lambda: GSM8K(subset="main", split="test"),
    "HumanEval": lambda: HumanEval(),
    "SpellingBee": lambda: SpellingBee(size=256, split="test"),
}

# Accuracy of guessing: 1 in 4 letters for the multiple-choice tasks (the reference's value, kept although
# a few ARC questions have 3 or 5 choices), 0 for open-ended answers.
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
CATEGORICAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU")  # chat_sft's ChatCORE_cat averages these only


# -----------------------------------------------------------------------------
# ChatCORE

def centered_accuracy(task_name, accuracy):
    """accuracy rescaled so that the task's chance level is 0 and perfect is 1."""
    baseline = BASELINES[task_name]
    return (accuracy - baseline) / (1.0 - baseline)


def chatcore(results):
    """Mean centered accuracy over the tasks in results ({task name: accuracy}). Pass all six tasks for
    ChatCORE, or the CATEGORICAL_TASKS for ChatCORE_cat."""
    if not results:
        raise ValueError("chatcore needs at least one task result")
    return sum(centered_accuracy(name, acc) for name, acc in results.items()) / len(results)


# -----------------------------------------------------------------------------
# Distributed bookkeeping

def _rank_and_world():
    """(rank, world_size) of the initialised process group, else (0, 1): striding and summing must agree."""
    if is_ddp_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_ranks(passed, total, device):
    if not is_ddp_initialized():
        return passed, total
    counts = torch.tensor([passed, total], dtype=torch.long, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return int(counts[0].item()), int(counts[1].item())


def _num_problems(task, max_problems):
    return len(task) if max_problems is None else min(len(task), max_problems)


def _report_final(passed, total):
    if total == 0:
        raise ValueError("no problems were evaluated (empty task, or max_problems=0)")
    print0(f"Final: {passed}/{total} ({100 * passed / total:.2f}%)")
    return passed / total


# -----------------------------------------------------------------------------
# Generative evaluation

def run_generative_eval(task, tokenizer, model, engine, num_samples, max_new_tokens, temperature, top_k,
                        max_problems=None):
    """pass@num_samples over the task's first max_problems problems (all if None), one problem at a time."""
    rank, world_size = _rank_and_world()
    if temperature == 0.0 and num_samples > 1:
        # greedy samples are all identical: generating one gives the same pass@k for a k-th of the compute
        print0(f"temperature 0: the {num_samples} samples per problem would be identical, generating 1")
        num_samples = 1
    passed, total = 0, 0
    for i in range(rank, _num_problems(task, max_problems), world_size):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k)
        completions = (tokenizer.decode(tokens[len(prompt):]) for tokens in results)
        passed += int(any(task.evaluate(conversation, completion) for completion in completions))
        total += 1
        # \r + clear-line: the progress line is rewritten in place
        print(f"\r\033[KRank {rank} | {passed}/{total} ({100 * passed / total:.2f}%)", end="", flush=True)
    print()
    passed, total = _sum_over_ranks(passed, total, model.get_device())
    print0("=" * 50)
    return _report_final(passed, total)


# -----------------------------------------------------------------------------
# Categorical evaluation

def _letter_token(tokenizer, letter, cache):
    """The single token id of an answer letter (memoised in cache)."""
    if letter not in cache:
        ids = tokenizer.encode(letter)
        if len(ids) != 1:
            raise ValueError(f"answer letter {letter!r} encodes to {len(ids)} tokens {ids}; "
                             f"categorical evaluation needs exactly one token per letter")
        cache[letter] = ids[0]
    return cache[letter]


@torch.no_grad()
def predict_letters(model, tokenizer, conversations, letter_cache=None):
    """
    The predicted answer letter of each conversation (which carries its "letters"), from one forward pass
    over the batch. Prompts are right-padded with BOS: attention is causal, so padding after a prompt
    cannot change the logits at its last position, which is the one read. Ties go to the first letter.
    """
    letter_cache = {} if letter_cache is None else letter_cache
    prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
    width = max(len(prompt) for prompt in prompts)
    bos = tokenizer.get_bos_token_id()
    ids = torch.tensor([prompt + [bos] * (width - len(prompt)) for prompt in prompts],
                       dtype=torch.long, device=model.get_device())
    logits = model(ids)  # (B, T, V)
    predictions = []
    for row, (prompt, conversation) in enumerate(zip(prompts, conversations)):
        letters = conversation["letters"]
        letter_ids = [_letter_token(tokenizer, letter, letter_cache) for letter in letters]
        letter_logits = logits[row, len(prompt) - 1, letter_ids]  # at <|assistant_start|>, the last prompt token
        predictions.append(letters[int(torch.argmax(letter_logits).item())])  # argmax: first of equal maxima
    return predictions


def run_categorical_eval(task, tokenizer, model, batch_size, max_problems=None):
    """Accuracy over the task's first max_problems problems (all if None), batch_size prompts per pass."""
    rank, world_size = _rank_and_world()
    num_problems = _num_problems(task, max_problems)
    num_batches = math.ceil(num_problems / batch_size)
    letter_cache = {}
    passed, total = 0, 0
    for b in range(rank, num_batches, world_size):
        conversations = [task[i] for i in range(b * batch_size, min((b + 1) * batch_size, num_problems))]
        for conversation, letter in zip(conversations, predict_letters(model, tokenizer, conversations, letter_cache)):
            passed += int(task.evaluate(conversation, letter))
            total += 1
    passed, total = _sum_over_ranks(passed, total, model.get_device())
    return _report_final(passed, total)


# -----------------------------------------------------------------------------
# One task by name

def run_chat_eval(task_name, model, tokenizer, engine, batch_size=1, num_samples=1, max_new_tokens=512,
                  temperature=0.0, top_k=50, max_problems=None):
    """Accuracy in [0, 1] of the model on the named task (a key of TASKS); max_problems=None means all."""
    if task_name not in TASKS:
        raise KeyError(f"Unknown task {task_name!r}; expected one of {', '.join(TASKS)}")
    if max_problems is not None and max_problems < 1:
        raise ValueError(f"max_problems must be None or >= 1, got {max_problems}")
    if batch_size < 1 or num_samples < 1:
        raise ValueError(f"batch_size and num_samples must be >= 1, got {batch_size} and {num_samples}")
    task = TASKS[task_name]()
    if task.eval_type == "generative":
        return run_generative_eval(task, tokenizer, model, engine, num_samples, max_new_tokens, temperature,
                                   top_k, max_problems=max_problems)
    if task.eval_type == "categorical":
        return run_categorical_eval(task, tokenizer, model, batch_size, max_problems=max_problems)
    raise ValueError(f"Unsupported task evaluation type: {task.eval_type}")


# -----------------------------------------------------------------------------
# CLI

def build_parser():
    parser = argparse.ArgumentParser(description="Evaluate a chat model on the ChatCORE tasks")
    parser.add_argument("-i", "--source", type=str, required=True, choices=["sft", "rl", "base"],
                        help="checkpoint family to load: sft|rl (base also works)")
    parser.add_argument("-a", "--task-name", type=str, default=None,
                        help=f"task(s) joined by '|' (default: all of {'|'.join(TASKS)})")
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (generative)")
    parser.add_argument("-m", "--max-new-tokens", type=int, default=512, help="completion length limit (generative)")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="samples per problem, for pass@k (generative)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="top-k sampling (generative; 0 = full vocab)")
    parser.add_argument("-b", "--batch-size", type=int, default=8, help="prompts per forward pass (categorical)")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="checkpoint tag (default: the largest model)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("-x", "--max-problems", type=int, default=None, help="problems per task (default: all)")
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"], metavar="DEVICE",
                        help="cuda|cpu|mps (empty = autodetect)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.task_name.split("|")] if args.task_name else list(TASKS)
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(map(repr, unknown))}; choose from {'|'.join(TASKS)}")
    args.task_names = list(dict.fromkeys(names))  # duplicates dropped, order kept
    for flag, value in [("--max-new-tokens", args.max_new_tokens), ("--num-samples", args.num_samples),
                        ("--batch-size", args.batch_size)]:
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.max_problems is not None and args.max_problems < 1:
        parser.error(f"--max-problems must be >= 1, got {args.max_problems}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0, got {args.top_k}")
    return args


def evaluate_tasks(args, model, tokenizer):
    """{task name: accuracy} over args.task_names, printing each as it completes."""
    engine = Engine(model, tokenizer)
    results = {}
    for task_name in args.task_names:
        accuracy = run_chat_eval(task_name, model, tokenizer, engine, batch_size=args.batch_size,
                                 num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, max_problems=args.max_problems)
        results[task_name] = accuracy
        print0(f"{task_name} accuracy: {100 * accuracy:.2f}%")
    return results


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


def main(argv=None):
    args = parse_args(argv)
    device_type = args.device_type or autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    try:
        try:
            model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag,
                                             step=args.step)
        except (FileNotFoundError, ValueError) as e:  # no checkpoint / tokenizer, or a bad one
            print(f"chat_eval: error: {e}", file=sys.stderr)
            raise SystemExit(1)
        results = evaluate_tasks(args, model, tokenizer)
        log_results(args, results)
        return results
    finally:
        compute_cleanup()


if __name__ == "__main__":
    main()
