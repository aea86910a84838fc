"""
The compiled paths on CPU, so that a graph break or a compile error fails here and not at minute one of a
GPU run: the fullgraph-compiled optimizer kernels (directly, with the bf16 orthogonalisation of GPU runs,
and through the optimizer's own compiled-kernel switch) and the torch.compile'd model's forward + backward,
each against the eager numbers. Tiny shapes, dynamic=False as in training.

Backend "aot_eager" runs dynamo's full-graph capture and AOT autograd (where graph breaks and tracing
errors live) in seconds; "inductor", the training backend, adds code generation and a C++ compile per
graph, minutes on a 2-core CPU, so those variants are marked slow.
"""
import copy

import pytest
import torch

from conftest import TINY_VOCAB, tiny_gpt
from nanochat import optim

BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


def compiled(fn, backend):
    # a fresh dynamo cache: the kernels are compiled for many shapes, dtypes and backends across the file,
    # more variants of one function than dynamo's recompile limit (8) allows
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)  # a graph break raises


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run_twice(kernel, state, fresh, args, **kwargs):
    """Two updates of clones of `state` (the kernel's tensors); fresh(i, t) gives tensor i of a step,
    args(step) the arguments after them."""
    state = [t.clone() for t in state]
    for step in (1, 2):
        kernel(*[fresh(i, t) for i, t in enumerate(state)], *args(step), **kwargs)
    return state


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_adamw_kernel_matches_eager(backend):
    state = [randn(8, 16, seed=1), randn(8, 16, seed=2), torch.zeros(8, 16), torch.zeros(8, 16)]  # p, g, m, v
    hyper = lambda step: [torch.tensor(float(v)) for v in (step, 0.01, 0.8, 0.95, 1e-10, 0.1)]
    results = [run_twice(kernel, state, lambda i, t: t, hyper)
               for kernel in (optim.adamw_step_fused, compiled(optim.adamw_step_fused, backend))]
    for eager, graph in zip(*results):
        torch.testing.assert_close(graph, eager, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])  # bf16: the GPU branch
@pytest.mark.parametrize("shape", [(3, 64, 16), (2, 16, 64)])  # tall (row statistic) and wide (column)
def test_fullgraph_muon_kernel_matches_eager(backend, compute_dtype, shape):
    red_dim = -1 if shape[1] >= shape[2] else -2
    factored = (shape[0], shape[1], 1) if red_dim == -1 else (shape[0], 1, shape[2])
    grads = randn(*shape, seed=1)
    state = [grads, randn(*shape, seed=2), torch.zeros(shape), torch.zeros(factored)]
    hyper = lambda step: [torch.tensor(v) for v in (0.95, 0.02, 0.1, 0.9)]  # momentum, lr, wd, beta2
    refill = lambda i, t: t.copy_(grads) if i == 0 else t  # the kernel overwrites the gradient
    args = lambda step: [*hyper(step), 5, red_dim]  # ns_steps, red_dim
    results = [run_twice(kernel, state, refill, args, compute_dtype=compute_dtype)
               for kernel in (optim.muon_step_fused, compiled(optim.muon_step_fused, backend))]
    tol = 2e-3 if compute_dtype == torch.bfloat16 else 1e-5  # bf16 rounding, fused in another order
    for eager, graph in zip(*results):
        torch.testing.assert_close(graph, eager, atol=tol, rtol=10 * tol)


@pytest.mark.slow
def test_optimizer_through_its_compiled_kernel_switch_matches_eager(monkeypatch):
    """The optimizer's own path to the compiled kernels (torch.compile(kernel, fullgraph=True), inductor),
    which a CPU tensor never takes in normal runs."""
    def params():
        return [randn(32, 8, seed=3), randn(16, 32, seed=4), randn(16, 32, seed=5)]
    def optimizer(ps):
        return optim.MuonAdamW([
            dict(kind="adamw", params=ps[:1], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01),
            dict(kind="muon", params=ps[1:], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9,
                 weight_decay=0.1)])
    monkeypatch.setattr(optim, "_compiled_kernels", {})
    results = []
    for eager in (True, False):
        monkeypatch.setattr(optim, "_wants_eager", lambda tensor, eager=eager: eager)
        ps = [torch.nn.Parameter(p) for p in params()]
        opt = optimizer(ps)
        for step in range(2):
            for i, p in enumerate(ps):
                p.grad = randn(*p.shape, seed=10 * step + i)
            opt.step()
        results.append(ps)
    assert set(optim._compiled_kernels) == {optim.adamw_step_fused, optim.muon_step_fused}
    for eager, graph in zip(*results):
        torch.testing.assert_close(graph, eager, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_model_forward_backward_matches_eager(backend):
    # perturbed: the zero-initialised projections would leave some gradients exactly zero
    eager_model = tiny_gpt(perturb=0.05, window_pattern="SL")
    graph_model = copy.deepcopy(eager_model)
    x = torch.randint(0, TINY_VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))
    x, y = x[:, :-1], x[:, 1:]
    eager_loss, graph_loss = eager_model(x, y), compiled(graph_model, backend)(x, y)
    eager_loss.backward()
    graph_loss.backward()
    torch.testing.assert_close(graph_loss, eager_loss, atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(eager_model.named_parameters(), graph_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
