"""scripts/tok_train.py and scripts/tok_eval.py, end to end on the committed offline sample."""

import contextlib
import random
import re

import pytest
import torch

from nanochat import dataset
from nanochat.tokenizer import SANITY_TEXT, RustBPETokenizer, get_token_bytes, get_tokenizer
from scripts import tok_eval, tok_train

from conftest import TerminalIO


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOCHAT_BASE_DIR", str(base))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        mp.delenv(k, raising=False)
    dataset.install_sample()
    tok_train.main(["--max-chars=3000000", "--vocab-size=2048"])
    yield base
    mp.undo()


@pytest.fixture
def base_env(trained_base, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(trained_base))
    return trained_base


def test_tok_train_writes_tokenizer_and_token_bytes(base_env):
    tok = get_tokenizer()
    assert tok.get_vocab_size() == 2048
    token_bytes = get_token_bytes()
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (2048,)
    rng = random.Random(0)
    docs = next(dataset.parquets_iter_batched("val"))
    for doc in rng.sample(docs, 5):
        text = doc[:3000]
        ids = tok.encode(text)
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert tok.decode(tok.encode(SANITY_TEXT)) == SANITY_TEXT


def test_tok_train_report_section(base_env):
    section = (base_env / "report" / "tokenizer-training.md").read_text()
    for key in ("max_chars: 3,000,000", "vocab_size: 2048", "num_special_tokens: 9", "token_bytes_mean", "train_time"):
        assert key in section


def test_text_iterator_stops_after_crossing_max_chars(base_env):
    docs = list(dataset.text_iterator(max_chars=20_000, doc_cap=3_000))
    lengths = [len(d) for d in docs]
    assert max(lengths) <= 3_000
    assert sum(lengths[:-1]) <= 20_000 < sum(lengths)


def test_text_iterator_draws_a_progress_bar_on_a_terminal(base_env, monkeypatch):
    monkeypatch.delenv("NANOCHAT_QUIET", raising=False)
    with contextlib.redirect_stderr(TerminalIO()) as terminal:
        docs = list(dataset.text_iterator(max_chars=20_000, doc_cap=3_000))
    assert docs and "Reading training text:   0%|" in terminal.getvalue()
    assert re.search(r"\| 0\.00/20\.0k \[00:00<\?, \?char/s\]", terminal.getvalue()), terminal.getvalue()


def test_tok_train_rejects_bad_flags():
    with pytest.raises(SystemExit):
        tok_train.parse_args(["--vocab-size=0"])


@pytest.mark.parametrize("vocab_size", [264, 2**31 + 1, 10**23])
def test_tok_train_refuses_a_vocab_size_outside_its_limits_naming_the_flag(vocab_size, capsys):
    # 264 has no room for 256 bytes + 9 specials; 10**23 overflowed inside rustbpe: both were tracebacks
    with pytest.raises(SystemExit) as exit_info:
        tok_train.parse_args([f"--vocab-size={vocab_size}"])
    assert exit_info.value.code == 2
    assert "--vocab-size must be between 265" in capsys.readouterr().err
    assert tok_train.parse_args(["--vocab-size=265"]).vocab_size == 265  # the smallest that trains


def test_tok_train_without_pretraining_data_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))  # the first thing a new user may try
    with pytest.raises(SystemExit) as exit_info:
        tok_train.main(["--max-chars=1000", "--vocab-size=300"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("tok_train: error: No pretraining data: ") and "nanochat.dataset --sample" in err
    (tmp_path / "base_data_climbmix").mkdir()
    with pytest.raises(SystemExit):
        tok_train.main(["--max-chars=1000", "--vocab-size=300"])
    assert "tok_train: error: No train shard in " in capsys.readouterr().err
    assert not (tmp_path / "tokenizer").exists()


def test_tok_eval_texts_have_the_reference_names_in_order(base_env):
    # the report's row names are the reference's (9822cc7): its split samples are fwe-train / fwe-val
    names = [name for name, _ in tok_eval.eval_texts()]
    assert names == ["news", "korean", "code", "math", "science", "fwe-train", "fwe-val"]


def test_tok_eval_offline_and_with_one_baseline(base_env, monkeypatch, capsys):
    ours = get_tokenizer()

    def fake_from_pretrained(name):
        if name == "gpt2":
            raise ConnectionError("no network")  # what tiktoken raises offline
        return ours  # stands in for an available cl100k_base

    monkeypatch.setattr(RustBPETokenizer, "from_pretrained", staticmethod(fake_from_pretrained))
    tok_eval.main()
    out = capsys.readouterr().out
    assert "cannot load the GPT-2 encoding" in out
    assert "Comparison with GPT-4" in out and "Comparison with GPT-2" not in out
    assert "fwe-train" in out and "fwe-val" in out
    section = (base_env / "report" / "tokenizer-evaluation.md").read_text()
    assert "### Comparison with GPT-4" in section and "| news |" in section
    assert "+0.0%" in section  # the stand-in is our own tokenizer: no difference


def test_tok_eval_with_no_baseline_still_reports(base_env, monkeypatch, capsys):
    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(RustBPETokenizer, "from_pretrained", staticmethod(offline))
    tok_eval.main()
    section = (base_env / "report" / "tokenizer-evaluation.md").read_text()
    assert "No baseline encodings could be loaded" in section and "fwe-val" in section


def test_tok_eval_without_pretraining_data_compares_the_committed_samples_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "no_data"))
    names = [name for name, _ in tok_eval.eval_texts()]
    out = capsys.readouterr().out
    assert "Skipping the train sample: " in out and "Skipping the val sample: " in out
    assert names and not any(name.startswith("fwe") for name in names)
