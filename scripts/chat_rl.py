"""
Reinforcement learning on GSM8K: on-policy REINFORCE with group-mean baselines ("GRPO" without the
KL term, the reference model, the ratio and the clipping, since every batch is fresh and used once),
token-level normalisation, and advantage = reward - mean reward of the question's samples.

    python -m scripts.chat_rl
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run=default

Differences from the reference, all deliberate:
- The terminating <|assistant_end|> (or BOS) that a sample ended with is part of its sequence and a
  training target (mask 1), so the policy is rewarded for stopping; samples cut by --max-new-tokens
  have no terminator. Padding is <|assistant_end|> with mask 0, never a target.
- --num-samples need not be a multiple of --device-batch-size: the last sampling call and the last
  training pass are smaller (the reference silently dropped the remainder).
- --num-steps (an addition) caps the number of steps; -1 keeps the reference's epochs-based count.
- Checkpoint step = number of updates done (the reference used the loop index, one less), the run
  ends with a checkpoint and (unless --eval-every=-1) a pass@k evaluation of the final weights, and
  checkpoints hold the optimizer shards: --resume-from-step s continues exactly, since rollout seeds
  are a function of (step, example index, sampling call) and the examples of a step a function of the
  step. SIGTERM/SIGINT save after the current step and exit with 128 + the signal number.
"""

import argparse
import itertools
import math
import os
from dataclasses import asdict

import torch
import torch.distributed as dist

from nanochat import training
from nanochat.checkpoint_manager import load_model
from nanochat.common import (autodetect_device_type, compute_init, get_base_dir, get_dist_info,
                             is_ddp_initialized, print0)
from nanochat.engine import Engine
from nanochat.report import get_report, record_point

EVAL_MAX_NEW_TOKENS = 256  # pass@k completions (reference value)
EVAL_TOP_K = 50
RESUME_FREE_KEYS = {"run", "device_type", "resume_from_step", "eval_every", "eval_examples", "save_every"}


# -----------------------------------------------------------------------------
# CLI

def build_parser():
    p = argparse.ArgumentParser(description="Reinforcement learning on GSM8K")
    p.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb logging)")
    p.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"],
                   help="cuda|cpu|mps (empty = autodetect)")
    p.add_argument("--model-tag", type=str, default=None, help="SFT checkpoint tag to load (and output dir name)")
    p.add_argument("--model-step", type=int, default=None, help="SFT checkpoint step to load (default: last)")
    p.add_argument("--num-epochs", type=int, default=1, help="passes over GSM8K train")
    p.add_argument("--num-steps", type=int, default=-1, help="number of steps (-1 = from --num-epochs)")
    p.add_argument("--device-batch-size", type=int, default=8, help="max rows per forward pass / sampling call")
    p.add_argument("--examples-per-step", type=int, default=16, help="questions per optimizer step, all ranks")
    p.add_argument("--num-samples", type=int, default=16, help="samples per question (the group size)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="max tokens per sample")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout temperature")
    p.add_argument("--top-k", type=int, default=50, help="rollout top-k (0 = full vocabulary)")
    p.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of the embeddings")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of lm_head")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (Muon groups only)")
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="initial LR as a fraction of the LRs above")
    p.add_argument("--eval-every", type=int, default=60, help="pass@k eval every N steps (-1 = never)")
    p.add_argument("--eval-examples", type=int, default=400, help="GSM8K test questions for pass@k")
    p.add_argument("--save-every", type=int, default=60, help="checkpoint every N steps (the last step always)")
    p.add_argument("--resume-from-step", type=int, default=-1, help="resume from this saved RL step (-1 = off)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("num_epochs", "device_batch_size", "examples_per_step", "num_samples", "max_new_tokens"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.num_steps == 0 or args.num_steps < -1:
        parser.error(f"--num-steps must be positive, or -1 for --num-epochs passes, got {args.num_steps}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    return args


# -----------------------------------------------------------------------------
# Rollouts and the policy-gradient arithmetic (pure functions)

def example_index(step, example_step, examples_per_rank, rank, world_size, num_examples):
    """The training question of (step, example_step) on this rank: the rank's questions rank, rank + W, ...
    taken in order, examples_per_rank per step, cycling over the epochs."""
    rank_count = len(range(rank, num_examples, world_size))
    position = (step * examples_per_rank + example_step) % rank_count
    return rank + position * world_size


def sample_rollouts(engine, prompt, num_samples, terminal_ids, **generate_kwargs):
    """
    (sequences, masks, finished): per sample the prompt plus its tokens, *including* the terminal token
    (<|assistant_end|> or BOS) that ended it; finished[i] says whether it ended so (False = cut by the
    token limit). Masks are 0 for the prompt and tool-forced tokens, 1 for sampled ones (the terminal
    token was sampled). Engine.generate_batch drops the terminal token, hence this loop.
    """
    sequences = [list(prompt) for _ in range(num_samples)]
    masks = [[0] * len(prompt) for _ in range(num_samples)]
    finished = [False] * num_samples
    for column, column_masks in engine.generate(prompt, num_samples=num_samples, **generate_kwargs):
        for i, (token, mask) in enumerate(zip(column, column_masks)):
            if finished[i]:
                continue
            sequences[i].append(token)
            masks[i].append(mask)
            finished[i] = token in terminal_ids
        if all(finished):
            break
    return sequences, masks, finished


def rollout_tensors(sequences, masks, pad_id, device="cpu"):
    """(inputs, targets): sequences right-padded with pad_id (mask 0) to the longest; targets are the
    next tokens, -1 wherever the next token's mask is 0 (prompt, tool output, padding)."""
    length = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (length - len(s)) for s in sequences], dtype=torch.long, device=device)
    mask = torch.tensor([m + [0] * (length - len(m)) for m in masks], dtype=torch.long, device=device)
    inputs = ids[:, :-1]
    targets = ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = -1
    return inputs, targets


