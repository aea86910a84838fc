"""
Pretrain the base model.

    python -m scripts.base_train                                   # one GPU (or CPU/MPS)
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=24
    python -m scripts.base_train --depth=4 --max-seq-len=512 --device-batch-size=1 --eval-tokens=512 \\
        --core-metric-every=-1 --total-batch-size=512 --num-iterations=20   # a tiny CPU run

The depth dial (--depth sets width, steps, batch size, LRs and weight decay) is nanochat/pretraining.py.

Resuming (--resume-from-step s) is exact: the checkpoint holds the weights, the optimizer, the loss EMA
and the dataloader position *before* the batch that was prefetched, so the resumed run trains on the
same batches as the uninterrupted one. SIGTERM/SIGINT save a checkpoint after the current step and exit.
With several ranks every rank's loader state and optimizer shard is saved and restored (resume with the
same world size: another is refused). A --run logged to wandb is continued by the resume.

Determinism: on CPU the same command gives bitwise-identical weights; on CUDA NANOCHAT_DETERMINISTIC=1
opts in (training.configure_determinism says what it costs and what it needs).
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # before torch is imported

import argparse
from types import SimpleNamespace

from nanochat import autofit, common, training
from nanochat.checkpoint_manager import get_checkpoints_dir
from nanochat.common import (exit_on_setup_error, gather_from_ranks, get_dist_info, maybe_compile, print0,
                             print_banner)
from nanochat.core_eval import format_core_metric, greedy_samples
from nanochat.dataloader import (PrefetchedPretrainBatches, state_for_rank,
                                 tokenizing_distributed_data_loader_with_state_bos_bestfit)
from nanochat.fp8 import fp8_tokens_error
from nanochat.loss_eval import split_bpb
from nanochat.pretraining import (apply_scaling_rules, build_model, check_resume_config, convert_fp8,
                                  core_and_log, num_iterations_for, print_horizon, print_parameter_counts)
from nanochat.report import get_report, record_point
from nanochat.tokenizer import get_token_bytes, get_tokenizer


# -----------------------------------------------------------------------------
# CLI

def build_parser():
    p = argparse.ArgumentParser(description="Pretrain base model")
    p.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb logging)")
    p.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    p.add_argument("--fp8", action="store_true", help="FP8 training of the large Linear layers (CUDA, sm89+)")
    p.add_argument("--fp8-recipe", type=str, default="tensorwise", choices=["rowwise", "tensorwise"],
                   help="FP8 scaling recipe (only tensorwise is implemented)")
    # model
    p.add_argument("--depth", type=int, default=20, help="number of layers: the single complexity dial")
    p.add_argument("--aspect-ratio", type=int, default=64, help="model_dim ≈ depth * aspect_ratio")
    p.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length")
    p.add_argument("--window-pattern", type=str, default="SSSL",
                   help="per-layer window pattern tiled over layers: L = full context, S = a quarter of it "
                        "(rounded up to 128); the last layer is always L")
    p.add_argument("--mup-base-width", type=int, default=0, help="muP base width (0 = standard param.)")
    p.add_argument("--l3-after-layers", type=str, default="", help="block indices followed by an L3 layer")
    p.add_argument("--l3-n-emb", type=int, default=0, help="L3 embeddings (0 = 4 * vocab, to x64)")
    p.add_argument("--l3-d-up", type=int, default=0, help="L3 up-projection width (0 = 4 * model_dim)")
    p.add_argument("--l3-k-max", type=int, default=32, help="L3 per-token cap on embeddings")
    p.add_argument("--l3-lzw-tokens", type=int, default=10_000_000, help="tokens scanned for L3 allocation")
    # horizon (the first positive one wins)
    p.add_argument("--num-iterations", type=int, default=-1, help="explicit number of steps (-1 = off)")
    p.add_argument("--target-flops", type=float, default=-1.0, help="steps from a FLOP budget (-1 = off)")
    p.add_argument("--target-param-data-ratio", type=float, default=12,
                   help="steps from tokens : scaling params (-1 = off)")
    # optimization
    p.add_argument("--device-batch-size", type=autofit.batch_size_arg, default=32,
                   help="rows per micro-batch per rank, or auto: the most that fit in memory")
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1 = auto)")
    p.add_argument("--embedding-lr", type=float, default=0.3, help="AdamW LR of the token embedding")
    p.add_argument("--unembedding-lr", type=float, default=0.008, help="AdamW LR of lm_head")
    p.add_argument("--weight-decay", type=float, default=0.28, help="Muon weight decay at d12")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR")
    p.add_argument("--scalar-lr", type=float, default=0.5, help="LR of the per-layer scalars")
    p.add_argument("--warmup-steps", type=int, default=40, help="linear LR warmup steps")
    p.add_argument("--warmdown-ratio", type=float, default=0.65, help="fraction of steps in LR warmdown")
    p.add_argument("--final-lr-frac", type=float, default=0.05, help="final LR multiplier")
    p.add_argument("--resume-from-step", type=int, default=-1, help="resume from this saved step (-1 = off)")
    # evaluation and output
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (-1 = off)")
    p.add_argument("--eval-tokens", type=int, default=80 * 524288, help="tokens per val bpb evaluation")
    p.add_argument("--core-metric-every", type=int, default=2000, help="CORE every N steps (-1 = off)")
    p.add_argument("--core-metric-max-per-task", type=int, default=500, help="per CORE task (-1 = all)")
    p.add_argument("--sample-every", type=int, default=2000, help="greedy samples every N steps (-1 = off)")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = at end)")
    p.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default d<depth>)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("depth", "aspect_ratio", "head_dim", "max_seq_len", "l3_k_max", "l3_lzw_tokens"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("mup_base_width", "l3_n_emb", "l3_d_up", "warmup_steps"):  # 0: no muP, default L3, no warmup
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    world_size = get_dist_info()[3]  # the distributed optimizer gives each rank an equal slice of table rows
    if args.l3_after_layers and args.l3_n_emb % world_size:
        parser.error(f"--l3-n-emb must be a multiple of the number of ranks ({world_size}), "
                     f"got {args.l3_n_emb}")
    # -1 is the documented "off"; any other value <= 0 would silently fall through to the next horizon rule
    # (--num-iterations=0 became a run of thousands of steps from the data ratio)
    for name in ("num_iterations", "target_flops", "total_batch_size"):
        value = getattr(args, name)
        if value <= 0 and value != -1:
            parser.error(f"--{name.replace('_', '-')} must be positive, or -1 for off/auto, got {value}")
    if args.head_dim % 2:  # rotary embeddings turn pairs of dimensions
        parser.error(f"--head-dim must be even, got {args.head_dim}")
    if args.target_param_data_ratio == 0:
        parser.error("--target-param-data-ratio must be positive, or -1 to turn it off")
    if not 0 <= args.warmdown_ratio <= 1:
        parser.error(f"--warmdown-ratio must be in [0, 1], got {args.warmdown_ratio}")
    if not set(args.window_pattern.upper()) <= {"S", "L"} or not args.window_pattern:
        parser.error(f"--window-pattern must be made of S and L, got {args.window_pattern!r}")
    if args.fp8 and args.fp8_recipe != "tensorwise":
        parser.error("--fp8-recipe rowwise is not implemented here; use tensorwise")
    batch = 1 if args.device_batch_size == autofit.AUTO else args.device_batch_size  # auto may pick 1
    if args.fp8 and fp8_tokens_error(batch, args.max_seq_len):
        parser.error(f"--fp8: {fp8_tokens_error(batch, args.max_seq_len)}")
    return args


# -----------------------------------------------------------------------------
# Set-up: everything the loop needs

def setup(args, user_config):
    """(st, run, step): the run's fixed parts, its counters (saved with every checkpoint), the first step."""
    print_banner()
    device_type, rank, world_size, device, peak_flops = training.start_run(args.device_type)
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device, tokenizer)
    print0(f"Vocab size: {tokenizer.get_vocab_size():,}")

    # --- model, scaling rules, optimizer
    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(get_checkpoints_dir("base"), model_tag)
    model, config, meta = build_model(args, tokenizer, device, rank, checkpoint_dir)
    wandb_run = training.init_wandb("nanochat", args.run, user_config, meta)
    if args.fp8:
        model = convert_fp8(model, args.fp8_recipe, device_type)
    orig_model = model  # uncompiled: saving, CORE and sampling (their shapes vary)
    model = maybe_compile(model)
    counts, flops_per_token = print_parameter_counts(orig_model)
    scale = apply_scaling_rules(args, orig_model, tokenizer.get_vocab_size())
    lrs = {k: getattr(args, k) * scale.batch_lr_scale for k in training.LR_KEYS}
    optimizer = training.setup_optimizer(orig_model, lrs, scale.weight_decay, device, rank,
                                         ("base", model_tag, args.resume_from_step))
    scaler = training.make_grad_scaler(common.COMPUTE_DTYPE, device_type)
    args.device_batch_size = autofit.device_batch_size(args.device_batch_size, model, args.max_seq_len, 32,
                                                       scale.total_batch_size,
                                                       saved=meta.get("device_batch_size"))

    # --- data and horizon
    loader_state = state_for_rank(meta, rank, world_size) if meta else None
    batches = PrefetchedPretrainBatches(tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, args.device_batch_size, args.max_seq_len, split="train", device=device,
        resume_state_dict=loader_state), loader_state)
    num_iterations = num_iterations_for(args, flops_per_token, scale.total_batch_size, scale.target_tokens)
    print_horizon(scale, flops_per_token, num_iterations)
    accum = training.grad_accum_steps(scale.total_batch_size, args.device_batch_size, args.max_seq_len,
                                      world_size)
    if meta:
        check_resume_config(meta, user_config, num_iterations)

    # --- the checkpoint: weights, optimizer, meta (the reference's keys, plus what an exact resume needs)
    ckpt = training.Checkpointer(checkpoint_dir, orig_model, optimizer, rank)
    # the loader state *before* the prefetched batch: a resume trains on exactly that batch next; rank 0's
    # under the reference's key (single-process readers), every rank's for an exact resume
    geometry = {"device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len,
                "total_batch_size": scale.total_batch_size, "num_iterations": num_iterations,
                "dataloader_state_dict": lambda: batches.trained_state,
                "dataloader_state_dicts": lambda: gather_from_ranks(batches.trained_state)}
    curve = {"steps": [], "train loss": [], "val bpb": []}  # the report plots the series in this order
    run = training.restore_run_state(ckpt, meta, config, user_config, geometry, scaler, wandb_run,
                                     curve=curve)
    if "train" in run.curve:  # a checkpoint saved before its series had the names the report shows
        run.curve = {"steps": run.curve["steps"], "train loss": run.curve["train"],
                     "val bpb": run.curve["val"]}
    run.core_results, run.mfu = None, 0.0
    st = SimpleNamespace(args=args, model=model, orig_model=orig_model, optimizer=optimizer, scaler=scaler,
                         tokenizer=tokenizer, token_bytes=token_bytes, device=device, device_type=device_type,
                         world_size=world_size, master=rank == 0, wandb_run=wandb_run, ckpt=ckpt,
                         batches=batches, accum=accum, scale=scale, num_iterations=num_iterations,
                         flops_per_token=flops_per_token, counts=counts,
                         timer=training.StepTimer(device_type),
                         logger=training.StepLogger(scale.total_batch_size, flops_per_token, peak_flops,
                                                    world_size, wandb_run, 100, mfu_label="bf16_mfu"))
    return st, run, meta.get("step", 0)


