"""
Pretrain the base model.

    python -m scripts.base_train                                   # one GPU (or CPU/MPS)
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=24
    python -m scripts.base_train --depth=4 --max-seq-len=512 --device-batch-size=1 --eval-tokens=512 \\
        --core-metric-every=-1 --total-batch-size=512 --num-iterations=20   # a tiny CPU run

The depth dial: --depth sets the width (depth * aspect ratio, rounded up to whole heads), the number of
steps (tokens = ratio * scaling params), the total batch size (Power Lines, B ∝ D^0.383), and scales the
learning rates and weight decay from the d12 reference point.

Resuming (--resume-from-step s) is exact: the checkpoint holds the weights, the optimizer, the loss EMA
and the dataloader position *before* the batch that was prefetched, so the resumed run trains on the
same batches as the uninterrupted one. SIGTERM/SIGINT save a checkpoint after the current step and exit.
With several ranks every rank's loader state is saved and restored (resume with the same world size;
another one resumes the data approximately). A --run logged to wandb is continued by the resume.

Determinism: on CPU the same command gives bitwise-identical weights (torch's deterministic algorithms
are on; keep OMP_NUM_THREADS the same). On CUDA that is opt-in, NANOCHAT_DETERMINISTIC=1 (slower; FA3's
backward stays non-deterministic, add NANOCHAT_ATTN=sdpa); NANOCHAT_DETERMINISTIC=0 turns it off on CPU.
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # before torch is imported

import argparse
import json
import math
import time
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.distributed as dist

from nanochat import autofit, training
from nanochat.checkpoint_manager import load_checkpoint, portable_model_config
from nanochat.common import (autodetect_device_type, compute_init, get_base_dir, maybe_compile, print0,
                             print_banner)
from nanochat.core_eval import core_metric_log_key, format_core_metric, greedy_samples
from nanochat.dataloader import (PrefetchedPretrainBatches, state_for_rank,
                                 tokenizing_distributed_data_loader_bos_bestfit,
                                 tokenizing_distributed_data_loader_with_state_bos_bestfit)
from nanochat.flash_attention import decide_backend
from nanochat.fp8 import disable_fp8, fp8_tokens_error
from nanochat.gpt import GPT, GPTConfig, config_for_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes, get_tokenizer

B_REF = 2 ** 19  # total batch size of the d12 reference point, tokens
BATCH_SIZE_EXPONENT = 0.383  # Power Lines (arXiv 2505.13738): optimal batch B ∝ D^0.383
# user_config keys that do not change the training trajectory: they may differ on resume without a warning
RESUME_FREE_KEYS = {"run", "resume_from_step", "eval_every", "eval_tokens", "core_metric_every",
                    "core_metric_max_per_task", "sample_every", "save_every", "device_type"}


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
    p.add_argument("--mup-base-width", type=int, default=0, help="muP base width (0 = standard parametrisation)")
    p.add_argument("--l3-after-layers", type=str, default="", help="comma-separated block indices followed by an L3 layer")
    p.add_argument("--l3-n-emb", type=int, default=0, help="embeddings per L3 layer (0 = 4 * vocab, rounded up to 64)")
    p.add_argument("--l3-d-up", type=int, default=0, help="L3 up-projection width (0 = 4 * model_dim)")
    p.add_argument("--l3-k-max", type=int, default=32, help="L3 per-token cap on embeddings")
    p.add_argument("--l3-lzw-tokens", type=int, default=10_000_000, help="training tokens scanned for the L3 allocation")
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
    p.add_argument("--weight-decay", type=float, default=0.28, help="Muon cautious weight decay at the d12 reference")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR")
    p.add_argument("--scalar-lr", type=float, default=0.5, help="LR of the per-layer scalars")
    p.add_argument("--warmup-steps", type=int, default=40, help="linear LR warmup steps")
    p.add_argument("--warmdown-ratio", type=float, default=0.65, help="fraction of steps in the final LR warmdown")
    p.add_argument("--final-lr-frac", type=float, default=0.05, help="LR multiplier at the end of the warmdown")
    p.add_argument("--resume-from-step", type=int, default=-1, help="resume from this saved step (-1 = off)")
    # evaluation and output
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (-1 = off)")
    p.add_argument("--eval-tokens", type=int, default=80 * 524288, help="tokens per val bpb evaluation")
    p.add_argument("--core-metric-every", type=int, default=2000, help="CORE every N steps (-1 = off)")
    p.add_argument("--core-metric-max-per-task", type=int, default=500, help="examples per CORE task (-1 = all)")
    p.add_argument("--sample-every", type=int, default=2000, help="greedy samples every N steps (-1 = off)")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    p.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default d<depth>)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    positive = ["depth", "aspect_ratio", "head_dim", "max_seq_len", "warmup_steps", "l3_k_max"]
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
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
# The depth dial and the scaling rules (pure functions of the arguments)

def model_config(args, depth, vocab_size, with_l3=True):
    """GPTConfig for this depth; the d12 reference point of the scaling rules is built without L3."""
    extra = dict(window_pattern=args.window_pattern, mup_base_width=args.mup_base_width)
    if with_l3 and args.l3_after_layers:
        n_emb = args.l3_n_emb or -(-4 * vocab_size // 64) * 64  # rounded up: n_emb % world_size == 0
        extra.update(l3_after_layers=args.l3_after_layers, l3_n_emb=n_emb, l3_d_up=args.l3_d_up,
                     l3_k_max=args.l3_k_max)
    return config_for_depth(depth, args.aspect_ratio, args.head_dim, args.max_seq_len, vocab_size, **extra)


def build_model_meta(config):
    with torch.device("meta"):
        return GPT(config)


def scaling_params(model):
    """N of the scaling laws: transformer matrices + lm_head (Kaplan-style; dev/LOG 2026-01-27)."""
    counts = model.num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


def auto_total_batch_size(target_tokens, reference_tokens):
    return 2 ** round(math.log2(B_REF * (target_tokens / reference_tokens) ** BATCH_SIZE_EXPONENT))


def scaled_weight_decay(weight_decay, total_batch_size, target_tokens, reference_tokens):
    """T_epoch rule (arXiv 2405.13698): wd ∝ sqrt(B) / D, anchored at the d12 reference point."""
    return weight_decay * math.sqrt(total_batch_size / B_REF) * (reference_tokens / target_tokens)


def num_iterations_for(args, flops_per_token, total_batch_size, target_tokens):
    """Horizon precedence: --num-iterations, then --target-flops, then the data:param ratio."""
    if args.num_iterations > 0:
        print0(f"Using user-provided number of iterations: {args.num_iterations:,}")
        return args.num_iterations
    if args.target_flops > 0:
        n = round(args.target_flops / (flops_per_token * total_batch_size))
        print0(f"Calculated number of iterations from target FLOPs: {n:,}")
        return n
    if args.target_param_data_ratio > 0:
        n = target_tokens // total_batch_size
        print0(f"Calculated number of iterations from target data:param ratio: {n:,}")
        return n
    raise ValueError("No training horizon: set --num-iterations, --target-flops or --target-param-data-ratio")


# -----------------------------------------------------------------------------
# Set-up pieces

def print_attention_notice(backend, window_pattern):
    from nanochat.common import COMPUTE_DTYPE
    from nanochat.flash_attention import HAS_FA3
    if backend.train == "fa3":
        print0("✓ Using Flash Attention 3 (Hopper GPU detected), efficient, new and awesome.")
        return
    print0("!" * 80)
    if HAS_FA3:
        print0(f"WARNING: Flash Attention 3 needs bfloat16, but COMPUTE_DTYPE is {COMPUTE_DTYPE}")
    else:
        print0("WARNING: Flash Attention 3 not available, using the PyTorch SDPA fallback (less efficient)")
    if window_pattern != "L":
        print0(f"WARNING: SDPA has no efficient sliding-window support (--window-pattern {window_pattern}): "
               f"GPU utilisation will be poor. Use --window-pattern L")
    print0("!" * 80)


def convert_fp8(model, recipe, device_type):
    if device_type != "cuda":
        print0("Warning: FP8 training requires CUDA, ignoring --fp8 flag")
        return model
    from nanochat.fp8 import Float8LinearConfig, convert_to_float8_training

    def eligible(mod, fqn):
        # the tiny gates (24 -> 1, 12 -> heads) would lose more to scaling overhead than they gain
        return (isinstance(mod, torch.nn.Linear) and mod.in_features % 16 == 0 and mod.out_features % 16 == 0
                and min(mod.in_features, mod.out_features) >= 128)

    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    n_fp8 = sum(eligible(m, "") for m in model.modules())
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=eligible)
    print0(f"✓ FP8 training enabled ({recipe} scaling) - converted {n_fp8}/{n_linear} linear layers, "
           f"skipped {n_linear - n_fp8} (too small)")
    return model


def first_train_tokens(tokenizer, limit):
    """Token sequences of the first training documents, `limit` tokens in all (the last one cropped)."""
    from nanochat.dataset import parquets_iter_batched
    bos, scanned = tokenizer.get_bos_token_id(), 0
    for texts in parquets_iter_batched("train"):
        for i in range(0, len(texts), 64):  # row groups are large: encode a few documents at a time
            for ids in tokenizer.encode(texts[i:i + 64], prepend=bos):
                ids = ids[:limit - scanned]
                scanned += len(ids)
                yield ids
                if scanned >= limit:
                    return


def compute_l3_bounds(model, tokenizer, args, device, rank):
    """LZW allocation from the first --l3-lzw-tokens training tokens on rank 0, broadcast to all ranks."""
    from nanochat.l3 import allocation_to_bounds, compute_lzw_allocation
    cfg = model.config
    bounds = torch.zeros(cfg.vocab_size + 1, dtype=torch.long, device=device)
    if rank == 0:
        t0 = time.time()
        seqs = list(first_train_tokens(tokenizer, args.l3_lzw_tokens))
        alloc = compute_lzw_allocation(seqs, cfg.vocab_size, cfg.l3_n_emb, cfg.l3_k_max)
        bounds.copy_(allocation_to_bounds(alloc))
        print0(f"L3 allocation: n_emb={cfg.l3_n_emb:,}, max per token {max(alloc)}, "
               f"average {sum(alloc) / len(alloc):.2f}, {sum(map(len, seqs)):,} tokens scanned in "
               f"{time.time() - t0:.1f}s")
    if dist.is_initialized():
        dist.broadcast(bounds, src=0)  # ranks read different shards; every rank needs identical bounds
    for layer in model.l3_layers.values():
        layer.set_bounds(bounds.cpu())


def check_resume_config(meta, config, user_config, num_iterations):
    """The checkpoint must be of this architecture; other differences change the trajectory: warn."""
    # a meta omits the keys of features that are off (portable_model_config), so those compare as off;
    # any other key is compared when the meta has it (older checkpoints lack some)
    saved, ours = portable_model_config(meta["model_config"]), portable_model_config(asdict(config))
    optional = set(asdict(config)) - set(portable_model_config(asdict(GPTConfig())))
    keys = {k for k in ours if k in saved or k in optional} | {k for k in saved if k in optional}
    diff = {k: (saved.get(k), ours.get(k)) for k in sorted(keys) if saved.get(k) != ours.get(k)}
    if diff:
        raise ValueError(f"--resume-from-step: the checkpoint's model config differs from these flags: {diff}")
    training.warn_on_changed_config(meta["user_config"], user_config, RESUME_FREE_KEYS)
    if meta.get("num_iterations", num_iterations) != num_iterations:
        print0(f"Warning: the horizon changed from {meta['num_iterations']} to {num_iterations} steps on resume")


# -----------------------------------------------------------------------------
# Evaluations run inside the loop

def run_val_bpb(model, tokenizer, args, token_bytes, device, world_size):
    steps = training.eval_steps_for(args.eval_tokens, args.device_batch_size, args.max_seq_len, world_size)
    loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, args.device_batch_size, args.max_seq_len,
                                                            "val", device=device)
    model.eval()
    try:
        with disable_fp8(model):
            return evaluate_bpb(model, loader, steps, token_bytes)
    finally:
        loader.close()  # stops its tokenizer thread now rather than at garbage collection
        model.train()


def run_core(orig_model, tokenizer, device, max_per_task):
    from nanochat.core_eval import evaluate_core
    orig_model.eval()
    try:
        with disable_fp8(orig_model):
            return evaluate_core(orig_model, tokenizer, device, max_per_task=max_per_task)
    finally:
        orig_model.train()


def print_samples(orig_model, tokenizer):
    orig_model.eval()
    try:
        with disable_fp8(orig_model):
            for text in greedy_samples(orig_model, tokenizer):
                print0(text)
    finally:
        orig_model.train()


def core_and_log(orig_model, tokenizer, device, args, step, flops_so_far, last_step, wandb_run):
    """CORE at this step (None if it failed at the last step, whose checkpoint is already saved)."""
    try:
        core_results = run_core(orig_model, tokenizer, device, args.core_metric_max_per_task)
    except (OSError, RuntimeError, ValueError) as e:
        if not last_step:
            raise
        print0(f"Step {step:05d} | CORE evaluation failed ({e}); the checkpoint is saved")
        return None
    print0(f"Step {step:05d} | CORE metric: {format_core_metric(core_results)}")
    wandb_run.log({"step": step, "total_training_flops": flops_so_far,
                   core_metric_log_key(core_results): core_results["core_metric"],
                   "centered_results": core_results["centered_results"]})
    return core_results


# -----------------------------------------------------------------------------
# Set-up of the run: model, scaling rules, optimizer, data

def build_model(args, tokenizer, device, rank, checkpoint_dir):
    """(model, config, optimizer state, meta): freshly initialised, or the checkpoint's when resuming."""
    config = model_config(args, args.depth, tokenizer.get_vocab_size())
    model = build_model_meta(config)
    print0("Model config:\n" + json.dumps(asdict(config), indent=2))
    model.to_empty(device=device)
    model.init_weights()
    # after compute_init, on this rank's device, at the model's head dim; before compile (it may all-reduce)
    print_attention_notice(decide_backend(device, config.n_embd // config.n_head), args.window_pattern)
    optimizer_data = meta = None
    if args.resume_from_step >= 0:
        print0(f"Resuming optimization from step {args.resume_from_step}")
        model_data, optimizer_data, meta = load_checkpoint(checkpoint_dir, args.resume_from_step, device,
                                                           load_optimizer=True, rank=rank)
        model.load_state_dict(model_data, strict=True, assign=True)
        del model_data
    elif len(model.l3_layers) > 0:
        compute_l3_bounds(model, tokenizer, args, device, rank)
    return model, config, optimizer_data, meta


def print_parameter_counts(model):
    """(parameter counts, FLOPs per token), both printed."""
    counts = model.num_scaling_params()
    print0("Parameter counts:")
    for key, value in counts.items():
        print0(f"{key:24s}: {value:,}")
    flops_per_token = model.estimate_flops()
    print0(f"Estimated FLOPs per token: {flops_per_token:e}")
    return counts, flops_per_token


def apply_scaling_rules(args, model, vocab_size):
    """The depth dial's consequences: scaling params, target tokens, batch size, LR scale, weight decay."""
    num_scaling = scaling_params(model)
    reference = build_model_meta(model_config(args, 12, vocab_size, with_l3=False))
    target_tokens = int(args.target_param_data_ratio * num_scaling)
    reference_tokens = args.target_param_data_ratio * scaling_params(reference)
    total_batch_size = args.total_batch_size
    if total_batch_size == -1:
        total_batch_size = auto_total_batch_size(target_tokens, reference_tokens)
        print0(f"Auto-computed optimal batch size: {total_batch_size:,} tokens")
    batch_lr_scale = 1.0
    if total_batch_size != B_REF:
        batch_lr_scale = math.sqrt(total_batch_size / B_REF)
        print0(f"Scaling LRs by {batch_lr_scale:.4f} for batch size {total_batch_size:,} (reference: {B_REF:,})")
    weight_decay = scaled_weight_decay(args.weight_decay, total_batch_size, target_tokens, reference_tokens)
    if weight_decay != args.weight_decay:
        print0(f"Scaling weight decay from {args.weight_decay:.6f} to {weight_decay:.6f} for depth {args.depth}")
    return SimpleNamespace(num_scaling=num_scaling, target_tokens=target_tokens,
                           total_batch_size=total_batch_size, batch_lr_scale=batch_lr_scale,
                           weight_decay=weight_decay)


def setup_optimizer(model, args, scale, optimizer_data):
    lr_scale = scale.batch_lr_scale
    optimizer = model.setup_optimizer(
        unembedding_lr=args.unembedding_lr * lr_scale, embedding_lr=args.embedding_lr * lr_scale,
        scalar_lr=args.scalar_lr * lr_scale, matrix_lr=args.matrix_lr * lr_scale,
        weight_decay=scale.weight_decay)
    if optimizer_data is not None:
        optimizer.load_state_dict(optimizer_data)
    return optimizer


def print_horizon(args, scale, flops_per_token, num_iterations, accum, world_size):
    total_tokens = scale.total_batch_size * num_iterations
    print0(f"Total number of training tokens: {total_tokens:,}")
    print0(f"Tokens : Scaling params ratio: {total_tokens / scale.num_scaling:.2f}")
    print0(f"Total training FLOPs estimate: {flops_per_token * total_tokens:e}")
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len
    print0(f"Tokens / micro-batch / rank: {args.device_batch_size} x {args.max_seq_len} = {tokens_per_fwdbwd:,}")
    print0(f"Tokens / micro-batch: {tokens_per_fwdbwd * world_size:,}")
    print0(f"Total batch size {scale.total_batch_size:,} => gradient accumulation steps: {accum}")


def register_checkpoint_state(ckpt, run, config, user_config, args, scale, num_iterations, batches, scaler,
                              wandb_run):
    """The meta keys of a base checkpoint (the reference's, plus what an exact resume needs)."""
    ckpt.register("val_bpb", lambda: run.val_bpb)
    for key, value in [("model_config", asdict(config)), ("user_config", user_config),
                       ("device_batch_size", args.device_batch_size), ("max_seq_len", args.max_seq_len),
                       ("total_batch_size", scale.total_batch_size), ("num_iterations", num_iterations)]:
        ckpt.register(key, value)
    # the state *before* the prefetched batch: a resume trains on exactly that batch next; rank 0's under
    # the reference's key (single-process readers), every rank's for an exact resume
    ckpt.register("dataloader_state_dict", lambda: batches.trained_state)
    ckpt.register("dataloader_state_dicts", lambda: training.gather_from_ranks(batches.trained_state))
    ckpt.register("loop_state", lambda: {"min_val_bpb": run.min_val_bpb, **run.tracker.state_dict(),
                                         "curve": run.curve})
    ckpt.register("grad_scaler", scaler)
    ckpt.register("wandb_run_id", training.wandb_run_id(wandb_run))


def report_run(user_config, args, run, counts, flops_per_token, scale, num_iterations, world_size, peak_mem):
    report = get_report()
    total_tokens = scale.total_batch_size * num_iterations
    report.log("Base model training", [
        user_config,
        {"Number of parameters": counts["total"], "Number of FLOPs per token": f"{flops_per_token:e}",
         "Calculated number of iterations": num_iterations, "Number of training tokens": total_tokens,
         "Tokens : Scaling params ratio": total_tokens / scale.num_scaling,
         "DDP world size": world_size, "warmup_steps": args.warmup_steps,
         "warmdown_ratio": args.warmdown_ratio, "final_lr_frac": args.final_lr_frac},
        {"Minimum validation bpb": run.min_val_bpb if run.val_bpb is not None else None,
         "Final validation bpb": run.val_bpb,
         "CORE metric estimate": format_core_metric(run.core_results) if run.core_results else None,
         "MFU %": f"{run.mfu:.2f}%", "Total training flops": f"{flops_per_token * total_tokens:e}",
         "Total training time": f"{run.tracker.total_training_time / 60:.2f}m",
         "Peak memory usage": f"{peak_mem:.2f}MiB"},
    ])
    curve = run.curve
    if curve["steps"]:
        series = {"train loss": curve["train"], "val bpb": curve["val"]}
        report.log_curve("Base model loss", curve["steps"], series,
                         {"train loss": "train loss (nats/token)", "val bpb": "val bpb (bits/byte)"})


# -----------------------------------------------------------------------------
# The loop's two halves: what happens at a step boundary, and one optimizer step

def evaluate_and_save(step, last_step, run, st):
    """Everything due at the boundary before step `step` (st: the run's fixed parts, run: its counters)."""
    flops_so_far = st.flops_per_token * st.scale.total_batch_size * step
    if training.every(step, st.args.eval_every, last_step, include_step_zero=True):
        run.val_bpb = run_val_bpb(st.model, st.tokenizer, st.args, st.token_bytes, st.device, st.world_size)
        print0(f"Step {step:05d} | Validation bpb: {run.val_bpb:.6f}")
        run.min_val_bpb = min(run.min_val_bpb, run.val_bpb)
        run.curve["steps"].append(step), run.curve["train"].append(None), run.curve["val"].append(run.val_bpb)
        st.wandb_run.log({"step": step, "total_training_flops": flops_so_far,
                          "total_training_time": run.tracker.total_training_time, "val/bpb": run.val_bpb})
    # the final checkpoint comes before the final CORE: an eval failure must not lose the run
    if training.save_due(step, last_step, st.args.save_every, st.args.resume_from_step):
        st.ckpt.save(step)
    if training.every(step, st.args.core_metric_every, last_step):
        run.core_results = core_and_log(st.orig_model, st.tokenizer, st.device, st.args, step, flops_so_far,
                                        last_step, st.wandb_run) or run.core_results
    if st.master and training.every(step, st.args.sample_every, last_step):
        print_samples(st.orig_model, st.tokenizer)


def train_step(step, run, st, stop_flag):
    """One optimizer step over `accum` micro-batches, logged; returns whether a signal asked to stop."""
    args, n = st.args, st.num_iterations
    st.timer.start()
    train_loss, _, _ = training.train_micro_steps(st.model, st.batches, st.accum, st.scaler)
    lrm = training.base_lr_multiplier(step, n, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
    training.apply_schedule(st.optimizer, lrm,
                            muon_momentum=training.base_muon_momentum(step, n, args.warmdown_ratio),
                            muon_weight_decay=training.base_weight_decay(step, n, st.scale.weight_decay))
    train_loss_f, dt, signalled = training.finish_step(st.optimizer, st.model, st.scaler, train_loss,
                                                       st.timer, stop_flag, st.device, step,
                                                       st.ckpt.checkpoint_dir)
    smooth = run.tracker.update(step, train_loss_f, dt)
    tokens = st.scale.total_batch_size
    tok_per_sec = int(tokens / dt)
    run.mfu = training.mfu_percent(st.flops_per_token, tokens, dt, st.peak_flops, st.world_size)
    loader = st.batches.next_state
    position = f"epoch: {loader['epoch']} pq: {loader['pq_idx']} rg: {loader['rg_idx']}"
    print0(training.step_log_line(step, f"/{n:05d} ({100 * step / n:.2f}%)", smooth, lrm, dt, tok_per_sec,
                                  "bf16_mfu", run.mfu, position, run.tracker,
                                  run.tracker.eta_suffix(step, n)))
    run.curve["steps"].append(step), run.curve["train"].append(train_loss_f), run.curve["val"].append(None)
    if step % 100 == 0:
        flops = st.flops_per_token * tokens * step
        st.wandb_run.log(training.step_wandb_metrics(step, flops, run.tracker, smooth, lrm, dt, tok_per_sec,
                                                     run.mfu, position[len("epoch: "):]))
    return signalled


# -----------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    user_config = vars(args).copy()
    print_banner()
    device_type = args.device_type or autodetect_device_type()
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    training.configure_determinism(device_type)
    peak_flops = training.print_compute_info(device_type)
    tokenizer, token_bytes = get_tokenizer(), get_token_bytes(device=device)
    print0(f"Vocab size: {tokenizer.get_vocab_size():,}")

    # --- model, scaling rules, optimizer
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", args.model_tag or f"d{args.depth}")
    model, config, optimizer_data, meta = build_model(args, tokenizer, device, rank, checkpoint_dir)
    meta = meta or {}
    wandb_run = training.init_wandb("nanochat", args.run, user_config, rank == 0, meta.get("wandb_run_id"))
    if args.fp8:
        model = convert_fp8(model, args.fp8_recipe, device_type)
    orig_model = model  # uncompiled: saving, CORE and sampling (their shapes vary)
    model = maybe_compile(model)
    counts, flops_per_token = print_parameter_counts(orig_model)
    scale = apply_scaling_rules(args, orig_model, tokenizer.get_vocab_size())
    optimizer = setup_optimizer(orig_model, args, scale, optimizer_data)
    del optimizer_data
    from nanochat.common import COMPUTE_DTYPE
    scaler = training.make_grad_scaler(COMPUTE_DTYPE, device_type)

    args.device_batch_size = autofit.device_batch_size(args.device_batch_size, model, args.max_seq_len, 32,
                                                       scale.total_batch_size,
                                                       saved=meta.get("device_batch_size"))

    # --- data and horizon
    loader_state = state_for_rank(meta, rank, world_size) if meta else None
    batches = PrefetchedPretrainBatches(tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, args.device_batch_size, args.max_seq_len, split="train", device=device,
        resume_state_dict=loader_state), loader_state)
    num_iterations = num_iterations_for(args, flops_per_token, scale.total_batch_size, scale.target_tokens)
    accum = training.grad_accum_steps(scale.total_batch_size, args.device_batch_size, args.max_seq_len,
                                      world_size)
    print_horizon(args, scale, flops_per_token, num_iterations, accum, world_size)
    if meta:
        check_resume_config(meta, config, user_config, num_iterations)

    # --- run state: counters (saved with every checkpoint) and the run's fixed parts
    loop = meta.get("loop_state", {})
    run = SimpleNamespace(val_bpb=meta.get("val_bpb"), min_val_bpb=loop.get("min_val_bpb", float("inf")),
                          tracker=training.LossTracker(loop.get("smooth_train_loss", 0.0),
                                                       loop.get("total_training_time", 0.0)),
                          curve=loop.get("curve", {"steps": [], "train": [], "val": []}),
                          core_results=None, mfu=0.0)
    ckpt = training.Checkpointer(checkpoint_dir, orig_model, optimizer, rank)
    register_checkpoint_state(ckpt, run, config, user_config, args, scale, num_iterations, batches, scaler,
                              wandb_run)
    ckpt.restore(meta)
    st = SimpleNamespace(args=args, model=model, orig_model=orig_model, optimizer=optimizer, scaler=scaler,
                         tokenizer=tokenizer, token_bytes=token_bytes, device=device, world_size=world_size,
                         master=rank == 0, wandb_run=wandb_run, ckpt=ckpt, batches=batches, accum=accum,
                         scale=scale, num_iterations=num_iterations, flops_per_token=flops_per_token,
                         peak_flops=peak_flops,
                         timer=training.StepTimer(device_type))

    step = meta.get("step", 0)
    with training.StopFlag() as stop_flag, autofit.oom_advice("--device-batch-size", args.device_batch_size):
        while True:
            last_step = step == num_iterations
            evaluate_and_save(step, last_step, run, st)
            if last_step:
                break
            signalled = train_step(step, run, st, stop_flag)
            first_step_of_run = step == 0 or step == args.resume_from_step
            step += 1
            training.gc_after_step(step, first_step_of_run)
            if signalled:
                batches.close()
                training.exit_after_signal(ckpt.save, step, stop_flag.signum)

    # --- end of run
    batches.close()
    peak_mem = training.print_run_end(device_type, run.tracker)
    if run.val_bpb is not None:
        print0(f"Minimum validation bpb: {run.min_val_bpb:.6f}")
    report_run(user_config, args, run, counts, flops_per_token, scale, num_iterations, world_size, peak_mem)
    training.close_run(wandb_run)


if __name__ == "__main__":
    main()
