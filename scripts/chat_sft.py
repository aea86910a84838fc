"""
Supervised fine-tuning (SFT): turn a base checkpoint into a chat model.

    python -m scripts.chat_sft
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --device-batch-size=16
    python -m scripts.chat_sft --max-seq-len=512 --device-batch-size=32 --total-batch-size=16384 \\
        --eval-every=200 --eval-tokens=524288 --num-iterations=1500                  # CPU/MPS demo

Conversations are rendered with the chat special tokens and packed into rows of max_seq_len + 1
tokens, best fit first, each conversation whole and starting with its own BOS; the rest of a row that
nothing fits is padding. Only the assistant's tokens are trained (render_conversation's mask). A
conversation longer than a row is truncated at render time (render_conversation's max_tokens) to
min(row, 2048) tokens and trained on: at --max-seq-len >= 2047 that is the reference's 2048-token render
truncation exactly, and at shorter rows every conversation still fits a row. A micro-batch without a
single supervised token (all padding, or prompts cut before their answers) contributes no gradient and
is left out of the step's mean; a step where no rank had one does not update the weights.
The optimizer warm start from the base checkpoint takes only its momentum/second-moment buffers; every
group setting (LR, weight decay 0, betas) stays this run's (the reference let weight decay and betas
be overwritten).

Data. Online, the mixture is the reference's: SmolTalk train, the identity conversations x2, MMLU
auxiliary_train x --mmlu-epochs, GSM8K train x --gsm8k-epochs, SimpleSpelling (200K), SpellingBee (80K);
val: SmolTalk test, MMLU test[:5200], GSM8K test[:420]. Offline (NANOCHAT_OFFLINE=1) SmolTalk and MMLU
auxiliary_train do not exist, so the mixture is built from the committed data instead: identity
conversations x2, the Dolly/HH sample, GSM8K train (2,000 rows) x --gsm8k-epochs, SimpleSpelling (2,000)
and SpellingBee (800), the spelling sizes scaled down 100x with the rest; val: MMLU test[:5200] and
GSM8K test[:420]. --mmlu-epochs has no effect offline.

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
done. The meta's model_config is the trained model's own config: the reference wrote sequence_len =
--max-seq-len there, and since the sliding-window sizes derive from sequence_len, a model fine-tuned at
another length came back with different attention windows than it was trained with. The SFT row length
is the top-level max_seq_len key (with device_batch_size and total_batch_size, as base_train writes).
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # before torch is imported

import argparse
from dataclasses import asdict
from types import SimpleNamespace

import torch

from nanochat import training
from nanochat.chat_core import chatcore_metrics, run_chatcore
from nanochat.checkpoint_manager import load_model, load_optimizer_state
from nanochat.common import (autodetect_device_type, compute_init, download_file_with_lock,
                             get_base_dir, maybe_compile, offline_mode, print0)
from nanochat.dataloader import ConversationPacker, PrefetchedBatches, sft_data_generator_bos_bestfit
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report, record_point
from nanochat.tokenizer import get_token_bytes

# (name, fallback, where the base checkpoint's meta keeps it): --flag None inherits the pretrained value
INHERITED = [
    ("max_seq_len", 2048, "meta"),
    ("device_batch_size", 32, "meta"),
    ("total_batch_size", 524288, "meta"),
    ("embedding_lr", 0.3, "user_config"),
    ("unembedding_lr", 0.004, "user_config"),
    ("matrix_lr", 0.02, "user_config"),
]
# user_config keys that may change on resume without changing the trajectory
RESUME_FREE_KEYS = {"run", "device_type", "resume_from_step", "eval_every", "eval_tokens", "chatcore_every",
                    "chatcore_max_cat", "chatcore_max_sample", "save_every"}
IDENTITY_FILENAME = "identity_conversations.jsonl"


# -----------------------------------------------------------------------------
# CLI

def build_parser():
    p = argparse.ArgumentParser(description="Supervised fine-tuning (SFT) the model")
    p.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb logging)")
    p.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"],
                   help="cuda|cpu|mps (empty = autodetect)")
    p.add_argument("--model-tag", type=str, default=None, help="base checkpoint tag to load (and output dir name)")
    p.add_argument("--model-step", type=int, default=None, help="base checkpoint step to load (default: last)")
    p.add_argument("--load-optimizer", type=int, default=1,
                   help="warm-start the optimizer's momentum buffers from the base checkpoint (0/1)")
    p.add_argument("--num-iterations", type=int, default=-1,
                   help="number of optimization steps (-1 = one pass over the training mixture)")
    p.add_argument("--max-seq-len", type=int, default=None, help="tokens per row (default: inherit)")
    p.add_argument("--device-batch-size", type=int, default=None,
                   help="rows per micro-batch per rank (default: inherit)")
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step (default: inherit)")
    p.add_argument("--embedding-lr", type=float, default=None, help="AdamW LR of the embeddings (default: inherit)")
    p.add_argument("--unembedding-lr", type=float, default=None, help="AdamW LR of lm_head (default: inherit)")
    p.add_argument("--matrix-lr", type=float, default=None, help="Muon LR (default: inherit)")
    p.add_argument("--init-lr-frac", type=float, default=0.8, help="initial LR as a fraction of the base LR")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of progress in the linear LR warmup")
    p.add_argument("--warmdown-ratio", type=float, default=0.5, help="fraction of progress in the linear LR warmdown")
    p.add_argument("--final-lr-frac", type=float, default=0.0, help="LR multiplier at the end of the warmdown")
    p.add_argument("--eval-every", type=int, default=200, help="val bpb every N steps (-1 = only at the end)")
    p.add_argument("--eval-tokens", type=int, default=40 * 524288, help="tokens per val bpb evaluation")
    p.add_argument("--chatcore-every", type=int, default=200, help="ChatCORE every N steps (-1 = never)")
    p.add_argument("--chatcore-max-cat", type=int, default=-1, help="max problems per categorical task (-1 = all)")
    p.add_argument("--chatcore-max-sample", type=int, default=24, help="max problems per generative task")
    p.add_argument("--mmlu-epochs", type=int, default=3, help="copies of MMLU auxiliary_train in the mixture")
    p.add_argument("--gsm8k-epochs", type=int, default=4, help="copies of GSM8K train in the mixture")
    p.add_argument("--resume-from-step", type=int, default=-1, help="resume from this saved SFT step (-1 = off)")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("max_seq_len", "device_batch_size", "total_batch_size"):
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
    return args


# -----------------------------------------------------------------------------
# Hyperparameters inherited from the base checkpoint

def inherit_hyperparameters(args, base_meta):
    """{name: value} for the INHERITED names: the flag if given, else the pretrained value, else the fallback."""
    resolved = {}
    for name, fallback, where in INHERITED:
        source = base_meta if where == "meta" else base_meta.get("user_config") or {}
        pretrained = source.get(name)
        flag = getattr(args, name)
        if flag is None:
            value = pretrained if pretrained is not None else fallback
            print0(f"Inherited {name}={value} from pretrained checkpoint")
        elif pretrained is not None and flag != pretrained:
            value = flag
            print0(f"NOTE: --{name.replace('_', '-')}={flag} overrides pretrained value of {pretrained}")
        else:
            value = flag
            print0(f"Using {name}={value}")
        resolved[name] = value
    return resolved


def warm_start_optimizer(optimizer, state):
    """
    Load only the per-parameter state (momentum and second-moment buffers) of a pretraining optimizer.
    load_state_dict also overwrites every group hyperparameter (LR, weight decay, betas, momentum) with
    the pretraining values; the reference restored just the LR, so its explicit weight_decay=0.0 was
    lost. Here all of this run's group settings are put back.
    """
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, saved in zip(optimizer.param_groups, settings):
        group.update(saved)


# -----------------------------------------------------------------------------
# Data mixtures

def ensure_identity_file():
    """<base_dir>/identity_conversations.jsonl, downloaded once (one rank downloads, the others wait)."""
    from tasks.customjson import IDENTITY_CONVERSATIONS_URL
    return download_file_with_lock(IDENTITY_CONVERSATIONS_URL, IDENTITY_FILENAME)


def train_mixture(mmlu_epochs, gsm8k_epochs):
    from tasks.common import TaskMixture
    from tasks.customjson import COMMITTED_DOLLY_PATH, COMMITTED_IDENTITY_PATH, CustomJSON
    from tasks.gsm8k import GSM8K
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    if offline_mode():
        identity = CustomJSON(COMMITTED_IDENTITY_PATH)
        gsm8k = GSM8K(subset="main", split="train")
        tasks = [identity, identity, CustomJSON(COMMITTED_DOLLY_PATH), *[gsm8k] * gsm8k_epochs,
                 SimpleSpelling(size=2000, split="train"), SpellingBee(size=800, split="train")]
        mixture = TaskMixture(tasks)
        print0(f"Training mixture: {len(mixture):,} rows (offline: identity x2, Dolly/HH, GSM8K x{gsm8k_epochs}, "
               f"SimpleSpelling 2,000, SpellingBee 800; no SmolTalk or MMLU auxiliary_train)")
        return mixture
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk
    identity = CustomJSON(ensure_identity_file())
    mmlu = MMLU(subset="all", split="auxiliary_train")
    gsm8k = GSM8K(subset="main", split="train")
    tasks = [SmolTalk(split="train"), identity, identity, *[mmlu] * mmlu_epochs, *[gsm8k] * gsm8k_epochs,
             SimpleSpelling(size=200000, split="train"), SpellingBee(size=80000, split="train")]
    mixture = TaskMixture(tasks)
    print0(f"Training mixture: {len(mixture):,} rows (MMLU x{mmlu_epochs}, GSM8K x{gsm8k_epochs})")
    return mixture


def val_mixture():
    """The stops keep the train proportions (reference values); offline there is no SmolTalk test."""
    from tasks.common import TaskMixture
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    tasks = [MMLU(subset="all", split="test", stop=5200), GSM8K(subset="main", split="test", stop=420)]
    if not offline_mode():
        from tasks.smoltalk import SmolTalk
        tasks.insert(0, SmolTalk(split="test"))
    return TaskMixture(tasks)


# -----------------------------------------------------------------------------
# Evaluations

def chatcore_and_log(orig_model, tokenizer, hp, args, step, wandb_run):
    accuracies = run_chatcore(orig_model, tokenizer, hp["device_batch_size"], args.chatcore_max_cat,
                              args.chatcore_max_sample)
    chatcore, chatcore_cat = chatcore_metrics(accuracies)
    print0(f"Step {step:05d} | ChatCORE: {chatcore:.4f} | ChatCORE_cat: {chatcore_cat:.4f}")
    wandb_run.log({"step": step, "chatcore_metric": chatcore, "chatcore_cat": chatcore_cat,
                   **{f"chatcore/{task}": acc for task, acc in accuracies.items()}})


def run_val_bpb(model, val_ds, tokenizer, hp, eval_tokens, token_bytes, rank, world_size, device):
    steps = training.eval_steps_for(eval_tokens, hp["device_batch_size"], hp["max_seq_len"], world_size)
    batches = sft_data_generator_bos_bestfit(val_ds, tokenizer, hp["device_batch_size"], hp["max_seq_len"],
                                             rank=rank, world_size=world_size, device=device)
    model.eval()
    try:
        return evaluate_bpb(model, batches, steps, token_bytes)
    finally:
        model.train()


# -----------------------------------------------------------------------------
# Set-up

def load_starting_model(args, device, resuming):
    """(model, tokenizer, base_meta, output_tag): the base model, or the SFT checkpoint to resume from."""
    base_tag, base_step, base_meta = training.checkpoint_meta("base", args.model_tag, args.model_step)
    output_tag = args.model_tag or f"d{base_meta['model_config']['n_layer']}"
    if resuming:
        model, tokenizer, _ = load_model("sft", device, phase="train", model_tag=output_tag,
                                         step=args.resume_from_step)
    else:
        model, tokenizer, _ = load_model("base", device, phase="train", model_tag=base_tag, step=base_step)
    return model, tokenizer, (base_tag, base_step, base_meta), output_tag


def setup_optimizer(orig_model, hp, args, device, rank, base, output_tag, resuming):
    optimizer = orig_model.setup_optimizer(unembedding_lr=hp["unembedding_lr"], embedding_lr=hp["embedding_lr"],
                                           matrix_lr=hp["matrix_lr"], weight_decay=0.0)
    if resuming:
        training.load_resume_optimizer(optimizer, "sft", device, rank, output_tag, args.resume_from_step)
        return optimizer  # LRs, initial LRs and buffers all come from the checkpoint
    if args.load_optimizer:
        base_tag, base_step, _ = base
        state = load_optimizer_state("base", device, rank, model_tag=base_tag, step=base_step)
        if state is None:
            print0("WARNING: no optimizer state in the base checkpoint; starting the optimizer fresh")
        else:
            warm_start_optimizer(optimizer, state)
            print0("Loaded optimizer state from pretrained checkpoint (momentum buffers only, LRs reset)")
    for group in optimizer.param_groups:
        group["lr"] *= args.init_lr_frac
        group["initial_lr"] = group["lr"]
    return optimizer


def train_packer(train_ds, tokenizer, hp, rank, world_size, device, loader_states=None):
    """This rank's packer over the training mixture, at the saved position when resuming."""
    packer = ConversationPacker(train_ds, tokenizer, hp["device_batch_size"], hp["max_seq_len"], rank, world_size,
                                device=device)
    if loader_states is not None:
        if len(loader_states) != world_size:
            raise ValueError(f"--resume-from-step: the checkpoint was saved by {len(loader_states)} ranks, "
                             f"this run has {world_size}; resume with the same world size")
        packer.load_state_dict(loader_states[rank])
    return packer


