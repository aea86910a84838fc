"""
Continuous batching: the per-row-position KV-cache path (SDPA fallback and GPT forward) and the
BatchScheduler (batch invariance, Engine equivalence, tool forcing, cancel, queue limits, top_p, stats).
"""

import copy
import math
import queue
import threading
import time
from dataclasses import dataclass

import pytest
import torch

import nanochat.flash_attention as fa_module
from nanochat.batching import BatchScheduler, QueueFull, SamplingParams, TokenEvent
from nanochat.engine import Engine, KVCache

from conftest import (ASSISTANT_END, BOS, OUTPUT_END, OUTPUT_START, PYTHON_END, PYTHON_START, AlteredLogits,
                      ByteTokenizer, tiny_gpt)

VOCAB = 262
SEQ_LEN = 96
EVENT_TIMEOUT = 30  # seconds; a hung scheduler fails the test instead of blocking forever


@pytest.fixture(autouse=True)
def sdpa_attention():
    # the CPU twin of the FA3 path: these tests pin the SDPA fallback
    saved = fa_module._override_impl, fa_module.USE_FA3
    fa_module._override_impl = "sdpa"
    fa_module.USE_FA3 = fa_module._resolve_use_fa3()
    yield
    fa_module._override_impl, fa_module.USE_FA3 = saved


@pytest.fixture(scope="module")
def model():
    # away from the identity init, so logits are spread out and argmax ties are unlikely
    gpt = tiny_gpt(perturb=0.1, sequence_len=SEQ_LEN, vocab_size=VOCAB)
    with torch.no_grad():
        gpt.smear_lambda.fill_(0.5)  # smear must follow each row's own history
        gpt.lm_head.weight.mul_(20.0)
    return gpt


def new_cache(model, batch_size, seq_len):
    return KVCache.for_model(model.config, batch_size, seq_len, device="cpu", dtype=torch.float32)


def prompts(n, seed=0):
    """n prompts of different lengths (4..26): rows at different positions."""
    gen = torch.Generator().manual_seed(seed)
    return [[BOS] + torch.randint(0, 256, (3 + (7 * i) % 23,), generator=gen).tolist() for i in range(n)]


def collect(request):
    """(token ids, masks, finish_reason) of a request consuming request.events."""
    tokens, masks = [], []
    while True:
        event = request.events.get(timeout=EVENT_TIMEOUT)
        if event.token_id is not None:
            tokens.append(event.token_id)
            masks.append(event.mask)
        if event.finish_reason is not None:
            return tokens, masks, event.finish_reason


@pytest.fixture
def scheduler_factory():
    made = []

    def make(model, tokenizer=None, start=True, **kwargs):
        scheduler = BatchScheduler(model, tokenizer or ByteTokenizer(), **kwargs)
        if start:
            scheduler.start()
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.shutdown()


# -----------------------------------------------------------------------------
# Per-row positions in the KV-cache path