def group_advantages(rewards):
    """Reward minus the group mean (no division by the std): sums to zero, all zero when rewards agree."""
    return rewards - rewards.mean()


def policy_objective(logp, targets, advantages, num_passes, examples_per_rank):
    """
    sum over the pass's rows i and valid targets t of A_i * log p(y_it), divided by (valid targets in
    this pass) * passes * examples per rank: the mean over tokens (DAPO-style token-level
    normalisation), accumulated over the passes and examples of one optimizer step.
    """
    valid = targets >= 0
    num_valid = max(1, int(valid.sum().item()))
    weighted = (logp * valid) * advantages.unsqueeze(1)
    return weighted.sum() / (num_valid * num_passes * examples_per_rank)


def pass_at_k_counts(records, k_max):
    """[number of records with a correct outcome among their first k outcomes, for k = 1..k_max]."""
    counts = [0] * k_max
    for record in records:
        correct = [bool(outcome["is_correct"]) for outcome in record["outcomes"]]
        for k in range(1, k_max + 1):
            counts[k - 1] += any(correct[:k])
    return counts


# -----------------------------------------------------------------------------
# Rollouts of one question, and the pass@k evaluation

def rollout_example(engine, tokenizer, task, example_idx, step, args, device):
    """(sequences, inputs, targets, rewards, advantages) for num_samples samples of one training question."""
    conversation = task[example_idx]
    prompt = tokenizer.render_for_completion(conversation)
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    terminal_ids = (assistant_end, tokenizer.get_bos_token_id())
    sequences, masks, finished = [], [], []
    engine.model.eval()
    for sampling_step in range(math.ceil(args.num_samples / args.device_batch_size)):
        count = min(args.device_batch_size, args.num_samples - sampling_step * args.device_batch_size)
        seed = hash((step, example_idx, sampling_step)) & 0x7FFFFFFF  # stable: hashes of int tuples
        s, m, f = sample_rollouts(engine, prompt, count, terminal_ids, max_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k, seed=seed)
        sequences += s
        masks += m
        finished += f
    rewards = []
    for seq, done in zip(sequences, finished):
        completion = seq[len(prompt):len(seq) - 1] if done else seq[len(prompt):]
        rewards.append(task.reward(conversation, tokenizer.decode(completion)))
    inputs, targets = rollout_tensors(sequences, masks, assistant_end, device)
    rewards = torch.tensor(rewards, dtype=torch.float, device=device)
    return sequences, inputs, targets, rewards, group_advantages(rewards)


