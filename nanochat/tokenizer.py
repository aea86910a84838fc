"""
BPE tokenizer in the style of GPT-4, and the chat format built on top of it. Two implementations share
one interface:
- RustBPETokenizer (the default): trained with `rustbpe`, run with `tiktoken`, saved as a pickled
  `tiktoken.Encoding` (<dir>/tokenizer.pkl). The special tokens take the LAST len(SPECIAL_TOKENS) ids.
- HuggingFaceTokenizer: a `tokenizers.Tokenizer` (<dir>/tokenizer.json), reached only explicitly (e.g.
  `base_eval --hf-path`). When trained here its special tokens take the FIRST ids. No chat rendering.

Conversations become (ids, loss mask) pairs in RustBPETokenizer.render_conversation. Prompts for sampling
a reply share that layout: fit_chat_prompt fits a conversation to a token budget (CLI and server), and
StreamDecoder turns the reply's ids into text as it streams. Importing this module does no work: the base
dir is read only by get_tokenizer()/get_token_bytes(), `rustbpe` and `tokenizers` only where they are used.
"""

import codecs
import logging
import math
import os
import pickle
import re

import tiktoken
import torch

from nanochat.common import BadFileError, MissingFileError, atomic_open, get_base_dir, one_line_error

logger = logging.getLogger(__name__)

# a fixed string touching every split-pattern branch; the trained tokenizer must round-trip it (tok_train)
SANITY_TEXT = """Hello world! This is a test.
Numbers: 123, 4567, 89
Contractions: I'm, you're, it's
Special chars: @#$%^&*()
Unicode: 你好世界 🌍"""

# Order is contractual: RustBPETokenizer assigns ids in this order after the BPE merges.
SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document; also the document delimiter
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the Python tool
    "<|python_end|>",
    "<|output_start|>",  # tool output handed back to the assistant
    "<|output_end|>",
]

# The GPT-4 (cl100k_base) pre-tokenizer, except that digit runs split into groups of at most 2 (\p{N}{1,2}
# instead of {1,3}). dev/LOG.md 2026-01-13 (d12, 32K vocab): val bpb 0.969 with {1,1}, 0.965 with {1,2},
# 0.972 with {1,3}. Needs possessive quantifiers and Unicode classes (tiktoken, `regex`, Onig).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

_PICKLE_FIX = ("Fix: copy it again from where it came, or retrain it with `python -m scripts.tok_train` "
               "(checkpoints trained with another tokenizer need theirs)")
_TOKEN_BYTES_FIX = ("Fix: rewrite it from the tokenizer with `python -c \"import torch; "
                    "from nanochat.tokenizer import get_tokenizer, compute_token_bytes as c; "
                    "torch.save(c(get_tokenizer()), '{path}')\"`")


class _Tokenizer:
    """encode() as both tokenizers have it; each gives _encode_one(text) and _encode_batch(texts, threads)."""

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """
        A str gives list[int], a list of str gives list[list[int]]. prepend/append: a token id or a
        special-token name, put around each row.
        """
        head = [] if prepend is None else [self._special_or_id(prepend)]
        tail = [] if append is None else [self._special_or_id(append)]
        if isinstance(text, str):
            rows = [self._encode_one(text)]
        elif isinstance(text, list):
            bad = [type(t).__name__ for t in text if not isinstance(t, str)]
            if bad:
                raise ValueError(f"Invalid input type: list items must be str, got {bad[0]}")
            rows = self._encode_batch(text, num_threads)
        else:
            raise ValueError(f"Invalid input type: {type(text).__name__} (expected str or list[str])")
        rows = [head + list(row) + tail for row in rows]
        return rows[0] if isinstance(text, str) else rows

    __call__ = encode

    def _special_or_id(self, token):
        token_id = token if isinstance(token, int) else self.encode_special(token)
        if token_id is None:  # HuggingFaceTokenizer's answer for a name it lacks (RustBPE raises KeyError)
            raise ValueError(f"Unknown special token: {token!r}")
        return token_id


