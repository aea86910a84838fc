"""
MuonAdamW: AdamW for embeddings, the unembedding and scalars; Muon (Polar Express + NorMuon +
cautious weight decay) for the transformer matrices.

One implementation serves both the single-process and the distributed case. A step has three
phases per parameter group: (1) launch the gradient reductions, (2) wait for a group's
reduction, update the part of it this rank owns and launch the gather of the result, (3) wait
for the gathers and write the gathered matrices back. With one process every collective is the
identity, ownership covers everything, and the same code yields the plain single-process
optimizer and its state layout. DistMuonAdamW only switches on the rank/world size.

Group schema (see the model spec, section 3.1): every group has `params` and `kind`;
'adamw' groups carry lr, betas, eps, weight_decay; 'muon' groups carry lr, momentum, ns_steps,
beta2 and weight_decay, and their params (possibly none: the group is then skipped) share one
shape (..., r, c).

Importing this module does no work: the kernels are compiled lazily, on the first call that
wants the compiled version.
"""

import os

import torch
import torch.distributed as dist

from nanochat import common  # common.COMPUTE_DTYPE is read at call time: deciding it may query CUDA

# -----------------------------------------------------------------------------
# Kernels. Hyperparameters arrive as 0-d fp32 CPU tensors so that a changing lr/momentum/wd
# does not trigger recompilation of the compiled versions.


def adamw_step_fused(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    """One AdamW update in place on p and its moments; step_t is the step count after incrementing."""
    # decoupled weight decay, before the update (Loshchilov & Hutter). On bf16 tables (the embeddings on GPU)
    # a factor within bf16's half-ulp of 1 (lr * wd < 2^-9, the defaults) rounds back to p: no decay, as in
    # the reference; fp32 master copies would change every GPU run's weights
    p.mul_(1 - lr_t * wd_t)
    exp_avg.lerp_(grad, 1 - beta1_t)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2_t)
    bias1 = 1 - beta1_t ** step_t
    bias2 = 1 - beta2_t ** step_t
    denom = (exp_avg_sq / bias2).sqrt() + eps_t
    # the reference's form: one rounding of p + alpha * x (its compiled graph, and so its bits, are ours)
    p.add_(exp_avg / denom, alpha=-(lr_t / bias1))


# Polar Express (Amsel et al., arXiv 2505.16932): per-iteration odd quintic coefficients,
# optimised for 5 iterations with safety factor 2e-2 and cushion 2. They must stay bit-exact.
polar_express_coeffs = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def _polar_express(X, ns_steps):
    """Approximate the orthogonal polar factor of each matrix in X (..., r, c)."""
    # ||X||_F bounds the spectral norm, so the singular values land in (0, 1] where the polynomials
    # are designed to work; the 1.01 leaves room for rounding (bf16 on GPU)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    for a, b, c in polar_express_coeffs[:ns_steps]:  # ns_steps > 5 silently uses 5
        # Gram matrix on the smaller side: (c, c) for tall, (r, r) for wide/square
        if tall:
            A = X.mT @ X
            B = b * A + c * (A @ A)
            X = a * X + X @ B
        else:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    return X


