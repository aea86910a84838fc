"""
Inference benchmark of a checkpoint through the Engine: prefill latency and a decode sweep over batch
sizes (and prompt lengths), with tok/s, peak memory, MBU and MFU. Runs on CUDA and on CPU.

    python -m scripts.infer_bench                                # latest base checkpoint, batch 1,8,32
    python -m scripts.infer_bench -i sft -g d12 --prompt-tokens 128,1024 --batch-sizes 1,8,32 -t 5

Per (prompt length, batch size), the median over -t timed trials (after one untimed warm-up run):
- ttft_sec: from the call to the first token: batch-1 prefill, copy into the B-row cache, first sample;
- tpot_sec: seconds per decode step after that (every step decodes one token for each of the B rows);
- tok_per_sec: B / tpot_sec;
- mbu_percent / mfu_percent: bytes read / FLOPs of one decode step at the mean context, per tpot_sec,
  over the device's peak (datasheet on CUDA, a measured estimate on CPU: nanochat.common.get_device_peaks).
  Bytes: every stored weight once (lookup tables one row per token) plus each row's cached keys and values
  within each layer's window; FLOPs: 2 per matmul weight per token plus attention over that window;
- peak_memory_mb: CUDA's peak allocation during the point; on CPU the process's peak RSS so far.
Decoding is greedy and never stops early: the Engine is shown no terminal token, so every run decodes
exactly --decode-tokens steps. A human-readable table goes first; the last stdout line is one JSON document.
"""

import argparse
import json
import math
import resource
import statistics
import time
from dataclasses import asdict

import torch

from nanochat import common
from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine, NeverStopping, decode_step_cost


def int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser():
    parser = argparse.ArgumentParser(description="Prefill/decode latency, tok/s, MBU, MFU of a checkpoint")
    parser.add_argument("-i", "--source", type=str, default="base", choices=["base", "sft", "rl"],
                        help="checkpoint family")
    parser.add_argument("-g", "--model-tag", type=str, default=None,
                        help="checkpoint tag (default: the largest model)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--prompt-tokens", type=int_list, default=[512],
                        help="prompt length(s), comma-separated: the context-length sweep")
    parser.add_argument("--decode-tokens", type=int, default=128, help="decode steps per run")
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 8, 32],
                        help="comma-separated decode batch sizes")
    parser.add_argument("-t", "--trials", type=int, default=3,
                        help="timed runs per point (the median is reported)")
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"],
                        metavar="DEVICE", help="cuda|cpu|mps (empty = autodetect)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("prompt_tokens", "batch_sizes"):
        if not getattr(args, name) or min(getattr(args, name)) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a comma list of integers >= 1")
    if args.decode_tokens < 2 or args.trials < 1:
        parser.error("--decode-tokens must be >= 2 and -t/--trials >= 1")
    return args


def time_run(engine, prompt, batch, decode_tokens):
    """(ttft, tpot, steps) of one generate call; every yield follows a host read of the sampled tokens,
    so on CUDA the time of a yield is the time its kernels finished."""
    t0 = time.perf_counter()
    stream = engine.generate(prompt, num_samples=batch, max_tokens=decode_tokens, temperature=0.0)
    stamps = [time.perf_counter() for _ in stream]
    return stamps[0] - t0, (stamps[-1] - stamps[0]) / (len(stamps) - 1), len(stamps)


def peak_memory_mb(device_type):
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_point(engine, prompt, batch, args, peaks):
    """One row of the sweep: the medians of args.trials timed runs after one warm-up run."""
    if args.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    time_run(engine, prompt, batch, args.decode_tokens)
    runs = [time_run(engine, prompt, batch, args.decode_tokens) for _ in range(args.trials)]
    ttft, tpot = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    flops, nbytes = decode_step_cost(engine.model, batch, len(prompt) + args.decode_tokens // 2)
    return {"prompt_tokens": len(prompt), "batch_size": batch, "decode_steps": runs[0][2],
            "ttft_sec": ttft, "tpot_sec": tpot, "tok_per_sec": batch / tpot,
            "mbu_percent": common.percent_of_peak(nbytes / tpot, peaks[1]),
            "mfu_percent": common.percent_of_peak(flops / tpot, peaks[0]),
            "bytes_per_step": nbytes, "flops_per_step": flops,
            "peak_memory_mb": peak_memory_mb(args.device_type)}


def print_table(header, sweep):
    print(header)
    print(f"{'prompt':>7} {'batch':>5} {'ttft ms':>9} {'tpot ms':>9} {'tok/s':>10} {'MBU %':>7} "
          f"{'MFU %':>7} {'peak MB':>9}")
    for r in sweep:
        print(f"{r['prompt_tokens']:>7} {r['batch_size']:>5} {1e3 * r['ttft_sec']:>9.2f} "
              f"{1e3 * r['tpot_sec']:>9.3f} {r['tok_per_sec']:>10.1f} {r['mbu_percent']:>7.2f} "
              f"{r['mfu_percent']:>7.2f} {r['peak_memory_mb']:>9.1f}")


@common.exit_on_setup_error("infer_bench")
def main(argv=None):
    args = parse_args(argv)
    args.device_type = args.device_type or common.autodetect_device_type()
    _, _, _, _, device = common.compute_init(args.device_type)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag,
                                        step=args.step)
    longest = max(args.prompt_tokens) + args.decode_tokens
    if longest > model.config.sequence_len:
        raise common.BadSettingError(f"--prompt-tokens {max(args.prompt_tokens)} + --decode-tokens "
                                     f"{args.decode_tokens} exceeds the model's context of "
                                     f"{model.config.sequence_len}; lower one of them")
    peaks = common.get_device_peaks(args.device_type)
    engine = Engine(model, NeverStopping(tokenizer))
    rng = torch.Generator().manual_seed(0)
    sweep = []
    for prompt_len in args.prompt_tokens:  # random byte tokens: ids every tokenizer has
        body = torch.randint(0, 256, (prompt_len - 1,), generator=rng).tolist()
        prompt = [tokenizer.get_bos_token_id()] + body
        sweep += [measure_point(engine, prompt, batch, args, peaks) for batch in args.batch_sizes]
    device_name = torch.cuda.get_device_name(0) if args.device_type == "cuda" else args.device_type
    dtype = str(common.COMPUTE_DTYPE).removeprefix("torch.")
    print_table(f"{device_name} | {dtype} | {args.source} step {meta.get('step')} | "
                f"peaks: {peaks[0]:.3g} FLOP/s, {peaks[1]:.3g} B/s, {peaks[2]}", sweep)
    config = {**asdict(model.config), "source": args.source, "step": meta.get("step"),
              "decode_tokens": args.decode_tokens, "trials": args.trials, "peaks": peaks[2],
              **{k: v if math.isfinite(v) else None for k, v in zip(("peak_flops", "peak_bandwidth"), peaks)}}
    print(json.dumps({"device": device_name, "dtype": dtype, "config": config, "sweep": sweep}))
    common.compute_cleanup()


if __name__ == "__main__":
    main()