# -----------------------------------------------------------------------------
# The default tokenizer: rustbpe for training, tiktoken for inference

class RustBPETokenizer(_Tokenizer):
    """A tiktoken.Encoding (`.enc`) whose special tokens are SPECIAL_TOKENS, plus the chat format."""

    def __init__(self, enc, bos_token):
        self.enc = enc
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Train on an iterable of str. vocab_size counts the 256 byte tokens, the merges and the specials."""
        import rustbpe
        vocab_size_no_special = vocab_size - len(SPECIAL_TOKENS)
        if vocab_size_no_special < 256:
            raise ValueError(f"vocab_size={vocab_size} leaves no room for 256 byte tokens plus "
                             f"{len(SPECIAL_TOKENS)} specials ({vocab_size_no_special} without specials)")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(text_iterator), vocab_size_no_special, pattern=SPLIT_PATTERN)
        # rustbpe ranks: 0..255 are the single bytes (rank = byte value), then the merges in merge order.
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        if len(mergeable_ranks) < vocab_size_no_special:
            logger.warning(f"corpus ran out of merges: got {len(mergeable_ranks)} BPE tokens, "
                           f"asked for {vocab_size_no_special}")
        # Specials go after the merges, so with the default 32768 vocab <|bos|> is 32759.
        special_tokens = {name: i for i, name in enumerate(SPECIAL_TOKENS, start=len(mergeable_ranks))}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=trainer.get_pattern(),
                                mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
        return cls(enc, "<|bos|>")

    @classmethod
    def from_directory(cls, tokenizer_dir):
        """Load <tokenizer_dir>/tokenizer.pkl, a pickled tiktoken.Encoding (only load files you trust)."""
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        with open(path, "rb") as f:
            try:
                enc = pickle.load(f)
            except Exception as e:  # UnpicklingError, EOFError, ImportError...: whatever the damage produces
                raise BadFileError(f"Tokenizer file {path} is truncated or corrupt ({one_line_error(e)}). "
                                   f"{_PICKLE_FIX}.") from e
        if not isinstance(enc, tiktoken.Encoding):
            raise BadFileError(f"Tokenizer file {path} holds a {type(enc).__name__}, not a "
                               f"tiktoken.Encoding. {_PICKLE_FIX}.")
        missing = [name for name in SPECIAL_TOKENS if name not in enc.special_tokens_set]
        if missing:  # another project's encoding (GPT-2's...): the <|bos|> lookup would be a KeyError
            raise BadFileError(f"Tokenizer file {path} is a tiktoken encoding without nanochat's special "
                               f"tokens ({', '.join(missing)}). {_PICKLE_FIX}.")
        return cls(enc, "<|bos|>")

    @classmethod
    def from_pretrained(cls, tiktoken_name):
        """A tiktoken encoding such as "gpt2" or "cl100k_base" (downloads on first use unless cached)."""
        enc = tiktoken.get_encoding(tiktoken_name)
        return cls(enc, "<|endoftext|>")  # tiktoken's name for the document delimiter

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return self.enc.special_tokens_set

    def id_to_token(self, id):
        return self.enc.decode([id])  # lossy: a token that is not whole UTF-8 becomes U+FFFD

    def decode_single_token_bytes(self, token_id):
        return self.enc.decode_single_token_bytes(token_id)

    def encode_special(self, text):
        """Id of one special token (exact match); KeyError for anything else."""
        return self.enc.encode_single_token(text)  # a cheap lookup (~0.6 us): no memo needed

    def get_bos_token_id(self):
        return self.bos_token_id

    def _encode_one(self, text):
        # ordinary BPE ids: special-token names inside text are NOT recognised, which keeps users from
        # injecting <|assistant_end|> and friends
        return self.enc.encode_ordinary(text)

    def _encode_batch(self, texts, num_threads):
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids):
        return self.enc.decode(ids)  # specials come out as their literal strings; bad UTF-8 as U+FFFD

    def save(self, tokenizer_dir):
        os.makedirs(tokenizer_dir, exist_ok=True)
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        with atomic_open(path, "wb") as f:
            pickle.dump(self.enc, f)
        print(f"Saved tokenizer encoding to {path}")

    # --- chat format ---------------------------------------------------------

    # part type -> (opening special, closing special, mask). Tool output is written by the interpreter at
    # test time, so the model is never trained to produce it.
    _PARTS = {
        "text": (None, None, 1),
        "python": ("<|python_start|>", "<|python_end|>", 1),
        "python_output": ("<|output_start|>", "<|output_end|>", 0),
    }

    def render_conversation(self, conversation, max_tokens=2048):
        """
        Tokenize a chat conversation for training. Returns (ids, mask), both truncated to max_tokens; mask 1
        marks the tokens the assistant is trained to produce. Layout:
            <|bos|>                                                       mask 0
            user:      <|user_start|> text <|user_end|>                   mask 0
            assistant: <|assistant_start|>                                mask 0
                       text | <|python_start|> code <|python_end|>        mask 1
                            | <|output_start|> output <|output_end|>      mask 0
                       <|assistant_end|>                                  mask 1
        A leading system message is merged into the first user message as system + "\n\n" + user.
        The input is never mutated. Malformed conversations raise ValueError.
        """
        messages, first = _merge_system_message(conversation["messages"])
        pieces = [([self.get_bos_token_id()], 0)]  # (tokens, mask)
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            role, content = message["role"], message["content"]
            if role != expected:
                raise ValueError(f"Message {i + first} is from {role!r} but should be from {expected!r}: "
                                 f"roles must alternate user, assistant, ... starting with user")
            if role == "user":
                if not isinstance(content, str):
                    raise ValueError(f"User message {i + first} content must be a str, "
                                     f"got {type(content).__name__}")
                pieces.append((render_turn(self, "user", content), 0))
            else:
                pieces.extend(self._render_assistant_message(content))
        ids = [token for tokens, _ in pieces for token in tokens]
        mask = [supervised for tokens, supervised in pieces for _ in tokens]
        return ids[:max_tokens], mask[:max_tokens]

    def _render_assistant_message(self, content):
        """(tokens, mask) pieces: <|assistant_start|>, content (str or list of parts), <|assistant_end|>."""
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        elif not isinstance(content, list):
            raise ValueError(f"Unknown content type: {type(content).__name__} "
                             f"(expected str or list of parts)")
        yield [self.encode_special("<|assistant_start|>")], 0
        for part in content:
            if part["type"] not in self._PARTS:
                raise ValueError(f"Unknown part type: {part['type']!r} (expected one of {list(self._PARTS)})")
            if not isinstance(part["text"], str):
                raise ValueError(f"Part text must be a str, got {type(part['text']).__name__}")
            start, end, supervised = self._PARTS[part["type"]]
            tokens = self.encode(part["text"])
            if start is not None:
                tokens = [self.encode_special(start)] + tokens + [self.encode_special(end)]
            yield tokens, supervised
        yield [self.encode_special("<|assistant_end|>")], 1

    def render_for_completion(self, conversation):
        """Prompt ids for sampling (RL/eval): the conversation without its final assistant message (default
        truncation), then <|assistant_start|> so the model answers next."""
        messages = conversation["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("Last message must be from the Assistant")
        ids, _ = self.render_conversation({**conversation, "messages": messages[:-1]})
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids, mask, with_token_id=False):
        """Each token in green (mask 1) or red (mask 0), optionally then its gray (id), joined by '|'."""
        if len(ids) != len(mask):
            raise ValueError(f"ids and mask differ in length: {len(ids)} vs {len(mask)}")
        GREEN, RED, GRAY, RESET = "\033[92m", "\033[91m", "\033[90m", "\033[0m"
        pieces = []
        for token_id, m in zip(ids, mask):
            color = GREEN if m == 1 else RED
            pieces.append(f"{color}{self.decode([token_id])}{RESET}")
            if with_token_id:
                pieces.append(f"{GRAY}({token_id}){RESET}")
        return "|".join(pieces)


def _merge_system_message(messages):
    """(messages, offset): a new list with a leading system message folded into the user message after it
    (offset 1, so error messages can name indices of the original list), or the input (offset 0)."""
    if not messages:
        raise ValueError("Conversation has no messages")
    if messages[0]["role"] != "system":
        return messages, 0
    if len(messages) < 2 or messages[1]["role"] != "user":
        raise ValueError("System message must be followed by a user message")
    system, user = messages[0]["content"], messages[1]["content"]
    if not isinstance(system, str) or not isinstance(user, str):
        raise ValueError("System message and the user message after it must have str content")
    merged = {**messages[1], "content": system + "\n\n" + user}
    return [merged] + list(messages[2:]), 1


# -----------------------------------------------------------------------------
# Chat prompts for sampling and the streamed text of a reply (the CLI and the server)

# The tool-call markers a reply shows literally; in assistant history they become special tokens again
TOOL_MARKERS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")


def encode_assistant_text(tokenizer, text):
    """Assistant history as the model wrote it: the tool-call markers its replies show literally become
    special tokens again, so an earlier calculator call reads as it did when generated. Only these four:
    turn markers stay plain text, so a client cannot forge turns."""
    ids = []
    for piece in re.split("(" + "|".join(map(re.escape, TOOL_MARKERS)) + ")", text):  # re caches the pattern
        if piece in TOOL_MARKERS:
            ids.append(tokenizer.encode_special(piece))
        elif piece:
            ids.extend(tokenizer.encode(piece))
    return ids


def render_turn(tokenizer, role, content):
    """<|user_start|> text <|user_end|>, or <|assistant_start|> reply <|assistant_end|> where the reply is
    text (see encode_assistant_text) or the token ids the model wrote."""
    special = tokenizer.encode_special
    if role == "user":
        return [special("<|user_start|>"), *tokenizer.encode(content), special("<|user_end|>")]
    reply = content if isinstance(content, list) else encode_assistant_text(tokenizer, content)
    return [special("<|assistant_start|>"), *reply, special("<|assistant_end|>")]


def prompt_budget(context_len, max_tokens):
    """Tokens a prompt may take: the context less room for a max_tokens reply, where that room is at most
    half the context, so a large max_tokens does not leave a long conversation no history."""
    return context_len - min(max_tokens, context_len // 2)


def fit_chat_prompt(tokenizer, turns, budget=math.inf, system=""):
    """
    (prompt, dropped): the tokens for the model to answer turns [(role, content), ...], the last one from the
    user, in at most `budget` tokens, and how many of the oldest turns were left out to fit. The layout of
    render_for_completion: BOS, each turn (render_turn), <|assistant_start|>; a system prompt is merged into
    the first user turn kept, as system + "\\n\\n" + text, as render_conversation merges a system message.
    The oldest turns are dropped first; if the last turn alone is too long, the beginning of its text is cut
    (its <|user_start|> stays, so the model still sees the layout it was trained on).
    """
    if not turns:
        raise ValueError("A chat prompt needs at least one turn")
    pieces = [render_turn(tokenizer, role, content) for role, content in turns]
    with_system = {}  # index of a user turn -> its tokens with the system prompt merged in
    for dropped in range(len(pieces)):
        kept = pieces[dropped:]
        first_user = next((i for i in range(dropped, len(turns)) if turns[i][0] == "user"), None)
        if system and first_user is not None:
            if first_user not in with_system:
                text = system + "\n\n" + turns[first_user][1]
                with_system[first_user] = render_turn(tokenizer, "user", text)
            kept[first_user - dropped] = with_system[first_user]
        if 2 + sum(map(len, kept)) <= budget:  # 2: BOS and the closing <|assistant_start|>
            break
    else:
        last = kept[-1]
        kept = [[last[0], *last[-max(budget - 3, 1):]]]  # 3: BOS, the turn's start and <|assistant_start|>
    body = [token for piece in kept for token in piece]
    return [tokenizer.get_bos_token_id(), *body, tokenizer.encode_special("<|assistant_start|>")], dropped


def render_chat_prompt(tokenizer, turns, system=""):
    """fit_chat_prompt's prompt with every turn kept."""
    return fit_chat_prompt(tokenizer, turns, system=system)[0]


