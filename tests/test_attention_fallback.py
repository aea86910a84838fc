"""
The attention switch end to end: FA3 and the SDPA fallback agree (Hopper only), the SDPA path works on
its own (CPU fp32 or CUDA bf16), and the override globals pick the implementation at call time.
"""

import os
from types import SimpleNamespace

os.environ.setdefault("NANOCHAT_DTYPE", "float32")

import pytest
import torch

import nanochat.flash_attention as fa_module
from nanochat.engine import KVCache
from nanochat.flash_attention import flash_attn

requires_fa3 = pytest.mark.skipif(not fa_module.HAS_FA3,
                                  reason="FA3 needs a Hopper (sm90) GPU and the kernel from the HF hub")
no_fa3_only = pytest.mark.skipif(fa_module.HAS_FA3, reason="checks the behaviour of machines without FA3")


@pytest.fixture(autouse=True)
def restore_globals():
    saved = fa_module._override_impl, fa_module.USE_FA3, fa_module._fa3
    try:
        yield
    finally:
        fa_module._override_impl, fa_module.USE_FA3, fa_module._fa3 = saved


def set_impl(impl):
    fa_module._override_impl = impl
    fa_module.USE_FA3 = fa_module._resolve_use_fa3()


def run_both_impls(fn):
    set_impl("fa3")
    out_fa3 = fn()
    set_impl("sdpa")
    out_sdpa = fn()
    set_impl(None)
    return out_fa3, out_sdpa


def assert_close(a, b, name, atol=1e-2, rtol=1e-2):
    max_diff = (a.float() - b.float()).abs().max().item()
    assert torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol), f"{name}: max diff {max_diff:.4g}"


def randn(*shape, device="cuda", dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=device, dtype=dtype)


# -----------------------------------------------------------------------------

@requires_fa3
class TestFA3VsSDPA:
    """CUDA, bf16: both kernels see identical inputs and must agree to bf16 precision."""

    def compare_func(self, B, T, H, Hkv, D, window, name):
        q, k, v = randn(B, T, H, D, seed=1), randn(B, T, Hkv, D, seed=2), randn(B, T, Hkv, D, seed=3)
        y_fa3, y_sdpa = run_both_impls(lambda: flash_attn.flash_attn_func(q, k, v, causal=True, window_size=window))
        assert y_fa3.shape == y_sdpa.shape == (B, T, H, D)
        assert_close(y_fa3, y_sdpa, name)

    def test_basic_causal(self):
        self.compare_func(2, 64, 4, 4, 32, (64, 0), "basic causal")

    def test_full_context(self):
        self.compare_func(2, 128, 4, 4, 32, (-1, -1), "full context")

    def test_sliding_window(self):
        self.compare_func(2, 128, 4, 4, 32, (32, 0), "sliding window 32")

    def test_gqa(self):
        self.compare_func(2, 64, 8, 2, 32, (64, 0), "GQA 8/2")

    def test_larger_model(self):
        self.compare_func(4, 256, 12, 12, 64, (-1, -1), "larger")

    def compare_kvcache(self, pos, T_new, window, name, T_max=64, B=2, H=4, D=32):
        # the caches are written in place, so each implementation gets its own copy
        k_init, v_init = randn(B, T_max, H, D, seed=4), randn(B, T_max, H, D, seed=5)
        k_init[:, pos:], v_init[:, pos:] = 0, 0
        q, k, v = randn(B, T_new, H, D, seed=6), randn(B, T_new, H, D, seed=7), randn(B, T_new, H, D, seed=8)

        def run():
            k_cache, v_cache = k_init.clone(), v_init.clone()
            seqlens = torch.full((B,), pos, dtype=torch.int32, device="cuda")
            y = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens,
                                                   causal=True, window_size=window)
            return y, k_cache, v_cache

        (y_fa3, kc_fa3, vc_fa3), (y_sdpa, kc_sdpa, vc_sdpa) = run_both_impls(run)
        assert y_fa3.shape == (B, T_new, H, D)
        assert_close(y_fa3, y_sdpa, name)
        assert_close(kc_fa3, kc_sdpa, name + " (k cache)", atol=0, rtol=0)
        assert_close(vc_fa3, vc_sdpa, name + " (v cache)", atol=0, rtol=0)

    def test_kvcache_prefill(self):
        self.compare_kvcache(pos=0, T_new=16, window=(64, 0), name="prefill")

    def test_kvcache_single_token(self):
        self.compare_kvcache(pos=16, T_new=1, window=(64, 0), name="decode")

    def test_kvcache_single_token_sliding_window(self):
        # regression: the SDPA decode path must apply the window (8 < Tk = 33)
        self.compare_kvcache(pos=32, T_new=1, window=(8, 0), name="decode, window 8")

    def test_backward(self):
        B, T, H, D = 2, 32, 4, 16
        q0, k0, v0 = randn(B, T, H, D, seed=1), randn(B, T, H, D, seed=2), randn(B, T, H, D, seed=3)
        grad_out = randn(B, T, H, D, seed=4)

        def run():
            q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
            y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(T, 0))
            y.backward(grad_out)
            return y.detach(), q.grad, k.grad, v.grad

        out_fa3, out_sdpa = run_both_impls(run)
        assert_close(out_fa3[0], out_sdpa[0], "backward: output")
        for name, g_fa3, g_sdpa in zip(("q", "k", "v"), out_fa3[1:], out_sdpa[1:]):
            assert_close(g_fa3, g_sdpa, f"backward: {name} grad", atol=0.05, rtol=0.05)


