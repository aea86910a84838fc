"""
Shared test setup.

Environment defaults are set here once, before pytest imports any test module: NANOCHAT_DTYPE=float32
gives the same fp32 numbers on every machine (a test file may still set its own before use, since the
dtype is read at use time).

Fixtures:
- tiny_tokenizer (session): a RustBPE tokenizer of TINY_VOCAB tokens trained on TINY_TEXT.
- tiny_base_dir: a fresh, offline, rank-0 NANOCHAT_BASE_DIR holding only that tokenizer.
- sample_tokenizer (session): a 512-token tokenizer trained on the first 200 documents of the committed
  pretraining sample, for tests that train on that sample (install_sample_base_dir).
- chat_tokenizer (session): a 512-token tokenizer trained on chat_texts() (committed GSM8K and identity
  text), for the chat-stage tests (SFT, RL, ChatCORE, tasks).
Helpers, imported with `from conftest import ...`: tiny_gpt (a tiny GPT built the production way, perturbed
on request), write_tiny_checkpoint (one saved as a checkpoint), point_base_dir_at,
install_sample_base_dir, install_tiny_chat_base_dir, chat_server (the chat server in-process), chat_prompt
(a hand-built chat prompt, for checking rendered prompts token by token), AlteredLogits (the real GPT
with its logits altered in one known way), sigterm_on_first_call (a SIGTERM in the middle of a step),
exits_with_error (a script's main() ends with exit status 1 and one error line), and the marker
raised_on_the_loader_thread (a test of an error raised on the dataloader's tokenizer thread fails in
seconds if the thread loses it). Every test: signal_handlers_left_as_found (autouse) fails a test that
leaves a SIGINT or SIGTERM handler of its own behind.
- tiny_chat_base_dir, tiny_chat_model (module): a perturbed tiny SFT checkpoint of the test module's
  SEQUENCE_LEN context, and its (model, tokenizer).
"""

import contextlib
import io
import os
import re
import signal
import sys

os.environ.setdefault("NANOCHAT_DTYPE", "float32")

# Started in the background by a non-interactive shell (`pytest ... &`, nohup), this process inherits SIGINT
# ignored, and every script a test starts would too: the tests of what Ctrl-C does need what a terminal
# gives, Python's KeyboardInterrupt (a handler, unlike SIG_IGN, is not inherited across exec)
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from dataclasses import asdict

import pytest
import torch

# The tokenizer thread of dataloader._Prefetcher hands its errors to the consumer; a thread that lost one
# would leave the consumer waiting on the queue forever, and the test stalled until the 600 s default. A
# SIGALRM (method="signal") interrupts that wait and fails only the test in 20 s (the tests take under 3 s).
raised_on_the_loader_thread = pytest.mark.timeout(20, method="signal")


@pytest.fixture(autouse=True)
def signal_handlers_left_as_found(request):
    """A test that leaves its own SIGINT or SIGTERM handler behind changes what Ctrl-C and SIGTERM do in
    every later test of the process (the chat_cli and training tests raise real signals): that test fails,
    naming the signal, and the handler found before it is put back."""
    watched = (signal.SIGINT, signal.SIGTERM)
    before = {sig: signal.getsignal(sig) for sig in watched}
    yield
    leaked = [sig for sig in watched if signal.getsignal(sig) != before[sig]]
    for sig in leaked:
        signal.signal(sig, before[sig])
    if leaked:
        pytest.fail(f"{request.node.nodeid} left a handler of {[signal.Signals(s).name for s in leaked]}")


def spawn_ranks(worker, *args):
    """torch.multiprocessing.spawn(worker, args) on 2 processes (spawned, not forked: a forked child can hang
    on a lock an earlier test's thread held), each ending with os._exit(0) once worker(rank, *args) returns.
    A finished gloo rank sometimes aborted at interpreter shutdown (SIGABRT, "terminate called without an
    active exception": gloo's threads free the last collective's tensors while Python is torn down; seen in
    about one suite run in ten), which failed a test whose ranks had all done their work. A worker that
    raises or exits still fails the spawn, with its traceback."""
    import torch.multiprocessing as mp
    mp.spawn(_run_rank_then_exit, args=(worker, args), nprocs=2)


def _run_rank_then_exit(rank, worker, args):
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


TINY_VOCAB = 300  # 256 bytes + 9 specials + 35 merges
TINY_TEXT = [
    "Hello there! How are you today? I am fine, thank you. What can I do for you?\n",
    "The quick brown fox jumps over the lazy dog. The answer is 42.\n",
    "Un café naïve, s'il vous plaît.\n",
] * 30


