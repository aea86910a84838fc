import datetime
import io
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.optim import (DistMuonAdamW, MuonAdamW, _normuon, _polar_express, adamw_step_fused,
                            muon_step_fused, polar_express_coeffs)


def adamw_group(params, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01, **extra):
    return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **extra)


def muon_group(params, lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0, **extra):
    return dict(kind="muon", params=params, lr=lr, momentum=momentum, ns_steps=ns_steps, beta2=beta2,
                weight_decay=weight_decay, **extra)


def leaf(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=g))


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def scalar(x):
    return torch.tensor(float(x), dtype=torch.float32)


# -----------------------------------------------------------------------------
# AdamW


def test_adamw_matches_torch_adamw():
    shapes = [(7, 5), (13,), ()]
    ours = [leaf(*s, seed=i) for i, s in enumerate(shapes)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    hp = dict(lr=0.03, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    opt = MuonAdamW([adamw_group(ours, **hp)])
    ref = torch.optim.AdamW(theirs, foreach=False, **hp)
    for step in range(6):
        set_grads(ours, seed=100 + step)
        for a, b in zip(ours, theirs):
            b.grad = a.grad.clone()
        if step == 2:  # a missing grad is skipped, as torch does: that param's step count lags
            ours[1].grad = theirs[1].grad = None
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert opt.state[ours[1]]["step"] == 5 and opt.state[ours[0]]["step"] == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_kernel_applies_the_update_in_the_reference_order(dtype):
    # the reference ends with p.add_(exp_avg / denom, alpha=-(lr / bias1)): one rounding of p + alpha * x,
    # where (lr / bias1) * exp_avg / denom rounds differently in a few percent of the entries
    p = leaf(64, 128, seed=0).detach().to(dtype)
    want = p.clone()
    m, v, m_ref, v_ref = (torch.zeros_like(p) for _ in range(4))
    lr, b1, b2, eps, wd = scalar(0.004), scalar(0.8), scalar(0.96), scalar(1e-10), scalar(0.01)
    for step in range(1, 5):
        g = leaf(64, 128, seed=step).detach().to(dtype)
        adamw_step_fused(p, g, m, v, scalar(step), lr, b1, b2, eps, wd)
        want.mul_(1 - lr * wd)
        m_ref.lerp_(g, 1 - b1)
        v_ref.lerp_(g.square(), 1 - b2)
        denom = (v_ref / (1 - b2 ** step)).sqrt() + eps
        want.add_(m_ref / denom, alpha=-(lr / (1 - b1 ** step)))
        assert torch.equal(p, want), step


def test_adamw_param_without_grad_is_untouched():
    a, b = leaf(4, 3, seed=0), leaf(6, seed=1)
    b_before = b.detach().clone()
    opt = MuonAdamW([adamw_group([a, b], weight_decay=0.5)])
    a.grad = torch.ones_like(a)
    opt.step()
    assert torch.equal(b, b_before)
    assert b not in opt.state


def test_adamw_kernel_first_step_is_sign_step():
    # Step 1 with bias correction: m/bias1 = g and v/bias2 = g^2, so the update is lr * sign(g)
    p = torch.randn(50, dtype=torch.float64)
    g = torch.randn(50, dtype=torch.float64)
    expected = p * (1 - 0.1 * 0.2) - 0.1 * g.sign()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    adamw_step_fused(p, g, m, v, scalar(1), scalar(0.1), scalar(0.9), scalar(0.99), scalar(0.0), scalar(0.2))
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)


# -----------------------------------------------------------------------------
# Muon kernel pieces


@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (256, 64)])
def test_polar_express_singular_values_near_one(shape):
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    O = _polar_express(X, ns_steps=5)
    s = torch.linalg.svdvals(O)
    assert s.min() > 0.8 and s.max() < 1.2, (s.min().item(), s.max().item())
    assert torch.linalg.svdvals(X).max() > 2  # the input was far from orthogonal