def test_ragged_sdpa_kvcache_matches_per_row_calls():
    gen = torch.Generator().manual_seed(0)
    B, T_new, H, Hkv, D, T_max = 3, 3, 4, 2, 8, 40
    k_cache, v_cache = torch.randn(2, B, T_max, Hkv, D, generator=gen)
    q = torch.randn(B, T_new, H, D, generator=gen)
    k, v = torch.randn(2, B, T_new, Hkv, D, generator=gen)
    positions = [5, 0, 17]
    # causal=True ignores a right window; without it a query also sees the row's later new keys, never the
    # stale slots past the row's end
    cases = ((True, (-1, 0)), (True, (6, 0)), (True, (-1, 2)), (False, (-1, -1)), (False, (6, 1)))
    for causal, window in cases:
        kc, vc = k_cache.clone(), v_cache.clone()
        seqlens = torch.tensor(positions, dtype=torch.int32)
        y = fa_module.flash_attn_with_kvcache(q, kc, vc, k=k, v=v, cache_seqlens=seqlens, causal=causal,
                                              window_size=window)
        assert seqlens.tolist() == positions  # not advanced by the kernel
        for b, pos in enumerate(positions):
            assert torch.equal(kc[b, pos:pos + T_new], k[b]) and torch.equal(vc[b, pos:pos + T_new], v[b])
            assert torch.equal(kc[b, pos + T_new:], k_cache[b, pos + T_new:])  # nothing written past the row's end
            # independent reference: explicit softmax over the row's visible keys
            keys = kc[b, :pos + T_new].repeat_interleave(H // Hkv, dim=1)  # (Tk, H, D)
            values = vc[b, :pos + T_new].repeat_interleave(H // Hkv, dim=1)
            scores = torch.einsum("thd,khd->htk", q[b], keys) / D ** 0.5
            query_pos = torch.arange(pos, pos + T_new)[:, None]
            key_pos = torch.arange(pos + T_new)[None, :]
            visible = (key_pos <= query_pos) | (not causal)  # (T_new, Tk)
            if window[0] >= 0:
                visible &= query_pos - key_pos <= window[0]
            if not causal and window[1] >= 0:
                visible &= key_pos - query_pos <= window[1]
            scores = scores.masked_fill(~visible, float("-inf"))
            want = torch.einsum("htk,khd->thd", scores.softmax(dim=-1), values)
            torch.testing.assert_close(y[b], want, atol=1e-5, rtol=1e-5)


def test_ragged_sdpa_kvcache_overflow_raises():
    k_cache = torch.zeros(2, 8, 1, 4)
    seqlens = torch.tensor([2, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="overflow"):
        fa_module.flash_attn_with_kvcache(torch.zeros(2, 1, 1, 4), k_cache, k_cache.clone(), k=torch.zeros(2, 1, 1, 4),
                                          v=torch.zeros(2, 1, 1, 4), cache_seqlens=seqlens, causal=True)


def load_rows(model, row_prompts, capacity):
    """A cache with one prompt per row, each prefilled on its own (rows end up at different positions)."""
    cache = new_cache(model, len(row_prompts), capacity)
    cache.prev_embedding = torch.zeros(len(row_prompts), 1, model.config.n_embd)
    for b, prompt in enumerate(row_prompts):
        single = new_cache(model, 1, len(prompt))
        model(torch.tensor([prompt]), kv_cache=single)
        cache.prefill(single, row=b)
    return cache


@torch.inference_mode()
def test_ragged_forward_matches_single_row_forwards(model):
    row_prompts = prompts(4)
    steps = [[7, 8, 9, 10], [11, 12, 13, 14], [15, 16, 17, 18]]  # one token per row per step
    ragged = load_rows(model, row_prompts, 64)
    batched = [model(torch.tensor(step)[:, None], kv_cache=ragged)[:, -1] for step in steps]
    assert ragged.cache_seqlens.tolist() == [len(p) + len(steps) for p in row_prompts]
    for b, prompt in enumerate(row_prompts):
        single = new_cache(model, 1, 64)
        model(torch.tensor([prompt]), kv_cache=single)
        for s, step in enumerate(steps):
            want = model(torch.tensor([[step[b]]]), kv_cache=single)[0, -1]
            # matmuls of another batch size differ in the last bits; the tokens must not
            torch.testing.assert_close(batched[s][b], want, atol=1e-4, rtol=1e-4)
            assert batched[s][b].argmax() == want.argmax()
        n = len(prompt) + len(steps)
        torch.testing.assert_close(ragged.k_cache[:, b, :n], single.k_cache[:, 0, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ragged.prev_embedding[b], single.prev_embedding[0], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_row_results_do_not_depend_on_the_other_rows(model):
    # same row 0 in two batch-invariant caches whose other rows differ in content and length (one batch is
    # even all at one position, i.e. in lockstep): row 0's logits must be bitwise identical
    mine = prompts(1, seed=5)[0]
    lockstep = load_rows(model, [mine, [3] * len(mine), [4] * len(mine)], 64)
    ragged = load_rows(model, [mine] + prompts(2, seed=9), 64)
    lockstep.batch_invariant = ragged.batch_invariant = True
    for token in (21, 22, 23):
        a = model(torch.tensor([[token], [1], [2]]), kv_cache=lockstep)
        b = model(torch.tensor([[token], [5], [6]]), kv_cache=ragged)
        assert torch.equal(a[0], b[0])


class CallCounter:
    """Counts calls of a function and passes them on."""

    def __init__(self, func):
        self.func, self.calls = func, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.func(*args, **kwargs)


@pytest.fixture
def host_syncs(monkeypatch):
    """Counts Tensor.tolist and Tensor.item calls (the host syncs a CUDA decode step would wait on)."""
    counter = CallCounter(lambda method, tensor, *args: method(tensor, *args))
    for name in ("tolist", "item"):
        # a plain function, so that it binds to the tensor as a method does
        monkeypatch.setattr(torch.Tensor, name, lambda tensor, *args, _m=getattr(torch.Tensor, name):
                            counter(_m, tensor, *args))
    return lambda: counter.calls


@torch.inference_mode()
def test_ragged_forward_is_one_attention_call_per_layer_without_host_sync(model, monkeypatch, host_syncs):
    cache = load_rows(model, prompts(3), 64)  # rows at positions 4, 11, 18
    sdpa = CallCounter(fa_module.F.scaled_dot_product_attention)
    monkeypatch.setattr(fa_module.F, "scaled_dot_product_attention", sdpa)
    syncs_before = host_syncs()
    model(torch.tensor([[7], [8], [9]]), kv_cache=cache)
    assert sdpa.calls == model.config.n_layer
    assert host_syncs() == syncs_before


def test_batch_invariant_ragged_kvcache_ignores_the_other_rows_positions():
    gen = torch.Generator().manual_seed(1)
    B, H, D, T_max = 3, 2, 8, 48
    k_cache, v_cache = torch.randn(2, B, T_max, H, D, generator=gen)
    q, k, v = torch.randn(3, B, 1, H, D, generator=gen)
    outputs = []
    for others in ([3, 40], [9, 2], [5, 5]):  # row 0 sits at 5 throughout; the last case is lockstep
        seqlens = torch.tensor([5] + others, dtype=torch.int32)
        outputs.append(fa_module.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k=k, v=v,
                                                         cache_seqlens=seqlens, causal=True,
                                                         pad_to_capacity=True))
    assert all(torch.equal(out[0], outputs[0][0]) for out in outputs[1:])
    plain = fa_module.flash_attn_with_kvcache(q[:1], k_cache[:1].clone(), v_cache[:1].clone(), k=k[:1],
                                              v=v[:1], cache_seqlens=torch.tensor([5], dtype=torch.int32),
                                              causal=True)
    torch.testing.assert_close(outputs[0][:1], plain, atol=1e-6, rtol=1e-6)


# -----------------------------------------------------------------------------
# Scheduler: equivalences

GREEDY = dict(temperature=0.0)
SEEDED = dict(temperature=1.0, top_k=40)
NUCLEUS = dict(temperature=0.8, top_p=0.9)


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED, NUCLEUS], ids=["greedy", "seeded", "top_p"])
def test_concurrent_requests_equal_each_request_alone(model, scheduler_factory, sampling):
    scheduler = scheduler_factory(model, max_batch_size=8, fixed_width=True)  # bit for bit needs fixed width
    params = [SamplingParams(max_tokens=40, seed=100 + i, **sampling) for i in range(8)]
    together = [scheduler.submit(p, sp) for p, sp in zip(prompts(8), params)]
    together = [collect(r) for r in together]
    alone = [collect(scheduler.submit(p, sp)) for p, sp in zip(prompts(8), params)]
    assert together == alone
    assert len({tuple(tokens) for tokens, _, _ in together}) > 1  # the rows really differ


def test_more_requests_than_slots_queue_and_still_match(model, scheduler_factory):
    scheduler = scheduler_factory(model, max_batch_size=3, fixed_width=True)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    requests = [scheduler.submit(p, params) for p in prompts(7)]
    together = [collect(r) for r in requests]
    alone = [collect(scheduler.submit(p, params)) for p in prompts(7)]
    assert together == alone


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_scheduler_matches_engine(model, scheduler_factory, sampling):
    scheduler = scheduler_factory(model, max_batch_size=4)
    engine = Engine(model, ByteTokenizer())
    requests = [(p, scheduler.submit(p, SamplingParams(max_tokens=30, seed=i, **sampling)))
                for i, p in enumerate(prompts(4))]
    for i, (prompt, request) in enumerate(requests):
        tokens, masks, reason = collect(request)
        results, engine_masks = engine.generate_batch(prompt, max_tokens=30, seed=i, **sampling)
        assert tokens == results[0][len(prompt):]
        assert masks == engine_masks[0][len(prompt):]
        assert reason == ("length" if len(tokens) == 30 else "stop")


def test_top_p_tiny_is_greedy(model, scheduler_factory):
    scheduler = scheduler_factory(model)
    for prompt in prompts(3):
        greedy = collect(scheduler.submit(prompt, SamplingParams(max_tokens=20, temperature=0.0)))
        nucleus = collect(scheduler.submit(prompt, SamplingParams(max_tokens=20, temperature=1.5, top_p=1e-6, seed=3)))
        assert nucleus == greedy


def test_seed_none_gives_varied_outputs_and_same_seed_repeats(model, scheduler_factory):
    scheduler = scheduler_factory(model)
    prompt = prompts(1)[0]
    unseeded = {tuple(collect(scheduler.submit(prompt, SamplingParams(max_tokens=8, temperature=1.0)))[0])
                for _ in range(4)}
    assert len(unseeded) > 1
    seeded = [collect(scheduler.submit(prompt, SamplingParams(max_tokens=8, seed=11))) for _ in range(2)]
    assert seeded[0] == seeded[1]


def token_events(request):
    """The events of a request that carry a token, and its finish reason."""
    events = []
    while True:
        event = request.events.get(timeout=EVENT_TIMEOUT)
        if event.token_id is not None:
            events.append(event)
        if event.finish_reason is not None:
            return events, event.finish_reason


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_logprobs_are_the_models_and_the_sampled_tokens_stay_the_same(model, scheduler_factory, sampling):
    scheduler = scheduler_factory(model, max_batch_size=4)
    prompt = prompts(3)[2]
    plain = collect(scheduler.submit(prompt, SamplingParams(max_tokens=12, seed=5, **sampling)))
    request = scheduler.submit(prompt, SamplingParams(max_tokens=12, seed=5, logprobs=3, echo_logprobs=True,
                                                      **sampling))
    events, reason = token_events(request)
    tokens = [event.token_id for event in events]
    assert (tokens, reason) == (plain[0], plain[2])  # asking for log-probabilities draws no random number
    # one forward over the whole sequence, no cache: position t's log-softmax scores token t + 1
    sequence = prompt + tokens
    with torch.no_grad():
        expected = model(torch.tensor([sequence]))[0].float().log_softmax(dim=-1)
    assert request.prompt_logprobs[0] is None  # nothing precedes the first token
    got = request.prompt_logprobs[1:] + [event.logprobs for event in events]
    assert len(got) == len(sequence) - 1
    for t, (logprob, top) in enumerate(got):
        assert logprob == pytest.approx(expected[t, sequence[t + 1]].item(), abs=1e-4)
        values, ids = expected[t].topk(3)
        assert [i for i, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
    if sampling is GREEDY:  # each reply token is its step's likeliest
        assert [top[0][0] for _, top in got[len(prompt) - 1:]] == tokens


def test_logprobs_zero_gives_no_alternatives_and_forced_tool_tokens_have_theirs(scheduler_factory):
    model = ScriptedModel(WORKED_SCRIPT, len(PROMPT))
    scheduler = scheduler_factory(model)
    events, reason = token_events(scheduler.submit(PROMPT, SamplingParams(max_tokens=50, temperature=0.0,
                                                                          logprobs=0)))
    assert [e.token_id for e in events] == WORKED_TOKENS and reason == "stop"
    assert all(event.logprobs[1] == () for event in events)
    # the scripted logits put 1.0 on the script's token and 0 on the others: a sampled token has the high
    # log-probability; a forced one (mask 0) has the model's for it, low when the script proposed another
    low, high = -math.log(math.e + VOCAB - 1), 1.0 - math.log(math.e + VOCAB - 1)
    for event in events:
        assert any(event.logprobs[0] == pytest.approx(v, abs=1e-6) for v in ([high] if event.mask else [low, high]))
    assert any(event.mask == 0 and event.logprobs[0] == pytest.approx(low, abs=1e-6) for event in events)


class WidthRecorder(AlteredLogits):
    """The real GPT, recording each decode step's batch width and the logits it returned."""

    def __init__(self, model):
        super().__init__(model)
        self.widths, self.logits = [], []

    def alter(self, logits, ids):
        if ids.size(1) == 1:
            self.widths.append(ids.size(0))
            self.logits.append(logits.clone())
        return logits


@pytest.mark.parametrize("fixed_width", [False, True])
def test_decode_width_follows_the_load_unless_fixed(model, scheduler_factory, fixed_width):
    recorder = WidthRecorder(NoStopModel(model))
    scheduler = scheduler_factory(recorder, max_batch_size=4, start=False, fixed_width=fixed_width)
    lengths = (9, 6, 3)
    requests = [scheduler.submit(p, SamplingParams(max_tokens=n, temperature=0.0))
                for p, n in zip(prompts(3), lengths)]
    scheduler.start()
    assert [collect(r)[2] for r in requests] == ["length"] * 3
    # slots 0-2 until the request in slot 2 ends, then two, then one (fixed width: always every slot)
    want = [4] * 8 if fixed_width else [3, 3, 2, 2, 2, 1, 1, 1]
    assert recorder.widths == want


def test_lone_request_computes_what_a_one_slot_scheduler_computes(model, scheduler_factory):
    runs = []
    for max_batch_size in (8, 1):
        recorder = WidthRecorder(NoStopModel(model))
        scheduler = scheduler_factory(recorder, max_batch_size=max_batch_size)
        collect(scheduler.submit(prompts(1)[0], SamplingParams(max_tokens=6, seed=3)))
        runs.append(recorder.logits)
    assert all(torch.equal(a, b) for a, b in zip(*runs)) and len(runs[0]) == len(runs[1]) == 5


def test_one_host_sync_per_decode_step(model, scheduler_factory, host_syncs):
    scheduler = scheduler_factory(NoStopModel(model), max_batch_size=4, start=False)
    requests = [scheduler.submit(p, SamplingParams(max_tokens=8, **sampling))
                for p, sampling in zip(prompts(3), (GREEDY, SEEDED, NUCLEUS))]
    syncs_before = host_syncs()
    scheduler.start()
    assert [collect(r)[2] for r in requests] == ["length"] * 3
    assert host_syncs() - syncs_before == 3 + 7  # one per prefill, then one per decode step


# -----------------------------------------------------------------------------
# Scheduler with a scripted model: tool forcing and stop handling

@dataclass
class ScriptConfig:
    n_kv_head: int = 2
    n_head: int = 2
    n_embd: int = 8
    n_layer: int = 1
    sequence_len: int = 64
    vocab_size: int = VOCAB


class ScriptedModel:
    """Row b at cache position p proposes script[p + T - 1 - prompt_len] (clamped): the Engine's test model,
    but driven by each row's own position so it works under continuous batching."""

    def __init__(self, script, prompt_len):
        self.script, self.prompt_len = script, prompt_len
        self.config = ScriptConfig()
        self.fail_next_decode = False

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        if T == 1 and self.fail_next_decode:
            self.fail_next_decode = False
            raise RuntimeError("simulated device failure")
        logits = torch.zeros(B, T, VOCAB)
        for b, pos in enumerate(kv_cache.cache_seqlens.tolist()):
            step = min(max(pos + T - self.prompt_len, 0), len(self.script) - 1)
            logits[b, -1, self.script[step]] = 1.0
        kv_cache.advance(T)
        return logits


PROMPT = [BOS] + list(b"Hello")
WORKED_SCRIPT = list(b"a") + [PYTHON_START] + list(b"1+2") + [PYTHON_END] + list(b"xxxxxb") + [ASSISTANT_END]
WORKED_TOKENS = list(b"a") + [PYTHON_START] + list(b"1+2") + [PYTHON_END, OUTPUT_START] + list(b"3") + [OUTPUT_END] + list(b"xxb")
WORKED_MASKS = [1] * 6 + [0] * 3 + [1] * 3


def test_tool_output_is_forced_like_in_the_engine(scheduler_factory):
    model = ScriptedModel(WORKED_SCRIPT, len(PROMPT))
    scheduler = scheduler_factory(model, max_batch_size=2)
    requests = [scheduler.submit(PROMPT, SamplingParams(max_tokens=50, temperature=0.0)) for _ in range(3)]
    for request in requests:
        assert collect(request) == (WORKED_TOKENS, WORKED_MASKS, "stop")
    results, masks = Engine(model, ByteTokenizer()).generate_batch(PROMPT, max_tokens=50, temperature=0.0)
    assert results[0][len(PROMPT):] == WORKED_TOKENS and masks[0][len(PROMPT):] == WORKED_MASKS


def test_forced_tokens_count_toward_max_tokens_and_length_event_carries_the_last_token(scheduler_factory):
    scheduler = scheduler_factory(ScriptedModel(WORKED_SCRIPT, len(PROMPT)))
    request = scheduler.submit(PROMPT, SamplingParams(max_tokens=8, temperature=0.0))
    events = [request.events.get(timeout=EVENT_TIMEOUT) for _ in range(8)]
    assert [e.token_id for e in events] == WORKED_TOKENS[:8]
    assert [e.finish_reason for e in events] == [None] * 7 + ["length"]
    assert events[-1].mask == 0  # the 8th token is forced tool output
    assert request.events.empty() and request.finish_reason == "length"


@pytest.mark.parametrize("terminal", [ASSISTANT_END, BOS, 120])
def test_stop_tokens_end_without_being_emitted(scheduler_factory, terminal):
    script = list(b"ab") + [terminal] + list(b"cd")
    scheduler = scheduler_factory(ScriptedModel(script, len(PROMPT)))
    request = scheduler.submit(PROMPT, SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(120,)))
    events = []
    while not events or events[-1].finish_reason is None:
        events.append(request.events.get(timeout=EVENT_TIMEOUT))
    assert events == [TokenEvent(97, 1, None), TokenEvent(98, 1, None), TokenEvent(None, 0, "stop")]


def test_model_error_ends_active_requests_and_the_scheduler_keeps_serving(scheduler_factory):
    model = ScriptedModel(list(b"abcdefgh"), len(PROMPT))
    scheduler = scheduler_factory(model, start=False)
    request = scheduler.submit(PROMPT, SamplingParams(max_tokens=5, temperature=0.0))
    model.fail_next_decode = True
    scheduler.start()
    assert collect(request) == ([97], [1], "error")  # the first token comes from the prefill
    assert collect(scheduler.submit(PROMPT, SamplingParams(max_tokens=3, temperature=0.0))) == (
        list(b"abc"), [1, 1, 1], "length")


# -----------------------------------------------------------------------------
# Scheduler: lifecycle, limits, stats

def test_cancel_frees_the_slot_for_a_queued_request(model, scheduler_factory):
    scheduler = scheduler_factory(model, max_batch_size=1, start=False)
    received = []

    def cancel_after_two(event):
        received.append(event)
        if len(received) == 2:
            first.cancel()

    first = scheduler.submit(prompts(1)[0], SamplingParams(max_tokens=50, temperature=0.0), on_event=cancel_after_two)
    second = scheduler.submit(prompts(2)[1], SamplingParams(max_tokens=10, temperature=0.0))
    assert first.events is None and scheduler.stats()["queued"] == 2
    scheduler.start()
    second_result = collect(second)
    assert [e.finish_reason for e in received] == [None, None, "cancelled"]
    assert received[-1].token_id is None and first.finish_reason == "cancelled"
    assert second_result == collect(scheduler.submit(prompts(2)[1], SamplingParams(max_tokens=10, temperature=0.0)))


def test_cancel_while_queued(model, scheduler_factory):
    scheduler = scheduler_factory(model, start=False)
    request = scheduler.submit(prompts(1)[0], SamplingParams(max_tokens=5))
    request.cancel()
    scheduler.start()
    assert collect(request) == ([], [], "cancelled")


def test_a_request_cancelled_while_the_queue_is_filtered_still_ends(model, scheduler_factory):
    class CancelledAfterOneLook(threading.Event):  # the client's cancel lands between two reads of the flag
        looks = 0

        def is_set(self):
            self.looks += 1
            return self.looks > 1

    # banned special ids: a sampled first token could otherwise be a terminal one, ending it with "stop"
    scheduler = scheduler_factory(NoStopModel(model), start=False)
    first, second = (scheduler.submit(prompts(1)[0], SamplingParams(max_tokens=5)) for _ in range(2))
    first.cancel()
    second._cancelled = CancelledAfterOneLook()
    scheduler.start()
    assert collect(first) == ([], [], "cancelled")
    assert collect(second)[2] == "cancelled"


def test_queue_full_and_shutdown_cancels_pending(model, scheduler_factory):
    # capacity is the slots plus max_queue: one slot and a waiting room of two take three requests
    scheduler = scheduler_factory(model, max_batch_size=1, max_queue=2, start=False)
    params = SamplingParams(max_tokens=5)
    waiting = [scheduler.submit(prompts(1)[0], params) for _ in range(3)]
    with pytest.raises(QueueFull):
        scheduler.submit(prompts(1)[0], params)
    assert scheduler.stats()["queued"] == 3
    scheduler.shutdown()
    assert [collect(r) for r in waiting] == [([], [], "cancelled")] * 3
    with pytest.raises(RuntimeError, match="shut down"):
        scheduler.submit(prompts(1)[0], params)


def test_a_cancelled_request_holds_no_place_in_the_queue(model, scheduler_factory):
    # a client that went away and retries at once must not get a 429 for its own dead request
    scheduler = scheduler_factory(NoStopModel(model), max_batch_size=1, max_queue=0, start=False)
    params = SamplingParams(max_tokens=5)  # sampled, with no terminal id to sample: it runs to its length
    gone = scheduler.submit(prompts(1)[0], params)
    with pytest.raises(QueueFull):
        scheduler.submit(prompts(1)[0], params)
    gone.cancel()
    retry = scheduler.submit(prompts(1)[0], params)
    scheduler.start()
    assert collect(gone) == ([], [], "cancelled")
    assert collect(retry)[2] == "length"


def test_a_cancelled_request_that_is_decoding_holds_no_place_either(model, scheduler_factory):
    # its slot is freed at the next step; a retry submitted before that must not get a 429 for it
    scheduler = scheduler_factory(model, max_batch_size=1, max_queue=0)
    params = SamplingParams(max_tokens=5, temperature=0.0)
    decoding, release = threading.Event(), threading.Event()

    def hold(event):  # keeps the decode thread inside its step, so the cancel cannot be acted on yet
        decoding.set()
        release.wait(EVENT_TIMEOUT)

    gone = scheduler.submit(prompts(1)[0], SamplingParams(max_tokens=60, temperature=0.0), on_event=hold)
    try:
        assert decoding.wait(EVENT_TIMEOUT)
        with pytest.raises(QueueFull):
            scheduler.submit(prompts(1)[0], params)
        gone.cancel()
        retry = scheduler.submit(prompts(1)[0], params)
    finally:
        release.set()
    assert collect(retry)[2] == "length" and gone.finish_reason == "cancelled"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices: a scheduler on cuda:1")
def test_the_decode_thread_runs_on_its_own_cuda_device(model, scheduler_factory):
    # what uses the current device (device="cuda", synchronize, new streams) must land on the worker's GPU
    scheduler = scheduler_factory(copy.deepcopy(model).to("cuda:1"))
    events = queue.SimpleQueue()
    scheduler.submit(prompts(1)[0], SamplingParams(max_tokens=3),
                     on_event=lambda event: events.put((torch.cuda.current_device(), event.finish_reason)))
    seen = [events.get(timeout=EVENT_TIMEOUT)]
    while seen[-1][1] is None:  # until the final event
        seen.append(events.get(timeout=EVENT_TIMEOUT))
    assert {device for device, _ in seen} == {1}


def test_shutdown_cancels_active_requests_and_stops_the_thread(model, scheduler_factory):
    scheduler = scheduler_factory(model)
    first_token, release = threading.Event(), threading.Event()

    def hold_first(event):
        if not first_token.is_set():
            first_token.set()
            release.wait(EVENT_TIMEOUT)  # keep the decode thread inside this step until shutdown began

    events = []
    request = scheduler.submit(prompts(1)[0], SamplingParams(max_tokens=60, temperature=0.0),
                               on_event=lambda e: (events.append(e), hold_first(e)))
    assert first_token.wait(EVENT_TIMEOUT)
    stopper = threading.Thread(target=scheduler.shutdown)
    stopper.start()
    deadline = time.time() + EVENT_TIMEOUT
    while time.time() < deadline:  # shutdown has begun once submit refuses
        try:
            scheduler.submit(prompts(1)[0], SamplingParams(max_tokens=1)).cancel()
        except RuntimeError:
            break
        time.sleep(0.01)
    release.set()
    stopper.join(EVENT_TIMEOUT)
    assert not stopper.is_alive()
    assert events[-1] == TokenEvent(None, 0, "cancelled") and request.finish_reason == "cancelled"
    assert not any(t.name == "nanochat-batching" and t.is_alive() for t in threading.enumerate())


def test_submit_validation(model, scheduler_factory):
    scheduler = scheduler_factory(model, start=False)
    prompt = prompts(1)[0]
    with pytest.raises(ValueError, match="empty"):
        scheduler.submit([], SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="context"):
        scheduler.submit(prompt, SamplingParams(max_tokens=SEQ_LEN - len(prompt) + 1))
    scheduler.submit(prompt, SamplingParams(max_tokens=SEQ_LEN - len(prompt)))  # exactly fills the context
    bad = [dict(max_tokens=0), dict(max_tokens=5, temperature=-1.0), dict(max_tokens=5, top_k=-2),
           dict(max_tokens=5, top_p=0.0), dict(max_tokens=5, top_p=1.5), dict(max_tokens=5, seed=1.5),
           dict(max_tokens=5, logprobs=-1), dict(max_tokens=5, echo_logprobs=True)]
    for kwargs in bad:
        field = list(kwargs)[-1]
        with pytest.raises(ValueError, match=f"^{field} "):  # the message names the bad field
            scheduler.submit(prompt, SamplingParams(**kwargs))
    with pytest.raises(ValueError, match="prompt_tokens"):
        scheduler.submit([BOS, VOCAB], SamplingParams(max_tokens=5))


def test_constructor_and_start_refuse_what_cannot_work(model):
    for sizes in (dict(max_batch_size=0), dict(max_queue=-1)):
        with pytest.raises(ValueError, match="max_batch_size >= 1 and max_queue >= 0"):
            BatchScheduler(model, ByteTokenizer(), **sizes)
    scheduler = BatchScheduler(model, ByteTokenizer())
    scheduler.start()
    scheduler.start()  # a second start is a no-op: still one decode thread
    assert sum(t.name == "nanochat-batching" for t in threading.enumerate()) == 1
    scheduler.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        scheduler.start()


def test_shutdown_called_from_on_event_ends_every_request_without_an_error(model, scheduler_factory, caplog):
    scheduler = scheduler_factory(model, start=False)
    received = []

    def stop_the_server(event):
        received.append(event)
        if len(received) == 1:
            scheduler.shutdown()  # on the decode thread: must not wait for itself

    first = scheduler.submit(prompts(1)[0], SamplingParams(max_tokens=20, temperature=0.0),
                             on_event=stop_the_server)
    second = scheduler.submit(prompts(2)[1], SamplingParams(max_tokens=20, temperature=0.0))
    scheduler.start()
    assert collect(second)[2] == "cancelled"
    # the step under way finishes (one more token at most), then every request is cancelled
    assert [e.finish_reason for e in received] in ([None, "cancelled"], [None, None, "cancelled"])
    assert first.finish_reason == "cancelled"
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


class NoStopModel(AlteredLogits):
    """The real GPT with the special ids banned, so only max_tokens can end a request."""

    def alter(self, logits, ids):
        logits[..., 256:] = float("-inf")
        return logits


def test_requests_filling_the_whole_context_run_to_length(model, scheduler_factory):
    scheduler = scheduler_factory(NoStopModel(model), max_batch_size=2)
    requests = [scheduler.submit(p, SamplingParams(max_tokens=SEQ_LEN - len(p), seed=2)) for p in prompts(3)]
    for prompt, request in zip(prompts(3), requests):
        tokens, _, reason = collect(request)
        assert reason == "length" and len(tokens) == SEQ_LEN - len(prompt)


def test_stats_count_requests_and_tokens(model, scheduler_factory):
    scheduler = scheduler_factory(model, max_batch_size=4)
    assert scheduler.stats() == {"active": 0, "queued": 0, "max_batch_size": 4, "completed": 0, "tokens_generated": 0}
    results = [collect(r) for r in [scheduler.submit(p, SamplingParams(max_tokens=9, seed=1)) for p in prompts(6)]]
    stats = scheduler.stats()
    assert stats["completed"] == 6 and stats["active"] == 0 and stats["queued"] == 0
    assert stats["tokens_generated"] == sum(len(tokens) for tokens, _, _ in results)


class PoisonedLogits(AlteredLogits):
    """The real GPT whose every logit row holds one non-finite value (at token 65)."""

    def __init__(self, model, value):
        super().__init__(model)
        self.value = value

    def alter(self, logits, ids):
        logits[..., 65] = self.value
        return logits


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_end_a_greedy_request_with_an_error(model, scheduler_factory, value):
    # +inf is not a "very likely" token: argmax would pick it, so samplability must be checked first
    scheduler = scheduler_factory(PoisonedLogits(model, value))
    request = scheduler.submit(prompts(1)[0], SamplingParams(max_tokens=5, temperature=0.0))
    assert collect(request) == ([], [], "error")


def test_a_stop_token_on_the_last_allowed_step_is_a_stop_and_is_not_counted(scheduler_factory):
    # max_tokens reached and a stop token at once: the stop wins, so the token is not delivered
    scheduler = scheduler_factory(ScriptedModel(list(b"ab") + [ASSISTANT_END], len(PROMPT)))
    request = scheduler.submit(PROMPT, SamplingParams(max_tokens=3, temperature=0.0))
    assert collect(request) == (list(b"ab"), [1, 1], "stop")
    assert scheduler.stats()["tokens_generated"] == 2  # the final event carries no token


def test_a_consumer_that_raises_is_treated_as_gone_and_its_request_is_cancelled(scheduler_factory, caplog):
    scheduler = scheduler_factory(ScriptedModel(list(b"abcdefgh"), len(PROMPT)))
    received = queue.SimpleQueue()

    def fails_once(event):
        received.put(event)
        if event.token_id == 97:
            raise ConnectionError("client went away")

    request = scheduler.submit(PROMPT, SamplingParams(max_tokens=8, temperature=0.0), on_event=fails_once)
    events = [received.get(timeout=EVENT_TIMEOUT)]
    while events[-1].finish_reason is None:
        events.append(received.get(timeout=EVENT_TIMEOUT))
    # it ends at the next step boundary: the step under way may deliver one more token
    assert events[0] == TokenEvent(97, 1, None) and events[-1] == TokenEvent(None, 0, "cancelled")
    assert len(events) <= 3
    assert request.finish_reason == "cancelled" and "client went away" in caplog.text