def print_geometry(hp, world_size, accum):
    tokens = hp["device_batch_size"] * hp["max_seq_len"]
    print0(f"Tokens / micro-batch / rank: {hp['device_batch_size']} x {hp['max_seq_len']} = {tokens:,}")
    print0(f"Tokens / micro-batch: {tokens * world_size:,}")
    print0(f"Total batch size {hp['total_batch_size']:,} => gradient accumulation steps: {accum}")


def register_checkpoint_state(ckpt, run, orig_model, user_config, hp, batches, scaler, wandb_run):
    """The meta keys of an SFT checkpoint; the loop state is what an exact resume needs."""
    ckpt.register("val_bpb", lambda: run.val_bpb)
    ckpt.register("model_config", asdict(orig_model.config))  # the trained attention windows (docstring)
    ckpt.register("user_config", user_config)
    for key in ("max_seq_len", "device_batch_size", "total_batch_size"):
        ckpt.register(key, hp[key])
    ckpt.register("hyperparameters", hp)
    ckpt.register("loop_state", lambda: {
        "progress": run.progress, "last_step": run.last_step, "epoch": run.epoch,
        "min_val_bpb": run.min_val_bpb, **run.tracker.state_dict(), "curve": run.curve,
        "loader_states": training.gather_from_ranks(batches.trained_state)})
    ckpt.register("grad_scaler", scaler)
    ckpt.register("wandb_run_id", training.wandb_run_id(wandb_run))


