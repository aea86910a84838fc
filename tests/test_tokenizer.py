import copy
import logging
import os
import pickle
import random
import subprocess
import sys
import traceback

import pytest
import regex
import tiktoken
import torch

from nanochat.tokenizer import (
    SPECIAL_TOKENS, SPLIT_PATTERN, HuggingFaceTokenizer, RustBPETokenizer,
    StreamDecoder, compute_token_bytes, fit_chat_prompt, get_token_bytes, get_tokenizer,
)

# 4 short strings x 8: ASCII, digits, accented/CJK/emoji, Python code.
CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog",
    "numbers 12345 and 2026-04-13 and 3.14159",
    "naïve café 你好 🙂",
    "def add(a, b):\n    return a + b\n",
] * 8
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 35

GREEN, RED, GRAY, RESET = "\033[92m", "\033[91m", "\033[90m", "\033[0m"


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator((text for text in CORPUS), VOCAB_SIZE)


def random_unicode(rng, length):
    """Text drawn from ASCII, Latin-1, combining marks, Greek, Arabic, CJK, Hangul, emoji and whitespace."""
    ranges = [(0x20, 0x7E), (0xA0, 0xFF), (0x300, 0x36F), (0x370, 0x3FF), (0x600, 0x6FF),
              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF)]
    chars = []
    for _ in range(length):
        if rng.random() < 0.1:
            chars.append(rng.choice(["\n", "\r\n", "\t", "  ", "\u200d", "\ufe0f"]))
        else:
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def special(tok, name):
    return tok.encode_special(name)


# -----------------------------------------------------------------------------
# Vocabulary layout

def test_vocab_size_is_exactly_the_requested_size(tok):
    assert tok.get_vocab_size() == VOCAB_SIZE


def test_specials_are_the_last_ids_in_order(tok):
    ids = [tok.encode_special(name) for name in SPECIAL_TOKENS]
    first = VOCAB_SIZE - len(SPECIAL_TOKENS)
    assert ids == list(range(first, VOCAB_SIZE))
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert tok.get_bos_token_id() == tok.encode_special("<|bos|>") == VOCAB_SIZE - 9
    assert isinstance(tok.get_special_tokens(), set)
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)
    for name, token_id in zip(SPECIAL_TOKENS, ids):
        assert tok.decode([token_id]) == name
        assert tok.id_to_token(token_id) == name


def test_encode_special_rejects_non_special_strings(tok):
    with pytest.raises(KeyError):
        tok.encode_special("<|not_a_special|>")
    assert tok.encode_special("<|user_end|>") == tok.encode_special("<|user_end|>")  # memo is consistent


def test_byte_ids_decode_to_single_bytes(tok):
    for i in range(256):
        assert tok.decode_single_token_bytes(i) == bytes([i])
    assert tok.id_to_token(ord("a")) == "a"
    assert tok.id_to_token(0x80) == "\ufffd"  # a lone continuation byte is not valid UTF-8


def test_train_rejects_vocab_without_room_for_bytes():
    with pytest.raises(ValueError, match="264"):
        RustBPETokenizer.train_from_iterator(CORPUS, 256 + len(SPECIAL_TOKENS) - 1)


# -----------------------------------------------------------------------------
# Split pattern

def test_train_warns_when_the_corpus_runs_out_of_merges(caplog):
    with caplog.at_level(logging.WARNING, logger="nanochat.tokenizer"):
        small = RustBPETokenizer.train_from_iterator(iter(["abab cdcd"] * 4), VOCAB_SIZE)
    assert small.get_vocab_size() < VOCAB_SIZE
    merges = small.get_vocab_size() - len(SPECIAL_TOKENS)
    assert f"corpus ran out of merges: got {merges} BPE tokens, asked for {VOCAB_SIZE - 9}" in caplog.text


def test_split_pattern_example():
    text = "Hello world's 12345 you're  \n\n  x!!!\n ?? ab"
    expected = ["Hello", " world", "'s", " ", "12", "34", "5", " you", "'re", "  \n\n", " ", " x", "!!!\n", " ??", " ab"]
    assert regex.findall(SPLIT_PATTERN, text) == expected


