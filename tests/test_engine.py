"""
Engine, KV cache and calculator (the sampler has tests/test_sampling.py). The first eight tests are the
reference's shipped engine tests (mock model and byte tokenizer that provide only the Engine's duck-typed
requirements); the rest check the tool state machine with scripted models, the calculator table, the
Engine against GPT.generate on a tiny real model, and the `python -m nanochat.engine` self-check.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nanochat.engine as engine_module
from nanochat import common
from nanochat.engine import (Engine, KVCache, NeverStopping, RowState, eval_with_timeout, prefill_prompt,
                             use_calculator)

from conftest import (ASSISTANT_END, BOS, OUTPUT_END, OUTPUT_START, PYTHON_END, PYTHON_START, AlteredLogits,
                      ByteTokenizer, tiny_gpt, write_tiny_checkpoint)

# -----------------------------------------------------------------------------
# The reference's mocks: only what the Engine is allowed to rely on

PROMPT = [261, 72, 101, 108, 108, 111]  # BOS + "Hello"


@dataclass
class MockConfig:
    n_kv_head: int = 4
    n_head: int = 4
    n_embd: int = 64
    n_layer: int = 2
    sequence_len: int = 128


class MockModel:
    """Uniform logits; advances the cache as the attention write would."""

    def __init__(self, vocab_size=262):
        self.vocab_size = vocab_size
        self.config = MockConfig()

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        if kv_cache is not None:
            kv_cache.advance(T)
        return torch.zeros(B, T, self.vocab_size)


# -----------------------------------------------------------------------------
# Shipped tests (reference tests/test_engine.py, rewritten from their description)

def test_kv_cache_basic():
    cache = KVCache(batch_size=2, num_heads=3, seq_len=64, head_dim=5, num_layers=6, device="cpu", dtype=torch.float32)
    assert cache.get_pos() == 0
    assert cache.k_cache.shape == cache.v_cache.shape == (6, 2, 64, 3, 5)
    cache.advance(10)
    assert cache.get_pos() == 10
    cache.advance(5)
    assert cache.get_pos() == 15
    cache.reset()
    assert cache.get_pos() == 0
    k, v = cache.get_layer_cache(0)
    assert k.shape == v.shape == (2, 64, 3, 5)


def test_kv_cache_reset_forgets_the_smear_feature_of_the_previous_sequence():
    cache = KVCache(batch_size=2, num_heads=1, seq_len=8, head_dim=4, num_layers=1, device="cpu",
                    dtype=torch.float32)
    cache.advance(3)
    cache.prev_embedding = torch.ones(2, 1, 4)
    cache.reset()
    assert cache.positions == [0, 0] and cache.cache_seqlens.tolist() == [0, 0]
    assert cache.prev_embedding is None


def test_kv_cache_prefill():
    src = KVCache(batch_size=1, num_heads=4, seq_len=32, head_dim=8, num_layers=2, device="cpu", dtype=torch.float32)
    src.k_cache[0, :, :16] = 1.0
    src.v_cache[0, :, :16] = 2.0
    src.advance(16)
    dst = KVCache(batch_size=1, num_heads=4, seq_len=64, head_dim=8, num_layers=2, device="cpu", dtype=torch.float32)
    dst.prefill(src)
    assert dst.get_pos() == 16
    assert (dst.k_cache[0, :, :16] == 1.0).all() and (dst.v_cache[0, :, :16] == 2.0).all()
    assert (dst.k_cache[0, :, 16:] == 0.0).all()


@pytest.mark.parametrize("num_samples", [4, 16])
def test_multi_sample_first_token_diversity(num_samples):
    engine = Engine(MockModel(), ByteTokenizer())
    column, _ = next(engine.generate(PROMPT, num_samples=num_samples, max_tokens=1, temperature=1.0, seed=42))
    assert len(column) == num_samples
    assert len(set(column)) > 1  # all equal would mean one draw broadcast to every row


@pytest.mark.parametrize("seed", [1, 42, 123, 999])
def test_seed_reproducibility(seed):
    engine = Engine(MockModel(), ByteTokenizer())
    runs = [engine.generate_batch(PROMPT, max_tokens=5, seed=seed) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


def test_temperature_zero_determinism():
    engine = Engine(MockModel(), ByteTokenizer())
    runs = [engine.generate_batch(PROMPT, max_tokens=5, temperature=0.0, seed=s) for s in (1, 42, 123)]
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("max_tokens", [1, 4, 16, 64])
def test_max_tokens_respected(max_tokens):
    engine = Engine(MockModel(), ByteTokenizer())
    results, masks = engine.generate_batch(PROMPT, max_tokens=max_tokens, seed=0)
    assert len(results[0]) - len(PROMPT) <= max_tokens
    assert len(masks[0]) == len(results[0])


@pytest.mark.parametrize("num_samples", [1, 4, 16, 64])
def test_num_samples_count(num_samples):
    engine = Engine(MockModel(), ByteTokenizer())
    results, masks = engine.generate_batch(PROMPT, num_samples=num_samples, max_tokens=3)
    assert len(results) == len(masks) == num_samples


def test_different_seeds_introduce_variation_when_temperature_nonzero():
    engine = Engine(MockModel(), ByteTokenizer())
    outputs = {tuple(engine.generate_batch(PROMPT, max_tokens=5, temperature=1.0, seed=s)[0][0]) for s in range(10)}
    assert len(outputs) > 1


# -----------------------------------------------------------------------------
# KV cache details

def small_cache(batch_size=1, seq_len=16, num_layers=2, num_heads=2, head_dim=4):
    return KVCache(batch_size=batch_size, num_heads=num_heads, seq_len=seq_len, head_dim=head_dim,
                   num_layers=num_layers, device="cpu", dtype=torch.float32)


def filled_cache(batch_size=1):
    """A cache at position 5 with random keys, values and smear embeddings in every row."""
    cache = small_cache(batch_size=batch_size)
    cache.k_cache.normal_()
    cache.v_cache.normal_()
    cache.advance(5)
    cache.prev_embedding = torch.randn(batch_size, 1, 8)
    return cache


def test_prefill_copies_every_layer_and_row_and_clones_prev_embedding():
    src = filled_cache()
    dst = small_cache(batch_size=3, seq_len=20)
    dst.prefill(src)
    for row in range(3):
        assert torch.equal(dst.k_cache[:, row, :5], src.k_cache[:, 0, :5])
        assert torch.equal(dst.v_cache[:, row, :5], src.v_cache[:, 0, :5])
    assert dst.cache_seqlens.tolist() == [5, 5, 5]
    assert dst.prev_embedding.shape == (3, 1, 8)
    dst.prev_embedding[0] += 1.0  # rows must not share storage with each other or with the source
    assert torch.equal(dst.prev_embedding[1], src.prev_embedding[0])
    assert torch.equal(dst.prev_embedding[2], src.prev_embedding[0])


def test_prefill_from_a_cache_of_as_many_rows_copies_row_by_row():
    # only a batch-1 source broadcasts; a source with the destination's rows gives each row its own
    src = filled_cache(batch_size=2)
    dst = small_cache(batch_size=2, seq_len=20)
    dst.prefill(src)
    assert torch.equal(dst.k_cache[:, :, :5], src.k_cache[:, :, :5])
    assert torch.equal(dst.v_cache[:, :, :5], src.v_cache[:, :, :5])
    assert torch.equal(dst.prev_embedding, src.prev_embedding)


@pytest.mark.parametrize("dst_kwargs", [dict(num_layers=3), dict(num_heads=4), dict(head_dim=8), dict(seq_len=8)])
def test_prefill_rejects_incompatible_destination(dst_kwargs):
    src = small_cache()
    src.advance(4)
    with pytest.raises(AssertionError):
        small_cache(**dst_kwargs).prefill(src)


def test_prefill_rejects_non_empty_destination():
    src, dst = small_cache(), small_cache()
    dst.advance(1)
    with pytest.raises(AssertionError, match="non-empty"):
        dst.prefill(src)


def test_prefill_into_one_row_keeps_the_other_rows():
    src = small_cache()
    src.k_cache.normal_()
    src.v_cache.normal_()
    src.advance(5)
    src.prev_embedding = torch.randn(1, 1, 8)
    dst = small_cache(batch_size=3, seq_len=20)
    dst.k_cache.fill_(7.0)
    dst.v_cache.fill_(7.0)
    dst.cache_seqlens.copy_(torch.tensor([9, 3, 11], dtype=torch.int32))  # rows busy at their own positions
    dst.prev_embedding = torch.full((3, 1, 8), 7.0)
    dst.prefill(src, row=1)
    for cache, source in ((dst.k_cache, src.k_cache), (dst.v_cache, src.v_cache)):
        assert torch.equal(cache[:, 1, :5], source[:, 0, :5])
        assert (cache[:, 1, 5:] == 7.0).all() and (cache[:, [0, 2]] == 7.0).all()
    assert dst.cache_seqlens.tolist() == [9, 5, 11]
    assert torch.equal(dst.prev_embedding[1], src.prev_embedding[0])
    assert (dst.prev_embedding[[0, 2]] == 7.0).all()
    fresh = small_cache(batch_size=2)  # no prev_embedding yet: the other rows get zeros
    fresh.prefill(src, row=0)
    assert torch.equal(fresh.prev_embedding[0], src.prev_embedding[0])
    assert (fresh.prev_embedding[1] == 0).all()


def test_kv_cache_for_model_is_shaped_by_the_config(monkeypatch):
    cfg = MockConfig(n_kv_head=2, n_head=4, n_embd=64, n_layer=3)
    cache = KVCache.for_model(cfg, batch_size=5, seq_len=17, device="cpu")
    assert cache.k_cache.shape == cache.v_cache.shape == (3, 5, 17, 2, 16)
    assert (cache.batch_size, cache.max_seq_len, cache.get_pos()) == (5, 17, 0)
    monkeypatch.setattr(common, "_compute_dtype_cache", (torch.bfloat16, "set by the test"))
    assert KVCache.for_model(cfg, 1, 4, "cpu").k_cache.dtype == torch.bfloat16  # read at call time
    assert KVCache.for_model(cfg, 1, 4, "cpu", dtype=torch.float32).k_cache.dtype == torch.float32


def test_engine_cache_uses_compute_dtype(monkeypatch):
    seen = []

    class RecordingModel(MockModel):
        def forward(self, ids, kv_cache=None):
            seen.append(kv_cache.k_cache.dtype)
            return super().forward(ids, kv_cache)

    monkeypatch.setattr(common, "_compute_dtype_cache", (torch.bfloat16, "set by the test"))
    Engine(RecordingModel(), ByteTokenizer()).generate_batch(PROMPT, max_tokens=3)
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)


# -----------------------------------------------------------------------------
# RowState

def test_row_state_defaults():
    row = RowState()
    assert row.current_tokens == [] and len(row.forced_tokens) == 0 and row.python_expr_tokens == []
    assert not row.in_python_block and not row.completed
    prompt = [1, 2]
    assert RowState(prompt).current_tokens == [1, 2]


# -----------------------------------------------------------------------------
# Tool state machine with scripted models

class ScriptedModel(MockModel):
    """Greedy-friendly logits: forward call k proposes scripts[row][k] (the prefill is call 0, batch 1)."""

    def __init__(self, scripts, vocab_size=262):
        super().__init__(vocab_size)
        self.scripts = scripts
        self.calls = 0

    def forward(self, ids, kv_cache=None):
        logits = super().forward(ids, kv_cache)
        for row in range(ids.size(0)):
            script = self.scripts[row]
            logits[row, -1, script[min(self.calls, len(script) - 1)]] = 1.0
        self.calls += 1
        return logits


def run_script(scripts, **kwargs):
    """All (column, masks) pairs of a greedy run with one row per script; also returns the model."""
    model = ScriptedModel(scripts)
    kwargs.setdefault("max_tokens", 50)
    steps = list(Engine(model, ByteTokenizer()).generate(PROMPT, num_samples=len(scripts), temperature=0.0, **kwargs))
    return steps, model


def ascii_ids(text):
    return list(text.encode())


# the worked example of the spec: a <|python_start|> 1 + 2 <|python_end|> x x x x x b <|assistant_end|>
WORKED_SCRIPT = (ascii_ids("a") + [PYTHON_START] + ascii_ids("1+2") + [PYTHON_END] + ascii_ids("xxxxxb")
                 + [ASSISTANT_END])
WORKED_COLUMN = (ascii_ids("a") + [PYTHON_START] + ascii_ids("1+2") + [PYTHON_END]
                 + [OUTPUT_START] + ascii_ids("3") + [OUTPUT_END] + ascii_ids("xxb") + [ASSISTANT_END])
WORKED_MASKS = [1] * 6 + [0] * 3 + [1] * 4


def test_worked_example_columns_and_masks():
    steps, _ = run_script([WORKED_SCRIPT, WORKED_SCRIPT])
    assert [column for column, _ in steps] == [[t, t] for t in WORKED_COLUMN]
    assert [masks for _, masks in steps] == [[m, m] for m in WORKED_MASKS]


def test_forced_tokens_count_toward_max_tokens():
    steps, _ = run_script([WORKED_SCRIPT], max_tokens=8)
    assert [column[0] for column, _ in steps] == WORKED_COLUMN[:8]


def test_calculator_output_two_plus_three():
    script = [PYTHON_START] + ascii_ids("2+3") + [PYTHON_END] + ascii_ids("zzzz") + [ASSISTANT_END]
    steps, _ = run_script([script])
    column = [c[0] for c, _ in steps]
    masks = [m[0] for _, m in steps]
    assert column[:8] == [PYTHON_START] + ascii_ids("2+3") + [PYTHON_END, OUTPUT_START] + ascii_ids("5") + [OUTPUT_END]
    assert masks[:8] == [1, 1, 1, 1, 1, 0, 0, 0]


TOO_LONG_TO_PRINT = "9" * 2200 + "*" + "9" * 2200  # 4400 digits: beyond Python's str() limit of 4300


@pytest.mark.parametrize("expr", ["2**8", "10 % 3", "5/0", "import os", TOO_LONG_TO_PRINT])
def test_failed_calculator_call_injects_nothing(expr):
    script = [PYTHON_START] + ascii_ids(expr) + [PYTHON_END] + ascii_ids("q") + [ASSISTANT_END]
    steps, _ = run_script([script], max_tokens=len(script) + 5)
    assert [c[0] for c, _ in steps] == script
    assert all(m == [1] for _, m in steps)


def test_python_end_outside_block_is_inert():
    script = ascii_ids("a") + [PYTHON_END] + ascii_ids("1+1") + [PYTHON_END, ASSISTANT_END]
    steps, _ = run_script([script])
    assert [c[0] for c, _ in steps] == script
    assert all(m == [1] for _, m in steps)


def test_second_python_start_restarts_the_expression():
    script = ([PYTHON_START] + ascii_ids("9") + [PYTHON_START] + ascii_ids("4*2") + [PYTHON_END] + ascii_ids("ww")
              + [ASSISTANT_END])
    steps, _ = run_script([script])
    column = [c[0] for c, _ in steps]
    assert column[7:10] == [OUTPUT_START] + ascii_ids("8") + [OUTPUT_END]


def test_bos_terminates_and_generate_batch_excludes_terminal_tokens():
    # row 0's script goes on after its BOS: what a finished row receives is not part of its result
    model = ScriptedModel([ascii_ids("ab") + [BOS] + ascii_ids("zz"), ascii_ids("abcd") + [ASSISTANT_END]])
    results, masks = Engine(model, ByteTokenizer()).generate_batch(PROMPT, num_samples=2, temperature=0.0)
    assert results == [PROMPT + ascii_ids("ab"), PROMPT + ascii_ids("abcd")]
    assert masks == [[0] * len(PROMPT) + [1, 1], [0] * len(PROMPT) + [1, 1, 1, 1]]


def test_generate_batch_masks_tool_output():
    results, masks = Engine(ScriptedModel([WORKED_SCRIPT]), ByteTokenizer()).generate_batch(PROMPT, temperature=0.0)
    assert results == [PROMPT + WORKED_COLUMN[:-1]]
    assert masks == [[0] * len(PROMPT) + WORKED_MASKS[:-1]]


def test_generation_stops_when_all_rows_complete_without_extra_forward():
    steps, model = run_script([ascii_ids("a") + [ASSISTANT_END], ascii_ids("abc") + [ASSISTANT_END]])
    assert len(steps) == 4  # row 0 finished after 2 tokens; the finished row keeps receiving tokens
    assert steps[-1][0][1] == ASSISTANT_END
    assert model.calls == 4  # the prefill plus one forward per yielded column except the last


def test_max_tokens_stop_without_extra_forward():
    steps, model = run_script([ascii_ids("z")], max_tokens=5)
    assert len(steps) == 5 and model.calls == 5


def test_consumer_stopping_early_runs_no_more_forwards():
    model = ScriptedModel([ascii_ids("z")])
    stream = Engine(model, ByteTokenizer()).generate(PROMPT, max_tokens=20, temperature=0.0)
    next(stream), next(stream)
    stream.close()
    assert model.calls == 2


def test_max_tokens_none_fits_the_context():
    steps, model = run_script([ascii_ids("z")], max_tokens=None)
    assert len(steps) == MockConfig.sequence_len - len(PROMPT)


def test_max_tokens_none_with_full_context_raises():
    engine = Engine(MockModel(), ByteTokenizer())
    with pytest.raises(ValueError, match="context"):
        next(engine.generate([1] * MockConfig.sequence_len, max_tokens=None))


def test_generate_rejects_bad_counts_and_max_tokens_zero_runs_no_forward():
    engine = Engine(MockModel(), ByteTokenizer())
    with pytest.raises(ValueError, match="max_tokens must be >= 0 or None, got -1"):
        next(engine.generate(PROMPT, max_tokens=-1))
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        next(engine.generate(PROMPT, num_samples=0, max_tokens=5))
    model = ScriptedModel([ascii_ids("z")])
    assert list(Engine(model, ByteTokenizer()).generate(PROMPT, max_tokens=0)) == []
    assert model.calls == 0


def test_never_stopping_decodes_exactly_max_tokens_through_tool_calls():
    script = [*ascii_ids("a"), ASSISTANT_END, BOS, PYTHON_START, *ascii_ids("1+2"), PYTHON_END,
              *ascii_ids("b")]
    engine = Engine(ScriptedModel([script]), NeverStopping(ByteTokenizer()))
    column = [c[0] for c, _ in engine.generate(PROMPT, max_tokens=16, temperature=0.0)]
    assert len(column) == 16 and column[:3] == script[:3]  # the terminal tokens end nothing
    assert column[8:11] == [OUTPUT_START] + ascii_ids("3") + [OUTPUT_END]  # the tool still answers


def test_generate_rejects_non_int_tokens():
    with pytest.raises(AssertionError, match="list of ints"):
        next(Engine(MockModel(), ByteTokenizer()).generate("hello"))


def test_engine_with_real_tokenizer_tool_call(tiny_tokenizer):
    # the real tokenizer: specials looked up by name, encode(str) of the calculator result
    tok = tiny_tokenizer
    script = ([tok.encode_special("<|python_start|>")] + tok.encode("2+3") + [tok.encode_special("<|python_end|>")]
              + tok.encode(" ok") * 4 + [tok.encode_special("<|assistant_end|>")])
    model = ScriptedModel([script], vocab_size=tok.get_vocab_size())
    prompt = tok.encode("Q", prepend="<|bos|>")
    results, masks = Engine(model, tok).generate_batch(prompt, temperature=0.0, max_tokens=30)
    assert tok.decode(results[0][len(prompt):]).startswith(
        "<|python_start|>2+3<|python_end|><|output_start|>5<|output_end|>")
    output = [tok.encode_special("<|output_start|>")] + tok.encode("5") + [tok.encode_special("<|output_end|>")]
    start = len(prompt) + len(tok.encode("2+3")) + 2  # after python_start, "2+3" and python_end
    assert results[0][start:start + len(output)] == output
    assert masks[0][start:start + len(output)] == [0] * len(output)


# -----------------------------------------------------------------------------
# Calculator

CALCULATOR_TABLE = [  # chat.md §1.1, reference outcomes
    ("12/60", 0.2), ("0.2*50", 10.0), ("1,000*2", 2000), ("10//3", 3), ("3 - -2", 5), ("(3+4)*2", 14),
    ("7.0/2", 3.5), ("2**10", None), ("10 % 3", None), ("5/0", None), ("1e5", None), ("", None),
    ("12/60=0.2", None), ("'strawberry'.count('r')", 3), ('"banana".count("a")', 3), ("'a_b'.count('_')", 1),
    ("'directory'.count('d')", None), ("'profile'.count('f')", None), ("'hello'.count('l')*2", None),
    ("'x'.count('x') + 1", None), ("'abc'.upper()", None), ("abs(-3)", None),
]


def in_worker_thread(fn, *args):
    out = []
    worker = threading.Thread(target=lambda: out.append(fn(*args)))
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the calculator hung in a worker thread"
    return out[0]


@pytest.mark.parametrize("where", ["main thread", "worker thread"])
@pytest.mark.parametrize("expr,want", CALCULATOR_TABLE)
def test_calculator_table(expr, want, where):
    got = use_calculator(expr) if where == "main thread" else in_worker_thread(use_calculator, expr)
    assert got == want and type(got) is type(want)
    if want is not None:
        assert str(got) == str(want)  # 0.2*50 renders "10.0", as the reference


@pytest.mark.parametrize("expr,want", [(" 48/2", 24.0), ("  3 + 4  ", 7), (" 'strawberry'.count('r')", 3)])
def test_calculator_leading_spaces_same_answer_in_worker_thread(expr, want):
    # a model often writes a call as space-prefixed tokens; the server evaluates it off the main thread
    assert use_calculator(expr) == want
    assert in_worker_thread(use_calculator, expr) == want


def test_calculator_strips_commas_and_blocks_case_insensitively():
    assert use_calculator("1,234+1") == 1235
    assert use_calculator("'a,b,c'.count('b')") == 1
    assert use_calculator("'a,b'.count(',')") == 3  # commas go inside literals too: 'ab'.count('') == 3
    assert use_calculator("'OPENED'.count('E')") is None  # "open" after lower-casing
    assert use_calculator("'DIR'.count('D')") is None
    assert use_calculator("'ABC'.count('A')") == 1


SLOW_EXPR = "[0 for a in 'x' * 100000 for b in 'x' * 100000 if 0]"  # ~1e10 interruptible steps, no memory


def test_eval_with_timeout_gives_up_and_restores_handler():
    def previous(signum, frame):
        pass

    old = signal.signal(signal.SIGALRM, previous)
    try:
        t0 = time.time()
        assert eval_with_timeout(SLOW_EXPR, max_time=0.5) is None
        assert time.time() - t0 < 3
        assert signal.getsignal(signal.SIGALRM) is previous
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    finally:
        signal.signal(signal.SIGALRM, old)


def test_eval_off_main_thread_refuses_unbounded_expressions():
    t0 = time.time()
    assert in_worker_thread(eval_with_timeout, SLOW_EXPR) is None
    assert in_worker_thread(eval_with_timeout, "'a' * 10") is None  # str arithmetic can explode: refused
    assert in_worker_thread(eval_with_timeout, "2 ** 3") is None  # ** too: 9**9**9 would never finish
    assert time.time() - t0 < 2
    assert in_worker_thread(eval_with_timeout, "'Straw'.lower().count('s')") == 1
    # a count on an unbounded receiver, a str method with a size argument ('x'.center(10**10)): refused
    assert in_worker_thread(eval_with_timeout, SLOW_EXPR + ".count('a')") is None
    assert in_worker_thread(eval_with_timeout, "'x'.center(3).count(' ')") is None
    assert eval_with_timeout("'a' * 10") == "a" * 10  # the main thread keeps the reference's eval semantics


# -----------------------------------------------------------------------------
# A tiny real GPT: Engine against GPT.generate, chunked prefill, capacity

VOCAB = 256  # byte ids only: the tool specials (256+) are never sampled, so the Engine forces nothing


def byte_gpt(sequence_len=64):
    model = tiny_gpt(perturb=0.1, sequence_len=sequence_len, vocab_size=VOCAB)  # away from identity blocks
    with torch.no_grad():
        model.smear_lambda.fill_(0.5)  # make smear matter
    return model.eval()


def test_engine_greedy_matches_gpt_generate():
    model = byte_gpt()
    prompt = ascii_ids("Hello wor")
    want = list(model.generate(prompt, 20, temperature=0.0))
    steps = list(Engine(model, ByteTokenizer()).generate(prompt, num_samples=3, max_tokens=20, temperature=0.0))
    assert len(set(want)) > 2  # a non-trivial continuation
    for row in range(3):
        assert [column[row] for column, _ in steps] == want


@pytest.mark.parametrize("top_k", [None, 5, 50])
def test_gpt_generate_matches_engine_when_sampling(top_k):
    model = byte_gpt()
    prompt = ascii_ids("Hello wor")
    kwargs = dict(temperature=0.9, top_k=top_k, seed=3)
    want = list(model.generate(prompt, 20, **kwargs))
    results, masks = Engine(model, ByteTokenizer()).generate_batch(prompt, max_tokens=20, **kwargs)
    assert results[0][len(prompt):] == want and all(masks[0][len(prompt):])
    assert want != list(model.generate(prompt, 20, temperature=0.0))  # really sampled, not greedy


def test_prefill_prompt_gives_the_full_forward_logits_and_a_filled_cache():
    model = byte_gpt()
    prompt = ascii_ids("Hello")
    with torch.inference_mode():
        logits, cache = prefill_prompt(model, prompt, torch.device("cpu"))
        full = model(torch.tensor([prompt]))[:, -1, :]
    assert (cache.batch_size, cache.max_seq_len, cache.get_pos()) == (1, len(prompt), len(prompt))
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def test_decode_step_cost_counts_two_flops_per_weight_and_attention_up_to_each_window():
    # sequence_len 1024: an S layer attends over 256 positions, the L layer over 1024
    model = tiny_gpt(sequence_len=1024, vocab_size=VOCAB, window_pattern="SL")
    cfg = model.config
    per_position = 4 * cfg.n_embd  # QK^T and AV: 2 FLOPs each per head dimension and cached position
    flops = lambda context: engine_module.decode_step_cost(model, 1, context)[0]
    assert flops(101) - flops(100) == 2 * per_position  # both layers see every cached position
    assert flops(301) - flops(300) == per_position  # past 256 the S layer's window no longer grows
    assert engine_module.decode_step_cost(model, 3, 100)[0] == 3 * flops(100)
    # the matmuls of a real decode step, counted by torch (the tiny value-embedding gate left aside)
    _, prompt_cache = prefill_prompt(model, list(range(40)), torch.device("cpu"))
    cache = KVCache.for_model(cfg, 1, 64, "cpu")
    cache.prefill(prompt_cache)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward(torch.tensor([[1]]), kv_cache=cache)
    assert flops(40) - 2 * 40 * per_position == pytest.approx(counter.get_total_flops(), rel=1e-3)
    # the bytes: each cached position of every layer is read once as a key and once as a value
    kv_bytes = lambda context: engine_module.decode_step_cost(model, 1, context)[1]
    head_dim = cfg.n_embd // cfg.n_head
    assert kv_bytes(101) - kv_bytes(100) == 2 * 2 * cfg.n_kv_head * head_dim * common.COMPUTE_DTYPE.itemsize


def test_engine_top_k_one_equals_greedy():
    model = byte_gpt()
    engine = Engine(model, ByteTokenizer())
    greedy = engine.generate_batch(ascii_ids("abc"), max_tokens=10, temperature=0.0)
    top1 = engine.generate_batch(ascii_ids("abc"), max_tokens=10, temperature=1.0, top_k=1, seed=7)
    assert greedy == top1


def test_chunked_prefill_equals_single_prefill():
    model = byte_gpt()
    cfg = model.config
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))

    def new_cache():
        return KVCache(batch_size=1, num_heads=cfg.n_kv_head, seq_len=32, head_dim=cfg.n_embd // cfg.n_head,
                       num_layers=cfg.n_layer, device="cpu", dtype=torch.float32)

    with torch.inference_mode():
        one = new_cache()
        single = model(ids, kv_cache=one)
        chunked_cache = new_cache()
        chunked = torch.cat([model(ids[:, a:b], kv_cache=chunked_cache) for a, b in ((0, 5), (5, 15), (15, 24))], dim=1)
        full = model(ids)
        nxt = torch.tensor([[7]])
        after_single, after_chunked = model(nxt, kv_cache=one), model(nxt, kv_cache=chunked_cache)
    tol = dict(atol=1e-5, rtol=1e-5)  # fp32; the same math in another order differs by ~1e-6
    assert torch.allclose(chunked, single, **tol) and torch.allclose(single, full, **tol)
    assert torch.allclose(after_chunked, after_single, **tol)
    assert chunked_cache.get_pos() == one.get_pos() == 25


def test_max_tokens_none_stops_at_context_on_real_model():
    class NoStopModel(AlteredLogits):
        """The real GPT with the terminal ids banned, so only the context length can end the run."""

        def alter(self, logits, ids):
            return torch.nn.functional.pad(logits, (0, 262 - VOCAB), value=float("-inf"))  # specials never win

    model = NoStopModel(byte_gpt(sequence_len=32))
    results, _ = Engine(model, ByteTokenizer()).generate_batch(ascii_ids("abcde"), num_samples=2, max_tokens=None)
    assert [len(r) for r in results] == [32, 32]


def test_self_check_matches_gpt_generate_and_skips_cuda_sync_on_cpu(monkeypatch, capsys):
    """The self-check on a tiny model with a stand-in tokenizer (dev/bench_engine --check's --depth case)."""
    from dev.bench_engine import _Tokens

    def no_cuda():
        raise RuntimeError("torch.cuda.synchronize called on CPU")

    monkeypatch.setattr(torch.cuda, "synchronize", no_cuda)
    assert engine_module.self_check(byte_gpt(), _Tokens(VOCAB))
    out = capsys.readouterr().out
    assert "Reference time: " in out and "Engine time: " in out and out.rstrip().endswith("Match: True")


# -----------------------------------------------------------------------------
# python -m nanochat.engine: the self-check users run on a trained base model

def test_self_check_runs_on_a_base_checkpoint_and_matches(tiny_base_dir, tiny_tokenizer):
    write_tiny_checkpoint(tiny_base_dir, "base", vocab_size=tiny_tokenizer.get_vocab_size(), perturb=0.1)
    proc = subprocess.run([sys.executable, "-m", "nanochat.engine"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^Reference time: \d+\.\d\ds$", proc.stdout, re.M)
    assert re.search(r"^Engine time: \d+\.\d\ds$", proc.stdout, re.M)
    assert proc.stdout.rstrip().endswith("Match: True")


def test_self_check_without_a_base_checkpoint_ends_in_one_line(tiny_base_dir):
    proc = subprocess.run([sys.executable, "-m", "nanochat.engine"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("engine: error: No checkpoints found in ")


def test_self_check_reports_a_broken_cache(tiny_base_dir, tiny_tokenizer, monkeypatch, capsys):
    # a decode cache that loses the prompt: the Engine continues from nothing, so its tokens diverge
    _, model = write_tiny_checkpoint(tiny_base_dir, "base", vocab_size=tiny_tokenizer.get_vocab_size(),
                                     perturb=0.1)
    monkeypatch.setattr(engine_module.KVCache, "prefill", lambda self, other, row=None: None)
    assert engine_module.self_check(model.eval(), tiny_tokenizer, max_tokens=16) is False
    out = capsys.readouterr().out
    assert re.search(r"^Mismatch at token \d+: reference \d+, engine \d+$", out, re.M)
    assert out.rstrip().endswith("Match: False")
