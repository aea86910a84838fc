"""
The attention switch end to end: FA3 and the SDPA fallback agree (Hopper only), the SDPA path works on
its own (CPU fp32 or CUDA bf16), and the override globals pick the implementation at call time.
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import nanochat.flash_attention as fa_module
from nanochat.engine import KVCache
from nanochat.flash_attention import flash_attn


def _fa3_available():
    # the decision is lazy: on a GPU machine make it here, at collection, so the skip marks can read it
    if torch.cuda.is_available():
        fa_module.decide_backend(torch.device("cuda", torch.cuda.current_device()), 64)
    return fa_module.HAS_FA3


requires_fa3 = pytest.mark.skipif(not _fa3_available(),
                                  reason="FA3 needs a Hopper (sm90) GPU and the kernel from the HF hub")
no_fa3_only = pytest.mark.skipif(fa_module.HAS_FA3, reason="checks the behaviour of machines without FA3")

SWITCH_GLOBALS = ("_backend", "_fa3", "_override_impl", "HAS_FA3", "HAS_FA3_KVCACHE", "USE_FA3",
                  "USE_FA3_KVCACHE")


@pytest.fixture(autouse=True)
def restore_globals():
    saved = {name: getattr(fa_module, name) for name in SWITCH_GLOBALS}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(fa_module, name, value)


def set_impl(impl):
    fa_module._override_impl = impl
    fa_module.USE_FA3 = fa_module._resolve_use_fa3("train")
    fa_module.USE_FA3_KVCACHE = fa_module._resolve_use_fa3("kvcache")


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

        fa_module.decide_backend(torch.device("cpu"), 16)  # decided: the calls below must not re-decide
        fa_module._fa3 = SimpleNamespace(flash_attn_func=kernel("func"), flash_attn_with_kvcache=kernel("kvcache"))
        q = randn(1, 8, 2, 16, device="cpu", dtype=torch.float32)
        k_cache = torch.zeros(1, 16, 2, 16)
        seqlens = torch.zeros(1, dtype=torch.int32)
        func, with_kvcache = flash_attn.flash_attn_func, flash_attn.flash_attn_with_kvcache

        fa_module.USE_FA3 = fa_module.USE_FA3_KVCACHE = True
        assert func(q, q, q, causal=True).abs().sum() == 0
        assert with_kvcache(q, k_cache, k_cache.clone(), k=q, v=q, cache_seqlens=seqlens, causal=True).abs().sum() == 0
        assert calls == ["func", "kvcache"]

        fa_module.USE_FA3 = fa_module.USE_FA3_KVCACHE = False
        assert func(q, q, q, causal=True).abs().sum() > 0
        assert with_kvcache(q, k_cache, k_cache.clone(), k=q, v=q, cache_seqlens=seqlens, causal=True).abs().sum() > 0
        assert calls == ["func", "kvcache"]


# -----------------------------------------------------------------------------
# Deciding the backend on CPU: a fake `kernels` package and a forced "this is a Hopper GPU" path

class FakeKernelsPackage:
    """Stands in for the `kernels` package: records every get_kernel call and, like kernels >= 0.15,
    refuses one that names neither a version nor a revision."""

    def __init__(self, kernel=None, error=None):
        self.kernel, self.error, self.calls = kernel, error, []

    def get_kernel(self, repo_id, *, revision=None, version=None, trust_remote_code=False, **kwargs):
        self.calls.append(dict(repo_id=repo_id, revision=revision, version=version))
        if revision is None and version is None:
            raise ValueError("A kernel version or revision must be specified.")
        if self.error is not None:
            raise self.error
        return self.kernel

    def install(self, monkeypatch):
        module = types.ModuleType("kernels")
        module.get_kernel = self.get_kernel
        monkeypatch.setitem(sys.modules, "kernels", module)
        return self


class StandInFA3:
    """An FA3-shaped kernel module computing with SDPA, recording (entry, q shape, device type) per call."""

    def __init__(self, kvcache_error=None, with_lse=False, train_error=None):
        self.kvcache_error, self.with_lse, self.calls = kvcache_error, with_lse, []
        self.train_error = train_error

    def _out(self, y):
        return (y, None) if self.with_lse else y

    def flash_attn_func(self, q, k, v, causal=False, window_size=(-1, -1)):
        self.calls.append(("train", tuple(q.shape), q.device.type))
        if self.train_error is not None:
            raise self.train_error
        return self._out(fa_module._sdpa_func(q, k, v, causal, window_size))

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False,
                                window_size=(-1, -1)):
        self.calls.append(("kvcache", tuple(q.shape), q.device.type))
        if self.kvcache_error is not None:
            raise self.kvcache_error
        return self._out(fa_module._sdpa_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal,
                                                      window_size))


@pytest.fixture
def hopper(monkeypatch, undecided):
    """Forced path: the device counts as a Hopper GPU and the model computes in bf16."""
    import nanochat.common as common
    monkeypatch.setattr(fa_module, "_hopper_check", lambda device: None)
    monkeypatch.setattr(common, "_compute_dtype_cache", (torch.bfloat16, "forced by the test"))


def test_loader_asks_for_a_versioned_kernel_repository(monkeypatch):
    kernel = StandInFA3()
    hub = FakeKernelsPackage(kernel).install(monkeypatch)
    assert fa_module._load_flash_attention_3() == (kernel, None)
    assert hub.calls == [dict(repo_id="kernels-community/flash-attn3", revision=None, version=1)]


def test_loader_reports_why_the_kernel_did_not_load(monkeypatch):
    error = ValueError("Kernel repository 'x/y' is not from a trusted publisher.")
    FakeKernelsPackage(error=error).install(monkeypatch)
    kernel, reason = fa_module._load_flash_attention_3()
    assert kernel is None and reason == f"ValueError: {error}"


def test_load_failure_on_hopper_prints_one_loud_line_with_reason_and_cost(monkeypatch, hopper, capsys):
    FakeKernelsPackage(error=RuntimeError("no build for torch214-cxx11-cu130")).install(monkeypatch)
    backend = fa_module.decide_backend(torch.device("cpu"), 128)
    assert (backend.train, backend.kvcache) == ("sdpa", "sdpa")
    lines = capsys.readouterr().out.splitlines()
    warnings = [line for line in lines if "WARNING" in line]
    assert len(warnings) == 1
    assert "no build for torch214-cxx11-cu130" in warnings[0] and "SDPA" in warnings[0]
    assert "throughput" in warnings[0]  # what the fallback costs
    assert lines[-1].startswith("rank 0: attention backend sdpa (FA3 did not load: RuntimeError")


def test_no_cuda_means_sdpa_without_fetching_or_warning(monkeypatch, undecided, capsys):
    hub = FakeKernelsPackage(StandInFA3()).install(monkeypatch)
    backend = fa_module.decide_backend(torch.device("cpu"), 128)
    assert (backend.train, backend.kvcache) == ("sdpa", "sdpa")
    assert hub.calls == [] and "WARNING" not in capsys.readouterr().out


def test_sdpa_override_skips_the_fetch(monkeypatch, hopper):
    hub = FakeKernelsPackage(StandInFA3()).install(monkeypatch)
    fa_module._override_impl = "sdpa"
    assert fa_module.decide_backend(torch.device("cpu"), 128).train == "sdpa"
    assert hub.calls == []


def test_startup_line_names_the_backend_and_the_kernel_repository(monkeypatch, hopper, capsys):
    FakeKernelsPackage(StandInFA3()).install(monkeypatch)
    monkeypatch.setenv("RANK", "3")
    fa_module.decide_backend(torch.device("cpu"), 128)
    assert capsys.readouterr().out == "rank 3: attention backend fa3 (kernels-community/flash-attn3 v1)\n"
    assert fa_module.USE_FA3 and fa_module.USE_FA3_KVCACHE


def test_first_model_call_decides_with_the_model_head_dim_and_device(monkeypatch, hopper):
    # no explicit decision: the first forward decides, probing at the model's head dim (128 here) on the
    # device of the activations
    from nanochat.gpt import GPT, config_for_depth
    kernel = StandInFA3()
    FakeKernelsPackage(kernel).install(monkeypatch)
    config = config_for_depth(2, aspect_ratio=64, head_dim=128, sequence_len=32, vocab_size=64,
                              window_pattern="SL")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    model(torch.zeros(1, 32, dtype=torch.long))
    probes = kernel.calls[:2]  # the probe runs both entry points once, then the model's layers run
    assert sorted(entry for entry, _, _ in probes) == ["kvcache", "train"]
    assert {shape[-1] for _, shape, _ in kernel.calls} == {128}
    assert {device for _, _, device in kernel.calls} == {"cpu"}
    assert [entry for entry, _, _ in kernel.calls[2:]] == ["train"] * config.n_layer


def test_kvcache_failure_keeps_fa3_for_training(monkeypatch, hopper, capsys):
    kernel = StandInFA3(kvcache_error=RuntimeError("kvcache: head dim 128 not compiled"))
    FakeKernelsPackage(kernel).install(monkeypatch)
    backend = fa_module.decide_backend(torch.device("cpu"), 128)
    assert (backend.train, backend.kvcache) == ("fa3", "sdpa")
    assert fa_module.USE_FA3 and not fa_module.USE_FA3_KVCACHE
    out = capsys.readouterr().out
    assert "flash_attn_with_kvcache unusable" in out and "not compiled" in out
    # each entry point dispatches on its own decision
    q = torch.randn(1, 8, 2, 128, dtype=torch.bfloat16)
    kernel.calls.clear()
    flash_attn.flash_attn_func(q, q, q, causal=True, window_size=(-1, 0))
    k_cache = torch.zeros(1, 16, 2, 128, dtype=torch.bfloat16)
    flash_attn.flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k=q, v=q,
                                       cache_seqlens=torch.zeros(1, dtype=torch.int32), causal=True)
    assert [entry for entry, _, _ in kernel.calls] == ["train"]


def test_fa3_that_works_is_not_used_for_a_compute_dtype_other_than_bfloat16(monkeypatch, undecided):
    import nanochat.common as common
    monkeypatch.setattr(fa_module, "_hopper_check", lambda device: None)
    monkeypatch.setattr(common, "_compute_dtype_cache", (torch.float32, "forced by the test"))
    FakeKernelsPackage(StandInFA3()).install(monkeypatch)
    backend = fa_module.decide_backend(torch.device("cpu"), 64)
    assert (backend.train, backend.kvcache) == ("sdpa", "sdpa") and not fa_module.USE_FA3
    assert backend.train_reason == "COMPUTE_DTYPE is not bfloat16, which the FA3 kernels need"


def test_training_failure_puts_the_kv_cache_on_sdpa_too(monkeypatch, hopper, capsys):
    # the KV-cache entry point runs FA3 only while USE_FA3 is on: the startup line must not claim it does
    kernel = StandInFA3(train_error=RuntimeError("func: head dim 128 not compiled"))
    FakeKernelsPackage(kernel).install(monkeypatch)
    backend = fa_module.decide_backend(torch.device("cpu"), 128)
    assert (backend.train, backend.kvcache) == ("sdpa", "sdpa") and not fa_module.USE_FA3_KVCACHE
    assert "attention backend sdpa (" in capsys.readouterr().out
    q = torch.randn(1, 8, 2, 128, dtype=torch.bfloat16)
    k_cache = torch.zeros(1, 16, 2, 128, dtype=torch.bfloat16)
    kernel.calls.clear()
    flash_attn.flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k=q, v=q,
                                       cache_seqlens=torch.zeros(1, dtype=torch.int32), causal=True)
    assert kernel.calls == []


def test_use_fa3_alone_switches_both_entry_points(monkeypatch, hopper):
    # the reference's tests compare FA3 with SDPA by assigning USE_FA3 only (its set_impl): the KV-cache
    # entry point must follow it, or its SDPA regression tests would run FA3 against FA3
    kernel = StandInFA3()
    FakeKernelsPackage(kernel).install(monkeypatch)
    assert fa_module.decide_backend(torch.device("cpu"), 128).kvcache == "fa3"
    q = torch.randn(1, 8, 2, 128, dtype=torch.bfloat16)
    k_cache = torch.zeros(1, 16, 2, 128, dtype=torch.bfloat16)
    for impl, expected in (("sdpa", []), ("fa3", ["train", "kvcache"])):
        fa_module._override_impl = impl
        fa_module.USE_FA3 = fa_module._resolve_use_fa3()
        kernel.calls.clear()
        flash_attn.flash_attn_func(q, q, q, causal=True, window_size=(-1, 0))
        flash_attn.flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k=q, v=q,
                                           cache_seqlens=torch.zeros(1, dtype=torch.int32), causal=True)
        assert [entry for entry, _, _ in kernel.calls] == expected, impl


def test_a_kernel_returning_a_tuple_yields_the_attention_output(monkeypatch, hopper):
    FakeKernelsPackage(StandInFA3(with_lse=True)).install(monkeypatch)
    assert fa_module.decide_backend(torch.device("cpu"), 64).train == "fa3"
    q = torch.randn(2, 8, 2, 64, dtype=torch.bfloat16)
    y = flash_attn.flash_attn_func(q, q, q, causal=True, window_size=(-1, 0))
    assert isinstance(y, torch.Tensor) and torch.equal(y, fa_module._sdpa_func(q, q, q, True, (-1, 0)))


def test_decision_is_made_once(monkeypatch, hopper):
    hub = FakeKernelsPackage(StandInFA3()).install(monkeypatch)
    first = fa_module.decide_backend(torch.device("cpu"), 128)
    assert fa_module.decide_backend(torch.device("cpu"), 64) is first
    assert len(hub.calls) == 1


# -----------------------------------------------------------------------------
# Every rank takes the same decision: two gloo processes, one of which cannot run the KV-cache kernel

_RANK_SCRIPT = r"""
import json, os, sys, types
import torch
import torch.distributed as dist
import nanochat.common as common
import nanochat.flash_attention as fa
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
common._compute_dtype_cache = (torch.bfloat16, "forced by the test")
local = {"train": None, "kvcache": None if rank == 0 else "kvcache kernel failed its probe"}
fa._local_fa3_status = lambda device, head_dim: (types.SimpleNamespace(), dict(local))
backend = fa.decide_backend(torch.device("cpu"), 128)
print(json.dumps([backend.train, backend.kvcache, backend.kvcache_reason]))
dist.destroy_process_group()
"""


def test_ranks_agree_on_the_backend(tmp_path):
    env = {key: val for key, val in os.environ.items() if key not in ("NANOCHAT_ATTN", "RANK")}
    env.update(NANOCHAT_DTYPE="bfloat16", OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(rank), str(tmp_path / "store")],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outputs = [proc.communicate(timeout=180) for proc in procs]
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr
    lines = [stdout.strip().splitlines() for stdout, _ in outputs]
    # rank 0 could run both entry points, rank 1 only training: both use SDPA for the KV cache
    assert json.loads(lines[0][-1]) == ["fa3", "sdpa", "another rank cannot run it"]
    assert json.loads(lines[1][-1]) == ["fa3", "sdpa", "kvcache kernel failed its probe"]
    assert lines[0][0] == ("rank 0: attention backend fa3 (kernels-community/flash-attn3 v1) for training, "
                           "sdpa (another rank cannot run it) for the KV cache")
    assert lines[1][0].startswith("rank 1: attention backend fa3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the GPU check script does without a GPU")
def test_gpu_check_script_without_a_gpu_says_so_and_succeeds(capsys):
    from dev import gpu_fa3_check
    assert gpu_fa3_check.main([]) == 0
    assert "No CUDA GPU" in capsys.readouterr().out
