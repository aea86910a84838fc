"""
Throughput of continuous batching: the BatchScheduler serving N concurrent requests, against the same N
requests served one at a time (by the scheduler, and by Engine.generate as the reference server does).

    python -m dev.bench_batching                          # the latest sft checkpoint (falls back to base)
    python -m dev.bench_batching --depth 4 --new-tokens 64 --concurrency 1,4,16
    python -m dev.bench_batching --source base --max-batch-size 16
    python -m dev.bench_batching --logprobs 5                 # what log-probabilities cost the scheduler

Every request decodes exactly --new-tokens tokens: the model is wrapped so that the terminal ids
(<|assistant_end|>, BOS) can never be sampled. Sampling: temperature 1, top_k 50, one seed per request.
Also printed: a lone request on a 1-slot scheduler, on a wide one, and on a wide fixed-width one (medians of
--rounds alternating runs).
"""

import argparse
import statistics
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Continuous batching throughput")
    p.add_argument("--source", type=str, default="", help="base|sft|rl checkpoint (empty = sft, else base)")
    p.add_argument("--depth", type=int, default=0, help="benchmark a random model of this depth instead")
    p.add_argument("--concurrency", type=str, default="1,4,16",
                   help="comma-separated numbers of concurrent requests")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64, help="prompts get lengths spread over [len/2, len]")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--device-type", type=str, default="")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the lone-request comparison")
    p.add_argument("--logprobs", type=int, default=None,
                   help="the scheduler's requests also ask for log-probabilities with this many alternatives")
    return p.parse_args(argv)


class _NoStopModel:
    """The model with the terminal ids' logits at -inf, so every request runs to max_tokens."""

    def __init__(self, model, banned):
        self.model, self.config, self.banned = model, model.config, list(banned)

    def get_device(self):
        return self.model.get_device()

    def forward(self, ids, kv_cache=None):
        logits = self.model.forward(ids, kv_cache=kv_cache)
        logits[..., self.banned] = float("-inf")
        return logits


def make_prompts(n, prompt_len, bos):
    gen = torch.Generator().manual_seed(0)
    lengths = [max(2, prompt_len // 2 + (i * 7) % (prompt_len // 2 + 1)) for i in range(n)]
    return [[bos] + torch.randint(0, 256, (length - 1,), generator=gen).tolist() for length in lengths]


def wait_all(requests):
    """Drain every request's events; returns the number of tokens delivered."""
    tokens = 0
    for request in requests:
        while True:
            event = request.events.get()
            tokens += event.token_id is not None
            if event.finish_reason is not None:
                if event.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"request {request.id} ended with {event.finish_reason}")
                break
    return tokens


def timed(fn, sync):
    sync()
    t0 = time.time()
    tokens = fn()
    sync()
    return tokens, time.time() - t0


def main(argv=None):
    args = parse_args(argv)
    from nanochat.batching import BatchScheduler, SamplingParams
    from nanochat.common import COMPUTE_DTYPE, autodetect_device_type
    from nanochat.engine import Engine
    device_type = args.device_type or autodetect_device_type()
    device = torch.device(device_type)
    from dev.bench_engine import load  # the same checkpoint-or-random-model loader
    base_model, tokenizer, what = load(args, device)
    model = _NoStopModel(base_model,
                         [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()])
    cfg = model.config
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    print(f"device={device_type} dtype={COMPUTE_DTYPE} model={what} n_layer={cfg.n_layer} "
          f"n_embd={cfg.n_embd} max_batch_size={args.max_batch_size} prompt<={args.prompt_len} "
          f"new_tokens={args.new_tokens} logprobs={args.logprobs} "
          f"threads={torch.get_num_threads()}")
    params = [SamplingParams(max_tokens=args.new_tokens, temperature=1.0, top_k=50, seed=i,
                             logprobs=args.logprobs) for i in range(256)]

    def run_scheduler(scheduler, prompts, concurrent):
        if concurrent:
            return wait_all([scheduler.submit(p, sp) for p, sp in zip(prompts, params)])
        return sum(wait_all([scheduler.submit(p, sp)]) for p, sp in zip(prompts, params))

    def run_engine(engine, prompts):
        return sum(sum(1 for _ in engine.generate(p, max_tokens=args.new_tokens, temperature=1.0, top_k=50,
                                                  seed=i))
                   for i, p in enumerate(prompts))

    scheduler = BatchScheduler(model, tokenizer, max_batch_size=args.max_batch_size, max_queue=256)
    scheduler.start()
    engine = Engine(model, tokenizer)
    try:
        warm_up = make_prompts(2, args.prompt_len, tokenizer.get_bos_token_id())
        run_scheduler(scheduler, warm_up, True)
        run_engine(engine, warm_up[:1])
        for n in [int(c) for c in args.concurrency.split(",")]:
            prompts = make_prompts(n, args.prompt_len, tokenizer.get_bos_token_id())
            rows = [("scheduler, concurrent", lambda: run_scheduler(scheduler, prompts, True)),
                    ("scheduler, one at a time", lambda: run_scheduler(scheduler, prompts, False)),
                    ("Engine, one at a time", lambda: run_engine(engine, prompts))]
            for name, fn in rows:
                tokens, seconds = timed(fn, sync)
                print(f"{n:3d} requests, {name:25s}: {tokens / seconds:9.1f} tok/s "
                      f"({tokens} tokens, {seconds:.2f} s)")
    finally:
        scheduler.shutdown()
    # a lone request on a wide server: the width follows the load, unless fixed_width computes every slot
    prompt = make_prompts(1, args.prompt_len, tokenizer.get_bos_token_id())
    servers = [(1, False), (args.max_batch_size, False), (args.max_batch_size, True)]
    rates = {server: [] for server in servers}
    for _ in range(args.rounds):  # alternating, so that a busy machine slows every server alike
        for width, fixed_width in servers:
            narrow = BatchScheduler(model, tokenizer, max_batch_size=width, fixed_width=fixed_width)
            narrow.start()
            try:
                tokens, seconds = timed(lambda: run_scheduler(narrow, prompt, True), sync)
            finally:
                narrow.shutdown()
            rates[width, fixed_width].append(tokens / seconds)
    for (width, fixed_width), values in rates.items():
        print(f"  1 request, max_batch_size {width:3d}{', fixed width' if fixed_width else '':13s}: "
              f"{statistics.median(values):9.1f} tok/s (median of {args.rounds})")


if __name__ == "__main__":
    main()