def test_polar_express_tall_and_wide_branches_agree():
    X = torch.randn(3, 48, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(_polar_express(X, 5).mT, _polar_express(X.mT, 5), rtol=0, atol=1e-12)
    X32 = X.float()
    torch.testing.assert_close(_polar_express(X32, 5).mT, _polar_express(X32.mT, 5), rtol=1e-5, atol=1e-5)


def test_polar_express_extra_steps_use_the_five_coefficients():
    assert len(polar_express_coeffs) == 5 and all(len(t) == 3 for t in polar_express_coeffs)
    X = torch.randn(16, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.equal(_polar_express(X, 7), _polar_express(X, 5))
    assert not torch.equal(_polar_express(X, 4), _polar_express(X, 5))


@pytest.mark.parametrize("shape,red_dim", [((3, 40, 12), -1), ((3, 12, 40), -2)])
def test_normuon_keeps_frobenius_norm_and_equalises_rows(shape, red_dim):
    gen = torch.Generator().manual_seed(3)
    O = torch.randn(*shape, generator=gen) * torch.rand(*shape[:-2], shape[-2], 1, generator=gen)  # uneven rows
    O = O * torch.rand(*shape[:-2], 1, shape[-1], generator=gen)  # and uneven columns
    S = torch.rand(O.mean(dim=red_dim, keepdim=True).shape, generator=gen)
    out = _normuon(O, S.clone(), scalar(0.9), red_dim)
    torch.testing.assert_close(out.norm(dim=(-2, -1)), O.norm(dim=(-2, -1)), rtol=1e-5, atol=0)
    # beta2 = 0: the statistic is this step's mean square, so every row (tall) or column (wide)
    # comes out with the same RMS
    out0 = _normuon(O, S.clone(), scalar(0.0), red_dim)
    rms = out0.square().mean(dim=red_dim)
    torch.testing.assert_close(rms, rms[:, :1].expand_as(rms), rtol=1e-4, atol=0)


def test_muon_zero_grad_only_decays():
    p = leaf(16, 16, seed=4)
    p0 = p.detach().clone()
    opt = MuonAdamW([muon_group([p], lr=0.1, weight_decay=0.5)])
    p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(p.detach(), p0 * (1 - 0.1 * 0.5), rtol=1e-6, atol=0)


def test_muon_weight_decay_is_cautious():
    # The decay term only acts where the update and the weight have the same sign
    results = {}
    for wd in (0.0, 0.5):
        p = leaf(24, 12, seed=5)
        opt = MuonAdamW([muon_group([p], lr=0.05, weight_decay=wd)])
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(6))
        opt.step()
        results[wd] = p.detach()
    p0 = leaf(24, 12, seed=5).detach()
    update = p0 - results[0.0]  # lr * O
    mask = (update * p0) >= 0
    assert 0 < mask.sum() < mask.numel()
    assert torch.equal(results[0.5][~mask], results[0.0][~mask])
    lr_eff = 0.05 * (24 / 12) ** 0.5  # the decay also uses the shape-aware lr
    torch.testing.assert_close((results[0.0] - results[0.5])[mask], (lr_eff * 0.5 * p0)[mask], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape,multiplier", [((64, 16), 2.0), ((16, 64), 1.0), ((32, 32), 1.0)])
def test_muon_shape_aware_lr(shape, multiplier):
    lr = 0.01
    p = leaf(*shape, seed=7)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    opt = MuonAdamW([muon_group([p], lr=lr)])
    p.grad = grad.clone()
    before = p.detach().clone()
    opt.step()
    # the same update through the kernel with the unscaled lr
    q = before.clone().unsqueeze(0)
    r, c = shape
    sm = torch.zeros(1, r, 1) if r >= c else torch.zeros(1, 1, c)
    muon_step_fused(grad.clone().unsqueeze(0), q, torch.zeros_like(q), sm, scalar(0.95), scalar(lr),
                    scalar(0.0), scalar(0.9), 5, -1 if r >= c else -2)
    ratio = (p.detach() - before).norm() / (q[0] - before).norm()
    assert abs(ratio.item() - multiplier) < 1e-5


def test_muon_beta2_none_means_no_ema():
    out = []
    for beta2 in (None, 0.0):
        p = leaf(20, 10, seed=9)
        opt = MuonAdamW([muon_group([p], beta2=beta2)])
        for step in range(3):
            set_grads([p], seed=10 + step)
            opt.step()
        out.append(p.detach())
    assert torch.equal(out[0], out[1])


def reference_muon_step(G, P, M, S, mu, lr, wd, beta2, red_dim):
    """Slow fp64 restatement of the Muon step, one matrix at a time. Both Polar Express branches
    evaluate the same odd polynomial a X + b (X X^T) X + c (X X^T)^2 X."""
    M = mu * M + (1 - mu) * G
    U = (1 - mu) * G + mu * M  # Nesterov look-ahead
    P, S = P.clone(), S.clone()
    for k in range(G.size(0)):
        X = U[k] / (U[k].norm() * 1.01 + 1e-6)
        for a, b, c in polar_express_coeffs:
            XXt = X @ X.T
            X = a * X + b * XXt @ X + c * XXt @ XXt @ X
        S[k] = beta2 * S[k] + (1 - beta2) * (X ** 2).mean(dim=red_dim, keepdim=True)
        O = X / S[k].sqrt()
        O = O * X.norm() / O.norm()
        P[k] -= lr * O + lr * wd * P[k] * (O * P[k] >= 0)
    return P, M, S


@pytest.mark.parametrize("shape,red_dim", [((3, 24, 10), -1), ((2, 10, 24), -2), ((2, 16, 16), -1)])
def test_muon_kernel_matches_slow_reference(shape, red_dim):
    gen = torch.Generator().manual_seed(17)
    P = torch.randn(shape, generator=gen)
    M = torch.zeros(shape)
    S = torch.zeros(P.mean(dim=red_dim, keepdim=True).shape)  # (K, r, 1) or (K, 1, c)
    hp = dict(mu=0.9, lr=0.05, wd=0.2, beta2=0.8)
    hp64 = {k: float(scalar(v)) for k, v in hp.items()}  # the values the fp32 scalars hold
    Pr, Mr, Sr = P.double(), M.double(), S.double()
    for step in range(3):  # several steps so that both EMAs carry state
        G = torch.randn(shape, generator=gen)
        Pr, Mr, Sr = reference_muon_step(G.double(), Pr, Mr, Sr, red_dim=red_dim, **hp64)
        muon_step_fused(G, P, M, S, scalar(hp["mu"]), scalar(hp["lr"]), scalar(hp["wd"]), scalar(hp["beta2"]),
                        5, red_dim, compute_dtype=torch.float32)
    torch.testing.assert_close(M.double(), Mr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(S.double(), Sr, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(P.double(), Pr, rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# The optimizer as a whole


def test_mlp_converges_with_muon_and_adamw():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(256, 16, generator=gen)
    teacher1, teacher2 = torch.randn(32, 16, generator=gen) / 4, torch.randn(8, 32, generator=gen) / 6
    y = torch.tanh(x @ teacher1.T) @ teacher2.T
    w1, w2 = leaf(32, 16, seed=12), leaf(8, 32, seed=13)
    with torch.no_grad():
        w1.mul_(0.25)
        w2.mul_(0.18)
    b1, b2 = torch.nn.Parameter(torch.zeros(32)), torch.nn.Parameter(torch.zeros(8))
    opt = MuonAdamW([adamw_group([b1, b2], lr=0.01, weight_decay=0.0),
                     muon_group([w1], lr=0.02), muon_group([w2], lr=0.02)])
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    steps, losses = 150, []
    for it in range(steps):
        for group in opt.param_groups:  # linear decay, as the training loop does via group["lr"]
            group["lr"] = group["initial_lr"] * (1 - it / steps)
        loss = ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])


def small_problem(seed=14):
    a, b = leaf(10, seed=seed), leaf(32, 8, seed=seed + 1)
    m = [leaf(48, 24, seed=seed + 2 + i) for i in range(3)]
    w = [leaf(8, 40, seed=seed + 5 + i) for i in range(2)]
    groups = [adamw_group([a, b], initial_lr=0.01), muon_group(m, weight_decay=0.1), muon_group(w, weight_decay=0.1)]
    return [a, b, *m, *w], groups


def test_step_runs_with_dynamo_disabled():
    # tests/test_mup.py sets this flag at import; a fullgraph-compiled kernel would then raise
    import torch._dynamo
    results = []
    for disable in (True, False):
        params, groups = small_problem()
        old = torch._dynamo.config.disable
        torch._dynamo.config.disable = disable
        try:
            opt = MuonAdamW(groups)
            set_grads(params, seed=0)
            opt.step()
        finally:
            torch._dynamo.config.disable = old
        results.append(params)
    assert all(torch.equal(p, q) for p, q in zip(*results))
    assert not any(torch.equal(p, q) for p, q in zip(results[0], small_problem()[0]))


def muon_kernel_inputs(seed=15):
    gen = torch.Generator().manual_seed(seed)
    G, P = torch.randn(2, 12, 6, generator=gen), torch.randn(2, 12, 6, generator=gen)
    M = torch.randn(2, 12, 6, generator=gen)
    return [G, P, M, torch.rand(2, 12, 1, generator=gen), scalar(0.95), scalar(0.02), scalar(0.1), scalar(0.9), 5, -1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_trace_as_one_graph(dtype):
    # What the compiled path needs on GPU: fullgraph tracing with 0-d CPU scalars and no graph
    # breaks (backend="eager" runs dynamo's tracing without inductor's code generation)
    eager, traced = muon_kernel_inputs(), muon_kernel_inputs()
    muon_step_fused(*eager, compute_dtype=dtype)
    torch.compile(muon_step_fused, backend="eager", dynamic=False, fullgraph=True)(*traced, compute_dtype=dtype)
    for a, b in zip(eager[:4], traced[:4]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    gen = torch.Generator().manual_seed(16)
    p, g = torch.randn(9, generator=gen), torch.randn(9, generator=gen)
    hp = [scalar(x) for x in (1, 0.1, 0.8, 0.95, 1e-10, 0.01)]
    q = p.clone()
    adamw_step_fused(q, g, torch.zeros(9), torch.zeros(9), *hp)
    torch.compile(adamw_step_fused, backend="eager", fullgraph=True)(p, g, torch.zeros(9), torch.zeros(9), *hp)
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_muon_orthogonalises_in_bf16_only_for_bf16_compute():
    ref, fp16, bf16 = muon_kernel_inputs(), muon_kernel_inputs(), muon_kernel_inputs()
    muon_step_fused(*ref, compute_dtype=torch.float32)
    muon_step_fused(*fp16, compute_dtype=torch.float16)  # fp16 compute still orthogonalises in fp32
    muon_step_fused(*bf16, compute_dtype=torch.bfloat16)
    assert torch.equal(ref[1], fp16[1])
    assert not torch.equal(ref[1], bf16[1]) and bf16[1].dtype == torch.float32
    update, bf16_update = ref[1] - muon_kernel_inputs()[1], bf16[1] - muon_kernel_inputs()[1]
    assert (bf16_update - update).norm() < 0.2 * update.norm()  # bf16 Polar Express is ~5-10% off on 12x6
    assert torch.equal(ref[2], bf16[2])  # momentum stays in the param dtype


def test_state_dict_layout():
    params, groups = small_problem()
    a, b = params[:2]
    opt = MuonAdamW(groups)
    set_grads(params, seed=1)
    a.grad = None
    opt.step()
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [1, 2, 5]  # b, first of each Muon group; a had no grad
    assert set(sd["state"][1]) == {"step", "exp_avg", "exp_avg_sq"}
    assert type(sd["state"][1]["step"]) is int and sd["state"][1]["step"] == 1
    assert sd["state"][1]["exp_avg"].shape == b.shape and sd["state"][1]["exp_avg_sq"].dtype == b.dtype
    assert set(sd["state"][2]) == {"momentum_buffer", "second_momentum_buffer"}
    assert sd["state"][2]["momentum_buffer"].shape == (3, 48, 24)
    assert sd["state"][2]["second_momentum_buffer"].shape == (3, 48, 1)  # tall: one value per row
    assert sd["state"][5]["momentum_buffer"].shape == (2, 8, 40)
    assert sd["state"][5]["second_momentum_buffer"].shape == (2, 1, 40)  # wide: one value per column
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3, 4], [5, 6]]
    assert sd["param_groups"][0]["initial_lr"] == 0.01 and sd["param_groups"][1]["kind"] == "muon"


def test_state_dict_round_trip_continues_identically():
    params, groups = small_problem()
    opt = MuonAdamW(groups)
    for step in range(2):
        set_grads(params, seed=20 + step)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # as a checkpoint would
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for step in range(2, 4):
        set_grads(params, seed=20 + step)
        opt.step()
    _, groups2 = small_problem()
    sizes = [len(g["params"]) for g in groups2]
    it = iter(clones)
    for g, n in zip(groups2, sizes):
        g["params"] = [next(it) for _ in range(n)]
    opt2 = MuonAdamW(groups2)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for step in range(2, 4):
        set_grads(clones, seed=20 + step)
        opt2.step()
    for p, q in zip(params, clones):
        assert torch.equal(p, q)


def test_unknown_kind_raises():
    p = leaf(4, seed=0)
    p.grad = torch.ones_like(p)
    opt = MuonAdamW([dict(kind="sgd", params=[p], lr=0.1)])
    with pytest.raises(ValueError, match="Unknown optimizer kind: sgd"):
        opt.step()



def test_empty_muon_group_is_skipped():
    # the reference's _step_muon returns on an empty group; the other groups still step
    p = leaf(8, 4, seed=0)
    set_grads([p], seed=1)
    before = p.detach().clone()
    opt = MuonAdamW([muon_group([]), muon_group([p])])
    opt.step()
    assert not torch.equal(p, before)
    assert "momentum_buffer" in opt.state[p]

# -----------------------------------------------------------------------------
# DistMuonAdamW on 2 gloo processes vs MuonAdamW on one


WORLD = 2
DIST_STEPS = 3
DIST_MODES = ("identical", "different", "different_sum")  # the last forces the SUM/W fallback
# The optimizer is invariant to a global gradient scale, so a missing "/ W" would not show in the
# params: the tests also compare the optimizer state and the averaged small-param .grad.
MUON_FIRST = {2: 3, 5: 2, 7: 1}  # state index of each Muon group's first param -> K


def dist_problem():
    """Groups of spec 3.6: small and large AdamW params; Muon 3x(64,32), 2x(32,128), 1x(128,32)."""
    shapes = [[(10,), (256, 16)], [(64, 32)] * 3, [(32, 128)] * 2, [(128, 32)]]
    params, groups, seed = [], [], 100
    for i, group_shapes in enumerate(shapes):
        ps = []
        for s in group_shapes:
            ps.append(leaf(*s, seed=seed))
            seed += 1
        params += ps
        groups.append(adamw_group(ps, weight_decay=0.05) if i == 0 else muon_group(ps, weight_decay=0.1))
    return params, groups


def dist_grads(params, mode, step, rank):
    seed = 1000 * step + (rank + 1 if mode != "identical" else 0)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in params]


def _dist_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        results = {}
        for mode in DIST_MODES:
            params, groups = dist_problem()
            opt = DistMuonAdamW(groups)
            opt._avg_supported = mode != "different_sum"
            for step in range(DIST_STEPS):
                for p, g in zip(params, dist_grads(params, mode, step, rank)):
                    p.grad = g
                opt.step()
            results[mode] = dict(params=[p.detach() for p in params], state=opt.state_dict()["state"],
                                 small_grad=params[0].grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_results():
    # fork where available: a spawned child re-imports torch and torch._dynamo, tens of seconds on
    # a small CPU box. A child's exception is re-raised here with its traceback.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_dist_worker, args=(free_port(), out_dir), nprocs=WORLD, join=True, start_method=method)
        yield [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def run_single(mode):
    """MuonAdamW on one process, fed the mean of the ranks' gradients."""
    params, groups = dist_problem()
    opt = MuonAdamW(groups)
    for step in range(DIST_STEPS):
        per_rank = [dist_grads(params, mode, step, r) for r in range(WORLD)]
        for i, p in enumerate(params):
            p.grad = (per_rank[0][i] + per_rank[1][i]) / WORLD
        opt.step()
    return [p.detach() for p in params], opt.state_dict()["state"], params[0].grad


def expected_shard(state, index, key, rank):
    """This rank's part of the single-process state: replicated (small AdamW param), a row slice
    (large AdamW param) or ceil(K/W) matrices, zero-padded past K (Muon buffers)."""
    full = state[index][key]
    if index == 0:
        return full
    if index == 1:
        rows = full.shape[0] // WORLD
        return full[rank * rows:(rank + 1) * rows]
    K = MUON_FIRST[index]
    chunk = -(-K // WORLD)
    lo = min(rank * chunk, K)
    owned = full[lo:min(lo + chunk, K)]
    return torch.cat([owned, owned.new_zeros(chunk - len(owned), *owned.shape[1:])])


def check_against_single(dist_results, mode, compare):
    params, state, small_grad = run_single("identical" if mode == "identical" else "different")
    for rank in range(WORLD):
        got = dist_results[rank][mode]
        for i, (p, q) in enumerate(zip(got["params"], params)):
            compare(p, q, f"rank {rank} param {i}")
        assert sorted(got["state"]) == [0, 1, *MUON_FIRST]
        for index, entry in got["state"].items():
            if index < 2:
                assert entry["step"] == DIST_STEPS
            for key, value in entry.items():
                if torch.is_tensor(value):
                    compare(value, expected_shard(state, index, key, rank), f"rank {rank} state {index} {key}")
        compare(got["small_grad"], small_grad, f"rank {rank} averaged grad of the small param")


def test_dist_identical_grads_bitwise_equal(dist_results):
    def equal(a, b, what):
        assert a.shape == b.shape and torch.equal(a, b), f"{what}: max diff {(a - b).abs().max().item()}"
    check_against_single(dist_results, "identical", equal)


@pytest.mark.parametrize("mode", ["different", "different_sum"])
def test_dist_different_grads_match_mean_gradient(dist_results, mode):
    def close(a, b, what):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")
    check_against_single(dist_results, mode, close)
