"""
Attention switch: Flash Attention 3 on Hopper, PyTorch SDPA everywhere else.

Both entry points follow the FA3 calling convention (layout (B, T, heads, D), window_size=(left, right),
queries bottom-right aligned against the keys), so the model never needs to know which kernel runs.

Which kernel runs is decided once per process, lazily: by decide_backend(device, head_dim), which the
training script calls after compute_init with the model's device and head dim, or else on the first call of
either entry point (with that call's device and head dim). Importing this module touches neither CUDA nor
the `kernels` package. The decision fetches FA3 (Hopper only), probes each entry point on the rank's own
device at the model's head dim, makes every rank agree (all-reduce MIN when torch.distributed is
initialised), and prints one line per rank naming the backend.

Module globals, read at call time (tests assign them):
- HAS_FA3 / HAS_FA3_KVCACHE: FA3's training / KV-cache entry point passed its probe on every rank.
  These and USE_FA3* exist once the decision is made. Reading one earlier (for example
  `from nanochat.flash_attention import HAS_FA3`) makes the decision then, on the process's current device
  at head dim 128, so it answers truly rather than with a placeholder False. Under torch.distributed every
  rank must read it at the same point (the decision may all-reduce).
- _override_impl: None | 'fa3' | 'sdpa', or _FROM_ENV until the decision reads the env var NANOCHAT_ATTN
  (so a value set after import, e.g. by a launcher, still counts).
- USE_FA3 / USE_FA3_KVCACHE = _resolve_use_fa3(entry); reassign them after changing _override_impl. Both
  entry points read USE_FA3 at call time (the reference's tests switch both to SDPA with it alone): the
  KV-cache one runs FA3 when USE_FA3 and USE_FA3_KVCACHE are both on.
"""

import contextlib
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import BadEnvironmentError, agree, is_ddp_initialized

FA3_REPO = "kernels-community/flash-attn3"  # a kernel repository with major versions, trusted publisher
FA3_VERSION = 1  # kernels >= 0.15 refuses to load without a version (or revision)
FA3_SOURCE = f"{FA3_REPO} v{FA3_VERSION}"
_HOPPER_MAJOR = 9  # the FA3 kernels target sm90: Ada (sm89) and Blackwell (sm100) use SDPA
_IMPLS = ("fa3", "sdpa")
_ENTRIES = ("train", "kvcache")
_ENTRY_FUNCS = {"train": "flash_attn_func", "kvcache": "flash_attn_with_kvcache"}
_PROBE_BTH = (1, 64, 2)  # (B, T, H); D is the model's head dim. T beyond the window exercises the window
_PROBE_WINDOW = (16, 0)
_PROBE_CACHE_LEN = 128
_PROBE_TOL = 1e-2  # atol and rtol: two correct bf16 kernels agree to about this
_SDPA_COST = ("PyTorch SDPA runs sliding-window layers as full T^2 attention with a dense mask "
              "(upstream measured ~28% lower training throughput on A100, more on H100)")


# -----------------------------------------------------------------------------
# Choosing the implementation (once per process, after compute_init)

@dataclass(frozen=True)
class AttentionBackend:
    """What each entry point runs ('fa3' or 'sdpa') and, for SDPA, why."""
    train: str
    kvcache: str
    train_reason: str
    kvcache_reason: str

    def describe(self):
        def name(impl, reason):
            return f"fa3 ({FA3_SOURCE})" if impl == "fa3" else f"sdpa ({reason})"
        train = name(self.train, self.train_reason)
        kvcache = name(self.kvcache, self.kvcache_reason)
        if train == kvcache:
            return f"attention backend {train}"
        return f"attention backend {train} for training, {kvcache} for the KV cache"


_FROM_ENV = "env"  # _override_impl before the decision reads NANOCHAT_ATTN
_override_impl = _FROM_ENV
_backend = None  # the AttentionBackend once decided
_fa3 = None  # the loaded FA3 kernel module (its functions at top level)
_DECIDED_NAMES = ("HAS_FA3", "HAS_FA3_KVCACHE", "USE_FA3", "USE_FA3_KVCACHE")  # set by decide_backend
_DEFAULT_HEAD_DIM = 128  # base_train's --head-dim default: the probe's shape when no model asked first


