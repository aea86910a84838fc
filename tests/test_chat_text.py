"""
nanochat/chat_text.py: a conversation's prompts (layout, history, forgetting, the system prompt) with a
scripted model behind the real Engine, a reply streamed as whole characters, and ReplyText's stop strings.
"""

from types import SimpleNamespace

import pytest
import torch

from nanochat.chat_text import Conversation, ReplyText, stream_reply
from nanochat.engine import Engine

from conftest import chat_prompt


@pytest.fixture
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


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


def converse(model, tokenizer, messages, max_tokens, system=""):
    """Each message answered in turn through one Conversation and stream_reply (greedy): returns the
    conversation, each reply's text as handed over, and how many exchanges each prompt forgot."""
    engine = Engine(model, tokenizer)
    conversation = Conversation(tokenizer, model.config.sequence_len, max_tokens, system)
    texts, forgotten = [], []
    for message in messages:
        prompt, num_forgotten = conversation.prompt(message)
        pieces = []
        reply = stream_reply(engine, prompt, pieces.append, max_tokens=max_tokens, temperature=0.0)
        conversation.add(message, reply)
        texts.append("".join(pieces))
        forgotten.append(num_forgotten)
    return conversation, texts, forgotten


def test_each_prompt_holds_the_earlier_exchanges_as_the_models_tokens(tokenizer):
    ok = tokenizer.encode("ok")
    end = tokenizer.encode_special("<|assistant_end|>")
    model = ScriptedModel(tokenizer, ok)
    conversation, texts, forgotten = converse(model, tokenizer, ["Hello", "how are you"], max_tokens=256)
    assert model.prompts == [chat_prompt(tokenizer, "Hello"), chat_prompt(tokenizer, "Hello", ok, "how are you")]
    assert texts == ["ok", "ok"] and forgotten == [0, 0]
    assert conversation.exchanges == [("Hello", ok + [end]), ("how are you", ok + [end])]


def test_reply_cut_by_max_tokens_is_closed_with_assistant_end(tokenizer):
    z = tokenizer.encode("z")
    model = ScriptedModel(tokenizer, z, endless=True)
    converse(model, tokenizer, ["a", "b"], max_tokens=3)
    assert model.prompts[1] == chat_prompt(tokenizer, "a", z * 3, "b")


def test_old_exchanges_are_forgotten_when_the_context_is_full(tokenizer):
    ok = tokenizer.encode("ok")
    # room for two turns and a 4-token reply, not for three
    two_turns = [chat_prompt(tokenizer, "one", ok, "two"), chat_prompt(tokenizer, "two", ok, "three")]
    context_len = max(map(len, two_turns)) + 4
    assert len(chat_prompt(tokenizer, "one", ok, "two", ok, "three")) + 4 > context_len
    model = ScriptedModel(tokenizer, ok, sequence_len=context_len)
    conversation, _, forgotten = converse(model, tokenizer, ["one", "two", "three"], max_tokens=4)
    assert model.prompts == [chat_prompt(tokenizer, "one"), chat_prompt(tokenizer, "one", ok, "two"),
                             chat_prompt(tokenizer, "two", ok, "three")]
    assert forgotten == [0, 0, 1] and [text for text, _ in conversation.exchanges] == ["two", "three"]


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
    chat = Conversation(tokenizer, 4096, 256, system="Be brief.")
    chat.add("Hello there", tokenizer.encode("Hi!") + [end])
    assert chat.prompt("How are you?") == (expected, 0)


def test_streaming_hands_over_multibyte_characters_whole(tokenizer):
    reply = tokenizer.encode("café 😀!")
    assert len(reply) > len("café 😀!")  # the emoji is split over several byte tokens
    model = ScriptedModel(tokenizer, reply)
    pieces = []
    tokens = stream_reply(Engine(model, tokenizer), [tokenizer.get_bos_token_id()] * 2, pieces.append,
                          max_tokens=64, temperature=0.0)
    assert "".join(pieces) == "café 😀!" and not any("\ufffd" in piece for piece in pieces)
    assert tokens == reply + [tokenizer.encode_special("<|assistant_end|>")]