# -----------------------------------------------------------------------------

class TestSDPAOnly:
    """The fallback on whatever this machine has: CUDA in bf16, else CPU in fp32."""

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32

    def rand(self, *shape, seed=0):
        return randn(*shape, device=self.device, dtype=self.dtype, seed=seed)

    def test_forward(self):
        set_impl("sdpa")
        B, T, H, D = 2, 64, 4, 32
        q, k, v = self.rand(B, T, H, D, seed=1), self.rand(B, T, H, D, seed=2), self.rand(B, T, H, D, seed=3)
        y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(T, 0))
        assert y.shape == (B, T, H, D) and y.dtype == self.dtype
        assert not torch.isnan(y).any()

    def test_backward(self):
        set_impl("sdpa")
        B, T, H, D = 2, 32, 4, 16
        q, k, v = (self.rand(B, T, H, D, seed=s).requires_grad_(True) for s in (1, 2, 3))
        y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(8, 0))
        y.sum().backward()
        for name, t in (("q", q), ("k", k), ("v", v)):
            assert t.grad is not None, f"{name}.grad is None"
            assert not torch.isnan(t.grad).any(), f"NaN in {name}.grad"

    def test_kvcache(self):
        set_impl("sdpa")
        B, T_max, H, D = 2, 64, 4, 32
        cache = KVCache(batch_size=B, num_heads=H, seq_len=T_max, head_dim=D, num_layers=1,
                        device=self.device, dtype=self.dtype)
        k_cache, v_cache = cache.get_layer_cache(0)

        def step(T_new, seed):
            q, k, v = (self.rand(B, T_new, H, D, seed=seed + s) for s in range(3))
            y = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache.cache_seqlens,
                                                   causal=True, window_size=(T_max, 0))
            cache.advance(T_new)
            return y

        y = step(16, seed=10)
        assert y.shape == (B, 16, H, D) and cache.get_pos() == 16
        y = step(1, seed=20)
        assert y.shape == (B, 1, H, D) and cache.get_pos() == 17
        assert not torch.isnan(y).any()
        # the layer views alias the cache storage: the writes landed in the KVCache itself
        assert cache.k_cache[0, :, :17].abs().sum() > 0 and cache.k_cache[0, :, 17:].abs().sum() == 0


# -----------------------------------------------------------------------------

class TestOverrideMechanism:

    @requires_fa3
    def test_override_fa3(self):
        set_impl("fa3")
        assert fa_module.USE_FA3 is True

    def test_override_sdpa(self):
        set_impl("sdpa")
        assert fa_module.USE_FA3 is False

    def test_override_auto(self):
        set_impl(None)
        from nanochat.common import COMPUTE_DTYPE
        # FA3 is chosen automatically only when it exists and the model computes in bf16
        assert fa_module.USE_FA3 == (fa_module.HAS_FA3 and COMPUTE_DTYPE == torch.bfloat16)

    @no_fa3_only
    def test_override_fa3_without_fa3_raises(self):
        with pytest.raises(AssertionError, match="Cannot override to FA3"):
            set_impl("fa3")

    def test_dispatch_reads_use_fa3_at_call_time(self):
        # stand in a recording kernel for _fa3, then flip USE_FA3 between two calls of the same function
        calls = []

        def kernel(name):
            def run(q, *args, **kwargs):
                calls.append(name)
                return torch.zeros_like(q)
            return run

        fa_module._fa3 = SimpleNamespace(flash_attn_func=kernel("func"), flash_attn_with_kvcache=kernel("kvcache"))
        q = randn(1, 8, 2, 16, device="cpu", dtype=torch.float32)
        k_cache = torch.zeros(1, 16, 2, 16)
        seqlens = torch.zeros(1, dtype=torch.int32)
        func, with_kvcache = flash_attn.flash_attn_func, flash_attn.flash_attn_with_kvcache

        fa_module.USE_FA3 = True
        assert func(q, q, q, causal=True).abs().sum() == 0
        assert with_kvcache(q, k_cache, k_cache.clone(), k=q, v=q, cache_seqlens=seqlens, causal=True).abs().sum() == 0
        assert calls == ["func", "kvcache"]

        fa_module.USE_FA3 = False
        assert func(q, q, q, causal=True).abs().sum() > 0
        assert with_kvcache(q, k_cache, k_cache.clone(), k=q, v=q, cache_seqlens=seqlens, causal=True).abs().sum() > 0
        assert calls == ["func", "kvcache"]