# -----------------------------------------------------------------------------
# The step boundary: val bpb, checkpoint, CORE, samples

def evaluate_and_save(step, last_step, run, st):
    """Everything due at the boundary before step `step` (st: the run's fixed parts, run: its counters)."""
    args, flops_so_far = st.args, st.logger.flops_at(step)

    def evaluate_val(step):
        steps = training.eval_steps_for(args.eval_tokens, args.device_batch_size, args.max_seq_len,
                                        st.world_size)
        with training.eval_mode(st.model):
            value = split_bpb(st.model, st.tokenizer, st.token_bytes, "val", args.device_batch_size,
                              args.max_seq_len, steps, st.device)
        run.val_bpb, run.min_val_bpb = value, min(run.min_val_bpb, value)
        print0(f"Step {step:05d} | Validation bpb: {value:.6f}")
        st.wandb_run.log({"step": step, "total_training_flops": flops_so_far,
                          "total_training_time": run.tracker.total_training_time, "val/bpb": value})
        record_point(run.curve, step, {"val bpb": value})

    def evaluate_core(step, last_step):
        result = core_and_log(st.orig_model, st.tokenizer, st.device, args.core_metric_max_per_task, step,
                              flops_so_far, last_step, st.wandb_run)
        run.core_results = result or run.core_results

    def print_samples(step, last_step):
        with training.eval_mode(st.orig_model):
            for text in greedy_samples(st.orig_model, st.tokenizer):
                print0(text)

    sample_every = args.sample_every if st.master else -1
    late_evals = [(args.core_metric_every, evaluate_core), (sample_every, print_samples)]
    training.evaluate_and_save(step, last_step, st.ckpt, args, evaluate_val, late_evals)