def tiny_gpt(seed=0, perturb=0.0, **config):
    """A GPT built the production way (shapes on meta, storage on the CPU, values from init_weights() after
    manual_seed(seed)), in train mode: by default depth 2, width 64, 2 heads, full-context layers, a 32-token
    context and TINY_VOCAB tokens; **config overrides any GPTConfig field. perturb > 0 adds that much
    Gaussian noise to every floating parameter: the zero-initialised projections (and scalars) would
    otherwise make every block the identity, leave gradients exactly zero and the logits nearly flat."""
    from nanochat.gpt import GPT, GPTConfig
    defaults = dict(sequence_len=32, vocab_size=TINY_VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                    window_pattern="L")
    with torch.device("meta"):
        model = GPT(GPTConfig(**{**defaults, **config}))
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    if perturb > 0:
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point():
                    p.add_(perturb * torch.randn_like(p))
    return model


def write_tiny_checkpoint(base, source="base", step=0, optimizer_state=None, seed=0, perturb=0.0,
                          sequence_len=128, **config):
    """tiny_gpt(seed, **config) of a 128-token context unless said otherwise, saved as
    <base>/<source checkpoints>/d2 at `step`; returns (checkpoint directory, model). perturb > 0 adds that
    much Gaussian noise to the matrices only: three tests in test_chat_web need the long, distinct replies
    of these draws, which every parameter perturbed does not give."""
    from nanochat import checkpoint_manager as cm
    model = tiny_gpt(seed, sequence_len=sequence_len, **config)
    with torch.no_grad():
        for p in model.parameters():
            if perturb > 0 and p.dim() == 2:
                p.add_(perturb * torch.randn_like(p))
    ckpt = os.path.join(str(base), cm.CHECKPOINT_DIRS[source], "d2")
    meta = {"step": step, "val_bpb": None, "model_config": asdict(model.config), "user_config": {}}
    cm.save_checkpoint(ckpt, step, model.state_dict(), optimizer_state, meta)
    return ckpt, model


def point_base_dir_at(monkeypatch, base, **extra_env):
    """Make `base` the NANOCHAT_BASE_DIR (offline, rank 0 of a single process, plus extra_env) for as
    long as `monkeypatch` (a fixture or a pytest.MonkeyPatch) holds."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in extra_env.items():
        monkeypatch.setenv(key, value)
    return base


def install_sample_base_dir(monkeypatch, base, tokenizer):
    """`base` as the NANOCHAT_BASE_DIR (no torch.compile) holding the committed pretraining sample and
    `tokenizer` with its token_bytes.pt."""
    from nanochat.dataset import install_sample
    from nanochat.tokenizer import compute_token_bytes
    point_base_dir_at(monkeypatch, base, NANOCHAT_COMPILE="0")
    install_sample()
    tokenizer.save(os.path.join(base, "tokenizer"))
    torch.save(compute_token_bytes(tokenizer), os.path.join(base, "tokenizer", "token_bytes.pt"))
    return base


def install_tiny_chat_base_dir(monkeypatch, base, tokenizer, sequence_len):
    """`base` as the NANOCHAT_BASE_DIR holding `tokenizer` and a perturbed depth-2 SFT checkpoint (d2, step
    0, seed 0), whose spread-out logits make greedy replies depend on the prompt."""
    point_base_dir_at(monkeypatch, base)
    tokenizer.save(str(base / "tokenizer"))
    write_tiny_checkpoint(base, "sft", vocab_size=tokenizer.get_vocab_size(), sequence_len=sequence_len,
                          perturb=0.1)
    return base


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


@pytest.fixture
def undecided(monkeypatch):
    """nanochat.flash_attention in a process that has not decided its attention backend yet (automatic
    choice): no backend, no kernel, none of the decided globals (HAS_FA3, USE_FA3, ...); monkeypatch puts
    everything back."""
    import nanochat.flash_attention as fa
    for name in fa._DECIDED_NAMES:
        monkeypatch.delitem(vars(fa), name, raising=False)
    monkeypatch.setattr(fa, "_backend", None)
    monkeypatch.setattr(fa, "_fa3", None)
    monkeypatch.setattr(fa, "_override_impl", None)
    monkeypatch.delenv("RANK", raising=False)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nanochat.tokenizer import RustBPETokenizer
    tokenizer = RustBPETokenizer.train_from_iterator(iter(TINY_TEXT), TINY_VOCAB)
    assert tokenizer.get_vocab_size() == TINY_VOCAB
    return tokenizer


@pytest.fixture(scope="session")
def sample_tokenizer(tmp_path_factory):
    from nanochat.dataset import install_sample, parquets_iter_batched
    from nanochat.tokenizer import RustBPETokenizer
    with pytest.MonkeyPatch.context() as mp:
        point_base_dir_at(mp, tmp_path_factory.mktemp("sample"))
        install_sample()
        texts = [t for batch in parquets_iter_batched("train") for t in batch][:200]
    return RustBPETokenizer.train_from_iterator(iter(texts), 512)


@pytest.fixture
def tiny_base_dir(tmp_path, monkeypatch, tiny_tokenizer):
    base = point_base_dir_at(monkeypatch, tmp_path / "base")
    tiny_tokenizer.save(str(base / "tokenizer"))
    return base


class TerminalIO(io.StringIO):
    """An in-memory terminal: with contextlib.redirect_stderr(TerminalIO()) progress bars draw on it (they
    stay off when stderr is not a TTY)."""

    def isatty(self):
        return True


@pytest.fixture(scope="module")
def tiny_chat_base_dir(request, tmp_path_factory, tiny_tokenizer):
    """install_tiny_chat_base_dir for a whole test module, its context the module's SEQUENCE_LEN."""
    with pytest.MonkeyPatch.context() as mp:
        yield install_tiny_chat_base_dir(mp, tmp_path_factory.mktemp("base"), tiny_tokenizer,
                                         request.module.SEQUENCE_LEN)


