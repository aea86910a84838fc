"""
Attention switch: Flash Attention 3 on Hopper, PyTorch SDPA everywhere else.

Both entry points follow the FA3 calling convention (layout (B, T, heads, D), window_size=(left, right),
queries bottom-right aligned against the keys), so the model never needs to know which kernel runs.

Which kernel runs is decided by module globals, read at call time:
- HAS_FA3: the FA3 kernels were fetched (Hopper only) and passed a numerical probe against SDPA.
- _override_impl: None | 'fa3' | 'sdpa'; initialised from the env var NANOCHAT_ATTN, tests assign it.
- USE_FA3 = _resolve_use_fa3(); reassign it after changing _override_impl.
On a machine without CUDA, importing this module does no work (no `kernels` import, no hub access).
"""

import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from nanochat.common import print0

_FA3_REPO = "varunneal/flash-attention-3"
_HOPPER_MAJOR = 9  # the hub build targets sm90 only: Ada (sm89) and Blackwell (sm100) use SDPA
_IMPLS = ("fa3", "sdpa")
_PROBE_SHAPE = (1, 64, 2, 64)  # (B, T, H, D): tiny, with T beyond the window so the window is exercised
_PROBE_WINDOW = (16, 0)
_PROBE_CACHE_LEN = 128
_PROBE_TOL = 1e-2  # atol and rtol: two correct bf16 kernels agree to about this


# -----------------------------------------------------------------------------
# Choosing the implementation

def _load_flash_attention_3():
    """The FA3 kernel module if this is a Hopper GPU and the kernel loads and passes its probe, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        major, _ = torch.cuda.get_device_capability()
        if major != _HOPPER_MAJOR:
            return None
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from kernels import get_kernel  # imported here: it pulls in the HF hub client
        fa3 = get_kernel(_FA3_REPO).flash_attn_interface
    except Exception as e:  # no package, no network, no matching build: all mean "no FA3"
        print0(f"FA3 not loaded ({type(e).__name__}: {e}); using PyTorch SDPA attention")
        return None
    failure = _probe_fa3(fa3, torch.device("cuda"))
    if failure is not None:
        print0(f"FA3 loaded but failed its probe ({failure}); using PyTorch SDPA attention")
        return None
    return fa3


def _probe_fa3(fa3, device):
    """Run fa3 once, through both entry points, against SDPA. Returns None if it agrees, else the reason."""
    # A kernel that imports fine can still be built for another CUDA/torch ABI or return garbage.
    try:
        want, outputs = _probe_outputs(fa3, device)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    for name, out in outputs.items():
        if not isinstance(out, torch.Tensor) or out.shape != want.shape:
            return f"{name} returned {type(out).__name__}, expected a tensor of shape {tuple(want.shape)}"
        if not torch.allclose(out.float(), want.float(), atol=_PROBE_TOL, rtol=_PROBE_TOL):
            return f"{name} differs from SDPA by up to {(out.float() - want.float()).abs().max().item():.3g}"
    return None


def _probe_outputs(fa3, device):
    """SDPA's output and fa3's two outputs ({name: output}) on one small random bf16 problem."""
    B, T, H, D = _PROBE_SHAPE
    gen = torch.Generator(device=device).manual_seed(0)  # private RNG: leave the global seed alone
    q, k, v = (torch.randn(B, T, H, D, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(3))
    k_cache, v_cache = torch.zeros(2, B, _PROBE_CACHE_LEN, H, D, device=device, dtype=torch.bfloat16)
    seqlens = torch.zeros(B, dtype=torch.int32, device=device)
    want = _sdpa_func(q, k, v, causal=True, window_size=_PROBE_WINDOW)
    outputs = {
        "flash_attn_func": fa3.flash_attn_func(q, k, v, causal=True, window_size=_PROBE_WINDOW),
        "flash_attn_with_kvcache": fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens,
                                                               causal=True, window_size=_PROBE_WINDOW),
    }
    return want, outputs


def _env_override():
    """NANOCHAT_ATTN=fa3|sdpa forces an implementation; unset or empty means automatic."""
    value = os.environ.get("NANOCHAT_ATTN", "").strip().lower()
    if not value:
        return None
    if value not in _IMPLS:
        raise ValueError(f"NANOCHAT_ATTN must be one of {_IMPLS} or unset, got {value!r}")
    return value


def _resolve_use_fa3():
    """Whether the public functions should call FA3, given _override_impl, HAS_FA3 and the compute dtype."""
    if _override_impl == "fa3":
        assert HAS_FA3, "Cannot override to FA3: not available on this hardware"
        return True
    if _override_impl == "sdpa" or not HAS_FA3:
        return False
    from nanochat.common import COMPUTE_DTYPE  # lazily: deciding the dtype may query CUDA
    return COMPUTE_DTYPE == torch.bfloat16  # the Hopper kernels take bf16/fp8 only


# -----------------------------------------------------------------------------
# SDPA fallback. Inside these helpers tensors are (B, heads, T, D).

def _band_mask(Tq, Tk, left, right, device):
    """Boolean (Tq, Tk) mask, True = attend: key j is visible to query i iff i - left <= j <= i + right.
    Queries sit at absolute positions Tk - Tq .. Tk - 1 (bottom-right aligned); a negative bound is unbounded."""
    if left < 0 and right < 0:
        return None
    row = (Tk - Tq) + torch.arange(Tq, device=device)[:, None]
    col = torch.arange(Tk, device=device)[None, :]
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= (row - col) <= left
    if right >= 0:
        mask &= (col - row) <= right
    return mask


def _sdpa_attention(q, k, v, window_size, enable_gqa):
    """Causal attention with a left window of window_size[0] (-1: unbounded); window_size[1] is ignored."""
    Tq, Tk, w = q.size(2), k.size(2), window_size[0]
    if (w < 0 or w >= Tq) and Tq == Tk:
        # the window covers the whole sequence: plain causal, the only case flash SDPA kernels take
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if Tq == 1:
        # decode: the single query is the last position, so the window is a slice of the keys
        if 0 <= w < Tk:
            start = max(0, Tk - (w + 1))
            k, v = k[:, :, start:], v[:, :, start:]
        return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=enable_gqa)
    # sliding-window training or chunked prefill (Tq < Tk): an explicit dense mask
    mask = _band_mask(Tq, Tk, w, 0, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def _sdpa_func(q, k, v, causal, window_size):
    """SDPA with the FA3 contract; inputs and output are (B, T, heads, D)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    enable_gqa = q.size(1) != k.size(1)
    left, right = window_size
    if causal or right == 0:
        y = _sdpa_attention(q, k, v, (left, 0), enable_gqa)
    else:
        mask = _band_mask(q.size(2), k.size(2), left, right, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
    return y.transpose(1, 2)


def cache_position_range(cache_seqlens):
    """(lowest, highest) row position of a cache as Python ints (one host sync); equal when the rows decode in lockstep."""
    positions = cache_seqlens.tolist()
    return min(positions), max(positions)


def _sdpa_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal, window_size):
    """The kv-cache contract on SDPA: write k, v at [pos, pos + T_new), attend over [0, pos + T_new)."""
    if cache_seqlens is None:
        raise ValueError("the SDPA fallback of flash_attn_with_kvcache needs cache_seqlens")
    positions = cache_seqlens.tolist()  # host sync
    low, high = min(positions), max(positions)
    end = high + q.size(1)
    if end > k_cache.size(1):
        raise ValueError(f"KV cache overflow: positions [{high}, {end}) do not fit a cache of length {k_cache.size(1)}")
    if low != high:
        return _sdpa_with_ragged_kvcache(q, k_cache, v_cache, k, v, positions, causal, window_size)
    pos = low  # every row at the same position: one call over contiguous slices (the fast path)
    if k is not None and v is not None:
        k_cache[:, pos:end] = k  # in place, casting to the cache dtype; the caller advances cache_seqlens
        v_cache[:, pos:end] = v
    # a cache kept in another dtype than the activations would otherwise make SDPA reject the call
    k_full, v_full = k_cache[:, :end].to(q.dtype), v_cache[:, :end].to(q.dtype)
    return _sdpa_func(q, k_full, v_full, causal, window_size)