def run_gsm8k_eval(task, tokenizer, engine, max_examples=None, num_samples=1,
                   max_completion_tokens=EVAL_MAX_NEW_TOKENS, temperature=1.0, top_k=EVAL_TOP_K):
    """Yields {"idx", "outcomes": [{"is_correct": 0|1}, ...]} for this rank's test questions."""
    _, rank, _, world_size = get_dist_info()
    num = len(task) if max_examples is None else min(max_examples, len(task))
    for idx in range(rank, num, world_size):
        conversation = task[idx]
        prompt = tokenizer.render_for_completion(conversation)
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_completion_tokens,
                                           temperature=temperature, top_k=top_k)
        outcomes = [{"is_correct": task.evaluate(conversation, tokenizer.decode(r[len(prompt):]))} for r in results]
        yield {"idx": idx, "outcomes": outcomes}


def evaluate_pass_at_k(val_task, tokenizer, engine, args, device):
    """{k: pass@k} over --eval-examples test questions, --device-batch-size samples each, all ranks."""
    engine.model.eval()
    records = list(run_gsm8k_eval(val_task, tokenizer, engine, max_examples=args.eval_examples,
                                  num_samples=args.device_batch_size))
    totals = torch.tensor(pass_at_k_counts(records, args.device_batch_size) + [len(records)],
                          dtype=torch.long, device=device)
    if is_ddp_initialized():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    *counts, num_records = totals.tolist()
    return {k: count / max(1, num_records) for k, count in enumerate(counts, 1)}


# -----------------------------------------------------------------------------
# One optimizer step

