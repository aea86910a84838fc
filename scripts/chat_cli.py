"""
Chat with a fine-tuned model in the terminal.

    python -m scripts.chat_cli                            # interactive, the latest sft checkpoint
    python -m scripts.chat_cli -i rl -t 0.8
    python -m scripts.chat_cli -p "Why is the sky blue?"  # answer one prompt and exit

In the conversation, `quit` or `exit` (or Ctrl-D / Ctrl-C) leaves and `clear` starts over.
Replies stream as they are generated; calculator calls show as their literal special tokens.
Loading messages go to stderr, so with -p stdout holds only the answer.
"""

import argparse
import contextlib
import sys

from nanochat.checkpoint_manager import load_model
from nanochat.common import autodetect_device_type, compute_cleanup, compute_init
from nanochat.engine import Engine
from nanochat.tokenizer import StreamDecoder, fit_chat_prompt, prompt_budget


def build_parser():
    parser = argparse.ArgumentParser(description="Chat with the model")
    parser.add_argument("-i", "--source", type=str, default="sft", choices=["sft", "rl", "base"],
                        help="checkpoint family: sft|rl (base loads too, but was never taught to chat)")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="checkpoint tag (default: the largest model)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("-p", "--prompt", type=str, default="", help="answer this one prompt and exit")
    parser.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"], metavar="DEVICE",
                        help="cuda|cpu|mps (empty = autodetect)")
    # not in the reference, whose values were fixed at these defaults
    parser.add_argument("--max-tokens", type=int, default=256, help="reply length limit in tokens")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed (the same for every reply)")
    parser.add_argument("--system", type=str, default="",
                        help="system prompt, merged into the first user message as training data does")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0, got {args.top_k}")
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    return args


# -----------------------------------------------------------------------------
# The conversation as tokens

def conversation_turns(exchanges, user_text):
    """
    The conversation as fit_chat_prompt's turns: each earlier exchange, (user text, reply tokens ending in
    <|assistant_end|>), as a user and an assistant turn (the model's own tokens), then the new message.
    """
    turns = []
    for text, reply in exchanges:
        turns += [("user", text), ("assistant", reply[:-1])]
    return turns + [("user", user_text)]


def stream_reply(engine, tokenizer, prompt, args):
    """
    Generate a reply to prompt, printing its text as it arrives; returns the reply tokens, always ending in
    <|assistant_end|> (appended when max_tokens cut the reply). A character split over several tokens
    prints once, whole (StreamDecoder); the terminal token is not printed.
    """
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    terminal = (assistant_end, tokenizer.get_bos_token_id())
    decoder = StreamDecoder(tokenizer)
    reply = []
    stream = engine.generate(prompt, num_samples=1, max_tokens=args.max_tokens, temperature=args.temperature,
                             top_k=args.top_k, seed=args.seed)
    for column, _ in stream:
        token = column[0]
        if token in terminal:
            break
        reply.append(token)
        print(decoder.add(token), end="", flush=True)
    print(decoder.finish())
    return reply + [assistant_end]


# -----------------------------------------------------------------------------
# Modes

def print_banner():
    print("\nNanoChat Interactive Mode")
    print("-" * 50)
    print("Type 'quit' or 'exit' to end the conversation")
    print("Type 'clear' to start a new conversation")
    print("-" * 50)


def chat_loop(engine, tokenizer, args, read_input=input):
    """The interactive conversation; returns when the user leaves."""
    budget = prompt_budget(engine.model.config.sequence_len, args.max_tokens)
    exchanges = []
    print_banner()
    try:
        while True:
            try:
                user_text = read_input("\nUser: ").strip()
            except EOFError:
                print("\nGoodbye!")
                return
            if user_text.lower() in ("quit", "exit"):
                print("Goodbye!")
                return
            if user_text.lower() == "clear":
                exchanges = []
                print("Conversation cleared.")
                continue
            if not user_text:
                continue
            turns = conversation_turns(exchanges, user_text)
            prompt, dropped = fit_chat_prompt(tokenizer, turns, budget, args.system)
            forgotten = (dropped + 1) // 2  # an exchange whose question no longer fits is forgotten
            if forgotten:
                print(f"(context full: forgot the oldest {forgotten} exchange(s))")
                exchanges = exchanges[forgotten:]
            print("\nAssistant: ", end="", flush=True)
            exchanges.append((user_text, stream_reply(engine, tokenizer, prompt, args)))
    except KeyboardInterrupt:
        print("\nGoodbye!")


def answer_once(engine, tokenizer, args):
    """-p mode: print the answer to args.prompt (no banner, no labels) and return its tokens."""
    budget = prompt_budget(engine.model.config.sequence_len, args.max_tokens)
    prompt, _ = fit_chat_prompt(tokenizer, [("user", args.prompt)], budget, args.system)
    return stream_reply(engine, tokenizer, prompt, args)


def load_engine(args):
    """An Engine over the requested checkpoint; a missing or broken one exits with one error line."""
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the conversation
        device_type = args.device_type or autodetect_device_type()
        _, _, _, _, device = compute_init(device_type)
        try:
            model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag,
                                             step=args.step)
        except (FileNotFoundError, ValueError) as e:  # no checkpoint / tokenizer, or a bad one
            print(f"chat_cli: error: {e}", file=sys.stderr)
            raise SystemExit(1)
    return Engine(model, tokenizer)


def main(argv=None):
    args = parse_args(argv)
    engine = load_engine(args)
    try:
        if args.prompt:
            answer_once(engine, engine.tokenizer, args)
        else:
            chat_loop(engine, engine.tokenizer, args)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    main()
