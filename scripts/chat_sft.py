"""
Supervised fine-tuning (SFT): turn a base checkpoint into a chat model.

    python -m scripts.chat_sft
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --device-batch-size=16
    python -m scripts.chat_sft --max-seq-len=512 --device-batch-size=32 --total-batch-size=16384 \\
        --eval-every=200 --eval-tokens=524288 --num-iterations=1500                  # CPU/MPS demo

Conversations are packed into rows of max_seq_len + 1 tokens, best fit first, each whole with its own
BOS (dataloader.ConversationPacker); one longer than a row is truncated at render time to min(row, 2048)
tokens, at --max-seq-len >= 2047 the reference's 2048-token render truncation exactly. Only the
assistant's tokens are trained; a micro-batch without any adds no gradient and is left out of the
step's mean (training.masked_micro_step); a step where no rank had one does not update the weights.
The optimizer warm start takes only the base checkpoint's buffers (training.warm_start_optimizer).
Data: the reference's mixture online, one of committed data offline (chat_train.train_mixture).

Horizon. --num-iterations N means N optimizer steps (what the reference's help text says; its loop
counted loader batches and, because of the prefetch, stopped one batch early). -1 means one pass over
the mixture: the run ends with the optimizer step that trains the batch completing the pass. Progress
is computed from the batches actually trained and clamped to 1, so the LR multiplier ends at exactly
--final-lr-frac and never goes negative.

Resume (--resume-from-step s, same flags and world size) is exact: a checkpoint holds the weights,
every rank's optimizer shard and packer state (the fetch cursor, the buffered conversations, the
counters) as of *before* the prefetched batch, and the loop state, so the resumed run trains on the
same batches with the same numbers, and continues the wandb run (its id is in the meta). SIGTERM/SIGINT
save a checkpoint after the current step and exit with 128 + the signal number; a non-finite loss stops
the run without saving.

Checkpoints go to <base_dir>/chatsft_checkpoints/<--model-tag or d<depth>>/, step = optimizer steps
done; main's checkpoint section lists what they hold.
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # before torch is imported

import argparse
import functools
from types import SimpleNamespace

import torch

from nanochat import autofit, chat_train, common, training
from nanochat.checkpoint_manager import get_checkpoints_dir
from nanochat.common import agree_max, exit_on_setup_error, gather_from_ranks, maybe_compile, print0
from nanochat.dataloader import ConversationPacker, PrefetchedBatches, sft_data_generator_bos_bestfit
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report, record_point
from nanochat.tokenizer import get_token_bytes

# user_config keys that may change on resume without changing the trajectory
RESUME_FREE_KEYS = {"run", "device_type", "resume_from_step", "eval_every", "eval_tokens", "chatcore_every",
                    "chatcore_max_cat", "chatcore_max_sample", "save_every"}


# -----------------------------------------------------------------------------
# CLI

def build_parser():
    p = argparse.ArgumentParser(description="Supervised fine-tuning (SFT) the model")
    p.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb logging)")
    p.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"],
                   help="cuda|cpu|mps (empty = autodetect)")
    p.add_argument("--model-tag", type=str, default=None, help="base checkpoint tag to load (and output dir)")
    p.add_argument("--model-step", type=int, default=None, help="base checkpoint step (default: the last)")
    p.add_argument("--load-optimizer", type=int, default=1,
                   help="warm-start the optimizer's momentum buffers from the base checkpoint (0/1)")
    p.add_argument("--num-iterations", type=int, default=-1,
                   help="number of optimization steps (-1 = one pass over the training mixture)")
    p.add_argument("--max-seq-len", type=int, default=None, help="tokens per row (default: inherit)")
    p.add_argument("--device-batch-size", type=autofit.batch_size_arg, default=None,
                   help="rows per micro-batch per rank, or auto: the most that fit (default: inherit)")
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per step (default: inherit)")
    p.add_argument("--embedding-lr", type=float, default=None, help="embeddings' AdamW LR (default: inherit)")
    p.add_argument("--unembedding-lr", type=float, default=None, help="lm_head's AdamW LR (default: inherit)")
    p.add_argument("--matrix-lr", type=float, default=None, help="Muon LR (default: inherit)")
    p.add_argument("--init-lr-frac", type=float, default=0.8, help="initial LR as a fraction of the base LR")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of progress in LR warmup")
    p.add_argument("--warmdown-ratio", type=float, default=0.5, help="fraction of progress in LR warmdown")
    p.add_argument("--final-lr-frac", type=float, default=0.0, help="LR multiplier at the end")
    p.add_argument("--eval-every", type=int, default=200, help="val bpb every N steps (-1 = only at the end)")
    p.add_argument("--eval-tokens", type=int, default=40 * 524288, help="tokens per val bpb evaluation")
    p.add_argument("--chatcore-every", type=int, default=200, help="ChatCORE every N steps (-1 = never)")
    p.add_argument("--chatcore-max-cat", type=int, default=-1, help="max per categorical task (-1 = all)")
    p.add_argument("--chatcore-max-sample", type=int, default=24, help="max problems per generative task")
    p.add_argument("--mmlu-epochs", type=int, default=3, help="copies of MMLU auxiliary_train in the mixture")
    p.add_argument("--gsm8k-epochs", type=int, default=4, help="copies of GSM8K train in the mixture")
    p.add_argument("--resume-from-step", type=int, default=-1, help="resume from this SFT step (-1 = off)")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = at the end)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("max_seq_len", "total_batch_size"):  # --device-batch-size: its type checks it
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.num_iterations == 0 or args.num_iterations < -1:
        parser.error(f"--num-iterations must be positive, or -1 for one pass, got {args.num_iterations}")
    for name in ("warmup_ratio", "warmdown_ratio"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.warmup_ratio + args.warmdown_ratio > 1:
        parser.error("--warmup-ratio + --warmdown-ratio must not exceed 1")
    if args.init_lr_frac <= 0:
        parser.error(f"--init-lr-frac must be positive, got {args.init_lr_frac}")
    if args.mmlu_epochs < 0 or args.gsm8k_epochs < 0:
        parser.error("--mmlu-epochs and --gsm8k-epochs must be >= 0")
    for name in ("chatcore_max_cat", "chatcore_max_sample"):  # 0 would end the first ChatCORE, mid-run
        if getattr(args, name) == 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, or -1 for all problems")
    return args


# -----------------------------------------------------------------------------
# The loop's two halves: what happens at a step boundary, and one optimizer step

def evaluate_and_save(step, run, st):
    """Everything due at the boundary before step `step` (st: the run's fixed parts, run: its counters)."""
    args = st.args

    def evaluate_val(step):
        rows, row_len = st.hp["device_batch_size"], st.hp["max_seq_len"]
        steps = training.eval_steps_for(args.eval_tokens, rows, row_len, st.world_size)
        # a fresh packer over the validation mixture: every evaluation sees the same rows
        batches = sft_data_generator_bos_bestfit(st.val_ds, st.tokenizer, rows, row_len, rank=st.rank,
                                                 world_size=st.world_size, device=st.device)
        with training.eval_mode(st.model):
            run.val_bpb = evaluate_bpb(st.model, batches, steps, st.token_bytes)
        run.min_val_bpb = min(run.min_val_bpb, run.val_bpb)
        print0(f"Step {step:05d} | Validation bpb: {run.val_bpb:.4f}")
        record_point(run.curve, step, {"val bpb": run.val_bpb})
        st.wandb_run.log({"step": step, "total_training_flops": st.logger.flops_at(step),
                          "total_training_time": run.tracker.total_training_time, "val/bpb": run.val_bpb})

    log_chatcore = functools.partial(chat_train.log_chatcore, st.orig_model, st.tokenizer,
                                     st.hp["device_batch_size"], args.chatcore_max_cat,
                                     args.chatcore_max_sample, st.wandb_run, st.logger.flops_at)
    training.evaluate_and_save(step, run.last_step, st.ckpt, args, evaluate_val,
                               [(args.chatcore_every, log_chatcore)], val_at_last_step=True)


def train_step(step, run, st, stop_flag):
    """One optimizer step over `accum` micro-batches, logged; returns whether a signal asked to stop."""
    args = st.args
    st.timer.start()
    train_loss, n_with_targets, advanced = training.train_micro_steps(st.model, st.batches, st.accum,
                                                                      st.scaler)
    run.train_loss = run.train_loss if train_loss is None else train_loss  # logging only
    progresses, dones, epochs = zip(*advanced)
    run.epoch = epochs[-1]
    # every rank must step with one LR
    run.progress, done_flag = agree_max([max(run.progress, *progresses), any(dones)], st.device)
    run.last_step = bool(done_flag)
    update = training.renormalise_accumulated_grads(st.model, n_with_targets, st.accum, st.device) > 0
    if not update:
        print0(f"Step {step:05d}: no supervised token in the whole batch; the weights are not updated")
    lrm = training.sft_lr_multiplier(run.progress, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    training.apply_schedule(st.optimizer, lrm, muon_momentum=training.sft_muon_momentum(step))
    train_loss_f, dt, signalled = training.finish_step(st.optimizer, st.model, st.scaler, run.train_loss,
                                                       st.timer, stop_flag, st.device, step,
                                                       st.ckpt.checkpoint_dir, update=update)
    # the loss EMA averages the losses of micro-batches that had targets only. The reference logs after its
    # step counter moved on: its debiasing (1 - 0.9^(step + 2)) and its 10 untimed steps count from there
    smooth = run.tracker.update(step + 1, train_loss_f, dt) if update else run.tracker.debiased(step + 1)
    record_point(run.curve, step, {"train loss": train_loss_f})
    st.logger.log(step + 1, f" ({100 * run.progress:.2f}%)", smooth, lrm, dt, run.tracker,
                  f"epoch: {run.epoch}", run.epoch, steps_done=step)
    return signalled


def report_run(user_config, run, steps, world_size, packer):
    print0(f"Minimum validation bpb: {run.min_val_bpb:.4f}")
    if packer.truncated:
        print0(f"Truncated {packer.truncated:,} training conversations to {packer.max_tokens} tokens")
    report = get_report()
    curves = report.curve_image("chat-sft-curves", run.curve, {"train loss": "train loss (nats/token)",
                                                              "val bpb": "val bpb (bits/byte)"}, title="SFT")
    report.log("SFT", [user_config, {"Number of iterations": steps, "DDP world size": world_size},
                       {"Minimum validation bpb": run.min_val_bpb}, curves])


# -----------------------------------------------------------------------------

@exit_on_setup_error("chat_sft")
def main(argv=None):
    args = parse_args(argv)
    user_config = vars(args).copy()  # before inheritance: the flags as given
    device_type, rank, world_size, device, peak_flops = training.start_run(args.device_type)

    # --- model, hyperparameters, optimizer
    model, tokenizer, (base_tag, base_step, base_meta), output_tag, meta = chat_train.load_start(
        "base", "sft", args, device, "train", user_config, RESUME_FREE_KEYS)
    hp = chat_train.inherit_hyperparameters(args, base_meta)
    orig_model = model  # uncompiled: checkpoints and ChatCORE (variable shapes)
    model = maybe_compile(model)
    hp["device_batch_size"] = autofit.device_batch_size(
        hp["device_batch_size"], model, hp["max_seq_len"], base_meta.get("device_batch_size", 32),
        hp["total_batch_size"], saved=meta.get("device_batch_size"))
    accum = training.grad_accum_steps(hp["total_batch_size"], hp["device_batch_size"], hp["max_seq_len"],
                                      world_size)
    warm_from = ("base", base_tag, base_step) if args.load_optimizer else None
    optimizer = training.setup_optimizer(orig_model, hp, 0.0, device, rank,
                                         ("sft", output_tag, args.resume_from_step), args.init_lr_frac,
                                         warm_from)
    scaler = training.make_grad_scaler(common.COMPUTE_DTYPE, device_type)
    wandb_run = training.init_wandb("nanochat-sft", args.run, user_config, meta)

    # --- data
    train_ds = chat_train.train_mixture(args.mmlu_epochs, args.gsm8k_epochs)
    packer = ConversationPacker(train_ds, tokenizer, hp["device_batch_size"], hp["max_seq_len"], rank,
                                world_size, device=device)
    saved_loader_states = meta.get("loop_state", {}).get("loader_states")
    if saved_loader_states is not None:  # of the world size that saved them: setup_optimizer refused others
        packer.load_state_dict(saved_loader_states[rank])
    horizon_batches = args.num_iterations * accum if args.num_iterations > 0 else -1
    batches = PrefetchedBatches(packer, len(train_ds), horizon_batches)

    # --- the checkpoint and the loop's counters. model_config is the trained model's own config (its
    # sliding windows derive from its sequence_len); the SFT row length is the top-level max_seq_len.
    ckpt = training.Checkpointer(os.path.join(get_checkpoints_dir("sft"), output_tag), orig_model,
                                 optimizer, rank)
    stage_keys = {**{k: hp[k] for k in ("max_seq_len", "device_batch_size", "total_batch_size")},
                  "hyperparameters": hp}
    every_ranks_loader = {"loader_states": lambda: gather_from_ranks(batches.trained_state)}
    run = training.restore_run_state(ckpt, meta, orig_model.config, user_config, stage_keys, scaler,
                                     wandb_run, every_ranks_loader, progress=0.0, last_step=False, epoch=1,
                                     curve={})
    run.train_loss = torch.zeros((), device=device)
    st = SimpleNamespace(args=args, hp=hp, model=model, orig_model=orig_model, optimizer=optimizer,
                         scaler=scaler, tokenizer=tokenizer, token_bytes=get_token_bytes(device, tokenizer),
                         val_ds=chat_train.val_mixture(), device=device, rank=rank, world_size=world_size,
                         wandb_run=wandb_run, ckpt=ckpt, batches=batches, accum=accum,
                         timer=training.StepTimer(device_type),
                         logger=training.StepLogger(hp["total_batch_size"], orig_model.estimate_flops(),
                                                    peak_flops, world_size, wandb_run, wandb_every=10))

    step = meta.get("step", 0)
    with training.StopFlag() as stop_flag, autofit.oom_advice("--device-batch-size", hp["device_batch_size"]):
        while True:
            evaluate_and_save(step, run, st)
            if run.last_step:
                break
            signalled = train_step(step, run, st, stop_flag)
            step += 1
            training.gc_after_step(step, args.resume_from_step)
            if signalled:
                training.exit_after_signal(ckpt.save, step, stop_flag.signum)

    training.print_run_end(device_type, run.tracker)
    report_run(user_config, run, step, world_size, packer)
    training.close_run(wandb_run)


if __name__ == "__main__":
    main()
