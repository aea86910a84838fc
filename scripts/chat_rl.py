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
import os

import torch

from nanochat import autofit, chat_train, training
from nanochat.checkpoint_manager import get_checkpoints_dir
from nanochat.common import BadSettingError, agree_sum, exit_on_setup_error, print0
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
    p.add_argument("--model-tag", type=str, default=None, help="SFT checkpoint tag to load (and output dir)")
    p.add_argument("--model-step", type=int, default=None, help="SFT checkpoint step to load (default: last)")
    p.add_argument("--num-epochs", type=int, default=1, help="passes over GSM8K train")
    p.add_argument("--num-steps", type=int, default=-1, help="number of steps (-1 = from --num-epochs)")
    p.add_argument("--device-batch-size", type=autofit.batch_size_arg, default=8,
                   help="max rows per forward pass / sampling call, or auto: the most that fit")
    p.add_argument("--examples-per-step", type=int, default=16, help="questions per step, all ranks")
    p.add_argument("--num-samples", type=int, default=16, help="samples per question (the group size)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="max tokens per sample")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout temperature")
    p.add_argument("--top-k", type=int, default=50, help="rollout top-k (0 = full vocabulary)")
    p.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of the embeddings")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of lm_head")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (Muon groups only)")
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="initial LR, a fraction of the LRs above")
    p.add_argument("--eval-every", type=int, default=60, help="pass@k eval every N steps (-1 = never)")
    p.add_argument("--eval-examples", type=int, default=400, help="GSM8K test questions for pass@k")
    p.add_argument("--save-every", type=int, default=60, help="checkpoint every N steps (and the last)")
    p.add_argument("--resume-from-step", type=int, default=-1, help="resume from this RL step (-1 = off)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("num_epochs", "examples_per_step", "num_samples", "max_new_tokens"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.num_steps == 0 or args.num_steps < -1:
        parser.error(f"--num-steps must be positive, or -1 for --num-epochs passes, got {args.num_steps}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    return args


# -----------------------------------------------------------------------------
# One optimizer step

def train_step(model, engine, tokenizer, train_task, optimizer, step, num_steps, args, rank, world_size,
               device):
    """Rollouts and backward passes for this rank's questions, and the step's LR (finish_step updates).
    Returns (mean reward, mean sequence length, sum of the pass losses (non-finite if any was), lrm)."""
    examples_per_rank = args.examples_per_step // world_size
    mean_rewards, lengths, loss_sum = [], [], 0.0
    for e in range(examples_per_rank):
        idx = chat_train.example_index(step, e, examples_per_rank, rank, world_size, len(train_task))
        sequences, inputs, targets, rewards, advantages = chat_train.rollout_example(
            engine, tokenizer, train_task, idx, step, args, device)
        model.train()
        starts = range(0, inputs.size(0), args.device_batch_size)
        for p, start in enumerate(starts):
            rows = slice(start, start + args.device_batch_size)
            logp = -model(inputs[rows], targets[rows], loss_reduction="none").view_as(targets[rows])
            loss = -chat_train.policy_objective(logp, targets[rows], advantages[rows], len(starts),
                                                examples_per_rank)
            loss.backward()
            loss_value = loss.item()
            loss_sum += loss_value
            print0(f"Step {step}/{num_steps} | Example step {e} | Pass {p} | loss: {loss_value:.6f} | "
                   f"Average reward: {rewards[rows].mean().item()}")
        mean_rewards.append(rewards.mean().item())
        lengths += [len(s) for s in sequences]
    # SUM then divide: gloo has no AVG
    totals = agree_sum([sum(mean_rewards) / len(mean_rewards), sum(lengths) / len(lengths)], device)
    mean_reward, mean_length = (total / world_size for total in totals)
    lrm = 1.0 - step / num_steps
    training.apply_schedule(optimizer, lrm)
    return mean_reward, mean_length, torch.tensor(loss_sum), lrm


# -----------------------------------------------------------------------------

@exit_on_setup_error("chat_rl")
def main(argv=None):
    args = parse_args(argv)
    user_config = vars(args).copy()
    device_type, rank, world_size, device, _ = training.start_run(args.device_type)
    if args.examples_per_step % world_size != 0:
        raise BadSettingError(f"--examples-per-step ({args.examples_per_step}) must be a multiple of the "
                              f"world size ({world_size})")
    model, tokenizer, _, output_tag, meta = chat_train.load_start("sft", "rl", args, device, "eval",
                                                                  user_config, RESUME_FREE_KEYS)
    engine = Engine(model, tokenizer)  # the same (uncompiled) model: rollouts always see the current weights
    from tasks.gsm8k import GSM8K
    train_task, val_task = GSM8K(subset="main", split="train"), GSM8K(subset="main", split="test")
    num_steps = args.num_steps
    if num_steps <= 0:
        num_steps = (len(train_task) // args.examples_per_step) * args.num_epochs
    if num_steps <= 0:
        raise BadSettingError(f"No steps to run: {len(train_task)} training questions, --examples-per-step "
                              f"{args.examples_per_step}, --num-epochs {args.num_epochs}")
    print0(f"Calculated number of steps: {num_steps}")
    if meta:
        training.check_resume_horizon(meta["step"], num_steps, "--num-steps (or --num-epochs)")
    print0(f"Total sequences per step: {args.examples_per_step * args.num_samples}")
    optimizer = training.setup_optimizer(model, vars(args), args.weight_decay, device, rank,
                                         ("rl", output_tag, args.resume_from_step), args.init_lr_frac)
    # rows are at most the model's context long (prompt + sample); more rows than samples are never needed
    args.device_batch_size = autofit.device_batch_size(
        args.device_batch_size, model, model.config.sequence_len, 8, max_rows=args.num_samples,
        saved=meta.get("device_batch_size"))
    wandb_run = training.init_wandb("nanochat-rl", args.run, user_config, meta)
    ckpt = training.Checkpointer(os.path.join(get_checkpoints_dir("rl"), output_tag), model,
                                 optimizer, rank)
    # the curve (reward per step, pass@1 at evaluations) is the report's plot; the world size counts the
    # ranks that saved an optimizer shard, so that a lost one is named on resume
    run = training.restore_run_state(ckpt, meta, model.config, user_config, {
        "num_steps": num_steps, "device_batch_size": args.device_batch_size}, None, wandb_run,
        loop_extra={"world_size": lambda: world_size}, curve={})

    def evaluate_pass_at_k(step):
        passk = chat_train.evaluate_pass_at_k(val_task, tokenizer, engine, args.eval_examples,
                                              args.device_batch_size, device, EVAL_MAX_NEW_TOKENS, EVAL_TOP_K)
        print0(f"Step {step} | " + ", ".join(f"Pass@{k}: {v:.4f}" for k, v in passk.items()))
        record_point(run.curve, step, {"pass@1": passk.get(1)})
        wandb_run.log({"step": step, **{f"pass@{k}": v for k, v in passk.items()}})

    timer = training.StepTimer(device_type)
    with training.StopFlag() as stop_flag, autofit.oom_advice("--device-batch-size", args.device_batch_size):
        for step in itertools.count(meta.get("step", 0)):
            last_step = step == num_steps
            training.evaluate_and_save(step, last_step, ckpt, args, evaluate_pass_at_k)
            if last_step:
                break
            timer.start()
            reward, length, loss_sum, lrm = train_step(model, engine, tokenizer, train_task, optimizer, step,
                                                       num_steps, args, rank, world_size, device)
            _, _, signalled = training.finish_step(optimizer, model, None, loss_sum, timer, stop_flag, device,
                                                   step, ckpt.checkpoint_dir)
            print0(f"Step {step}/{num_steps} | Average reward: {reward} | "
                   f"Average sequence length: {length:.2f}")
            record_point(run.curve, step, {"mean reward": reward})
            wandb_run.log({"step": step, "reward": reward, "sequence_length": length, "lrm": lrm})
            if signalled:
                training.exit_after_signal(ckpt.save, step + 1, stop_flag.signum)

    report = get_report()
    axes = {"mean reward": "mean reward (train)", "pass@1": "pass@1 (GSM8K test)"}
    report.log("Chat RL", [user_config, report.curve_image("chat-rl-curves", run.curve, axes, title="RL")])
    training.close_run(wandb_run)


if __name__ == "__main__":
    main()
