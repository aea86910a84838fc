"""
Decode throughput of the Engine: prefill a prompt once, then sample `--new-tokens` tokens for each of
`--batch` rows in lockstep (one forward per step for all rows). Prints tokens/s per batch size.

    python -m dev.bench_engine                       # the latest sft checkpoint (falls back to base)
    python -m dev.bench_engine --source base --batch 1,8 --prompt-len 64 --new-tokens 256
    python -m dev.bench_engine --depth 12            # a randomly initialised model of that depth instead
    python -m dev.bench_engine --check               # the Engine's greedy tokens == GPT.generate's (base)

Generation runs at temperature 1 with a fixed seed. The Engine is given a tokenizer view whose terminal
ids (<|assistant_end|>, BOS) can never be sampled, so every run decodes exactly --new-tokens steps.
--check runs nanochat.engine.self_check, which `python -m nanochat.engine` runs on the base model: 64 greedy
tokens of "The chemical formula of water is" through GPT.generate, then through the Engine, streamed, timed
and compared.
"""

import argparse
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Engine decode throughput")
    p.add_argument("--source", type=str, default="", help="base|sft|rl checkpoint (empty = sft, else base)")
    p.add_argument("--depth", type=int, default=0,
                   help="benchmark a random model of this depth instead (vocab 32768)")
    p.add_argument("--batch", type=str, default="1,8", help="comma-separated numbers of rows")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per batch size (the best is reported)")
    p.add_argument("--device-type", type=str, default="")
    p.add_argument("--check", action="store_true", help="compare greedy Engine and GPT.generate instead")
    return p.parse_args(argv)


class _Tokens:
    """The five special ids the Engine asks for, for a model without a trained tokenizer."""

    def __init__(self, vocab_size):
        self.ids = {name: vocab_size - 9 + i for i, name in enumerate(
            ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
             "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"])}

    def encode_special(self, name):
        return self.ids[name]

    def get_bos_token_id(self):
        return self.ids["<|bos|>"]

    def encode(self, text):
        return [ord(c) % 256 for c in text]

    def decode(self, ids):
        return "".join(chr(i % 256) for i in ids)


def load(args, device):
    if args.depth:
        from nanochat.gpt import GPT, config_for_depth
        with torch.device("meta"):
            model = GPT(config_for_depth(args.depth, sequence_len=2048, window_pattern="L"))
        model.to_empty(device=device)
        model.init_weights()
        model.eval()
        return model, _Tokens(model.config.vocab_size), f"random d{args.depth}"
    from nanochat.checkpoint_manager import load_model
    sources = [args.source] if args.source else ["sft", "base"]
    for source in sources:
        try:
            model, tokenizer, meta = load_model(source, device, phase="eval")
            return model, tokenizer, f"{source} checkpoint, step {meta.get('step')}"
        except FileNotFoundError as e:
            last_error = e
    raise SystemExit(f"bench_engine: no checkpoint found ({last_error}); train one or pass --depth")


def timed(consume, device_type):
    """(consume()'s result, seconds), CUDA's queued kernels finished before and after."""
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    sync()
    t0 = time.time()
    result = consume()
    sync()
    return result, time.time() - t0


def time_decode(engine, prompt, rows, new_tokens, device_type):
    stream = engine.generate(prompt, num_samples=rows, max_tokens=new_tokens, temperature=1.0, seed=0)
    return timed(lambda: sum(1 for _ in stream), device_type)


def main(argv=None):
    args = parse_args(argv)
    from nanochat.common import COMPUTE_DTYPE, autodetect_device_type
    from nanochat.engine import Engine, NeverStopping, self_check
    device_type = args.device_type or autodetect_device_type()
    device = torch.device(device_type)
    if args.check:
        args.source = args.source or "base"  # the reference checks the base model
    model, tokenizer, what = load(args, device)
    if args.check:
        return self_check(model, tokenizer)
    cfg = model.config
    print(f"device={device_type} dtype={COMPUTE_DTYPE} model={what} n_layer={cfg.n_layer} "
          f"n_embd={cfg.n_embd} vocab={cfg.vocab_size} prompt={args.prompt_len} new_tokens={args.new_tokens} "
          f"threads={torch.get_num_threads()}")
    engine = Engine(model, NeverStopping(tokenizer))
    g = torch.Generator().manual_seed(0)
    prompt = ([tokenizer.get_bos_token_id()]
              + torch.randint(0, 256, (args.prompt_len - 1,), generator=g).tolist())
    for rows in [int(b) for b in args.batch.split(",")]:
        time_decode(engine, prompt, rows, 8, device_type)  # warm-up: allocator, kernels
        steps, best = min((time_decode(engine, prompt, rows, args.new_tokens, device_type)
                           for _ in range(args.repeats)), key=lambda r: r[1] / r[0])
        print(f"batch {rows:3d}: {rows * steps / best:9.1f} tok/s ({steps / best:7.1f} steps/s, "
              f"{1000 * best / steps:.2f} ms/step incl. prefill, {steps} steps)")


if __name__ == "__main__":
    main()