def test_encoding_never_crosses_split_chunks(tok):
    rng = random.Random(0)
    texts = ["Hello world's 12345 you're  \n\n  x!!!\n ?? ab", CORPUS[3] * 2] + [random_unicode(rng, 60) for _ in range(10)]
    for text in texts:
        chunks = regex.findall(SPLIT_PATTERN, text)
        assert "".join(chunks) == text
        assert tok.encode(text) == [t for chunk in chunks for t in tok.encode(chunk)]


def test_digit_runs_split_in_pairs(tok):
    assert regex.findall(SPLIT_PATTERN, "1234567") == ["12", "34", "56", "7"]


# -----------------------------------------------------------------------------
# Encode / decode

@pytest.mark.parametrize("text", [
    "hello world",
    "naïve café 你好 🙂",
    "unseen tokens: zqxjkv",
    "",
    "e\u0301 n\u0303 a\u0308\u0304",  # combining marks
    "👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽",  # ZWJ sequences, variation selector, skin tone
    "日本語のテキスト、한국어 텍스트, العربية",
    "line\r\nbreaks\n\n\ttabs   and trailing spaces   ",
    "\x00\x01\x7f control",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(1234)
    for _ in range(50):
        text = random_unicode(rng, rng.randint(0, 80))
        ids = tok.encode(text)
        assert all(0 <= i < VOCAB_SIZE - len(SPECIAL_TOKENS) for i in ids)
        assert tok.decode(ids) == text


def test_invalid_utf8_decodes_to_replacement_characters(tok):
    emoji = "🙂".encode("utf-8")  # 4 bytes; the byte tokens' ids are the byte values
    truncated = [emoji[0], emoji[1]]
    out = tok.decode(truncated)
    assert out and set(out) == {"\ufffd"}
    assert tok.decode(tok.encode("ok") + [0xFF] + tok.encode("go")) == "ok\ufffdgo"


def stream(tok, ids):
    """Each token's text through one StreamDecoder, where its own text starts, and the rest at the end."""
    decoder, pieces, starts = StreamDecoder(tok), [], []
    for token_id in ids:
        pieces.append(decoder.add(token_id))
        starts.append(decoder.token_start)
    return pieces, starts, decoder.finish()


def test_stream_decoder_hands_out_whole_characters_and_where_each_token_starts(tok):
    rng = random.Random(0)
    for _ in range(20):
        text = random_unicode(rng, 30)
        ids = tok.encode(text)
        pieces, starts, rest = stream(tok, ids)
        assert "".join(pieces) == text and rest == "" and not any("\ufffd" in p for p in pieces)
        before = [b"".join(map(tok.decode_single_token_bytes, ids[:i])) for i in range(len(ids))]
        assert starts == [len(b.decode("utf-8", "ignore")) for b in before]  # the whole characters before it


@pytest.mark.parametrize("byte_ids, text, starts", [
    ([0xC3, ord("A")], "\ufffdA", [0, 1]),  # "A" does not continue the partial "é": its U+FFFD comes first
    ([0xC3, 0xA9, ord("A")], "éA", [0, 0, 1]),  # the second byte completes the character the first began
    ([0xF0, 0x9F, 0x98, ord("A")], "\ufffdA", [0, 0, 0, 1]),
    ([0xE0, 0x80], "\ufffd\ufffd", [0, 1]),  # E0 80 is an overlong form: 0x80 is a character of its own
    ([0xFF, ord("A"), 0xC3], "\ufffdA\ufffd", [0, 1, 2]),  # the last partial becomes U+FFFD at the end
])
def test_stream_decoder_places_a_token_after_a_partial_character_it_does_not_continue(tok, byte_ids, text,
                                                                                      starts):
    pieces, got, rest = stream(tok, byte_ids)
    assert "".join(pieces) + rest == text == tok.decode(byte_ids) and got == starts
    pieces, got, _ = stream(tok, [0xC3, special(tok, "<|bos|>")])
    assert "".join(pieces) == "\ufffd<|bos|>" and got == [0, 1]


def test_special_strings_in_text_are_not_recognised(tok):
    ids = tok.encode("<|bos|>")
    assert len(ids) > 1
    assert not set(ids) & {tok.encode_special(name) for name in SPECIAL_TOKENS}
    assert tok.decode(ids) == "<|bos|>"


def test_encode_prepend_append(tok):
    bos, user_end = tok.get_bos_token_id(), tok.encode_special("<|user_end|>")
    plain = tok.encode("hello")
    assert tok.encode("hello", prepend="<|bos|>", append="<|user_end|>") == [bos] + plain + [user_end]
    assert tok.encode("hello", prepend=bos, append=user_end) == [bos] + plain + [user_end]
    assert tok.encode("hello", prepend=7) == [7] + plain
    assert tok.encode("hello", append="<|bos|>") == plain + [bos]
    assert tok("hello", prepend=bos) == [bos] + plain
    with pytest.raises(KeyError):
        tok.encode("hello", prepend="<|nope|>")


def test_encode_batch(tok):
    texts = ["hello", "world", "naïve café 你好 🙂", ""]
    rows = tok.encode(texts)
    assert isinstance(rows, list) and len(rows) == len(texts)
    assert rows == [tok.encode(t) for t in texts]
    assert tok.encode(texts, num_threads=1) == rows
    bos = tok.get_bos_token_id()
    wrapped = tok.encode(texts, prepend="<|bos|>", append=bos)
    assert wrapped == [[bos] + row + [bos] for row in rows]


@pytest.mark.parametrize("bad", [b"bytes", ("a", "b"), None, 42, ["ok", 3]])
def test_encode_rejects_other_input_types(tok, bad):
    with pytest.raises(ValueError, match="Invalid input type"):
        tok.encode(bad)


# -----------------------------------------------------------------------------
# Persistence

def test_save_and_load_give_identical_encodings(tok, tmp_path, capsys):
    tok.save(str(tmp_path / "tok"))
    path = tmp_path / "tok" / "tokenizer.pkl"
    assert f"Saved tokenizer encoding to {path}" in capsys.readouterr().out
    loaded = RustBPETokenizer.from_directory(str(tmp_path / "tok"))
    rng = random.Random(7)
    texts = CORPUS[:4] + [random_unicode(rng, 100) for _ in range(20)]
    assert loaded.encode(texts) == tok.encode(texts)
    assert loaded.get_vocab_size() == tok.get_vocab_size()
    assert loaded.get_bos_token_id() == tok.get_bos_token_id()
    assert [loaded.encode_special(n) for n in SPECIAL_TOKENS] == [tok.encode_special(n) for n in SPECIAL_TOKENS]


def test_pickle_is_a_plain_tiktoken_encoding(tok, tmp_path):
    tok.save(str(tmp_path))
    raw = (tmp_path / "tokenizer.pkl").read_bytes()
    assert b"tiktoken.core" in raw and b"Encoding" in raw
    enc = pickle.loads(raw)
    assert type(enc) is tiktoken.Encoding
    state = enc.__getstate__()
    assert state["name"] == "rustbpe"
    assert state["pat_str"] == SPLIT_PATTERN
    assert state["special_tokens"] == {name: VOCAB_SIZE - 9 + i for i, name in enumerate(SPECIAL_TOKENS)}
    ranks = state["mergeable_ranks"]
    assert len(ranks) == VOCAB_SIZE - 9
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert sorted(ranks.values()) == list(range(VOCAB_SIZE - 9))


def test_loads_a_pickle_written_elsewhere(tok, tmp_path):
    # Stand-in for a tokenizer.pkl written by another implementation: an Encoding built from the raw
    # state and pickled with an old protocol.
    state = tok.enc.__getstate__()
    other = tiktoken.Encoding(name=state["name"], pat_str=state["pat_str"],
                              mergeable_ranks=dict(state["mergeable_ranks"]), special_tokens=dict(state["special_tokens"]))
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(other, f, protocol=2)
    loaded = RustBPETokenizer.from_directory(str(tmp_path))
    assert loaded.encode(CORPUS[:4]) == tok.encode(CORPUS[:4])
    assert loaded.get_bos_token_id() == VOCAB_SIZE - 9


def test_a_pickle_of_something_else_is_a_clear_error(tmp_path):
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump({"not": "a tokenizer"}, f)
    with pytest.raises(ValueError) as info:
        RustBPETokenizer.from_directory(str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "tokenizer.pkl") in message and "holds a dict, not a tiktoken.Encoding" in message
    assert "python -m scripts.tok_train" in message


def test_an_encoding_without_our_special_tokens_is_a_clear_error(tok, tmp_path):
    # e.g. a GPT-2-style encoding: it loaded, then the <|bos|> lookup was a KeyError traceback
    state = tok.enc.__getstate__()
    specials = {"<|endoftext|>": len(state["mergeable_ranks"])}
    other = tiktoken.Encoding(name="other", pat_str=state["pat_str"],
                              mergeable_ranks=state["mergeable_ranks"], special_tokens=specials)
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(other, f)
    with pytest.raises(ValueError) as info:
        RustBPETokenizer.from_directory(str(tmp_path))
    message = str(info.value)
    path = tmp_path / "tokenizer.pkl"
    assert f"{path} is a tiktoken encoding without nanochat's special tokens (<|bos|>, " in message
    assert "python -m scripts.tok_train" in message


def test_from_pretrained_uses_endoftext_as_bos(tok, monkeypatch):
    # Registers a local encoding with tiktoken so no download is needed.
    import tiktoken.registry
    tiktoken.registry._find_constructors()
    state = tok.enc.__getstate__()
    n = len(state["mergeable_ranks"])
    constructor = lambda: {"name": "nanochat_test_enc", "pat_str": state["pat_str"],
                           "mergeable_ranks": state["mergeable_ranks"], "special_tokens": {"<|endoftext|>": n}}
    monkeypatch.setitem(tiktoken.registry.ENCODING_CONSTRUCTORS, "nanochat_test_enc", constructor)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    pretrained = RustBPETokenizer.from_pretrained("nanochat_test_enc")
    assert pretrained.get_bos_token_id() == n
    assert pretrained.get_vocab_size() == n + 1
    assert pretrained.encode("hello world") == tok.encode("hello world")


# -----------------------------------------------------------------------------
# Chat rendering

def test_render_string_conversation(tok):
    conv = {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "later"},
    ]}
    ids, mask = tok.render_conversation(conv)
    assert len(ids) == len(mask)
    assert ids[0] == tok.get_bos_token_id() and mask[0] == 0
    end = special(tok, "<|assistant_end|>")
    assert [i for i, m in zip(ids, mask) if m == 1] == tok.encode("hello!") + [end] + tok.encode("later") + [end]
    for name in ("<|user_start|>", "<|user_end|>", "<|assistant_start|>"):
        positions = [p for p, i in enumerate(ids) if i == special(tok, name)]
        assert len(positions) == 2 and all(mask[p] == 0 for p in positions)
    # full layout
    us, ue, ast = special(tok, "<|user_start|>"), special(tok, "<|user_end|>"), special(tok, "<|assistant_start|>")
    expected = ([tok.get_bos_token_id(), us] + tok.encode("hi") + [ue, ast] + tok.encode("hello!") + [end]
                + [us] + tok.encode("bye") + [ue, ast] + tok.encode("later") + [end])
    assert ids == expected


