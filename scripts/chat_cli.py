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
import os
import sys

from nanochat.chat_text import Conversation, stream_reply
from nanochat.checkpoint_manager import load_model
from nanochat.common import (BadSettingError, autodetect_device_type, compute_cleanup, compute_init,
                             exit_on_setup_error)
from nanochat.engine import Engine
from nanochat.tokenizer import prompt_budget


def build_parser():
    parser = argparse.ArgumentParser(description="Chat with the model")
    parser.add_argument("-i", "--source", type=str, default="sft", choices=["sft", "rl", "base"],
                        help="checkpoint family: sft|rl (base loads too, but was never taught to chat)")
    parser.add_argument("-g", "--model-tag", type=str, default=None,
                        help="checkpoint tag (default: the largest model)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("-p", "--prompt", type=str, default="", help="answer this one prompt and exit")
    parser.add_argument("-t", "--temperature", type=float, default=0.6,
                        help="sampling temperature (0 = greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50,
                        help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"],
                        metavar="DEVICE", help="cuda|cpu|mps (empty = autodetect)")
    # not in the reference, whose values were fixed at these defaults
    parser.add_argument("--max-tokens", type=int, default=256, help="reply length limit in tokens")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed (the same for every reply)")
    parser.add_argument("--system", type=str, default="",
                        help="system prompt, merged into the first user message as training data does")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value, low in (("--temperature", args.temperature, 0), ("--top-k", args.top_k, 0),
                             ("--max-tokens", args.max_tokens, 1)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if not -2**63 <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        parser.error(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    return args


def chat_loop(conversation, print_reply):
    """The interactive conversation; returns when the user leaves."""
    rule = "-" * 50
    print(f"\nNanoChat Interactive Mode\n{rule}\nType 'quit' or 'exit' to end the conversation\n"
          f"Type 'clear' to start a new conversation\n{rule}")
    try:
        while True:
            user_text = input("\nUser: ").strip()
            if user_text.lower() in ("quit", "exit"):
                print("Goodbye!")
                return
            if user_text.lower() == "clear":
                conversation.exchanges.clear()
                print("Conversation cleared.")
                continue
            if not user_text:
                continue
            prompt, forgotten = conversation.prompt(user_text)
            if forgotten:
                print(f"(context full: forgot the oldest {forgotten} exchange(s))")
            print("\nAssistant: ", end="", flush=True)
            conversation.add(user_text, print_reply(prompt))
    except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C
        print("\nGoodbye!")


@exit_on_setup_error("chat_cli")
def main(argv=None):
    args = parse_args(argv)
    try:
        chat(args)
    except KeyboardInterrupt:  # Ctrl-C while the model loads or during a one-shot answer
        with contextlib.suppress(OSError):
            print(flush=True)  # end the partial answer's line
        print("chat_cli: interrupted", file=sys.stderr)
        raise SystemExit(130)  # the shell's code for death by SIGINT
    except BrokenPipeError:  # stdout closed early (`chat_cli -p ... | head -1`): nobody is reading
        # later flushes (at exit) would fail again: send what is left to devnull
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1)


def check_reply_fits(model, max_tokens):
    """BadSettingError if a prompt and a max_tokens reply can outgrow the model's rotary table: the model
    would fail on an assertion only when a reply really runs that long."""
    context_len, positions = model.config.sequence_len, model.rotary_seq_len
    longest_prompt = prompt_budget(context_len, max_tokens)
    if longest_prompt + max_tokens > positions:
        most = positions - prompt_budget(context_len, positions)
        raise BadSettingError(f"--max-tokens {max_tokens} does not fit: with the prompt a reply can reach "
                              f"{longest_prompt + max_tokens} positions, and this model has {positions}; "
                              f"use --max-tokens {most} or less")


def chat(args):
    """Load the model, then answer -p once or hold the conversation."""
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the conversation
        _, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
        model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag,
                                         step=args.step)
    check_reply_fits(model, args.max_tokens)
    engine = Engine(model, tokenizer)
    conversation = Conversation(tokenizer, model.config.sequence_len, args.max_tokens, args.system)
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                    seed=args.seed)

    def print_reply(prompt):
        tokens = stream_reply(engine, prompt, lambda text: print(text, end="", flush=True), **sampling)
        print()
        return tokens

    try:
        if args.prompt:  # the answer alone: no banner, no labels
            print_reply(conversation.prompt(args.prompt)[0])
        else:
            chat_loop(conversation, print_reply)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    main()
