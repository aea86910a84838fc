"""
scripts/chat_cli.py: one-shot mode end to end on a tiny checkpoint, the conversation loop with scripted
input and a scripted model behind the real Engine, prompt layout, context trimming, streaming decode.
"""

from types import SimpleNamespace

import pytest
import torch

from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine
from nanochat.tokenizer import fit_chat_prompt, render_chat_prompt
from scripts import chat_cli

from conftest import write_tiny_checkpoint

@pytest.fixture
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(autouse=True)
def offline_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    return tmp_path / "base"


def save_tiny_sft_checkpoint(base_dir, tokenizer):
    tokenizer.save(str(base_dir / "tokenizer"))
    write_tiny_checkpoint(base_dir, "sft", vocab_size=tokenizer.get_vocab_size())


def chat_prompt(tokenizer, *turns):
    """Hand-built prompt: BOS, then user/assistant turns (assistant turns given as token lists), ending in
    <|assistant_start|> after the last user message."""
    special = tokenizer.encode_special
    tokens = [tokenizer.get_bos_token_id()]
    for i, turn in enumerate(turns):
        if i % 2 == 0:
            tokens += [special("<|user_start|>"), *tokenizer.encode(turn), special("<|user_end|>"),
                       special("<|assistant_start|>")]
        else:
            tokens += turn + [special("<|assistant_end|>")]
    return tokens


class ScriptedModel:
    """Replies to any prompt with `reply` then <|assistant_end|> (or repeats reply forever when endless);
    records every prompt it is given. Advances the KV cache as the attention layers would."""

    def __init__(self, tokenizer, reply, endless=False, sequence_len=4096):
        self.config = SimpleNamespace(n_layer=1, n_head=1, n_kv_head=1, n_embd=8, sequence_len=sequence_len)
        self.vocab_size = tokenizer.get_vocab_size()
        self.reply, self.endless = reply, endless
        self.end = tokenizer.encode_special("<|assistant_end|>")
        self.prompts = []

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        if T > 1:
            self.prompts.append(ids[0].tolist())
        step = kv_cache.get_pos() + T - len(self.prompts[-1])
        kv_cache.advance(T)
        if self.endless:
            token = self.reply[step % len(self.reply)]
        else:
            token = (self.reply + [self.end])[min(step, len(self.reply))]
        logits = torch.zeros(B, T, self.vocab_size)
        logits[:, -1, token] = 100.0
        return logits


def scripted_input(lines):
    """An input() replacement that returns the lines, then raises EOFError (Ctrl-D)."""
    remaining = iter(lines)

    def read(prompt):
        print(prompt, end="")
        try:
            return next(remaining)
        except StopIteration:
            raise EOFError from None
    return read


# -----------------------------------------------------------------------------
# One-shot mode and errors, end to end on a real checkpoint

def test_one_shot_prints_only_the_engine_answer(tokenizer, offline_base_dir, capsys):
    save_tiny_sft_checkpoint(offline_base_dir, tokenizer)
    capsys.readouterr()  # drop what saving printed
    chat_cli.main(["-p", "Hello there", "--device-type", "cpu"])
    out = capsys.readouterr().out
    # independently: the chat-format prompt by hand, generated with the CLI's defaults (0.6, top-k 50, seed 42)
    model, tok, _ = load_model("sft", "cpu", phase="eval")
    prompt = chat_prompt(tok, "Hello there")
    results, _ = Engine(model, tok).generate_batch(prompt, max_tokens=256, temperature=0.6, top_k=50, seed=42)
    expected = tok.decode(results[0][len(prompt):])
    assert len(expected) > 0
    assert out == expected + "\n"


def test_missing_checkpoint_is_one_error_line_and_exit_1(capsys):
    with pytest.raises(SystemExit) as e:
        chat_cli.main(["-p", "hi", "--device-type", "cpu"])
    assert e.value.code == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("chat_cli: error:") and "chatsft_checkpoints" in err and "\n" not in err
    assert captured.out == ""


@pytest.mark.parametrize("argv", [["-t", "-1"], ["-k", "-2"], ["--max-tokens", "0"], ["-i", "nope"],
                                  ["--device-type", "tpu"], ["-s", "x"]])
def test_bad_flags_are_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        chat_cli.parse_args(argv)
    assert e.value.code == 2


def test_defaults():
    args = chat_cli.parse_args([])
    assert (args.source, args.model_tag, args.step, args.prompt) == ("sft", None, None, "")
    assert (args.temperature, args.top_k, args.device_type, args.max_tokens, args.seed) == (0.6, 50, "", 256, 42)


# -----------------------------------------------------------------------------
# The conversation loop

def test_loop_commands_history_and_eof(tokenizer, capsys):
    ok = tokenizer.encode("ok")
    model = ScriptedModel(tokenizer, ok)
    args = chat_cli.parse_args(["-t", "0"])
    chat_cli.chat_loop(Engine(model, tokenizer), tokenizer, args,
                       scripted_input(["", "Hi", "CLEAR", "   ", "Hello", "how are you"]))
    assert model.prompts == [
        chat_prompt(tokenizer, "Hi"),
        chat_prompt(tokenizer, "Hello"),  # after clear: a fresh conversation
        chat_prompt(tokenizer, "Hello", ok, "how are you"),
    ]
    out = capsys.readouterr().out
    assert out.startswith("\nNanoChat Interactive Mode\n" + "-" * 50 + "\n")
    assert out.count("\nAssistant: ok\n") == 3
    assert "Conversation cleared." in out
    assert out.endswith("\nGoodbye!\n")  # EOF