class StreamDecoder:
    """Token ids in, text out as it becomes whole: a character split over several tokens comes out once,
    whole, and decoding stays linear in the reply length. Special tokens come out as their literal names."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.length = 0  # characters out so far
        self.token_start = 0  # index of the last token's first character, or of the one it continues

    def add(self, token_id):
        token_bytes = self.tokenizer.decode_single_token_bytes(token_id)
        # a partial character that the token does not continue comes out first, as one U+FFFD
        pending = self.decoder.getstate()[0]
        self.token_start = self.length + (bool(pending) and not _continues(pending, token_bytes[:1]))
        return self._out(self.decoder.decode(token_bytes))

    def finish(self):
        """The rest, at the end of the reply: an incomplete character becomes U+FFFD instead of vanishing."""
        return self._out(self.decoder.decode(b"", final=True))

    def _out(self, text):
        self.length += len(text)
        return text


def _continues(partial, byte):
    """Whether `byte` can follow the partial UTF-8 character `partial`."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(partial + byte)
        return True
    except UnicodeDecodeError:
        return False


# -----------------------------------------------------------------------------
# Alternative: a HuggingFace `tokenizers` BPE (not used by the default pipeline)

class HuggingFaceTokenizer(_Tokenizer):
    """Wrapper around a tokenizers.Tokenizer (`.tokenizer`). No chat rendering."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, hf_path):
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_pretrained(hf_path))  # network

    @classmethod
    def from_directory(cls, tokenizer_dir):
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json")))

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Byte-level BPE on SPLIT_PATTERN chunks; vocab_size includes the specials (which get ids 0..8)."""
        from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE
        from tokenizers.trainers import BpeTrainer
        tokenizer = Tokenizer(BPE(byte_fallback=True, unk_token=None, fuse_unk=False))  # no normalizer
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = BpeTrainer(vocab_size=vocab_size, show_progress=True, min_frequency=0,
                             initial_alphabet=alphabet, special_tokens=SPECIAL_TOKENS)
        tokenizer.train_from_iterator(text_iterator, trainer)
        return cls(tokenizer)

    def get_vocab_size(self):
        return self.tokenizer.get_vocab_size()

    def get_special_tokens(self):
        return [token.content for token in self.tokenizer.get_added_tokens_decoder().values()]

    def id_to_token(self, id):
        return self.tokenizer.id_to_token(id)  # the raw byte-level string

    def encode_special(self, text):
        return self.tokenizer.token_to_id(text)  # None when absent

    def get_bos_token_id(self):
        for name in ("<|bos|>", "<|endoftext|>"):
            token_id = self.encode_special(name)
            if token_id is not None:
                return token_id
        raise ValueError("Failed to find BOS token in tokenizer (neither <|bos|> nor <|endoftext|>)")

    def _encode_one(self, text):
        # `tokenizers` still matches added special tokens inside text: "<|bos|>" encodes to the BOS id
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts, num_threads):  # num_threads: part of the shared call shape, unused
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, tokenizer_dir):
        os.makedirs(tokenizer_dir, exist_ok=True)
        path = os.path.join(tokenizer_dir, "tokenizer.json")
        self.tokenizer.save(path)
        print(f"Saved tokenizer to {path}")