def __getattr__(name):
    """A decided global read before the decision (PEP 562): decide on the current device, then answer."""
    if name not in _DECIDED_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cuda = torch.cuda.is_available()
    decide_backend(torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu", _DEFAULT_HEAD_DIM)
    return globals()[name]


def _rank():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def decide_backend(device, head_dim):
    """Pick FA3 or SDPA for each entry point, the same on every rank; returns the AttentionBackend.
    Call after compute_init, on every rank at the same point (it may all-reduce), with the rank's own
    device and the model's head dim. Later calls return the first decision."""
    global _backend, _fa3, _override_impl, HAS_FA3, HAS_FA3_KVCACHE, USE_FA3, USE_FA3_KVCACHE
    if _backend is not None:
        return _backend
    if _override_impl == _FROM_ENV:
        _override_impl = _env_override()
    device = torch.device(device)
    if _override_impl == "sdpa":
        fa3, reasons = None, dict.fromkeys(_ENTRIES, "NANOCHAT_ATTN=sdpa")
    else:
        fa3, reasons = _local_fa3_status(device, head_dim)
    agreed = _agree_across_ranks({e: reasons[e] is None for e in _ENTRIES}, device)
    for entry in _ENTRIES:
        if agreed[entry] is False and reasons[entry] is None:
            reasons[entry] = "another rank cannot run it"
    _fa3 = fa3
    HAS_FA3, HAS_FA3_KVCACHE = agreed["train"], agreed["kvcache"]
    USE_FA3 = _resolve_use_fa3("train")
    USE_FA3_KVCACHE = USE_FA3 and _resolve_use_fa3("kvcache")  # what flash_attn_with_kvcache runs
    dtype_reason = "COMPUTE_DTYPE is not bfloat16, which the FA3 kernels need"
    train_reason = "" if USE_FA3 else reasons["train"] or dtype_reason
    kvcache_reason = "" if USE_FA3_KVCACHE else reasons["kvcache"] or train_reason
    _backend = AttentionBackend(train="fa3" if USE_FA3 else "sdpa",
                                kvcache="fa3" if USE_FA3_KVCACHE else "sdpa",
                                train_reason=train_reason, kvcache_reason=kvcache_reason)
    print(f"rank {_rank()}: {_backend.describe()}", flush=True)
    return _backend


def _hopper_check(device):
    """None if device is a Hopper GPU, else why FA3 does not apply (not a failure: no warning)."""
    if device.type != "cuda":
        return f"no CUDA device ({device.type})"
    major, minor = torch.cuda.get_device_capability(device)
    if major != _HOPPER_MAJOR:
        return f"sm{major}{minor} is not Hopper (sm90)"
    return None


def _local_fa3_status(device, head_dim):
    """(fa3 module or None, {entry: None if FA3 runs it correctly on this rank, else the reason})."""
    reason = _hopper_check(device)
    if reason is not None:
        return None, dict.fromkeys(_ENTRIES, reason)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        fa3, reason = _load_flash_attention_3()
        if fa3 is None:
            reasons = dict.fromkeys(_ENTRIES, f"FA3 did not load: {reason}")
        else:
            reasons = {e: _probe_fa3(fa3, device, head_dim, e) for e in _ENTRIES}
    failed = {_ENTRY_FUNCS[e]: r for e, r in reasons.items() if r is not None}
    if failed:  # Hopper without FA3 is a costly surprise: say so in one loud line
        why = next(iter(failed.values())) if len(set(failed.values())) == 1 else \
            "; ".join(f"{name}: {r}" for name, r in failed.items())
        print(f"rank {_rank()}: WARNING: FA3 {' and '.join(failed)} unusable on this Hopper GPU ({why}); "
              f"using PyTorch SDPA instead. Cost: {_SDPA_COST}", flush=True)
    return (None if len(failed) == len(_ENTRIES) else fa3), reasons


def _load_flash_attention_3():
    """(FA3 kernel module, None), or (None, the reason it did not load)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from kernels import get_kernel  # imported here: it pulls in the HF hub client
        # The repository is named here, so it is allow-listed: loading does not hinge on a second Hub
        # request for the publisher's trust status.
        module = get_kernel(FA3_REPO, version=FA3_VERSION, trust_remote_code=[FA3_REPO])
    except Exception as e:  # no package, no network, untrusted, no build for this torch/CUDA variant
        return None, f"{type(e).__name__}: {e}"
    if not hasattr(module, "flash_attn_func"):  # older builds keep the functions in a submodule
        module = getattr(module, "flash_attn_interface", module)
    missing = [f for f in _ENTRY_FUNCS.values() if not hasattr(module, f)]
    if missing:
        return None, f"{FA3_SOURCE} has no {', '.join(missing)}"
    return module, None


def _agree_across_ranks(usable, device):
    """{entry: bool} -> the same dict with each flag ANDed over all ranks (all-reduce MIN)."""
    # gloo reduces on the host
    on = device if is_ddp_initialized() and dist.get_backend() == "nccl" else "cpu"
    flags = agree([usable[e] for e in _ENTRIES], on, dist.ReduceOp.MIN)
    return {e: bool(f) for e, f in zip(_ENTRIES, flags)}


def _first(out):
    """Some FA3 builds return (out, softmax_lse): keep the attention output."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _probe_fa3(fa3, device, head_dim, entry):
    """Run one FA3 entry point once against SDPA at the model's head dim. None if it agrees, else why."""
    # A kernel that imports fine can still be built for another CUDA/torch ABI or return garbage.
    try:
        want, out = _probe_outputs(fa3, device, head_dim, entry)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    name = _ENTRY_FUNCS[entry]
    if not isinstance(out, torch.Tensor) or out.shape != want.shape:
        return f"{name} returned {type(out).__name__}, expected a tensor of shape {tuple(want.shape)}"
    if not torch.allclose(out.float(), want.float(), atol=_PROBE_TOL, rtol=_PROBE_TOL):
        return f"{name} differs from SDPA by up to {(out.float() - want.float()).abs().max().item():.3g}"
    return None


def _probe_outputs(fa3, device, head_dim, entry):
    """SDPA's output and fa3's output for one entry point, on one small random bf16 problem."""
    B, T, H = _PROBE_BTH
    gen = torch.Generator(device=device).manual_seed(0)  # private RNG: leave the global seed alone
    q, k, v = (torch.randn(B, T, H, head_dim, generator=gen, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    want = _sdpa_func(q, k, v, causal=True, window_size=_PROBE_WINDOW)
    if entry == "train":
        return want, _first(fa3.flash_attn_func(q, k, v, causal=True, window_size=_PROBE_WINDOW))
    k_cache, v_cache = torch.zeros(2, B, _PROBE_CACHE_LEN, H, head_dim, device=device, dtype=torch.bfloat16)
    seqlens = torch.zeros(B, dtype=torch.int32, device=device)
    out = fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens, causal=True,
                                      window_size=_PROBE_WINDOW)
    return want, _first(out)


def _env_override():
    """NANOCHAT_ATTN=fa3|sdpa forces an implementation; unset or empty means automatic."""
    value = os.environ.get("NANOCHAT_ATTN", "").strip().lower()
    if not value:
        return None
    if value not in _IMPLS:
        raise BadEnvironmentError.unknown("NANOCHAT_ATTN", value, _IMPLS)
    return value


def _resolve_use_fa3(entry="train"):
    """Whether an entry point ('train' or 'kvcache') should call FA3, given _override_impl, HAS_FA3*
    and the compute dtype."""
    name = "HAS_FA3" if entry == "train" else "HAS_FA3_KVCACHE"
    usable = globals()[name] if name in globals() else __getattr__(name)
    if _override_impl == "fa3":
        assert usable, f"Cannot override to FA3: not available on this hardware ({_ENTRY_FUNCS[entry]})"
        return True
    if _override_impl == "sdpa" or not usable:
        return False
    from nanochat.common import COMPUTE_DTYPE  # lazily: deciding the dtype may query CUDA
    return COMPUTE_DTYPE == torch.bfloat16  # the Hopper kernels take bf16/fp8 only


# -----------------------------------------------------------------------------
# SDPA fallback. Inside these helpers tensors are (B, heads, T, D).

def _band_mask(query_start, Tq, Tk, left, right, device):
    """Boolean mask, True = attend: key j is visible to the query at absolute position i iff
    i - left <= j <= i + right (a negative bound is unbounded) and j <= the last query's position (later
    cache slots are stale). Queries sit at query_start .. query_start + Tq - 1: an int gives a (Tq, Tk) mask
    (None if nothing is masked), a (B,) tensor of row positions a (B, 1, Tq, Tk) mask, built on its device."""
    ragged = torch.is_tensor(query_start)
    if left < 0 and right < 0 and not ragged:
        return None
    row = (query_start.long()[:, None, None, None] if ragged else query_start) + \
        torch.arange(Tq, device=device)[:, None]
    col = torch.arange(Tk, device=device)
    mask = col <= row[..., -1:, :]
    if left >= 0:
        mask = mask & (row - col <= left)
    if right >= 0:
        mask = mask & (col - row <= right)
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
    mask = _band_mask(Tk - Tq, Tq, Tk, w, 0, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def _sdpa_func(q, k, v, causal, window_size):
    """SDPA with the FA3 contract; inputs and output are (B, T, heads, D)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    enable_gqa = q.size(1) != k.size(1)
    left, right = window_size
    if causal or right == 0:
        y = _sdpa_attention(q, k, v, (left, 0), enable_gqa)
    else:
        mask = _band_mask(k.size(2) - q.size(2), q.size(2), k.size(2), left, right, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
    return y.transpose(1, 2)


def _sdpa_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal, window_size, seqlen_range=None,
                       pad_to_capacity=False):
    """The kv-cache contract on SDPA: write k, v at [pos, pos + T_new), attend over [0, pos + T_new)."""
    if cache_seqlens is None:
        raise ValueError("the SDPA fallback of flash_attn_with_kvcache needs cache_seqlens")
    if seqlen_range is None:
        positions = cache_seqlens.tolist()  # host sync: callers that know the positions pass seqlen_range
        seqlen_range = min(positions), max(positions)
    low, high = seqlen_range
    end = high + q.size(1)
    if end > k_cache.size(1):
        raise ValueError(f"KV cache overflow: positions [{high}, {end}) do not fit a cache of length "
                         f"{k_cache.size(1)}")
    if low != high or pad_to_capacity:
        key_len = k_cache.size(1) if pad_to_capacity else end
        return _sdpa_with_ragged_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, key_len, causal,
                                         window_size)
    pos = low  # every row at the same position: one call over contiguous slices (the fast path)
    if k is not None and v is not None:
        k_cache[:, pos:end] = k  # in place, casting to the cache dtype; the caller advances cache_seqlens
        v_cache[:, pos:end] = v
    # a cache kept in another dtype than the activations would otherwise make SDPA reject the call
    k_full, v_full = k_cache[:, :end].to(q.dtype), v_cache[:, :end].to(q.dtype)
    return _sdpa_func(q, k_full, v_full, causal, window_size)


def _sdpa_with_ragged_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, key_len, causal, window_size):
    """Rows at different positions (continuous batching) in one call: k, v are scattered into each row at its
    own position and every row attends over keys [0, key_len) under a mask built from cache_seqlens.
    A row's numbers depend on key_len (the reduction's blocking), not on the other rows' contents: with
    key_len the whole capacity they do not depend on the other rows at all (KVCache.batch_invariant)."""
    B, T_new = q.shape[:2]
    if k is not None and v is not None:
        rows = torch.arange(B, device=q.device)[:, None]
        cols = cache_seqlens.long()[:, None] + torch.arange(T_new, device=q.device)  # (B, T_new)
        k_cache[rows, cols] = k.to(k_cache.dtype)
        v_cache[rows, cols] = v.to(v_cache.dtype)
    left, right = window_size
    mask = _band_mask(cache_seqlens, T_new, key_len, left, 0 if causal else right, q.device)
    q = q.transpose(1, 2)
    k_full, v_full = (cache[:, :key_len].to(q.dtype).transpose(1, 2) for cache in (k_cache, v_cache))
    y = F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=mask,
                                       enable_gqa=q.size(1) != k_full.size(1))
    return y.transpose(1, 2)


# -----------------------------------------------------------------------------
# Public API (FA3 calling convention)

def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
    """Training attention. q (B, T, H, D); k, v (B, T, Hkv, D) with H % Hkv == 0. Returns (B, T, H, D).
    Query i sees keys i - left .. i + right for window_size=(left, right), -1 = unbounded; causal=True
    sets right=0."""
    if _backend is None:  # scripts that do not call decide_backend get it here, from the first call
        decide_backend(q.device, q.size(-1))
    if USE_FA3:
        return _first(_fa3.flash_attn_func(q, k, v, causal=causal, window_size=window_size))
    return _sdpa_func(q, k, v, causal, window_size)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False,
                            window_size=(-1, -1), seqlen_range=None, pad_to_capacity=False):
    """Inference attention. q (B, T_new, H, D); caches (B, T_max, Hkv, D); cache_seqlens int32 (B,).
    k, v (B, T_new, Hkv, D) are written into the caches at [cache_seqlens, cache_seqlens + T_new) and
    attended to; cache_seqlens itself is not modified. Returns (B, T_new, H, D).
    For the SDPA fallback only (FA3 ignores them): seqlen_range, the (lowest, highest) of cache_seqlens as
    host ints, spares it a device sync; pad_to_capacity makes every row attend over the whole cache with a
    mask, so its numbers do not depend on the other rows' positions."""
    if _backend is None:
        decide_backend(q.device, q.size(-1))
    if USE_FA3 and USE_FA3_KVCACHE:
        out = _fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                           causal=causal, window_size=window_size)
        return _first(out)
    return _sdpa_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal, window_size, seqlen_range,
                              pad_to_capacity)


flash_attn = SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_with_kvcache=flash_attn_with_kvcache)
