"""
The one token sampler: temperature, top-k and top-p (nucleus), used by GPT.generate, the Engine and the
continuous-batching scheduler, so that all three draw the same tokens for the same logits and generator.
"""

import torch
import torch.nn.functional as F

# Temperatures below this sample greedily. Dividing logits by a tiny temperature overflows float32 (1e-39
# turns a logit of 1 into inf, and softmax of inf is NaN); and already at 1e-6 every logit more than ~1e-4
# below the top one gets probability exactly 0 (exp underflows), so argmax is the same answer, made safely.
TEMPERATURE_EPSILON = 1e-6


def is_greedy(temperature):
    """True when a temperature means argmax: 0, or below TEMPERATURE_EPSILON."""
    return temperature < TEMPERATURE_EPSILON


def keep_nucleus(probs, top_p):
    """Zero the tail of probs (sorted descending along the last dim) beyond the smallest prefix whose mass
    reaches top_p. The top token always stays: top_p is compared in float32, where a tiny top_p such as
    1e-300 is 0 and `mass before >= top_p` would otherwise drop every token."""
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop = mass_before >= top_p
    drop[..., 0] = False
    return probs.masked_fill(drop, 0.0)


@torch.inference_mode()
def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """Next ids (B, 1) from logits (B, V), one independent draw per row with torch.multinomial(generator=rng).
    Argmax at temperature 0 (or below TEMPERATURE_EPSILON). Else softmax(logits / temperature), restricted
    to the top_k logits when top_k > 0 (None or 0: the full vocabulary), then to the nucleus when
    top_p < 1 (None or 1.0: off). Without top_p these are exactly the reference Engine's draws."""
    assert temperature >= 0.0, "temperature must be non-negative"
    if is_greedy(temperature):
        return torch.argmax(logits, dim=-1, keepdim=True)
    nucleus = top_p is not None and top_p < 1.0
    if top_k is not None and top_k > 0:
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)  # sorted, descending
    elif nucleus:
        values, indices = torch.sort(logits, dim=-1, descending=True)
    else:  # the full vocabulary, in id order
        values, indices = logits, None
    probs = F.softmax(values / temperature, dim=-1)
    if nucleus:
        probs = keep_nucleus(probs, top_p)
    choice = torch.multinomial(probs, num_samples=1, generator=rng)  # (B, 1), an index into values
    return choice if indices is None else indices.gather(-1, choice)