# -----------------------------------------------------------------------------
# token_bytes and convenience loaders

def compute_token_bytes(tokenizer):
    """
    (vocab_size,) int32 CPU tensor: how many UTF-8 bytes each token stands for, 0 for special tokens (so
    they drop out of bits per byte). Counted on the raw token bytes, not on a decoded string: a token that
    is not a complete UTF-8 sequence (e.g. the single byte 0x80) would decode to U+FFFD and count 3 bytes.
    Invariant: sum(token_bytes[encode(text)]) == len(text.encode("utf-8")).
    """
    special_ids = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}

    def n_bytes(token_id):
        try:
            return 0 if token_id in special_ids else len(tokenizer.decode_single_token_bytes(token_id))
        except KeyError:  # an unused id inside the vocab range (pretrained encodings have gaps)
            return 0

    return torch.tensor([n_bytes(i) for i in range(tokenizer.get_vocab_size())], dtype=torch.int32)


def _tokenizer_path(filename, what):
    path = os.path.join(get_base_dir(), "tokenizer", filename)
    if not os.path.exists(path):
        raise MissingFileError(f"{what} not found at {path}; train one first with "
                               f"`python -m scripts.tok_train`")
    return path


def get_tokenizer():
    """The trained tokenizer in <base_dir>/tokenizer/."""
    path = _tokenizer_path("tokenizer.pkl", "Tokenizer")
    return RustBPETokenizer.from_directory(os.path.dirname(path))


