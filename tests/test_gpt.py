import math
import os
import subprocess
import sys

import pytest
import torch

from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig, apply_rotary_emb, has_ve, meta_model


def tiny_config(**kw):
    cfg = dict(sequence_len=64, vocab_size=100, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
    cfg.update(kw)
    return GPTConfig(**cfg)


def build(config, seed=0, perturb=False):
    """Build on meta, materialise, init: the production path. perturb=True gives every
    zero-initialised projection and scalar a random value so that all paths carry signal."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    if perturb:
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_proj.weight.normal_(0, 0.05)
                block.mlp.c_proj.weight.normal_(0, 0.05)
            model.smear_lambda.fill_(0.7)
            model.smear_gate.weight.normal_(0, 0.5)
    return model


# -----------------------------------------------------------------------------
# Forward, loss, shapes

def test_forward_backward_shapes_and_finite():
    model = build(tiny_config(), perturb=True)
    idx = torch.randint(0, 100, (2, 32))
    logits = model(idx)
    assert logits.shape == (2, 32, 100) and logits.dtype == torch.float32
    assert logits.abs().max() < 15  # soft-cap
    loss = model(idx, targets=torch.roll(idx, -1, dims=1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_loss_ignore_index():
    model = build(tiny_config(), perturb=True)
    idx = torch.randint(0, 100, (2, 16))
    targets = torch.randint(0, 100, (2, 16))
    targets[0, :5] = -1
    targets[1, 10:] = -1
    per_token = model(idx, targets=targets, loss_reduction="none")
    assert per_token.shape == (32,)
    ignored = targets.view(-1) == -1
    assert torch.all(per_token[ignored] == 0)
    mean = model(idx, targets=targets)
    torch.testing.assert_close(mean, per_token[~ignored].mean())
    # and the mean loss is the cross-entropy of the returned logits
    logits = model(idx)
    manual = torch.nn.functional.cross_entropy(logits[~ignored.view(2, 16)], targets[targets != -1])
    torch.testing.assert_close(mean, manual)


def test_single_token_forward_works():
    # the reference asserts T > 1 without a cache, so generate() crashes on a 1-token prompt
    model = build(tiny_config())
    assert model(torch.tensor([[5]])).shape == (1, 1, 100)
    out = list(model.generate([5], max_tokens=3, temperature=0.0))
    assert len(out) == 3


# -----------------------------------------------------------------------------
# Init

def test_init_statistics():
    cfg = tiny_config(n_embd=256, n_head=4, n_kv_head=4, vocab_size=1000, n_layer=5)
    model = build(cfg)
    n = cfg.n_embd
    s = math.sqrt(3) / math.sqrt(n)
    assert abs(model.transformer.wte.weight.std().item() - 0.8) < 0.02
    assert abs(model.lm_head.weight.std().item() - 0.001) < 0.0001
    for block in model.transformer.h:
        for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
            assert lin.weight.abs().max() <= s
            assert abs(lin.weight.std().item() - 1 / math.sqrt(n)) < 0.003
        assert block.mlp.c_fc.weight.abs().max() <= 0.4 * s
        assert torch.all(block.attn.c_proj.weight == 0) and torch.all(block.mlp.c_proj.weight == 0)
        if block.attn.ve_gate is not None:
            w = block.attn.ve_gate.weight
            assert w.min() >= 0 and w.max() <= 0.02
    L = cfg.n_layer
    expected_resid = torch.tensor([1.15 - 0.10 * i / (L - 1) for i in range(L)])
    expected_x0 = torch.tensor([0.20 - 0.15 * i / (L - 1) for i in range(L)])
    torch.testing.assert_close(model.resid_lambdas.data, expected_resid)
    torch.testing.assert_close(model.x0_lambdas.data, expected_x0)
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)
    assert model.smear_gate.weight.min() >= 0 and model.smear_gate.weight.max() <= 0.02
    for ve in model.value_embeds.values():
        assert ve.weight.abs().max() <= s
    assert model.cos.dtype == torch.float32
    assert model.cos[0, 1, 0, 0].item() == pytest.approx(math.cos(1.0))


def test_meta_and_cpu_construction_give_identical_init():
    cfg = tiny_config()
    built_on_meta = build(cfg, seed=123)
    cpu_model = GPT(cfg)  # consumes RNG in default initialisers; init_weights must not depend on it
    torch.manual_seed(123)
    cpu_model.init_weights()
    for (name, a), (_, b) in zip(built_on_meta.state_dict().items(), cpu_model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kw, says", [
    (dict(n_head=3, n_kv_head=3), "AssertionError"),  # heads that do not divide the width
    (dict(n_kv_head=3), "AssertionError"),  # kv heads that do not divide the heads
    (dict(window_pattern="X"), "AssertionError: Invalid window_pattern: X"),
    (dict(n_head=0), "ZeroDivisionError"),
    (dict(n_kv_head=-2), "RuntimeError: Trying to create tensor with negative dimension"),
    # these would build, and fail only at init_weights() or the first forward
    (dict(n_layer=0), "AssertionError: n_layer, vocab_size and sequence_len must be at least 1"),
    (dict(vocab_size=0), "AssertionError: n_layer, vocab_size and sequence_len"),
    (dict(sequence_len=0), "AssertionError: n_layer, vocab_size and sequence_len"),
    (dict(n_embd=16), "AssertionError: n_embd must be at least 24"),
    (dict(n_embd=36), "AssertionError: the head dim n_embd / n_head must be even .rotary pairs., got 9"),
    (dict(l3_after_layers="5", l3_n_emb=128), r"ValueError: l3_after_layers index 5 out of range \[0, 3\]"),
])
def test_a_config_no_gpt_is_built_of_raises_the_callers_error(kw, says):
    with pytest.raises(LookupError, match=f"^no model: {says}") as info:
        meta_model(tiny_config(**kw), lambda why: LookupError(f"no model: {why}"))
    assert "\n" not in str(info.value)
    assert meta_model(tiny_config(), None).transformer.wte.weight.is_meta


def test_at_init_blocks_are_identity():
    # zero output projections: the logits depend only on embeddings, not on attention
    model = build(tiny_config())
    idx = torch.randint(0, 100, (1, 16))
    a = model(idx)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_q.weight.normal_()
            block.mlp.c_fc.weight.normal_()
    torch.testing.assert_close(model(idx), a)


def test_smear_is_the_reference_formula_bit_for_bit():
    # the gate is computed on the reference's slice x[:, 1:] only: in fp32 on CPU a matmul's last bits depend
    # on its shape, so gating all positions and dropping the first shifts every later logit by an ulp
    model = build(tiny_config(), perturb=True)
    x = torch.randn(2, 32, 64)
    with torch.no_grad():
        gate = model.smear_lambda.to(x.dtype) * torch.sigmoid(model.smear_gate(x[:, 1:, :24]))
        want = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        assert torch.equal(model._smear(x, None), want)


# -----------------------------------------------------------------------------
# Windows and rotary

def test_window_sizes():
    model = build(GPTConfig(sequence_len=2048, n_layer=12, window_pattern="SSSL", vocab_size=64, n_embd=64, n_head=1, n_kv_head=1))
    assert [w for w, _ in model.window_sizes] == [512, 512, 512, 2048] * 3
    model = build(GPTConfig(sequence_len=100, n_layer=5, window_pattern="sl", vocab_size=64, n_embd=64, n_head=1, n_kv_head=1))
    assert [w for w, _ in model.window_sizes] == [128, 100, 128, 100, 100]
    with pytest.raises(AssertionError, match="Invalid window_pattern"):
        GPT(tiny_config(window_pattern="SXL"))


def test_rotary_is_relative_and_identity_at_zero():
    model = build(tiny_config())
    cos, sin = model.cos, model.sin
    D = cos.size(-1) * 2
    q = torch.randn(1, 1, 1, D)
    k = torch.randn(1, 1, 1, D)
    rot = lambda x, i: apply_rotary_emb(x, cos[:, i:i + 1], sin[:, i:i + 1])
    torch.testing.assert_close(rot(q, 0), q)
    dots = [(rot(q, i) * rot(k, i - 3)).sum().item() for i in (3, 10, 40)]
    assert dots[0] == pytest.approx(dots[1], abs=1e-4) and dots[0] == pytest.approx(dots[2], abs=1e-4)
    # sign convention: first half is x1*cos + x2*sin
    x1, x2 = q[..., :D // 2], q[..., D // 2:]
    torch.testing.assert_close(rot(q, 5)[..., :D // 2], x1 * cos[:, 5:6] + x2 * sin[:, 5:6])


def test_rotary_precompute_takes_the_reference_device_argument():
    # the reference signature is (seq_len, head_dim, base=100000, device=None): None means wte's device
    with torch.device("meta"):
        model = GPT(tiny_config())
    cos, sin = model._precompute_rotary_embeddings(16, 8, device="cpu")
    assert cos.device.type == sin.device.type == "cpu" and cos.shape == (1, 16, 1, 4)
    assert cos[0, 3, 0, 1].item() == pytest.approx(math.cos(3 * 100000 ** (-2 / 8)))
    assert model._precompute_rotary_embeddings(16, 8)[0].is_meta


def test_has_ve_pattern():
    assert [i for i in range(12) if has_ve(i, 12)] == [1, 3, 5, 7, 9, 11]
    assert [i for i in range(5) if has_ve(i, 5)] == [0, 2, 4]
    assert [i for i in range(2) if has_ve(i, 2)] == [1]


# -----------------------------------------------------------------------------
# KV cache

def cache_for(model, batch_size, seq_len):
    cfg = model.config
    return KVCache(batch_size=batch_size, num_heads=cfg.n_kv_head, seq_len=seq_len, head_dim=cfg.n_embd // cfg.n_head,
                   num_layers=cfg.n_layer, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_kv_cache_decode_matches_full_forward(batch_size):
    # T > short window (128) so the sliding window is exercised in decode
    model = build(tiny_config(sequence_len=200), perturb=True)
    T, P = 160, 20
    idx = torch.randint(0, 100, (batch_size, T))
    full = model(idx)
    cache = cache_for(model, batch_size, T)
    pieces = [model(idx[:, :P], kv_cache=cache)]
    for t in range(P, T):
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.get_pos() == T
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=1e-4)


def test_chunked_prefill_matches_single_prefill():
    # smear_lambda != 0: the reference's chunked prefill drifts at each chunk boundary
    model = build(tiny_config(sequence_len=200), perturb=True)
    idx = torch.randint(0, 100, (1, 150))
    full = model(idx)
    cache = cache_for(model, 1, 150)
    chunks = [model(idx[:, a:b], kv_cache=cache) for a, b in ((0, 50), (50, 51), (51, 140), (140, 150))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=2e-5, rtol=1e-4)


def test_decode_past_rotary_cache_raises_clear_error():
    model = build(tiny_config(sequence_len=8))  # rotary cache 80
    cache = cache_for(model, 1, 100)
    model(torch.randint(0, 100, (1, 79)), kv_cache=cache)
    model(torch.randint(0, 100, (1, 1)), kv_cache=cache)
    with pytest.raises(AssertionError, match="rotary embeddings cache"):
        model(torch.randint(0, 100, (1, 1)), kv_cache=cache)


# -----------------------------------------------------------------------------
# Accounting: exact integers from the reference, plus an independent recount

REFERENCE_COUNTS = [
    # (config kwargs, total, transformer_matrices, value_embeds, scalars, flops per token)
    (dict(), 286_261_730, 84_935_088, 150_994_944, 50, 759_695_904),
    (dict(n_layer=4, n_embd=256, n_head=2, n_kv_head=2), 36_700_242, 3_145_776, 16_777_216, 34, 80_216_352),
    (dict(n_layer=20, n_embd=1280, n_head=10, n_kv_head=10), 896_533_746, 393_217_200, 419_430_400, 66, 2_886_212_640),
    (dict(n_layer=24, n_embd=1536, n_head=12, n_kv_head=12), 1_384_122_122, 679_478_976, 603_979_776, 74, 4_775_225_472),
    (dict(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=128, window_pattern="L"),
     491_574, 393_240, 32_768, 30, 2_752_656),
]


@pytest.mark.parametrize("kwargs,total,matrices,ve,scalars,flops", REFERENCE_COUNTS)
def test_counts_match_reference(kwargs, total, matrices, ve, scalars, flops):
    with torch.device("meta"):
        model = GPT(GPTConfig(**kwargs))
    counts = model.num_scaling_params()
    assert list(counts) == ["wte", "value_embeds", "lm_head", "transformer_matrices", "scalars", "total"]
    assert (counts["total"], counts["transformer_matrices"], counts["value_embeds"], counts["scalars"]) == (total, matrices, ve, scalars)
    assert model.estimate_flops() == flops


def test_counts_against_independent_recount():
    cfg = tiny_config(n_layer=3, window_pattern="SSL")
    with torch.device("meta"):
        model = GPT(cfg)
    n, V, L, H, Hkv = cfg.n_embd, 128, cfg.n_layer, cfg.n_head, cfg.n_kv_head  # vocab padded 100 -> 128
    D = n // H
    per_block = n * H * D + 2 * n * Hkv * D + n * n + 2 * 4 * n * n
    n_ve = sum(has_ve(i, L) for i in range(L))
    matrices = L * per_block + n_ve * 12 * Hkv
    counts = model.num_scaling_params()
    assert counts["transformer_matrices"] == matrices
    assert counts["lm_head"] == V * n and counts["wte"] == V * n and counts["value_embeds"] == n_ve * V * Hkv * D
    assert counts["scalars"] == 2 * L + 24 + 2
    windows = [128, 128, 64]  # short window rounds up to 128 and exceeds T=64; the last is long
    attn = sum(12 * H * D * min(w, cfg.sequence_len) for w in windows)
    assert model.estimate_flops() == 6 * (matrices + V * n) + attn


# -----------------------------------------------------------------------------
# Optimizer grouping

def test_every_parameter_in_exactly_one_group():
    model = build(tiny_config())
    opt = model.setup_optimizer()
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters()}
    kinds = [g["kind"] for g in opt.param_groups]
    assert kinds[:6] == ["adamw"] * 6 and set(kinds[6:]) == {"muon"}
    for g in opt.param_groups:
        assert g["initial_lr"] == g["lr"]
        if g["kind"] == "muon":
            assert len({p.shape for p in g["params"]}) == 1


def test_group_learning_rates():
    model = build(tiny_config(n_embd=128, n_head=2, n_kv_head=2))
    opt = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.1)
    scale = math.sqrt(6)  # (128/768)^-0.5
    lrs = [g["lr"] for g in opt.param_groups[:6]]
    assert lrs == pytest.approx([0.004 * scale, 0.2 * scale, 0.1 * scale, 0.005, 0.5, 0.2])
    assert [g["weight_decay"] for g in opt.param_groups[:6]] == [0.01, 0.001, 0.01, 0.05, 0.0, 0.0]
    assert [g["betas"] for g in opt.param_groups[:6]] == [
        (0.8, 0.96), (0.8, 0.995), (0.8, 0.995), (0.8, 0.95), (0.96, 0.95), (0.8, 0.95)]
    assert all(g["eps"] == 1e-10 for g in opt.param_groups[:6])
    muon = opt.param_groups[6:]
    assert [tuple(g["params"][0].shape) for g in muon] == sorted(tuple(g["params"][0].shape) for g in muon)
    assert all(g["lr"] == 0.02 and g["weight_decay"] == 0.1 for g in muon)


def test_tiny_model_learns():
    model = build(tiny_config())
    opt = model.setup_optimizer(matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.02)
    torch.manual_seed(0)
    idx = torch.randint(0, 100, (4, 32))
    losses = []
    for _ in range(30):
        loss = model(idx[:, :-1], targets=idx[:, 1:])
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# -----------------------------------------------------------------------------
# generate

def test_generate_greedy_matches_argmax_and_sampling_is_seeded():
    model = build(tiny_config(), perturb=True)
    prompt = [1, 2, 3, 4]
    out = list(model.generate(prompt, max_tokens=6, temperature=0.0))
    ids = list(prompt)
    for _ in range(6):
        ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    assert out == ids[len(prompt):]
    a = list(model.generate(prompt, max_tokens=8, temperature=1.0, top_k=5, seed=7))
    b = list(model.generate(prompt, max_tokens=8, temperature=1.0, top_k=5, seed=7))
    assert a == b


def test_generate_below_the_temperature_epsilon_is_greedy():
    # the Engine's rule: dividing by such a temperature overflows float32 and softmax would give NaN
    model = build(tiny_config(), perturb=True)
    prompt = [1, 2, 3, 4]
    greedy = list(model.generate(prompt, max_tokens=6, temperature=0.0))
    for temperature in (1e-39, 5e-324, 0.5e-6):
        assert list(model.generate(prompt, max_tokens=6, temperature=temperature, top_k=5)) == greedy, temperature


# -----------------------------------------------------------------------------
# muP and dtype

def test_mup_at_base_width_equals_sp():
    sp, mup = build(tiny_config(), seed=3), build(tiny_config(mup_base_width=64), seed=3)
    for (name, a), (_, b) in zip(sp.state_dict().items(), mup.state_dict().items()):
        assert torch.equal(a, b), name
    idx = torch.randint(0, 100, (2, 16))
    assert torch.equal(sp(idx), mup(idx))
    lr_sp = [g["lr"] for g in sp.setup_optimizer().param_groups]
    lr_mup = [g["lr"] for g in mup.setup_optimizer().param_groups]
    assert lr_sp == lr_mup


def test_mup_validation():
    model = build(tiny_config())
    with pytest.raises(ValueError, match="mup_base_width"):
        model.setup_optimizer(use_mup=True)
    mup = build(tiny_config(n_embd=128, mup_base_width=64))
    with pytest.raises(ValueError, match="does not match"):
        mup.setup_optimizer(use_mup=True, base_width=32)


def test_bfloat16_compute_dtype_in_subprocess():
    code = (
        "import torch\n"
        "from nanochat.gpt import GPT, GPTConfig\n"
        "from nanochat.common import COMPUTE_DTYPE, COMPUTE_DTYPE_REASON\n"
        "assert COMPUTE_DTYPE == torch.bfloat16, COMPUTE_DTYPE\n"
        "assert COMPUTE_DTYPE_REASON == 'set via NANOCHAT_DTYPE=bfloat16'\n"
        "cfg = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)\n"
        "with torch.device('meta'):\n    m = GPT(cfg)\n"
        "m.to_empty(device='cpu'); m.init_weights()\n"
        "assert m.transformer.wte.weight.dtype == torch.bfloat16\n"
        "assert m.lm_head.weight.dtype == torch.float32 and m.cos.dtype == torch.bfloat16\n"
        "idx = torch.randint(0, 64, (2, 16))\n"
        "loss = m(idx, targets=idx); loss.backward()\n"
        "assert m.lm_head.weight.grad.dtype == torch.float32 and torch.isfinite(loss)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, NANOCHAT_DTYPE="bfloat16")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