def log_step(step, loss, lrm, dt, run, st):
    """The step's line, its point on the loss curve and, every 100 steps, its wandb metrics."""
    n, loader = st.num_iterations, st.batches.next_state
    smooth = run.tracker.update(step, loss, dt)
    position = f"epoch: {loader['epoch']} pq: {loader['pq_idx']} rg: {loader['rg_idx']}"
    run.mfu = st.logger.log(step, f"/{n:05d} ({100 * step / n:.2f}%)", smooth, lrm, dt, run.tracker, position,
                            position[len("epoch: "):], run.tracker.eta_suffix(step, n))
    record_point(run.curve, step, {"train loss": loss})


def report_run(user_config, run, st, peak_mem):
    args, scale, n, flops_per_token = st.args, st.scale, st.num_iterations, st.flops_per_token
    total_tokens = scale.total_batch_size * n
    report = get_report()
    report.log("Base model training", [
        user_config,
        {"Number of parameters": st.counts["total"], "Number of FLOPs per token": f"{flops_per_token:e}",
         "Calculated number of iterations": n, "Number of training tokens": total_tokens,
         "Tokens : Scaling params ratio": total_tokens / scale.num_scaling,
         "DDP world size": st.world_size, "warmup_steps": args.warmup_steps,
         "warmdown_ratio": args.warmdown_ratio, "final_lr_frac": args.final_lr_frac},
        {"Minimum validation bpb": run.min_val_bpb if run.val_bpb is not None else None,
         "Final validation bpb": run.val_bpb,
         "CORE metric estimate": format_core_metric(run.core_results) if run.core_results else None,
         "MFU %": f"{run.mfu:.2f}%", "Total training flops": f"{flops_per_token * total_tokens:e}",
         "Total training time": f"{run.tracker.total_training_time / 60:.2f}m",
         "Peak memory usage": f"{peak_mem:.2f}MiB"},
    ])
    if run.curve["steps"]:
        report.log_curve("Base model loss", run.curve,
                         {"train loss": "train loss (nats/token)", "val bpb": "val bpb (bits/byte)"})