def _sdpa_with_ragged_kvcache(q, k_cache, v_cache, k, v, positions, causal, window_size):
    """Rows at different positions (continuous batching): each row is written and attended on its own.
    A per-row loop rather than one call with a padding mask: SDPA's numbers for a row do not depend on the
    batch around it, so every row gets exactly the bits of the lockstep path (a mask over a longer key range
    changes the reduction blocking and thus the last bits, which then depend on the other rows' lengths)."""
    T_new = q.size(1)
    rows = []
    for b, pos in enumerate(positions):
        end = pos + T_new
        if k is not None and v is not None:
            k_cache[b, pos:end] = k[b]
            v_cache[b, pos:end] = v[b]
        k_row, v_row = k_cache[b:b + 1, :end].to(q.dtype), v_cache[b:b + 1, :end].to(q.dtype)
        rows.append(_sdpa_func(q[b:b + 1], k_row, v_row, causal, window_size))
    return torch.cat(rows, dim=0)


# -----------------------------------------------------------------------------
# Public API (FA3 calling convention)

def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
    """Training attention. q (B, T, H, D); k, v (B, T, Hkv, D) with H % Hkv == 0. Returns (B, T, H, D).
    Query i sees keys i - left .. i + right for window_size=(left, right), -1 = unbounded; causal=True sets right=0."""
    if USE_FA3:
        return _fa3.flash_attn_func(q, k, v, causal=causal, window_size=window_size)
    return _sdpa_func(q, k, v, causal, window_size)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False,
                            window_size=(-1, -1)):
    """Inference attention. q (B, T_new, H, D); caches (B, T_max, Hkv, D); cache_seqlens int32 (B,).
    k, v (B, T_new, Hkv, D) are written into the caches at [cache_seqlens, cache_seqlens + T_new) and
    attended to; cache_seqlens itself is not modified. Returns (B, T_new, H, D)."""
    if USE_FA3:
        return _fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                            causal=causal, window_size=window_size)
    return _sdpa_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal, window_size)


flash_attn = SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_with_kvcache=flash_attn_with_kvcache)

# Resolved once at import (tests and callers may reassign _override_impl and USE_FA3 afterwards).
# An explicit NANOCHAT_ATTN=sdpa skips the kernel download altogether.
_override_impl = _env_override()
_fa3 = None if _override_impl == "sdpa" else _load_flash_attention_3()
HAS_FA3 = _fa3 is not None
USE_FA3 = _resolve_use_fa3()
