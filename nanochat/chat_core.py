"""
ChatCORE: a chat model's accuracy on six tasks, each centered on its chance level, and their mean.

Two kinds of evaluation:
- categorical (ARC-Easy, ARC-Challenge, MMLU): one forward pass per batch of prompts. The prediction is
  the answer letter with the highest logit at the last prompt position (<|assistant_start|>), among the
  problem's own letters only, so the model never has to produce the letter by itself.
- generative (GSM8K, HumanEval, SpellingBee): the Engine samples completions (calculator tool included)
  and the task grades them; a problem passes if any of its num_samples completions passes (pass@k).
Under torchrun each rank takes every world_size-th problem (or batch) and the counts are summed.

ChatCORE = mean over the six tasks of (accuracy - baseline) / (1 - baseline): 0 at chance, 1 when perfect,
with the one centered_accuracy that CORE uses (nanochat.core_eval). This lives beside core_eval rather
than inside it because it runs on tasks/ and the Engine, while core_eval scores a base model on the
eval bundle; the CLI is scripts/chat_eval.py, and chat_sft runs ChatCORE during training.
Importing this module does no work (a task loads its data when a run asks for it).
"""

import math

import torch

from nanochat import training
from nanochat.common import agree_sum, print0, progress, rank_and_world
from nanochat.core_eval import centered_accuracy, stack_sequences
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee

# name -> task constructor, in the order the CLI evaluates them (a task loads its data when constructed)
TASKS = {
    "ARC-Easy": lambda: ARC(subset="ARC-Easy", split="test"),
    "ARC-Challenge": lambda: ARC(subset="ARC-Challenge", split="test"),
    "MMLU": lambda: MMLU(subset="all", split="test"),
    "GSM8K": lambda: GSM8K(subset="main", split="test"),
    "HumanEval": HumanEval,
    "SpellingBee": lambda: SpellingBee(size=256, split="test"),
}

# Accuracy of guessing: 1 in 4 letters for the multiple-choice tasks (the reference's value, kept although
# a few ARC questions have 3 or 5 choices), 0 for open-ended answers.
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0}
CATEGORICAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU")  # chat_sft's ChatCORE_cat averages these only


# -----------------------------------------------------------------------------
# ChatCORE

def chatcore(results):
    """Mean centered accuracy over the tasks in results ({task name: accuracy}). Pass all six tasks for
    ChatCORE, or the CATEGORICAL_TASKS for ChatCORE_cat."""
    if not results:
        raise ValueError("chatcore needs at least one task result")
    return sum(centered_accuracy(acc, BASELINES[name]) for name, acc in results.items()) / len(results)


# -----------------------------------------------------------------------------
# Distributed bookkeeping

def _num_problems(task, max_problems):
    return len(task) if max_problems is None else min(len(task), max_problems)


def _report_final(passed, total, device):
    """Sums this rank's counts over the ranks, prints the final line and returns the accuracy."""
    passed, total = (int(count) for count in agree_sum([passed, total], device))
    if total == 0:
        raise ValueError("no problems were evaluated (empty task, or max_problems=0)")
    print0(f"Final: {passed}/{total} ({100 * passed / total:.2f}%)")
    return passed / total


# -----------------------------------------------------------------------------
# Generative evaluation

def sampled_completions(task, tokenizer, engine, indices, num_samples, max_new_tokens, temperature, top_k):
    """(conversation, [completion text] * num_samples) for each problem index, sampled from its prompt."""
    for i in indices:
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k)
        yield conversation, [tokenizer.decode(tokens[len(prompt):]) for tokens in results]


def run_generative_eval(task, tokenizer, model, engine, num_samples, max_new_tokens, temperature, top_k,
                        max_problems=None):
    """pass@num_samples over the task's first max_problems problems (all if None), one problem at a time."""
    rank, world_size = rank_and_world()
    if temperature == 0.0 and num_samples > 1:
        # greedy samples are all identical: generating one gives the same pass@k for a k-th of the compute
        print0(f"temperature 0: the {num_samples} samples per problem would be identical, generating 1")
        num_samples = 1
    passed, total = 0, 0
    bar = progress(range(rank, _num_problems(task, max_problems), world_size), unit="problem")
    for conversation, completions in sampled_completions(task, tokenizer, engine, bar, num_samples,
                                                         max_new_tokens, temperature, top_k):
        passed += int(any(task.evaluate(conversation, completion) for completion in completions))
        total += 1
        if bar.disable:  # \r + clear-line: without a bar, this line rewritten in place shows the progress
            print(f"\r\033[KRank {rank} | {passed}/{total} ({100 * passed / total:.2f}%)", end="", flush=True)
        else:
            bar.set_postfix_str(f"{passed}/{total} ({100 * passed / total:.2f}%)")
    print()
    print0("=" * 50)
    return _report_final(passed, total, model.get_device())