def get_token_bytes(device="cpu", tokenizer=None):
    """The (vocab_size,) int32 table written by tok_train (see compute_token_bytes), on `device`, checked
    against `tokenizer` (the caller's, loaded from this base dir; None: the tokenizer.pkl beside it)."""
    path = _tokenizer_path("token_bytes.pt", "Token bytes")
    fix = _TOKEN_BYTES_FIX.format(path=path)
    try:
        token_bytes = torch.load(path, map_location=device)
    except Exception as e:
        raise BadFileError(f"Token bytes file {path} is truncated or corrupt ({one_line_error(e)}). "
                           f"{fix}") from e
    is_table = isinstance(token_bytes, torch.Tensor) and token_bytes.ndim == 1
    if not is_table or token_bytes.is_floating_point():
        raise BadFileError(f"Token bytes file {path} does not hold a 1-D integer tensor. {fix}")
    # a table of another tokenizer indexes out of range or, as often with the same vocab size (32768 by
    # default), gives a wrong bpb silently: it must be this tokenizer's (~30 ms to recount at 32K)
    if tokenizer is None and os.path.exists(os.path.join(os.path.dirname(path), "tokenizer.pkl")):
        tokenizer = get_tokenizer()
    if tokenizer is not None:
        if len(token_bytes) != tokenizer.get_vocab_size():
            raise BadFileError(f"Token bytes file {path} has {len(token_bytes)} entries and the tokenizer "
                               f"beside it {tokenizer.get_vocab_size()} tokens: it belongs to another "
                               f"tokenizer. {fix}")
        foreign = _entries_of_another_tokenizer(token_bytes, tokenizer)
        if foreign:
            raise BadFileError(f"Token bytes file {path} differs from the tokenizer beside it in {foreign} "
                               f"of {len(token_bytes)} entries: it belongs to another tokenizer. {fix}")
    return token_bytes


def _entries_of_another_tokenizer(table, tokenizer):
    """How many entries of a token_bytes table fit neither way of counting this tokenizer's tokens: the raw
    bytes (compute_token_bytes) or the UTF-8 length of the token's decoded text, the table the reference's
    tok_train writes (a partial UTF-8 sequence decodes to U+FFFD: 3 bytes)."""
    differing = (table.cpu().long() != compute_token_bytes(tokenizer).long()).nonzero().flatten().tolist()
    return sum(int(table[i]) != len(tokenizer.decode([i]).encode("utf-8")) for i in differing)