# -----------------------------------------------------------------------------

@exit_on_setup_error("base_train")
def main(argv=None):
    args = parse_args(argv)
    user_config = vars(args).copy()
    st, run, step = setup(args, user_config)
    n, batches, optimizer = st.num_iterations, st.batches, st.optimizer
    with training.StopFlag() as stop_flag, autofit.oom_advice("--device-batch-size", args.device_batch_size):
        while True:
            last_step = step == n
            evaluate_and_save(step, last_step, run, st)
            if last_step:
                break
            # one optimizer step: `accum` micro-batches, the schedules, the update
            st.timer.start()
            train_loss, _, _ = training.train_micro_steps(st.model, batches, st.accum, st.scaler)
            lrm = training.base_lr_multiplier(step, n, args.warmup_steps, args.warmdown_ratio,
                                              args.final_lr_frac)
            training.apply_schedule(optimizer, lrm, training.base_muon_momentum(step, n, args.warmdown_ratio),
                                    training.base_weight_decay(step, n, st.scale.weight_decay))
            loss, dt, signalled = training.finish_step(optimizer, st.model, st.scaler, train_loss, st.timer,
                                                       stop_flag, st.device, step, st.ckpt.checkpoint_dir)
            log_step(step, loss, lrm, dt, run, st)
            step += 1
            training.gc_after_step(step, args.resume_from_step)
            if signalled:
                batches.close()
                training.exit_after_signal(st.ckpt.save, step, stop_flag.signum)

    # --- end of run
    batches.close()
    peak_mem = training.print_run_end(st.device_type, run.tracker)
    if run.val_bpb is not None:
        print0(f"Minimum validation bpb: {run.min_val_bpb:.6f}")
    report_run(user_config, run, st, peak_mem)
    training.close_run(st.wandb_run)


if __name__ == "__main__":
    main()