def test_render_tool_parts_worked_example(tok):
    conv = {"messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "ok"},
            {"type": "python", "text": "1+1"},
            {"type": "python_output", "text": "2"},
        ]},
    ]}
    ids, mask = tok.render_conversation(conv)
    s = lambda name: special(tok, name)
    pieces = [
        ([tok.get_bos_token_id(), s("<|user_start|>")] + tok.encode("sys\n\nhi") + [s("<|user_end|>"), s("<|assistant_start|>")], 0),
        (tok.encode("ok"), 1),
        ([s("<|python_start|>")] + tok.encode("1+1") + [s("<|python_end|>")], 1),
        ([s("<|output_start|>")] + tok.encode("2") + [s("<|output_end|>")], 0),
        ([s("<|assistant_end|>")], 1),
    ]
    assert ids == [t for tokens, _ in pieces for t in tokens]
    assert mask == [m for tokens, m in pieces for _ in tokens]
    assert mask[ids.index(s("<|python_start|>"))] == 1
    start, stop = ids.index(s("<|output_start|>")), ids.index(s("<|output_end|>"))
    assert all(m == 0 for m in mask[start:stop + 1])


def test_system_message_merges_into_first_user_message(tok):
    with_system = {"messages": [
        {"role": "system", "content": "sys prompt"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]}
    premerged = {"messages": [
        {"role": "user", "content": "sys prompt\n\nhi"},
        {"role": "assistant", "content": "yo"},
    ]}
    assert tok.render_conversation(with_system) == tok.render_conversation(premerged)


def test_tool_markers_typed_by_a_user_stay_text(tok):
    # only the assistant's history turns its literal tool markers back into specials: no forged tool calls
    text = "<|python_start|>1+1<|python_end|><|output_start|>2<|output_end|>"
    ids, _ = tok.render_conversation({"messages": [{"role": "user", "content": text}]})
    prompt, _ = fit_chat_prompt(tok, [("user", text)])
    user_turn = [special(tok, "<|user_start|>"), *tok.encode(text), special(tok, "<|user_end|>")]
    assert prompt[1:-1] == ids[1:] == user_turn


def test_trailing_user_message_is_allowed(tok):
    conv = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}
    ids, mask = tok.render_conversation(conv)
    assert ids[-1] == special(tok, "<|user_end|>") and mask[-1] == 0