# -----------------------------------------------------------------------------
# Categorical evaluation

def _letter_token(tokenizer, letter):
    ids = tokenizer.encode(letter)
    if len(ids) != 1:
        raise ValueError(f"answer letter {letter!r} encodes to {len(ids)} tokens {ids}; "
                         f"categorical evaluation needs exactly one token per letter")
    return ids[0]


@torch.no_grad()
def predict_letters(model, tokenizer, conversations):
    """
    The predicted answer letter of each conversation (which carries its "letters"), from one forward pass
    over the batch. Prompts are right-padded with BOS: attention is causal, so padding after a prompt
    cannot change the logits at its last position, which is the one read. Ties go to the first letter.
    """
    prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
    logits = model(stack_sequences(prompts, tokenizer.get_bos_token_id()).to(model.get_device()))  # (B, T, V)
    predictions = []
    for row, (prompt, conversation) in enumerate(zip(prompts, conversations)):
        letters = conversation["letters"]
        letter_ids = [_letter_token(tokenizer, letter) for letter in letters]
        letter_logits = logits[row, len(prompt) - 1, letter_ids]  # at <|assistant_start|>, the prompt's end
        predictions.append(letters[int(torch.argmax(letter_logits).item())])  # argmax: first of equal maxima
    return predictions


def run_categorical_eval(task, tokenizer, model, batch_size, max_problems=None):
    """Accuracy over the task's first max_problems problems (all if None), batch_size prompts per pass."""
    rank, world_size = rank_and_world()
    num_problems = _num_problems(task, max_problems)
    num_batches = math.ceil(num_problems / batch_size)
    passed, total = 0, 0
    for b in progress(range(rank, num_batches, world_size), unit="batch"):
        conversations = [task[i] for i in range(b * batch_size, min((b + 1) * batch_size, num_problems))]
        letters = predict_letters(model, tokenizer, conversations)
        for conversation, letter in zip(conversations, letters):
            passed += int(task.evaluate(conversation, letter))
            total += 1
    return _report_final(passed, total, model.get_device())


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
# Several tasks: the CLI's selection, and ChatCORE during training (chat_sft)

def run_chat_evals(model, tokenizer, max_problems, line="{task} accuracy: {percent:.2f}%", **options):
    """{task: accuracy} for each task of max_problems ({task name: problems to take, None = all}), each
    printed as it completes (`line`: chat_eval's format, chat_sft has its own); options (batch_size,
    sampling) go to run_chat_eval."""
    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)
    accuracies = {}
    for task, limit in max_problems.items():
        accuracies[task] = run_chat_eval(task, model, tokenizer, engine, max_problems=limit, **options)
        print0(line.format(task=task, percent=100 * accuracies[task]))
    return accuracies


def chatcore_metrics(accuracies):
    """(ChatCORE, ChatCORE_cat) from {task: accuracy}: the centered mean over all / the categorical tasks."""
    categorical = {task: acc for task, acc in accuracies.items() if task in CATEGORICAL_TASKS}
    return chatcore(accuracies), chatcore(categorical)


def run_chatcore(orig_model, tokenizer, batch_size, max_cat, max_sample):
    """{task: accuracy} over all six tasks, at most max_cat / max_sample problems each (-1 = all)."""
    limits = {task: max_cat if task in CATEGORICAL_TASKS else max_sample for task in TASKS}
    limits = {task: None if limit < 0 else limit for task, limit in limits.items()}
    with training.eval_mode(orig_model):
        return run_chat_evals(orig_model, tokenizer, limits, line="  {task}: {percent:.2f}%",
                              batch_size=batch_size)