def mean_over_ranks(values, device):
    t = torch.tensor(values, dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
    if is_ddp_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # SUM then divide: gloo has no AVG
        t /= dist.get_world_size()
    return t.tolist()


def train_step(model, engine, tokenizer, train_task, optimizer, step, num_steps, args, rank, world_size, device):
    """Rollouts and backward passes for this rank's questions, then the update. Returns
    (mean reward, mean sequence length, sum of the pass losses (non-finite if any was), lrm)."""
    examples_per_rank = args.examples_per_step // world_size
    mean_rewards, lengths, loss_sum = [], [], 0.0
    for e in range(examples_per_rank):
        idx = example_index(step, e, examples_per_rank, rank, world_size, len(train_task))
        sequences, inputs, targets, rewards, advantages = rollout_example(engine, tokenizer, train_task, idx, step,
                                                                          args, device)
        model.train()
        starts = range(0, inputs.size(0), args.device_batch_size)
        for p, start in enumerate(starts):
            rows = slice(start, start + args.device_batch_size)
            logp = -model(inputs[rows], targets[rows], loss_reduction="none").view_as(targets[rows])
            objective = policy_objective(logp, targets[rows], advantages[rows], len(starts), examples_per_rank)
            loss = -objective
            loss.backward()
            loss_value = loss.item()
            loss_sum += loss_value
            print0(f"Step {step}/{num_steps} | Example step {e} | Pass {p} | loss: {loss_value:.6f} | "
                   f"Average reward: {rewards[rows].mean().item()}")
        mean_rewards.append(rewards.mean().item())
        lengths += [len(s) for s in sequences]
    mean_reward, mean_length = mean_over_ranks([sum(mean_rewards) / len(mean_rewards), sum(lengths) / len(lengths)],
                                               device)
    lrm = 1.0 - step / num_steps
    training.apply_schedule(optimizer, lrm)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return mean_reward, mean_length, loss_sum, lrm


# -----------------------------------------------------------------------------

def load_policy(args, device, resuming):
    """(model, tokenizer, output_tag): the SFT model, or the RL checkpoint to resume from."""
    _, _, sft_meta = training.checkpoint_meta("sft", args.model_tag, args.model_step)
    output_tag = args.model_tag or f"d{sft_meta['model_config']['n_layer']}"
    if resuming:
        model, tokenizer, _ = load_model("rl", device, phase="eval", model_tag=output_tag, step=args.resume_from_step)
    else:
        model, tokenizer, _ = load_model("sft", device, phase="eval", model_tag=args.model_tag, step=args.model_step)
    return model, tokenizer, output_tag


def setup_optimizer(model, args, device, rank, output_tag, resuming):
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                      matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    if resuming:
        training.load_resume_optimizer(optimizer, "rl", device, rank, output_tag, args.resume_from_step)
        return optimizer
    for group in optimizer.param_groups:
        group["lr"] *= args.init_lr_frac
        group["initial_lr"] = group["lr"]
    return optimizer


def main(argv=None):
    args = parse_args(argv)
    user_config = vars(args).copy()
    device_type = args.device_type or autodetect_device_type()
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    if args.examples_per_step % world_size != 0:
        raise ValueError(f"--examples-per-step ({args.examples_per_step}) must be a multiple of the world size "
                         f"({world_size})")
    training.configure_determinism(device_type)
    training.print_compute_info(device_type)
    resuming = args.resume_from_step >= 0
    model, tokenizer, output_tag = load_policy(args, device, resuming)
    engine = Engine(model, tokenizer)  # the same (uncompiled) model: rollouts always see the current weights
    from tasks.gsm8k import GSM8K
    train_task, val_task = GSM8K(subset="main", split="train"), GSM8K(subset="main", split="test")
    num_steps = args.num_steps if args.num_steps > 0 else (len(train_task) // args.examples_per_step) * args.num_epochs
    if num_steps <= 0:
        raise ValueError(f"No steps to run: {len(train_task)} training questions, --examples-per-step "
                         f"{args.examples_per_step}, --num-epochs {args.num_epochs}")
    print0(f"Calculated number of steps: {num_steps}")
    print0(f"Total sequences per step: {args.examples_per_step * args.num_samples}")
    optimizer = setup_optimizer(model, args, device, rank, output_tag, resuming)
    checkpoint_dir = os.path.join(get_base_dir(), "chatrl_checkpoints", output_tag)
    step, meta = 0, {}
    if resuming:
        _, step, meta = training.checkpoint_meta("rl", output_tag, args.resume_from_step)
        training.warn_on_changed_config(meta.get("user_config", {}), user_config, RESUME_FREE_KEYS)
    wandb_run = training.init_wandb("nanochat-rl", args.run, user_config, rank == 0, meta.get("wandb_run_id"))

    ckpt = training.Checkpointer(checkpoint_dir, model, optimizer, rank)
    for key, value in [("model_config", asdict(model.config)), ("user_config", user_config),
                       ("num_steps", num_steps), ("wandb_run_id", training.wandb_run_id(wandb_run))]:
        ckpt.register(key, value)
    curve = meta.get("curve", {})  # reward per step, pass@1 at evaluations: the report's plot
    ckpt.register("curve", lambda: curve)

    def save(step):
        ckpt.save(step)
        print0(f"✅ Saved model checkpoint to {checkpoint_dir}")

    with training.StopFlag() as stop_flag:
        for step in itertools.count(step):
            last_step = step == num_steps
            if training.every(step, args.eval_every, last_step, include_step_zero=True):
                passk = evaluate_pass_at_k(val_task, tokenizer, engine, args, device)
                print0(f"Step {step} | " + ", ".join(f"Pass@{k}: {v:.4f}" for k, v in passk.items()))
                record_point(curve, step, {"pass@1": passk.get(1)})
                wandb_run.log({"step": step, **{f"pass@{k}": v for k, v in passk.items()}})
            if training.save_due(step, last_step, args.save_every, args.resume_from_step):
                save(step)
            if last_step:
                break
            reward, length, loss_value, lrm = train_step(model, engine, tokenizer, train_task, optimizer, step,
                                                         num_steps, args, rank, world_size, device)
            print0(f"Step {step}/{num_steps} | Average reward: {reward} | Average sequence length: {length:.2f}")
            record_point(curve, step, {"mean reward": reward})
            wandb_run.log({"step": step, "reward": reward, "sequence_length": length, "lrm": lrm})
            signalled, non_finite = training.should_stop(stop_flag, loss_value, device)
            if non_finite:
                raise training.NonFiniteLossError(f"Non-finite RL loss ({loss_value}) at step {step}; not saving. "
                                                  f"The last good checkpoint in {checkpoint_dir} is untouched")
            if signalled:
                training.exit_after_signal(save, step + 1, stop_flag.signum)

    report = get_report()
    axes = {"mean reward": "mean reward (train)", "pass@1": "pass@1 (GSM8K test)"}
    report.log("Chat RL", [user_config, report.curve_image("chat-rl-curves", curve, axes, title="RL")])
    training.close_run(wandb_run)


if __name__ == "__main__":
    main()
