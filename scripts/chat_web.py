"""
Serve a chat model over HTTP: the chat UI, the reference's streaming API and an OpenAI-compatible API.

    python -m scripts.chat_web                          # the latest sft checkpoint, autodetected device
    python -m scripts.chat_web -i rl -p 8080 --max-batch-size 16
    python -m scripts.chat_web -n 8                     # one scheduler per GPU, cuda:0..7
    python -m scripts.chat_web --api-key KEY            # /v1 and the stream need `Authorization: Bearer KEY`
    uvicorn scripts.chat_web:app                        # default flags; no header timeout, Ctrl-C waits

The endpoints, their limits and errors are described in nanochat/server.py, which holds the app.
"""

import argparse
import sys

from nanochat.common import SetupError, autodetect_device_type, compute_init, exit_on_setup_error
from nanochat.server import (ServerConfig, check_listening_address, create_app, required_api_key,
                             uvicorn_server, worker_devices)


def build_parser():
    """The flags; their defaults are ServerConfig's."""
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(description="NanoChat Web Server")
    parser.add_argument("-n", "--num-gpus", type=int, default=defaults.num_gpus,
                        help="number of GPUs, one scheduler each (cuda only)")
    parser.add_argument("-i", "--source", type=str, default=defaults.source, choices=["sft", "rl", "base"],
                        help="checkpoint family: sft|rl (base loads too, but was never taught to chat)")
    parser.add_argument("-t", "--temperature", type=float, default=defaults.temperature,
                        help="default sampling temperature")
    parser.add_argument("-k", "--top-k", type=int, default=defaults.top_k,
                        help="default top-k (0 = no filtering)")
    parser.add_argument("-m", "--max-tokens", type=int, default=defaults.max_tokens,
                        help="default reply length limit in tokens")
    parser.add_argument("-g", "--model-tag", type=str, default=defaults.model_tag,
                        help="checkpoint tag (default: the largest model)")
    parser.add_argument("-s", "--step", type=int, default=defaults.step,
                        help="checkpoint step (default: the last)")
    parser.add_argument("-p", "--port", type=int, default=defaults.port, help="port to listen on")
    parser.add_argument("--device-type", type=str, default=defaults.device_type,
                        choices=["", "cuda", "cpu", "mps"], metavar="DEVICE",
                        help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--host", type=str, default=defaults.host, help="address to bind")
    # not in the reference
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                        help="sequences decoded together per device")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="decode every slot at full width, so that a seeded reply is bit for bit "
                             "the same whatever else is being served (slower under light load)")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="requests waiting per device beyond its free slots, before 429 "
                             "(0: free slots only)")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help="largest request body in bytes (413 beyond)")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout,
                        help="seconds to receive a request's headers, and again its body "
                             "(408 and the connection closed beyond)")
    parser.add_argument("--log-conversations", action="store_true",
                        help="log every conversation in full, as the reference did "
                             "(default: one summary line)")
    parser.add_argument("--api-key", type=str, default=defaults.api_key, metavar="KEY",
                        help="require `Authorization: Bearer KEY` on /v1/*, /chat/completions and /stats "
                             "(default: $NANOCHAT_API_KEY; unset = open). The chat page cannot send it.")
    return parser


def parse_args(argv=None):
    """The flags as a ServerConfig; a value out of range is a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return ServerConfig(**vars(args))
    except ValueError as e:
        parser.error(str(e))


_default_app = None


def __getattr__(name):
    # `uvicorn scripts.chat_web:app`, and code written for the reference (whose module built `app` at import):
    # the app with the default flags, built on first access instead of at import
    global _default_app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _default_app is None:
        _default_app = create_app(parse_args([]))
    return _default_app


@exit_on_setup_error("chat_web")
def main(argv=None):
    args = parse_args(argv)
    args.device_type = args.device_type or autodetect_device_type()
    worker_devices(args.device_type, args.num_gpus)  # -n beyond this machine's GPUs: said before any loading
    check_listening_address(args.host, args.port)  # so is a port in use
    compute_init(args.device_type)
    app = create_app(args)
    print("Starting NanoChat Web Server")
    print(f"Temperature: {args.temperature}, Top-k: {args.top_k}, Max tokens: {args.max_tokens}")
    if args.host in ("0.0.0.0", "::") and not required_api_key(args):
        print(f"WARNING: listening on all interfaces ({args.host}) without an API key: anyone who can reach "
              f"this machine can use the model (set --api-key or NANOCHAT_API_KEY, or --host 127.0.0.1)")
    try:
        uvicorn_server(app, host=args.host, port=args.port).run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it has shut down
        pass
    finally:
        # the cause, as the last line, instead of uvicorn's "Application startup failed"
        error = app.state.startup_error
        if isinstance(error, SetupError):  # a file or setting the user fixes: `chat_web: error: ...`
            raise error
        if error is not None:  # a bug: uvicorn has logged its traceback
            sys.exit(f"Server startup failed: {type(error).__name__}: {' '.join(str(error).split())}")


if __name__ == "__main__":
    main()
