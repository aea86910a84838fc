"""
scripts/chat_cli.py as a user runs it, on a tiny checkpoint: one-shot mode, a conversation typed on stdin
(commands, history, a full context, EOF), errors and flags. The conversation's prompts and the streamed
text are unit-tested in test_chat_text.py.
"""

import io
import os
import signal
import subprocess
import sys

import pytest

from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine
from scripts import chat_cli

from conftest import chat_prompt, write_tiny_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def test_the_library_logs_reach_the_user(tokenizer, offline_base_dir):
    # which checkpoint was picked, and how, is logged by the library: a script must show its INFO logs
    save_tiny_sft_checkpoint(offline_base_dir, tokenizer)
    run = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "hi", "--device-type", "cpu",
                          "--max-tokens", "2"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr
    assert "No model tag provided, guessing model tag" in run.stderr
    assert "No model tag" not in run.stdout  # the reply alone is on stdout


def test_missing_checkpoint_is_one_error_line_and_exit_1(capsys):
    with pytest.raises(SystemExit) as e:
        chat_cli.main(["-p", "hi", "--device-type", "cpu"])
    assert e.value.code == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("chat_cli: error:") and "chatsft_checkpoints" in err and "\n" not in err
    assert captured.out == ""


@pytest.mark.parametrize("argv", [["-t", "-1"], ["-k", "-2"], ["--max-tokens", "0"], ["-i", "nope"],
                                  ["--device-type", "tpu"], ["-s", "x"], ["--seed", str(2**64)],
                                  ["--seed", str(-2**63 - 1)]])
def test_bad_flags_are_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        chat_cli.parse_args(argv)
    assert e.value.code == 2


def test_defaults():
    args = chat_cli.parse_args([])
    assert (args.source, args.model_tag, args.step, args.prompt) == ("sft", None, None, "")
    assert (args.temperature, args.top_k, args.device_type, args.max_tokens, args.seed) == (0.6, 50, "", 256, 42)


# -----------------------------------------------------------------------------
# The conversation, typed on stdin

BANNER = ("\nNanoChat Interactive Mode\n" + "-" * 50 + "\nType 'quit' or 'exit' to end the conversation\n"
          "Type 'clear' to start a new conversation\n" + "-" * 50 + "\n")


def chat(monkeypatch, capsys, typed, *flags):
    """main() with `typed` as the keyboard, then EOF (Ctrl-D); returns what it printed."""
    monkeypatch.setattr("sys.stdin", io.StringIO(typed))
    capsys.readouterr()  # drop what came before
    chat_cli.main(["--device-type", "cpu", *flags])
    return capsys.readouterr().out


def greedy_reply(prompt, max_tokens):
    """The reply tokens of an independent greedy Engine run over the checkpoint."""
    model, tok, _ = load_model("sft", "cpu", phase="eval")
    results, _ = Engine(model, tok).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    return results[0][len(prompt):]


def test_a_conversation_with_commands_history_and_eof(tokenizer, offline_base_dir, monkeypatch, capsys):
    save_tiny_sft_checkpoint(offline_base_dir, tokenizer)
    out = chat(monkeypatch, capsys, "\nHi\nCLEAR\n   \nHello\nhow are you\n", "-t", "0", "--max-tokens", "8")
    hi = greedy_reply(chat_prompt(tokenizer, "Hi"), 8)
    hello = greedy_reply(chat_prompt(tokenizer, "Hello"), 8)  # after clear: a fresh conversation
    how = greedy_reply(chat_prompt(tokenizer, "Hello", hello, "how are you"), 8)
    assert hi and hello and how
    answer = "\nUser: \nAssistant: {}\n".format
    assert out == (BANNER + "\nUser: " + answer(tokenizer.decode(hi)) + "\nUser: Conversation cleared.\n"
                   + "\nUser: " + answer(tokenizer.decode(hello)) + answer(tokenizer.decode(how))
                   + "\nUser: \nGoodbye!\n")


