"""
lm-evaluation-harness on a nanochat checkpoint, two ways that share no scoring code: its `local-completions`
model on the chat server's /v1/completions (echo and logprobs: the scheduler's prefill, nanochat/batching.py)
and its `hf` model on the Hugging Face export of the same checkpoint (nanochat/hf_modeling.py's forward).
Prints each request's log-likelihood both ways and the largest difference; exits 1 beyond --tolerance.

    pip install lm_eval                      # not a dependency of nanochat
    python -m dev.lm_eval_check -i base      # the latest base checkpoint, on the CPU

Both get add_bos_token=True: nanochat models read every text after <|bos|> (without it lm-eval's
local-completions sends the bare tokens, and the scores are of text the model never saw that way).
"""

import argparse
import os
import sys
import tempfile

import httpx

from nanochat.checkpoint_manager import load_model
from nanochat.hf_export import export
from nanochat.server import ServerConfig, create_app, serve_in_thread

PAIRS = [("The capital of France is", " Paris"), ("The capital of France is", " London"),
         ("One, two, three,", " four"), ("Water boils at 100 degrees", " Celsius."),
         ("The quick brown fox jumps over the", " lazy dog")]


def served_loglikelihoods(requests, source, model_tag, export_dir, max_length):
    """lm-eval's local-completions against the chat server (in this process) on the checkpoint."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    server, thread, port = serve_in_thread(create_app(ServerConfig(device_type="cpu", source=source,
                                                                   model_tag=model_tag)))
    try:
        url = f"http://127.0.0.1:{port}/v1"
        model_id = httpx.get(url + "/models").json()["data"][0]["id"]
        api = LocalCompletionsAPI(base_url=url + "/completions", model=model_id, tokenizer=export_dir,
                                  tokenizer_backend="huggingface", add_bos_token=True, max_length=max_length)
        return api.loglikelihood(requests)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def main(argv=None):
    parser = argparse.ArgumentParser(description="lm-eval through the server vs. through the HF export")
    parser.add_argument("-i", "--source", type=str, default="base", choices=["base", "sft", "rl"])
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="checkpoint tag (default: largest)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |difference|")
    args = parser.parse_args(argv)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(PAIRS)]
    model, tokenizer, meta = load_model(args.source, "cpu", phase="eval", model_tag=args.model_tag)
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = export(model, tokenizer, meta, args.source, os.path.join(tmp, "export"))
        served = served_loglikelihoods(requests, args.source, args.model_tag, export_dir,
                                       model.config.sequence_len)
        local = HFLM(pretrained=export_dir, trust_remote_code=True, device="cpu", dtype="float32",
                     add_bos_token=True, batch_size=1).loglikelihood(requests)
    worst = max(abs(a - b) for (a, _), (b, _) in zip(served, local))
    for (context, continuation), (a, greedy_a), (b, greedy_b) in zip(PAIRS, served, local):
        request = f"{context}|{continuation}"
        print(f"{request:45} server {a:11.6f} {greedy_a!s:5}  hf {b:11.6f} {greedy_b!s:5}")
    print(f"largest |difference|: {worst:.2e} (tolerance {args.tolerance:g})")
    sys.exit(int(worst > args.tolerance))


if __name__ == "__main__":
    main()