@pytest.mark.parametrize("command", ["quit", "EXIT"])
def test_quit_and_exit_end_the_loop(tokenizer, command, capsys):
    model = ScriptedModel(tokenizer, tokenizer.encode("ok"))
    chat_cli.chat_loop(Engine(model, tokenizer), tokenizer, chat_cli.parse_args([]),
                       scripted_input([command, "never read"]))
    assert model.prompts == []
    assert capsys.readouterr().out.endswith("User: Goodbye!\n")


def test_reply_cut_by_max_tokens_is_closed_with_assistant_end(tokenizer):
    z = tokenizer.encode("z")
    model = ScriptedModel(tokenizer, z, endless=True)
    args = chat_cli.parse_args(["--max-tokens", "3", "-t", "0"])
    chat_cli.chat_loop(Engine(model, tokenizer), tokenizer, args, scripted_input(["a", "b"]))
    assert model.prompts[1] == chat_prompt(tokenizer, "a", z * 3, "b")


def test_old_exchanges_are_dropped_when_the_context_is_full(tokenizer, capsys):
    ok = tokenizer.encode("ok")
    # room for two turns and a 4-token reply, not for three
    two_turns = [chat_prompt(tokenizer, "one", ok, "two"), chat_prompt(tokenizer, "two", ok, "three")]
    context_len = max(map(len, two_turns)) + 4
    assert len(chat_prompt(tokenizer, "one", ok, "two", ok, "three")) + 4 > context_len
    model = ScriptedModel(tokenizer, ok, sequence_len=context_len)
    args = chat_cli.parse_args(["--max-tokens", "4", "-t", "0"])
    chat_cli.chat_loop(Engine(model, tokenizer), tokenizer, args, scripted_input(["one", "two", "three"]))
    assert model.prompts == [chat_prompt(tokenizer, "one"), chat_prompt(tokenizer, "one", ok, "two"),
                             chat_prompt(tokenizer, "two", ok, "three")]
    assert "(context full: forgot the oldest 1 exchange(s))" in capsys.readouterr().out


def test_prompt_layout_matches_render_for_completion_with_a_system_prompt(tokenizer):
    end = tokenizer.encode_special("<|assistant_end|>")
    conversation = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": ""},
    ]}
    expected = tokenizer.render_for_completion(conversation)
    exchanges = [("Hello there", tokenizer.encode("Hi!") + [end])]
    turns = chat_cli.conversation_turns(exchanges, "How are you?")
    assert render_chat_prompt(tokenizer, turns, system="Be brief.") == expected


def test_streaming_prints_multibyte_characters_whole(tokenizer, capsys):
    reply = tokenizer.encode("café 😀!")
    assert len(reply) > len("café 😀!")  # the emoji is split over several byte tokens
    model = ScriptedModel(tokenizer, reply)
    args = chat_cli.parse_args(["-t", "0"])
    tokens = chat_cli.stream_reply(Engine(model, tokenizer), tokenizer, [tokenizer.get_bos_token_id()] * 2, args)
    assert capsys.readouterr().out == "café 😀!\n"
    assert tokens == reply + [tokenizer.encode_special("<|assistant_end|>")]


def test_a_message_longer_than_the_context_keeps_its_end_and_half_the_context_for_the_reply(tokenizer, capsys):
    # the server's policy: the prompt gets at least half the context, the message loses its beginning
    ok = tokenizer.encode("ok")
    context_len = 48
    message = " ".join(["The quick brown fox jumps over the lazy dog."] * 4)
    assert len(chat_prompt(tokenizer, message)) > context_len
    model = ScriptedModel(tokenizer, ok, sequence_len=context_len)
    args = chat_cli.parse_args(["--max-tokens", "40", "-t", "0"])
    chat_cli.chat_loop(Engine(model, tokenizer), tokenizer, args, scripted_input([message]))
    [prompt] = model.prompts
    full = chat_prompt(tokenizer, message)
    assert len(prompt) == context_len // 2 and prompt[0] == tokenizer.get_bos_token_id()
    assert prompt[1:] == full[len(full) - len(prompt) + 1:]  # the end of the message, then the reply opens
    assert "\nAssistant: ok\n" in capsys.readouterr().out


def test_a_system_prompt_stays_with_the_first_exchange_kept(tokenizer):
    ok = tokenizer.encode("ok")
    end = tokenizer.encode_special("<|assistant_end|>")
    exchanges = [("one", ok + [end]), ("two", ok + [end])]
    turns = chat_cli.conversation_turns(exchanges, "three")
    full, dropped = fit_chat_prompt(tokenizer, turns, system="Be brief.")
    assert dropped == 0 and full == chat_prompt(tokenizer, "Be brief.\n\none", ok, "two", ok, "three")
    kept = chat_prompt(tokenizer, "Be brief.\n\ntwo", ok, "three")
    assert fit_chat_prompt(tokenizer, turns, len(kept), system="Be brief.") == (kept, 2)
