"""
Serving benchmark for the chat server (scripts/chat_web.py): N concurrent streaming clients on
/v1/chat/completions, for each N in a list. Reports requests/s, output tokens/s, time to first token (TTFT)
and per-token latency (the gaps between streamed chunks, as a client sees them), p50 and p95.

    python -m dev.bench_serve --url http://localhost:8000          # a server that is already running
    python -m dev.bench_serve --source sft --device-type cpu       # starts one on a checkpoint
    python -m dev.bench_serve --concurrency 1,4,16 --requests-per-client 4 --max-tokens 128 --serial
    python -m dev.bench_serve --max-batch-size 1    # the reference's design: one request at a time

Each of the N clients sends --requests-per-client requests back to back, so N*k requests per level. With
--serial the same requests are then sent one at a time: the reference server's design, one request per
GPU at a time, for comparison. Replies stop at <|assistant_end|> as usual, so lengths vary with the model
and the sampling (tokens/s counts the tokens actually generated, from the usage chunk).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

PROMPTS = [
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "What is 12 times 7? Explain step by step.",
    "Tell me a fun fact about octopuses.",
    "How do I reverse a list in Python?",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Give me three tips for learning a new language.",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Throughput and latency of the chat server under concurrent clients")
    p.add_argument("--url", type=str, default="", help="a running server (empty = start one)")
    p.add_argument("--source", type=str, default="sft",
                   help="started server: checkpoint family sft|rl|base")
    p.add_argument("--model-tag", type=str, default=None, help="started server: checkpoint tag")
    p.add_argument("--step", type=int, default=None, help="started server: checkpoint step")
    p.add_argument("--device-type", type=str, default="",
                   help="started server: cuda|cpu|mps (empty = autodetect)")
    p.add_argument("--max-batch-size", type=int, default=16, help="started server: sequences per batch")
    p.add_argument("--batch-invariant", action="store_true",
                   help="started server: decode every slot at full width (chat_web --batch-invariant)")
    p.add_argument("--concurrency", type=str, default="1,4,16", help="comma-separated numbers of clients")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--serial", action="store_true", help="also send the same requests one at a time")
    p.add_argument("--timeout", type=float, default=600, help="seconds per request")
    return p.parse_args(argv)


def free_port(host="127.0.0.1"):
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_local_server(args, timeout=600):
    """
    `python -m scripts.chat_web` on a free port, in its own process as users run it; returns (url, stop
    function). In this process its scheduler and uvicorn would share the GIL with the client threads, and the
    numbers would be the contention's: on CPU (d4 quick-start model, one client, 8 tokens) TTFT was 44 ms
    in-process against 10 ms in a process of its own, and half the token gaps were 0.02 ms (chunks in bursts).
    Its output goes to a temporary log file, shown if it fails to start.
    """
    port = free_port()
    command = [sys.executable, "-m", "scripts.chat_web", "--host", "127.0.0.1", "-p", str(port),
               "-i", args.source, "--max-batch-size", str(args.max_batch_size),
               "--max-queue", str(max(map(int, args.concurrency.split(","))))]
    for flag, value in (("-g", args.model_tag), ("-s", args.step), ("--device-type", args.device_type)):
        command += [flag, str(value)] if value not in (None, "") else []
    command += ["--batch-invariant"] if args.batch_invariant else []
    log = tempfile.NamedTemporaryFile("w+", prefix="bench_serve_", suffix=".log", delete=False)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout

    def stop():
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        os.remove(log.name)
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).json().get("ready"):
                return url, stop
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    log.seek(0)
    output = log.read()[-3000:]
    stop()
    raise RuntimeError(f"the server did not start (exit status {process.returncode}); the end of its "
                       f"output:\n{output}")


def timed_request(client, url, body):
    """Stream one completion; returns (start, [arrival time of each text chunk], completion tokens)."""
    start, arrivals, tokens = time.perf_counter(), [], 0
    with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode()}")
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"the server reported an error: {chunk['error']}")
            if any(choice["delta"].get("content") for choice in chunk["choices"]):
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return start, arrivals, tokens


def make_requests(args, n):
    return [{"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "stream": True,
             "stream_options": {"include_usage": True}, "max_tokens": args.max_tokens,
             "temperature": args.temperature, "seed": i} for i in range(n)]


def run_clients(url, bodies, num_clients, timeout):
    """Send bodies from num_clients threads (client c takes bodies c, c + num_clients, ...); returns
    (wall seconds, results)."""
    results, errors = [], []

    def client_loop(c):
        with httpx.Client(timeout=timeout) as client:
            for body in bodies[c::num_clients]:
                try:
                    results.append(timed_request(client, url, body))
                except (httpx.HTTPError, RuntimeError) as e:
                    errors.append(e)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(num_clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(bodies)} requests failed, the first: {errors[0]}")
    return time.perf_counter() - start, results


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(label, num_clients, wall, results):
    ttft = [arrivals[0] - start for start, arrivals, _ in results if arrivals]
    gaps = [b - a for _, arrivals, _ in results for a, b in zip(arrivals, arrivals[1:])]
    tokens = sum(n for _, _, n in results)
    print(f"{label:<8} {num_clients:>7} {len(results):>8} {len(results) / wall:>7.2f} {tokens / wall:>10.1f} "
          f"{1000 * percentile(ttft, 50):>9.1f} {1000 * percentile(ttft, 95):>9.1f} "
          f"{1000 * percentile(gaps, 50):>11.2f} {1000 * percentile(gaps, 95):>11.2f}")


def main(argv=None):
    args = parse_args(argv)
    url, stop = (args.url.rstrip("/"), None) if args.url else start_local_server(args)
    try:
        print(f"server {url}, max_tokens {args.max_tokens}, temperature {args.temperature}")
        run_clients(url, make_requests(args, 2), 1, args.timeout)  # warm-up
        print(f"{'mode':<8} {'clients':>7} {'requests':>8} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} "
              f"{'TTFT p95':>9} {'tok ms p50':>11} {'tok ms p95':>11}   (times in ms)")
        for num_clients in map(int, args.concurrency.split(",")):
            bodies = make_requests(args, num_clients * args.requests_per_client)
            summarize("batched", num_clients, *run_clients(url, bodies, num_clients, args.timeout))
            if args.serial:
                summarize("serial", 1, *run_clients(url, bodies, 1, args.timeout))
    finally:
        if stop is not None:
            stop()


if __name__ == "__main__":
    main()