def test_a_reply_ends_at_bos_too_and_an_unfinished_last_character_is_shown_as_such(tokenizer):
    ok, end = tokenizer.encode("ok"), tokenizer.encode_special("<|assistant_end|>")
    model = ScriptedModel(tokenizer, ok + [tokenizer.get_bos_token_id()] + tokenizer.encode("zz"))
    _, texts, _ = converse(model, tokenizer, ["hi"], max_tokens=16)
    assert texts == ["ok"]  # a new document is not part of the reply
    first_byte = tokenizer.encode("😀")[:1]
    model = ScriptedModel(tokenizer, first_byte)
    conversation, texts, _ = converse(model, tokenizer, ["hi"], max_tokens=16)
    assert texts == ["\ufffd"] and conversation.exchanges == [("hi", first_byte + [end])]


def test_a_message_longer_than_the_context_keeps_its_end_and_half_the_context_for_the_reply(tokenizer):
    # the server's policy: the prompt gets at least half the context, the message loses its beginning
    ok = tokenizer.encode("ok")
    context_len = 48
    message = " ".join(["The quick brown fox jumps over the lazy dog."] * 4)
    assert len(chat_prompt(tokenizer, message)) > context_len
    model = ScriptedModel(tokenizer, ok, sequence_len=context_len)
    _, texts, _ = converse(model, tokenizer, [message], max_tokens=40)
    [prompt] = model.prompts
    full = chat_prompt(tokenizer, message)
    assert len(prompt) == context_len // 2 and prompt[0] == tokenizer.get_bos_token_id()
    assert prompt[1] == tokenizer.encode_special("<|user_start|>")  # the turn still opens as in training
    assert prompt[2:] == full[len(full) - len(prompt) + 2:]  # the end of the message, then the reply opens
    assert texts == ["ok"]


def test_a_system_prompt_stays_with_the_first_exchange_kept(tokenizer):
    ok = tokenizer.encode("ok")
    end = tokenizer.encode_special("<|assistant_end|>")
    full = chat_prompt(tokenizer, "Be brief.\n\none", ok, "two", ok, "three")
    kept = chat_prompt(tokenizer, "Be brief.\n\ntwo", ok, "three")
    # max_tokens 1: the prompt may take all of the context but one token
    for context_len, expected in ((len(full) + 1, (full, 0)), (len(kept) + 1, (kept, 1))):
        conversation = Conversation(tokenizer, context_len, 1, system="Be brief.")
        conversation.add("one", ok + [end])
        conversation.add("two", ok + [end])
        assert conversation.prompt("three") == expected


# -----------------------------------------------------------------------------
# ReplyText: the decoder of the server and the CLI

def test_reply_text_releases_whole_characters_and_cuts_stop_strings(tokenizer):
    text = "Un café 😀 naïve, s'il vous plaît. 你好"
    ids = tokenizer.encode(text)
    splits = [i for i in ids if not _decodes_alone(tokenizer, i)]
    assert splits, "the test needs characters split over several tokens"

    decoder = ReplyText(tokenizer)
    deltas = [decoder.add(i) for i in ids] + [decoder.finish()]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)

    decoder = ReplyText(tokenizer, stops=["😀 na", "zzz"])
    released = "".join(decoder.add(i) for i in ids) + decoder.finish()
    assert decoder.stopped and released == decoder.text == "Un café "

    decoder = ReplyText(tokenizer, stops=["plaît!"])  # held back while it could still match
    released = "".join(decoder.add(i) for i in tokenizer.encode("s'il vous plaît"))
    assert released == "s'il vous " and decoder.finish() == "plaît" and not decoder.stopped

    decoder = ReplyText(tokenizer, stops=["bc", "abc"])  # both found at once: the text ends at the first
    released = "".join(decoder.add(i) for i in tokenizer.encode("xx abc d")) + decoder.finish()
    assert decoder.stopped and released == "xx "

    decoder = ReplyText(tokenizer)
    assert decoder.add(tokenizer.encode("😀")[0]) == "" and decoder.finish() == "\ufffd"


def _decodes_alone(tokenizer, token_id):
    try:
        tokenizer.decode_single_token_bytes(token_id).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