# -----------------------------------------------------------------------------
# The loop's two halves: what happens at a step boundary, and one optimizer step

def evaluate_and_save(step, run, st):
    """Everything due at the boundary before step `step` (st: the run's fixed parts, run: its counters)."""
    args, last_step = st.args, run.last_step
    if training.every(step, args.eval_every, last_step, include_step_zero=True) or last_step:
        run.val_bpb = run_val_bpb(st.model, st.val_ds, st.tokenizer, st.hp, args.eval_tokens, st.token_bytes,
                                  st.rank, st.world_size, st.device)
        run.min_val_bpb = min(run.min_val_bpb, run.val_bpb)
        print0(f"Step {step:05d} | Validation bpb: {run.val_bpb:.4f}")
        record_point(run.curve, step, {"val bpb": run.val_bpb})
        st.wandb_run.log({"step": step, "val/bpb": run.val_bpb})
    # the final checkpoint comes before the final ChatCORE: an eval failure must not lose the run
    if training.save_due(step, last_step, args.save_every, args.resume_from_step):
        st.ckpt.save(step)
    if training.every(step, args.chatcore_every, last_step):
        chatcore_and_log(st.orig_model, st.tokenizer, st.hp, args, step, st.wandb_run)


def train_step(step, run, st, stop_flag):
    """One optimizer step over `accum` micro-batches, logged; returns whether a signal asked to stop."""
    args, tokens = st.args, st.hp["total_batch_size"]
    st.timer.start()
    train_loss, n_with_targets, advanced = training.train_micro_steps(st.model, st.batches, st.accum,
                                                                      st.scaler)
    run.train_loss = run.train_loss if train_loss is None else train_loss  # logging only
    batch_done = False
    for batch_progress, done, run.epoch in advanced:
        run.progress, batch_done = max(run.progress, batch_progress), batch_done or done
    # every rank must step with one LR
    run.progress, done_flag = training.agree_max([run.progress, batch_done], st.device)
    run.last_step = bool(done_flag)
    update = training.renormalise_accumulated_grads(st.model, n_with_targets, st.accum, st.device) > 0
    if not update:
        print0(f"Step {step:05d}: no supervised token in the whole batch; the weights are not updated")
    lrm = training.sft_lr_multiplier(run.progress, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    training.apply_schedule(st.optimizer, lrm, muon_momentum=training.sft_muon_momentum(step))
    train_loss_f, dt, signalled = training.finish_step(st.optimizer, st.model, st.scaler, run.train_loss,
                                                       st.timer, stop_flag, st.device, step,
                                                       st.ckpt.checkpoint_dir, update=update)
    # the loss EMA averages the losses of micro-batches that had targets only
    smooth = run.tracker.update(step, train_loss_f, dt) if update else run.tracker.debiased(step)
    record_point(run.curve, step, {"train loss": train_loss_f})
    done_steps = step + 1
    tok_per_sec = int(tokens / dt)
    mfu = training.mfu_percent(st.flops_per_token, tokens, dt, st.peak_flops, st.world_size)
    print0(training.step_log_line(done_steps, f" ({100 * run.progress:.2f}%)", smooth, lrm, dt, tok_per_sec,
                                  "mfu", mfu, f"epoch: {run.epoch}", run.tracker))
    if done_steps % 10 == 0:
        flops = st.flops_per_token * tokens * done_steps
        st.wandb_run.log(training.step_wandb_metrics(done_steps, flops, run.tracker, smooth, lrm, dt, tok_per_sec,
                                                     mfu, run.epoch))
    return signalled


# -----------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    user_config = vars(args).copy()  # before inheritance: the flags as given
    device_type = args.device_type or autodetect_device_type()
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    training.configure_determinism(device_type)
    peak_flops = training.print_compute_info(device_type)
    resuming = args.resume_from_step >= 0

    # --- model, hyperparameters, optimizer
    model, tokenizer, base, output_tag = load_starting_model(args, device, resuming)
    hp = inherit_hyperparameters(args, base[2])
    orig_model = model  # uncompiled: checkpoints and ChatCORE (variable shapes)
    model = maybe_compile(model)
    accum = training.grad_accum_steps(hp["total_batch_size"], hp["device_batch_size"], hp["max_seq_len"], world_size)
    print_geometry(hp, world_size, accum)
    token_bytes = get_token_bytes(device=device)
    optimizer = setup_optimizer(orig_model, hp, args, device, rank, base, output_tag, resuming)
    from nanochat.common import COMPUTE_DTYPE
    scaler = training.make_grad_scaler(COMPUTE_DTYPE, device_type)
    meta = {}
    if resuming:
        _, _, meta = training.checkpoint_meta("sft", output_tag, args.resume_from_step)
        training.warn_on_changed_config(meta.get("user_config", {}), user_config, RESUME_FREE_KEYS)
    wandb_run = training.init_wandb("nanochat-sft", args.run, user_config, rank == 0,
                                    meta.get("wandb_run_id"))

    # --- data
    train_ds, val_ds = train_mixture(args.mmlu_epochs, args.gsm8k_epochs), val_mixture()
    loop = meta.get("loop_state", {})
    packer = train_packer(train_ds, tokenizer, hp, rank, world_size, device, loop.get("loader_states"))
    horizon_batches = args.num_iterations * accum if args.num_iterations > 0 else -1
    batches = PrefetchedBatches(packer, len(train_ds), horizon_batches)

    # --- run state: counters (saved with every checkpoint) and the run's fixed parts
    run = SimpleNamespace(val_bpb=meta.get("val_bpb"), min_val_bpb=loop.get("min_val_bpb", float("inf")),
                          progress=loop.get("progress", 0.0), last_step=loop.get("last_step", False),
                          epoch=loop.get("epoch", 1), train_loss=torch.zeros((), device=device),
                          curve=loop.get("curve", {}),
                          tracker=training.LossTracker(loop.get("smooth_train_loss", 0.0),
                                                       loop.get("total_training_time", 0.0)))
    ckpt = training.Checkpointer(os.path.join(get_base_dir(), "chatsft_checkpoints", output_tag), orig_model,
                                 optimizer, rank)
    register_checkpoint_state(ckpt, run, orig_model, user_config, hp, batches, scaler, wandb_run)
    ckpt.restore(meta)
    st = SimpleNamespace(args=args, hp=hp, model=model, orig_model=orig_model, optimizer=optimizer,
                         scaler=scaler, tokenizer=tokenizer, token_bytes=token_bytes, val_ds=val_ds,
                         device=device, rank=rank, world_size=world_size, wandb_run=wandb_run, ckpt=ckpt, batches=batches, accum=accum,
                         flops_per_token=orig_model.estimate_flops(), peak_flops=peak_flops,
                         timer=training.StepTimer(device_type))

    step = meta.get("step", 0)
    with training.StopFlag() as stop_flag:
        while True:
            evaluate_and_save(step, run, st)
            if run.last_step:
                break
            signalled = train_step(step, run, st, stop_flag)
            first_step_of_run = step == 0 or step == args.resume_from_step
            step += 1
            training.gc_after_step(step, first_step_of_run)
            if signalled:
                training.exit_after_signal(ckpt.save, step, stop_flag.signum)

    # --- end of run
    training.print_run_end(device_type, run.tracker)
    print0(f"Minimum validation bpb: {run.min_val_bpb:.4f}")
    if packer.truncated:
        print0(f"Truncated {packer.truncated:,} training conversations to {packer.max_tokens} tokens")
    report = get_report()
    curves = report.curve_image("chat-sft-curves", run.curve, {"train loss": "train loss (nats/token)",
                                                              "val bpb": "val bpb (bits/byte)"}, title="SFT")
    report.log("SFT", [user_config, {"Number of iterations": step, "DDP world size": world_size},
                       {"Minimum validation bpb": run.min_val_bpb}, curves])
    training.close_run(wandb_run)


if __name__ == "__main__":
    main()