@pytest.fixture(scope="module")
def tiny_chat_model(tiny_chat_base_dir):
    """(model, tokenizer) of that checkpoint, loaded by the tests themselves."""
    from nanochat.checkpoint_manager import load_model
    model, tokenizer, _ = load_model("sft", "cpu", phase="eval")
    return model, tokenizer


@contextlib.contextmanager
def chat_server(**settings):
    """The chat server app (ServerConfig(device_type="cpu", **settings)) served in this process on loopback;
    yields (app, url, port) and stops it on exit."""
    from nanochat.server import ServerConfig, create_app, serve_in_thread
    app = create_app(ServerConfig(device_type="cpu", **settings))
    server, thread, port = serve_in_thread(app)
    try:
        yield app, f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def chat_texts(limit=300):
    """A few hundred KB of the committed chat data: GSM8K questions/answers and identity messages."""
    import gzip
    import json
    data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tasks")
    texts = []
    with gzip.open(os.path.join(data, "gsm8k", "main", "train.jsonl.gz"), "rt") as f:
        for line, _ in zip(f, range(limit)):
            row = json.loads(line)
            texts.append(row["question"] + " " + row["answer"])
    with gzip.open(os.path.join(data, "chat", "identity_conversations.jsonl.gz"), "rt") as f:
        for line, _ in zip(f, range(limit // 3)):
            texts += [m["content"] for m in json.loads(line)]
    return texts


@pytest.fixture(scope="session")
def chat_tokenizer():
    """A 512-token tokenizer trained on chat_texts(), for tests of the chat stages (SFT, RL)."""
    from nanochat.tokenizer import RustBPETokenizer
    return RustBPETokenizer.train_from_iterator(iter(chat_texts()), 512)


# -----------------------------------------------------------------------------
# The byte tokenizer of test_engine and test_batching: only what the Engine and the scheduler may rely on

PYTHON_START, PYTHON_END, OUTPUT_START, OUTPUT_END, ASSISTANT_END, BOS = 256, 257, 258, 259, 260, 261


class ByteTokenizer:
    """Ids 0-255 are bytes; the five tool specials and BOS follow. Any other special is a KeyError."""
    SPECIALS = {"<|python_start|>": PYTHON_START, "<|python_end|>": PYTHON_END, "<|output_start|>": OUTPUT_START,
                "<|output_end|>": OUTPUT_END, "<|assistant_end|>": ASSISTANT_END, "<|bos|>": BOS}

    def encode_special(self, name):
        return self.SPECIALS[name]

    def get_bos_token_id(self):
        return BOS

    def encode(self, s, prepend=None):
        ids = list(s.encode("utf-8"))
        return ids if prepend is None else [prepend] + ids

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class AlteredLogits:
    """The real GPT whose logits pass through alter(logits, ids), which a subclass overrides: a stand-in for
    a model that misbehaves (or is observed) in one known way."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def get_device(self):
        return self.model.get_device()

    def forward(self, ids, kv_cache=None):
        return self.alter(self.model.forward(ids, kv_cache=kv_cache), ids)

    def alter(self, logits, ids):
        return logits


def sigterm_on_first_call(monkeypatch, owner, name):
    """Make owner.<name> send this process SIGTERM on its first call, then do what it did: a signal that
    arrives in the middle of a training step. Later calls (the resumed run's) only do what it did."""
    original, sent = getattr(owner, name), []

    def first_call_signals(*args, **kwargs):
        if not sent:
            sent.append(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, first_call_signals)


@contextlib.contextmanager
def exits_with_error(capsys, pattern):
    """The script's main() called inside ends as a SetupError ends it: exit status 1, and a last stderr line
    `<script>: error: ...` that matches the regex `pattern`."""
    with pytest.raises(SystemExit) as info:
        yield
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 1 and re.search(pattern, last_line), last_line
