"""
Base-model pretraining (scripts/base_train.py) below its loop: the depth dial and the scaling rules, the
training horizon, the model built from the flags (fresh with its L3 bounds, or resumed; optionally FP8),
the check that a resume matches its checkpoint, and the evaluations the loop runs.

The depth dial: --depth sets the width (depth * aspect ratio, rounded up to whole heads), the number of
steps (tokens = ratio * scaling params), the total batch size (Power Lines, B ∝ D^0.383), and scales the
learning rates and weight decay from the d12 reference point. `args` is base_train's parsed flags.
"""

import json
import math
import time
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.distributed as dist

from nanochat import common, training
from nanochat.checkpoint_manager import load_checkpoint, portable_model_config
from nanochat.common import BadSettingError, print0
from nanochat.gpt import GPTConfig, config_for_depth, meta_model

B_REF = 2 ** 19  # total batch size of the d12 reference point, tokens
BATCH_SIZE_EXPONENT = 0.383  # Power Lines (arXiv 2505.13738): optimal batch B ∝ D^0.383
# user_config keys that do not change the training trajectory: they may differ on resume without a warning
RESUME_FREE_KEYS = {"run", "resume_from_step", "eval_every", "eval_tokens", "core_metric_every",
                    "core_metric_max_per_task", "sample_every", "save_every", "device_type"}


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
    """GPT(config) on the meta device; flags that describe no model (an L3 layer past the depth) are a
    BadSettingError."""
    return meta_model(config, lambda why: BadSettingError(f"The model flags describe no model: {why}"))


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
    raise BadSettingError("No training horizon: set --num-iterations, --target-flops or "
                          "--target-param-data-ratio")


def apply_scaling_rules(args, model, vocab_size):
    """The depth dial's consequences: scaling params, target tokens, batch size, LR scale, weight decay.
    The auto batch size and the weight decay follow the ratio's horizon even when --num-iterations or
    --target-flops sets another one, as in the reference: scaling_laws.sh's batch sizes stay its."""
    num_scaling = scaling_params(model)
    reference = build_model_meta(model_config(args, 12, vocab_size, with_l3=False))
    target_tokens = int(args.target_param_data_ratio * num_scaling)
    reference_tokens = args.target_param_data_ratio * scaling_params(reference)
    total_batch_size = args.total_batch_size
    if total_batch_size == -1:
        total_batch_size = auto_total_batch_size(target_tokens, reference_tokens)
        print0(f"Auto-computed optimal batch size: {total_batch_size:,} tokens")
    batch_lr_scale = math.sqrt(total_batch_size / B_REF)
    if total_batch_size != B_REF:
        print0(f"Scaling LRs by {batch_lr_scale:.4f} for batch size {total_batch_size:,} "
               f"(reference: {B_REF:,})")
    weight_decay = scaled_weight_decay(args.weight_decay, total_batch_size, target_tokens, reference_tokens)
    if weight_decay != args.weight_decay:
        print0(f"Scaling weight decay from {args.weight_decay:.6f} to {weight_decay:.6f} "
               f"for depth {args.depth}")
    return SimpleNamespace(num_scaling=num_scaling, target_tokens=target_tokens,
                           total_batch_size=total_batch_size, batch_lr_scale=batch_lr_scale,
                           weight_decay=weight_decay)


def print_parameter_counts(model):
    """(parameter counts, FLOPs per token), both printed."""
    counts = model.num_scaling_params()
    print0("Parameter counts:")
    for key, value in counts.items():
        print0(f"{key:24s}: {value:,}")
    flops_per_token = model.estimate_flops()
    print0(f"Estimated FLOPs per token: {flops_per_token:e}")
    return counts, flops_per_token


def print_horizon(scale, flops_per_token, num_iterations):
    total_tokens = scale.total_batch_size * num_iterations
    print0(f"Total number of training tokens: {total_tokens:,}")
    print0(f"Tokens : Scaling params ratio: {total_tokens / scale.num_scaling:.2f}")
    print0(f"Total training FLOPs estimate: {flops_per_token * total_tokens:e}")