def _normuon(O, second_momentum_buffer, beta2_t, red_dim):
    """NorMuon (arXiv 2510.05491): per-row (tall/square) or per-column (wide) adaptive step
    from an EMA of the mean square, then rescale each matrix back to its Frobenius norm."""
    beta2 = beta2_t.to(O.dtype)
    v = O.float().square().mean(dim=red_dim, keepdim=True)  # (K, r, 1) or (K, 1, c), fp32
    n_red = O.size(red_dim)
    norm_before = (v.sum(dim=(-2, -1), keepdim=True) * n_red).sqrt()  # = ||O||_F
    second_momentum_buffer.lerp_(v.to(second_momentum_buffer.dtype), 1 - beta2)
    step = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    norm_after = (v * n_red * step.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    scale = step * (norm_before / norm_after.clamp_min(1e-10))
    return O * scale.to(O.dtype)


def muon_step_fused(stacked_grads, stacked_params, momentum_buffer, second_momentum_buffer,
                    momentum_t, lr_t, wd_t, beta2_t, ns_steps: int, red_dim: int, compute_dtype=None):
    """
    One Muon update of K same-shape matrices, in place on stacked_params (K, r, c) and both
    buffers; stacked_grads is overwritten. momentum_buffer is (K, r, c), second_momentum_buffer
    (K, r, 1) with red_dim=-1 when r >= c, else (K, 1, c) with red_dim=-2. lr_t already holds the
    shape-aware lr. compute_dtype (default: COMPUTE_DTYPE) selects bf16 orthogonalisation; the
    optimizer passes it explicitly so that the compiled graph does not trace the lazy lookup.
    """
    if compute_dtype is None:
        compute_dtype = common.COMPUTE_DTYPE
    # Nesterov momentum; the look-ahead is written into the gradient buffer
    mu = momentum_t.to(stacked_grads.dtype)
    momentum_buffer.lerp_(stacked_grads, 1 - mu)
    U = stacked_grads.lerp_(momentum_buffer, mu)
    # bf16 only when the run computes in bf16; fp16's exponent range is too small for this
    X = U.bfloat16() if compute_dtype == torch.bfloat16 else U
    O = _normuon(_polar_express(X, ns_steps), second_momentum_buffer, beta2_t, red_dim)
    # Cautious weight decay: decay only where the update moves the weight toward zero (or is 0)
    lr, wd = lr_t.to(O.dtype), wd_t.to(O.dtype)  # bf16 on GPU, as in the reference (its bits are ours)
    mask = (O * stacked_params) >= 0
    stacked_params.sub_(lr * O + lr * wd * stacked_params * mask)


# -----------------------------------------------------------------------------
# Eager/compiled switch, decided per call. A fullgraph compiled function raises when dynamo is
# disabled (torch 2.14: "found no compiled frames"), and compiling on CPU is slow for no gain.

_compiled_kernels = {}


def _wants_eager(tensor):
    # the device test comes first: reading the dynamo flag imports torch._dynamo (seconds)
    return (tensor.device.type == "cpu" or os.environ.get("NANOCHAT_COMPILE") == "0"
            or torch._dynamo.config.disable)


def _run_kernel(kernel, *args, **kwargs):
    device = args[0].device
    if _wants_eager(args[0]):
        if device.type != "cpu":
            # eager ops such as lerp_ reject a CPU 0-d weight next to GPU tensors (compiled graphs lift them)
            args = [a.to(device, non_blocking=True) if isinstance(a, torch.Tensor) and a.ndim == 0 else a
                    for a in args]
        return kernel(*args, **kwargs)
    if kernel not in _compiled_kernels:
        _compiled_kernels[kernel] = torch.compile(kernel, dynamic=False, fullgraph=True)
    return _compiled_kernels[kernel](*args, **kwargs)


# -----------------------------------------------------------------------------
# Collectives


class _Pending:
    """An async collective (or nothing, for one process) plus the work that must follow it."""

    def __init__(self, work=None, then=None):
        self.work, self.then = work, then

    def wait(self):
        if self.work is not None:
            self.work.wait()  # not work.get_future(): gloo lacks it for reduce_scatter_tensor
        if self.then is not None:
            self.then()


def _fill(scalars, *values):
    for t, v in zip(scalars, values, strict=True):
        t.fill_(v)


def _owned_range(rank, world, n):
    """Rows [lo, hi) of n owned by `rank` when n is split in ceil(n / world) chunks."""
    chunk = -(-n // world)
    lo = min(rank * chunk, n)
    return lo, min(lo + chunk, n)


# -----------------------------------------------------------------------------
# The optimizer


class MuonAdamW(torch.optim.Optimizer):
    """
    MuonAdamW on one process. DistMuonAdamW is this class with the rank and world size of the
    process group; with a world size of 1 the two are identical. On one process, params of an
    AdamW group whose .grad is None are skipped (Muon groups need every grad).
    """

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        self._rank, self._world = 0, 1
        self._avg_supported = True  # flips to False if the backend lacks ReduceOp.AVG
        # 0-d fp32 CPU tensors refilled before every kernel call (see the kernels' note), in the order of
        # the kernels' arguments: AdamW (step, lr, beta1, beta2, eps, wd), Muon (momentum, lr, wd, beta2)
        self._adamw_hyper = [torch.zeros((), dtype=torch.float32, device="cpu") for _ in range(6)]
        self._muon_hyper = [torch.zeros((), dtype=torch.float32, device="cpu") for _ in range(4)]

    @torch.no_grad()
    def step(self):
        phases = {"adamw": (self._reduce_adamw, self._update_adamw),
                  "muon": (self._reduce_muon, self._update_muon)}
        for group in self.param_groups:
            if group["kind"] not in phases:
                raise ValueError(f"Unknown optimizer kind: {group['kind']}")
        # an empty group has nothing to do (the same on every rank: it joins no collective)
        groups = [(group, *phases[group["kind"]]) for group in self.param_groups if group["params"]]
        if self._world == 1:
            # Nothing to overlap: finish each group before the next, so only one group's
            # stacked buffers are alive at a time.
            for group, reduce, update in groups:
                for pending in update(group, reduce(group)):
                    pending.wait()
            return
        reduced = [reduce(group) for group, reduce, _ in groups]
        gathers = []
        for (group, _, update), r in zip(groups, reduced):
            gathers += update(group, r)
        for pending in gathers:
            pending.wait()

    # ---- collectives (identity on one process)

    def _mean(self, collective, out, *inputs):
        """Launch an averaging all_reduce/reduce_scatter_tensor into `out` (nothing on one process)."""
        if self._world == 1:
            return _Pending()
        if self._avg_supported:
            try:
                return _Pending(collective(out, *inputs, op=dist.ReduceOp.AVG, async_op=True))
            except (RuntimeError, ValueError):  # older gloo builds: no AVG
                self._avg_supported = False
        work = collective(out, *inputs, op=dist.ReduceOp.SUM, async_op=True)
        return _Pending(work, then=lambda: out.div_(self._world))

    def _gather(self, out, shard):
        """All-gather `shard` into `out`; returns the tensor that will hold the result and its _Pending."""
        if self._world == 1:
            return shard, _Pending()
        return out, _Pending(dist.all_gather_into_tensor(out, shard, async_op=True))

    # ---- AdamW: small params are all-reduced and updated everywhere; large ones are
    # reduce-scattered by rows, each rank updates its row slice (ZeRO-2-style state) and
    # the slices are gathered back in place. After step() a small param's .grad is the average and a large
    # one's the local gradient, as in the reference: nothing reads .grad after step() (no clipping).

    def _reduce_adamw(self, group):
        todo = []  # (param, param slice, grad slice, pending reduction)
        for p in group["params"]:
            if p.grad is None:
                assert self._world == 1, "DistMuonAdamW needs a gradient for every parameter on every rank"
                continue
            if self._world == 1 or p.numel() < 1024:
                todo.append((p, p, p.grad, self._mean(dist.all_reduce, p.grad)))
            else:
                rows, W = p.shape[0], self._world
                assert rows % W == 0, (f"AdamW reduce_scatter requires shape[0] ({rows}) divisible by "
                                       f"world_size ({W})")
                lo, hi = _owned_range(self._rank, W, rows)
                grad_slice = torch.empty_like(p.grad[lo:hi])
                pending = self._mean(dist.reduce_scatter_tensor, grad_slice, p.grad)
                todo.append((p, p[lo:hi], grad_slice, pending))
        return todo

    def _update_adamw(self, group, todo):
        gathers = []
        for p, p_slice, grad, pending in todo:
            pending.wait()
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p_slice)
                state["exp_avg_sq"] = torch.zeros_like(p_slice)
            state["step"] += 1
            _fill(self._adamw_hyper, state["step"], group["lr"], *group["betas"], group["eps"],
                  group["weight_decay"])
            _run_kernel(adamw_step_fused, p_slice, grad, state["exp_avg"], state["exp_avg_sq"],
                        *self._adamw_hyper)
            if p_slice is not p:
                gathers.append(self._gather(p, p_slice)[1])  # in place: the slice is a view of p
        return gathers

    # ---- Muon: the K matrices are stacked (zero-padded to a multiple of the world size),
    # reduce-scattered by matrix, each rank updates its ceil(K / W) matrices, and the
    # results are all-gathered into the stacking buffer.

    def _reduce_muon(self, group):
        params = group["params"]
        assert all(p.grad is not None for p in params), "Muon needs a gradient for every parameter"
        K, W, g0 = len(params), self._world, params[0].grad
        chunk = -(-K // W)
        stacked = torch.empty((chunk * W, *g0.shape), dtype=g0.dtype, device=g0.device)
        torch.stack([p.grad for p in params], out=stacked[:K])
        stacked[K:].zero_()
        grad_chunk = stacked if W == 1 else torch.empty_like(stacked[:chunk])
        return stacked, grad_chunk, self._mean(dist.reduce_scatter_tensor, grad_chunk, stacked)

    def _update_muon(self, group, reduced):
        stacked, grad_chunk, pending = reduced
        pending.wait()
        params = group["params"]
        lo, hi = _owned_range(self._rank, self._world, len(params))
        n = hi - lo
        momentum_buffer, second_momentum_buffer = self._muon_buffers(params[0], grad_chunk.size(0))
        updated = torch.empty_like(grad_chunk)  # (chunk, r, c)
        if n > 0:
            torch.stack(params[lo:hi], out=updated[:n])
            r, c = params[0].shape[-2:]
            # Shape-aware lr: tall matrices (fan-out > fan-in, e.g. c_fc) get sqrt(r / c) more
            lr = group["lr"] * max(1.0, r / c) ** 0.5
            beta2 = 0.0 if group["beta2"] is None else group["beta2"]  # None: no EMA
            _fill(self._muon_hyper, group["momentum"], lr, group["weight_decay"], beta2)
            _run_kernel(muon_step_fused, grad_chunk[:n], updated[:n], momentum_buffer[:n],
                        second_momentum_buffer[:n], *self._muon_hyper, group["ns_steps"],
                        -1 if r >= c else -2, compute_dtype=common.COMPUTE_DTYPE)
        updated[n:].zero_()
        gathered, gather = self._gather(stacked, updated)  # reuses the grad buffer as output
        gather.then = lambda: torch._foreach_copy_(params, list(gathered[:len(params)].unbind(0)))
        return [gather]

    def _muon_buffers(self, p0, chunk):
        """Both buffers live in the state of the group's first param, sized for this rank's chunk."""
        state = self.state[p0]
        if "momentum_buffer" not in state:
            *lead, r, c = p0.shape
            factored = (*lead, r, 1) if r >= c else (*lead, 1, c)  # statistic along the larger side
            state["momentum_buffer"] = torch.zeros((chunk, *p0.shape), dtype=p0.dtype, device=p0.device)
            state["second_momentum_buffer"] = torch.zeros((chunk, *factored), dtype=p0.dtype,
                                                          device=p0.device)
        return state["momentum_buffer"], state["second_momentum_buffer"]


class DistMuonAdamW(MuonAdamW):
    """
    MuonAdamW across the ranks of the default process group, without a DDP wrapper: each rank
    holds full params and local grads, and step() averages the grads. Optimizer state is sharded
    (large AdamW params by rows, Muon groups by matrix), so checkpoints are per rank. Every param
    needs a grad on every rank, and step() must be called on all ranks with the same groups.
    """

    def __init__(self, param_groups):
        super().__init__(param_groups)
        self._rank, self._world = dist.get_rank(), dist.get_world_size()