@pytest.mark.parametrize("command", ["quit", "EXIT"])
def test_quit_and_exit_end_the_conversation(tokenizer, offline_base_dir, monkeypatch, capsys, command):
    save_tiny_sft_checkpoint(offline_base_dir, tokenizer)
    out = chat(monkeypatch, capsys, f"{command}\nnever read\n")
    assert out == BANNER + "\nUser: Goodbye!\n"


def test_a_full_context_forgets_the_oldest_exchange_and_says_so(tokenizer, offline_base_dir, monkeypatch,
                                                                 capsys):
    save_tiny_sft_checkpoint(offline_base_dir, tokenizer)  # 128 tokens of context
    message = "The quick brown fox jumps over the lazy dog. Hello there! How are you?"
    turn = len(tokenizer.encode(message)) + 2  # with <|user_start|>, <|user_end|>
    # --max-tokens 4 leaves a prompt 124 tokens: two exchanges fit, three do not
    assert 2 + 2 * turn + 6 <= 124 < 2 + 3 * turn + 4
    out = chat(monkeypatch, capsys, f"{message}\n" * 3, "-t", "0", "--max-tokens", "4")
    assert out.count("(context full: forgot the oldest 1 exchange(s))") == 1
    assert out.count("\nAssistant: ") == 3 and out.endswith("\nGoodbye!\n")


# -----------------------------------------------------------------------------
# Ctrl-C and a closed stdout end the program cleanly, without a traceback

def press_ctrl_c_at_first_text(monkeypatch):
    """The user presses Ctrl-C (a real SIGINT to this process) as soon as the reply starts to stream."""
    real_stream_reply = chat_cli.stream_reply

    def stream_reply(engine, prompt, on_text, **sampling):
        def on_text_then_sigint(text):
            on_text(text)
            signal.raise_signal(signal.SIGINT)
        return real_stream_reply(engine, prompt, on_text_then_sigint, **sampling)
    monkeypatch.setattr(chat_cli, "stream_reply", stream_reply)


def test_ctrl_c_during_a_one_shot_answer_exits_130_without_traceback(tokenizer, offline_base_dir,
                                                                      monkeypatch, capsys):
    save_tiny_sft_checkpoint(offline_base_dir, tokenizer)
    press_ctrl_c_at_first_text(monkeypatch)
    capsys.readouterr()
    try:
        chat_cli.main(["-p", "Hello there", "--device-type", "cpu", "--max-tokens", "50"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped chat_cli.main: the user sees a traceback")
    except SystemExit as e:
        assert e.code == 130
    else:
        pytest.fail("chat_cli.main returned normally after Ctrl-C")
    captured = capsys.readouterr()
    assert captured.out.endswith("\n")  # the partial answer's line is ended
    assert captured.err.strip().splitlines()[-1] == "chat_cli: interrupted"


def test_stdout_closed_early_exits_without_traceback(tokenizer, offline_base_dir):
    # `chat_cli -p ... | head -c 1`: the reader is gone before the answer is written
    save_tiny_sft_checkpoint(offline_base_dir, tokenizer)
    argv = [sys.executable, "-m", "scripts.chat_cli", "-p", "hi", "--device-type", "cpu", "--max-tokens", "4"]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT)
    run.stdout.close()
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()[-2000:]


def test_max_tokens_past_the_rotary_table_is_one_error_line(tokenizer, offline_base_dir, capsys):
    # a 32-token context: rotary positions end at 320, a prompt may take 32 - 16 = 16 of them
    tokenizer.save(str(offline_base_dir / "tokenizer"))
    write_tiny_checkpoint(offline_base_dir, "sft", vocab_size=tokenizer.get_vocab_size(), sequence_len=32)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        chat_cli.main(["-p", "hi", "--device-type", "cpu", "-t", "0", "--max-tokens", "305"])
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == (
        "chat_cli: error: --max-tokens 305 does not fit: with the prompt a reply can reach 321 positions, "
        "and this model has 320; use --max-tokens 304 or less")
    assert captured.out == ""
    # the most that fits
    chat_cli.main(["-p", "hi", "--device-type", "cpu", "-t", "0", "--max-tokens", "304"])
    assert capsys.readouterr().out.endswith("\n")