def check_resume_config(meta, user_config, num_iterations):
    """The checkpoint must be before the horizon; other differences change the trajectory: warn. (Its
    architecture was checked by build_model, before the weights were loaded.)"""
    training.warn_on_changed_config(meta["user_config"], user_config, RESUME_FREE_KEYS)
    if meta.get("num_iterations", num_iterations) != num_iterations:
        print0(f"Warning: the horizon changed from {meta['num_iterations']} to {num_iterations} steps "
               f"on resume")
    training.check_resume_horizon(meta["step"], num_iterations,
                                  "--num-iterations (or --target-flops / --target-param-data-ratio)")


def check_resume_architecture(meta, config):
    """Before the weights are loaded: a mismatch would otherwise end in load_state_dict's list of shapes."""
    # a meta omits the keys of features that are off (portable_model_config), so those compare as off;
    # any other key is compared when the meta has it (older checkpoints lack some)
    saved, ours = portable_model_config(meta["model_config"]), portable_model_config(asdict(config))
    optional = set(asdict(config)) - set(portable_model_config(asdict(GPTConfig())))
    keys = {k for k in ours if k in saved or k in optional} | {k for k in saved if k in optional}
    diff = {k: (saved.get(k), ours.get(k)) for k in sorted(keys) if saved.get(k) != ours.get(k)}
    if diff:
        raise BadSettingError(f"--resume-from-step: the checkpoint's model config differs from these flags: "
                              f"{diff} (saved, now); pass the flags it was trained with")


# -----------------------------------------------------------------------------
# The model of the flags: fresh or resumed, its attention backend, L3 bounds and FP8 layers

def print_attention_notice(backend, window_pattern):
    from nanochat.flash_attention import HAS_FA3
    if backend.train == "fa3":
        print0("✓ Using Flash Attention 3 (Hopper GPU detected), efficient, new and awesome.")
        return
    print0("!" * 80)
    if HAS_FA3:
        print0(f"WARNING: Flash Attention 3 needs bfloat16, but COMPUTE_DTYPE is {common.COMPUTE_DTYPE}")
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
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=eligible)
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


def build_model(args, tokenizer, device, rank, checkpoint_dir):
    """(model, config, meta): freshly initialised (meta {}), or the checkpoint's when resuming."""
    from nanochat.flash_attention import decide_backend
    config = model_config(args, args.depth, tokenizer.get_vocab_size())
    model = build_model_meta(config)
    print0("Model config:\n" + json.dumps(asdict(config), indent=2))
    model.to_empty(device=device)
    model.init_weights()
    # after compute_init, on this rank's device, at the model's head dim; before compile (it may all-reduce)
    print_attention_notice(decide_backend(device, config.n_embd // config.n_head), args.window_pattern)
    meta = {}
    if args.resume_from_step >= 0:
        print0(f"Resuming optimization from step {args.resume_from_step}")
        model_data, _, meta = load_checkpoint(checkpoint_dir, args.resume_from_step, device)
        check_resume_architecture(meta, config)
        model.load_state_dict(model_data, strict=True, assign=True)
    elif len(model.l3_layers) > 0:
        compute_l3_bounds(model, tokenizer, args, device, rank)
    return model, config, meta


# -----------------------------------------------------------------------------
# Evaluations inside the loop

def core_and_log(model, tokenizer, device, max_per_task, step, flops_so_far, last_step, wandb_run):
    """CORE at this step (None if it failed at the last step, whose checkpoint is already saved)."""
    from nanochat.core_eval import core_metric_log_key, evaluate_core, format_core_metric
    try:
        with training.eval_mode(model):
            core = evaluate_core(model, tokenizer, device, max_per_task=max_per_task)
    except (OSError, RuntimeError, ValueError) as e:
        if not last_step:
            raise
        print0(f"Step {step:05d} | CORE evaluation failed ({e}); the checkpoint is saved")
        return None
    print0(f"Step {step:05d} | CORE metric: {format_core_metric(core)}")
    wandb_run.log({"step": step, "total_training_flops": flops_so_far, core_metric_log_key(core):
                   core["core_metric"], "centered_results": core["centered_results"]})
    return core
