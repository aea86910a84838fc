"""
The one sampler (nanochat.sampling.sample_next_token) used by GPT.generate, the Engine and the scheduler:
greedy below the temperature epsilon, top-k, full vocabulary, top-p (nucleus) and their combination.
"""

import pytest
import torch

from nanochat.sampling import TEMPERATURE_EPSILON, sample_next_token


def test_sampler_temperature_zero_is_argmax_and_ignores_rng():
    logits = torch.randn(5, 50)
    want = logits.argmax(dim=-1, keepdim=True)
    assert torch.equal(sample_next_token(logits, None, temperature=0.0), want)
    assert torch.equal(sample_next_token(logits, None, temperature=0.0, top_k=3), want)
    assert torch.equal(sample_next_token(logits, None, temperature=0.0, top_p=0.5), want)


def test_sampler_top_k_stays_in_top_k():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 100, generator=gen)
    ids = sample_next_token(logits.repeat(8, 1), gen, temperature=2.0, top_k=5)
    top5 = torch.topk(logits, 5, dim=-1).indices.repeat(8, 1)
    assert ids.shape == (512, 1) and ids.dtype == torch.long
    assert (ids == top5).any(dim=-1).all()


@pytest.mark.parametrize("top_k", [None, 0])
def test_sampler_without_top_k_uses_full_vocab(top_k):
    gen = torch.Generator().manual_seed(0)
    ids = sample_next_token(torch.zeros(2000, 10), gen, temperature=1.0, top_k=top_k)
    assert set(ids[:, 0].tolist()) == set(range(10))


@pytest.mark.parametrize("top_k", [None, 0])
def test_sampler_full_vocab_draws_are_the_references(top_k):
    # the reference Engine: softmax(logits / temperature) over the whole vocabulary, one draw per row
    logits = torch.randn(256, 50, generator=torch.Generator().manual_seed(0))
    ids = sample_next_token(logits, torch.Generator().manual_seed(1), temperature=0.7, top_k=top_k)
    probs = torch.softmax(logits / 0.7, dim=-1)
    assert torch.equal(ids, torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(1)))


def test_sampler_clamps_top_k_to_vocab():
    gen = torch.Generator().manual_seed(0)
    ids = sample_next_token(torch.zeros(2000, 10), gen, temperature=1.0, top_k=1000)
    assert set(ids[:, 0].tolist()) == set(range(10))


@pytest.mark.parametrize("temperature", [1e-39, 2e-39, 1e-40, 5e-324, 0.5e-6])
def test_sampler_below_the_temperature_epsilon_is_argmax(temperature):
    # logits / 1e-39 overflow float32 to inf, and softmax(inf) is NaN: these must be argmax instead
    assert temperature < TEMPERATURE_EPSILON
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 5
    want = logits.argmax(dim=-1, keepdim=True)
    for top_k in (None, 5):
        assert torch.equal(sample_next_token(logits, None, temperature=temperature, top_k=top_k), want)


def test_sampler_at_the_temperature_epsilon_still_samples():
    gen = torch.Generator().manual_seed(0)
    ids = sample_next_token(torch.zeros(400, 10), gen, temperature=TEMPERATURE_EPSILON)
    assert len(set(ids[:, 0].tolist())) > 1  # equal logits: a draw, not argmax


def test_sampler_rejects_negative_temperature():
    with pytest.raises(AssertionError, match="non-negative"):
        sample_next_token(torch.zeros(1, 10), None, temperature=-0.1)


def test_top_p_below_float32_resolution_keeps_the_top_token():
    # 1e-300 is 0 in float32, where `mass before >= top_p` would drop every token, the top one included
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5]])
    gen = torch.Generator().manual_seed(0)
    for top_p in (1e-300, 5e-324):
        assert {sample_next_token(logits, gen, 1.0, top_p=top_p).item() for _ in range(20)} == {1}


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    everything = {0, 1, 2, 3}
    for top_p, allowed in ((0.7, {1, 3}), (0.85, {1, 2, 3}), (0.5, {1}), (1.0, everything), (None, everything)):
        seen = {sample_next_token(logits, gen, 1.0, top_p=top_p).item() for _ in range(400)}
        assert seen == allowed, top_p
    # top_k applies first
    assert {sample_next_token(logits, gen, 1.0, top_k=2, top_p=0.99).item() for _ in range(200)} == {1, 3}