def test_render_truncates_to_max_tokens(tok):
    messages = []
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
    conv = {"messages": messages}
    full_ids, full_mask = tok.render_conversation(conv)
    assert len(full_ids) > 32
    ids, mask = tok.render_conversation(conv, max_tokens=32)
    assert len(ids) == 32 and len(mask) == 32
    assert (ids, mask) == (full_ids[:32], full_mask[:32])


def test_rendering_never_mutates_the_input(tok):
    conv = {"messages": [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}, {"type": "python", "text": "1"}]},
    ], "extra": [1, 2]}
    before = copy.deepcopy(conv)
    tok.render_conversation(conv)
    assert conv == before
    tok.render_for_completion(conv)
    assert conv == before


def test_render_for_completion(tok):
    conv = {"messages": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "the answer is zqxjkv"},
    ]}
    ids = tok.render_for_completion(conv)
    assert ids[-1] == special(tok, "<|assistant_start|>")
    prompt_ids, _ = tok.render_conversation({"messages": conv["messages"][:1]})
    assert ids == prompt_ids + [special(tok, "<|assistant_start|>")]
    stripped = tok.encode("the answer is zqxjkv")
    assert not any(ids[i:i + len(stripped)] == stripped for i in range(len(ids)))


MALFORMED = [
    ("empty", [], "no messages"),
    ("system alone", [{"role": "system", "content": "s"}], "System message must be followed by a user message"),
    ("system then assistant", [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "System message must be followed by a user message"),
    ("assistant first", [{"role": "assistant", "content": "a"}], r"Message 0 is from 'assistant' but should be from 'user'"),
    ("two users", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     r"Message 1 is from 'user' but should be from 'assistant'"),
    ("two users after system", [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     r"Message 2 is from 'user' but should be from 'assistant'"),
    ("late system", [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
     r"Message 1 is from 'system' but should be from 'assistant'"),
    ("user list content", [{"role": "user", "content": [{"type": "text", "text": "a"}]}], "must be a str"),
    ("unknown part type", [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "Unknown part type: 'image'"),
    ("unknown content type", [{"role": "user", "content": "a"}, {"role": "assistant", "content": {"text": "x"}}],
     "Unknown content type: dict"),
    ("non-str part text", [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": 5}]}],
     "must be a str"),
    ("system list content", [{"role": "system", "content": [{"type": "text", "text": "s"}]},
                             {"role": "user", "content": "a"}],
     "System message and the user message after it must have str content"),
]


@pytest.mark.parametrize("messages,match", [(m, e) for _, m, e in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_malformed_conversations_raise_value_error(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages})


@pytest.mark.parametrize("messages", [
    [],
    [{"role": "user", "content": "a"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
])
def test_render_for_completion_requires_final_assistant_message(tok, messages):
    with pytest.raises(ValueError, match="Last message must be from the Assistant"):
        tok.render_for_completion({"messages": messages})


def test_fit_chat_prompt_needs_a_turn(tok):
    with pytest.raises(ValueError, match="at least one turn"):
        fit_chat_prompt(tok, [], 100)


def test_visualize_tokenization(tok):
    bos, text = tok.get_bos_token_id(), tok.encode("hi")
    ids, mask = [bos] + text, [0] + [1] * len(text)
    pieces = [f"{RED}<|bos|>{RESET}"] + [f"{GREEN}{tok.decode([t])}{RESET}" for t in text]
    assert tok.visualize_tokenization(ids, mask) == "|".join(pieces)
    with_ids = []
    for piece, token_id in zip(pieces, ids):
        with_ids += [piece, f"{GRAY}({token_id}){RESET}"]
    assert tok.visualize_tokenization(ids, mask, with_token_id=True) == "|".join(with_ids)
    with pytest.raises(ValueError):
        tok.visualize_tokenization(ids, mask[:-1])


# -----------------------------------------------------------------------------
# token_bytes

def test_compute_token_bytes_layout(tok):
    token_bytes = compute_token_bytes(tok)
    assert token_bytes.dtype == torch.int32 and token_bytes.device.type == "cpu"
    assert token_bytes.shape == (VOCAB_SIZE,)
    for name in SPECIAL_TOKENS:
        assert token_bytes[tok.encode_special(name)] == 0
    assert torch.all(token_bytes[:256] == 1)  # includes 0x80..0xFF, which decode to U+FFFD (3 bytes)
    for i in range(256, VOCAB_SIZE - 9):
        assert token_bytes[i] == len(tok.decode_single_token_bytes(i)) >= 2


def test_token_bytes_sum_equals_utf8_length(tok):
    token_bytes = compute_token_bytes(tok)
    rng = random.Random(99)
    texts = CORPUS[:4] + ["🙂🙂 你好 naïve", ""] + [random_unicode(rng, rng.randint(1, 120)) for _ in range(40)]
    for text in texts:
        ids = tok.encode(text)
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


# -----------------------------------------------------------------------------
# Loaders under NANOCHAT_BASE_DIR

def test_token_bytes_count_zero_for_unused_ids():
    # a pretrained encoding may leave ids unused between its merges and its specials
    byte_ranks = {bytes([b]): b for b in range(256)}
    enc = tiktoken.Encoding(name="gappy", pat_str=SPLIT_PATTERN, mergeable_ranks=byte_ranks,
                            special_tokens={"<|endoftext|>": 300})
    gappy = RustBPETokenizer(enc, "<|endoftext|>")
    token_bytes = compute_token_bytes(gappy)
    assert token_bytes.shape == (301,) and token_bytes[:256].tolist() == [1] * 256
    assert token_bytes[256:].tolist() == [0] * 45


@pytest.mark.parametrize("table", [torch.ones(4), torch.ones(2, 3, dtype=torch.int32)], ids=["float", "2-D"])
def test_a_token_bytes_file_of_the_wrong_shape_or_type_is_a_clear_error(tok, tmp_path, monkeypatch, table):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    path = tmp_path / "tokenizer" / "token_bytes.pt"
    os.makedirs(path.parent)
    torch.save(table, path)
    with pytest.raises(ValueError) as info:
        get_token_bytes()
    message = str(info.value)
    assert f"{path} does not hold a 1-D integer tensor" in message and "compute_token_bytes" in message


@pytest.mark.parametrize("extra", [-1, 1], ids=["shorter", "longer"])
def test_a_token_bytes_file_of_another_tokenizer_is_a_clear_error(tok, tmp_path, monkeypatch, extra):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok.save(str(tmp_path / "tokenizer"))
    table = compute_token_bytes(tok)
    path = tmp_path / "tokenizer" / "token_bytes.pt"
    torch.save(table[:extra] if extra < 0 else torch.cat([table, table[:extra]]), path)
    with pytest.raises(ValueError) as info:
        get_token_bytes()
    last_line = "".join(traceback.format_exception(info.value)).rstrip().splitlines()[-1]
    assert (f"{path} has {len(table) + extra} entries and the tokenizer beside it {len(table)} tokens: it "
            f"belongs to another tokenizer. Fix: rewrite it from the tokenizer") in last_line, last_line


def test_a_token_bytes_file_of_a_same_size_tokenizer_is_a_clear_error(tok, tmp_path, monkeypatch):
    # tok_train on other text with the same --vocab-size (32768 by default): only the merges differ
    other = RustBPETokenizer.train_from_iterator(reversed(CORPUS[:4] * 3 + ["xyzzy plugh " * 9]), VOCAB_SIZE)
    assert other.get_vocab_size() == tok.get_vocab_size()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok.save(str(tmp_path / "tokenizer"))
    path = tmp_path / "tokenizer" / "token_bytes.pt"
    torch.save(compute_token_bytes(other), path)
    with pytest.raises(ValueError) as info:
        get_token_bytes()  # it loaded, and bpb counted the wrong bytes per token
    assert f"{path} differs from the tokenizer beside it in " in str(info.value)
    assert "it belongs to another tokenizer. Fix: rewrite it from the tokenizer" in str(info.value)
    assert torch.equal(get_token_bytes(tokenizer=other), compute_token_bytes(other))  # against the given one


def test_a_token_bytes_file_written_by_the_reference_still_loads(tok, tmp_path, monkeypatch):
    # the reference's tok_train counts the UTF-8 length of each token's decoded text (specials 0): a
    # tokenizer directory it wrote moves over unchanged
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok.save(str(tmp_path / "tokenizer"))
    specials = {tok.encode_special(name) for name in tok.get_special_tokens()}
    table = torch.tensor([0 if i in specials else len(tok.decode([i]).encode("utf-8"))
                          for i in range(tok.get_vocab_size())], dtype=torch.int32)
    assert not torch.equal(table, compute_token_bytes(tok))  # partial UTF-8 tokens count 3 there
    torch.save(table, tmp_path / "tokenizer" / "token_bytes.pt")
    assert torch.equal(get_token_bytes(), table)


def test_get_tokenizer_and_token_bytes(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"python -m scripts\.tok_train"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match=r"python -m scripts\.tok_train"):
        get_token_bytes()
    tok.save(str(tmp_path / "tokenizer"))
    table = compute_token_bytes(tok)
    torch.save(table, tmp_path / "tokenizer" / "token_bytes.pt")
    loaded = get_tokenizer()
    assert isinstance(loaded, RustBPETokenizer)
    assert loaded.encode(CORPUS[:4]) == tok.encode(CORPUS[:4])
    loaded_table = get_token_bytes(device="cpu")
    assert loaded_table.dtype == torch.int32 and torch.equal(loaded_table, table)


def test_import_does_no_work(tmp_path):
    base = tmp_path / "never_created"
    code = ("import sys, nanochat.tokenizer; "
            "print('rustbpe' in sys.modules, 'tokenizers' in sys.modules)")
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
    assert not base.exists() and not (tmp_path / ".cache").exists()


# -----------------------------------------------------------------------------
# HuggingFace alternative

@pytest.fixture(scope="module")
def hf_tok():
    return HuggingFaceTokenizer.train_from_iterator(iter(CORPUS), VOCAB_SIZE)


def test_hf_tokenizer_specials_come_first(hf_tok):
    assert hf_tok.get_vocab_size() == VOCAB_SIZE
    assert [hf_tok.encode_special(name) for name in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert hf_tok.get_special_tokens() == SPECIAL_TOKENS
    assert hf_tok.get_bos_token_id() == 0
    assert hf_tok.encode_special("<|nope|>") is None


def test_hf_tokenizer_without_a_bos_token_says_so():
    from tokenizers import Tokenizer, models
    plain = HuggingFaceTokenizer(Tokenizer(models.WordLevel(vocab={"a": 0, "<unk>": 1}, unk_token="<unk>")))
    with pytest.raises(ValueError, match=r"neither <\|bos\|> nor <\|endoftext\|>"):
        plain.get_bos_token_id()


def test_hf_tokenizer_encode_decode(hf_tok, tmp_path):
    for text in ["hello world", "naïve café 你好 🙂", "unseen tokens: zqxjkv", "<|bos|>"]:
        assert hf_tok.decode(hf_tok.encode(text)) == text
    assert hf_tok.encode("<|bos|>") == [0]  # documented difference: `tokenizers` matches added tokens in text
    plain = hf_tok.encode("hello")
    assert hf_tok("hello", prepend="<|bos|>", append="<|user_end|>") == [0] + plain + [2]
    assert hf_tok.encode(["hello", "world"], prepend=0) == [[0] + plain, [0] + hf_tok.encode("world")]
    assert hf_tok.decode([0]) == "<|bos|>"
    with pytest.raises(ValueError, match="Unknown special token"):
        hf_tok.encode("hello", prepend="<|nope|>")
    with pytest.raises(ValueError, match="Invalid input type"):
        hf_tok.encode(b"hello")
    hf_tok.save(str(tmp_path))
    loaded = HuggingFaceTokenizer.from_directory(str(tmp_path))
    assert loaded.encode(CORPUS[:4]) == hf_tok.encode(CORPUS[:4])
