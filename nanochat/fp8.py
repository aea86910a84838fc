"""
Minimal FP8 training for Linear layers: tensorwise dynamic scaling, the same entry points as torchao.float8.

Each of the three GEMMs of a converted layer runs through torch._scaled_mm with one scale per tensor,
recomputed on every call: inputs and weights in float8_e4m3fn (more mantissa), gradients in float8_e5m2
(more range). Master weights stay fp32. Needs a CUDA GPU with FP8 tensor cores (sm89 / sm90+); convert
before torch.compile.
"""

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from nanochat import common

EPS = 1e-12  # floor on amax, so an all-zero tensor gets a finite scale
_MIN_CAPABILITY = (8, 9)  # first architecture with FP8 _scaled_mm (Ada)


@torch.no_grad()
def _to_fp8(x, fp8_dtype):
    """Quantise x with one scale so that max |x| maps to the fp8 max. Returns (x_fp8, inverse_scale)."""
    fp8_max = torch.finfo(fp8_dtype).max  # 448 for e4m3fn, 57344 for e5m2
    amax = x.float().abs().max()
    # the division in float64 keeps eager and compiled scales bit-identical
    scale = (fp8_max / amax.double().clamp(min=EPS)).float()
    # the cast to fp8 does not saturate on its own, so clamp first
    x_fp8 = (x.float() * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return x_fp8, scale.reciprocal()


def _to_col_major(x):
    """The same 2-D tensor laid out column-major (the second operand of _scaled_mm must be)."""
    return x.t().contiguous().t()


TOKEN_MULTIPLE = 16  # _scaled_mm needs its inner dimension to be a multiple of 16


def fp8_tokens_error(device_batch_size, sequence_len):
    """None if micro-batches of device_batch_size x sequence_len tokens can train in FP8, else why + fix.
    The weight gradient contracts over the tokens of the micro-batch ([N, M] @ [M, K], M = B * T), so
    M must be a multiple of 16; the layer filter only sees the feature sizes, and without this check the
    first backward pass crashes inside torch._scaled_mm."""
    tokens = device_batch_size * sequence_len
    if tokens % TOKEN_MULTIPLE == 0:
        return None
    seq_step = TOKEN_MULTIPLE // math.gcd(device_batch_size, TOKEN_MULTIPLE)
    batch_step = TOKEN_MULTIPLE // math.gcd(sequence_len, TOKEN_MULTIPLE)
    fit_seq = -(-sequence_len // seq_step) * seq_step
    fit_batch = -(-device_batch_size // batch_step) * batch_step
    return (f"FP8 training needs device_batch_size * sequence_len to be a multiple of {TOKEN_MULTIPLE} "
            f"(torch._scaled_mm contracts over the micro-batch's tokens in the weight gradient); "
            f"got {device_batch_size} x {sequence_len} = {tokens}. Fix: --max-seq-len {fit_seq} or "
            f"--device-batch-size {fit_batch} (or drop --fp8)")


def _check_fp8_device(x):
    if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) < _MIN_CAPABILITY:
        raise RuntimeError(f"FP8 training needs a CUDA GPU with FP8 tensor cores (sm89 / sm90 or newer) "
                           f"for torch._scaled_mm; got a tensor on {x.device}")


class _Float8Matmul(torch.autograd.Function):
    """input_2d [M, K] @ weight [N, K].T with all three GEMMs in FP8. Registered with dynamo on first use."""

    @staticmethod
    def forward(ctx, input_2d, weight):
        _check_fp8_device(input_2d)
        in_fp8, inv_in = _to_fp8(input_2d, torch.float8_e4m3fn)
        w_fp8, inv_w = _to_fp8(weight, torch.float8_e4m3fn)
        ctx.save_for_backward(in_fp8, inv_in, w_fp8, inv_w)
        # w_fp8 is [N, K] row-major, so its transpose is the column-major [K, N] that _scaled_mm wants
        return torch._scaled_mm(in_fp8, w_fp8.t(), scale_a=inv_in, scale_b=inv_w,
                                out_dtype=input_2d.dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad_out):
        in_fp8, inv_in, w_fp8, inv_w = ctx.saved_tensors
        go_fp8, inv_go = _to_fp8(grad_out.contiguous(), torch.float8_e5m2)
        # [M, N] @ [N, K]
        grad_input = torch._scaled_mm(go_fp8, _to_col_major(w_fp8), scale_a=inv_go, scale_b=inv_w,
                                      out_dtype=grad_out.dtype, use_fast_accum=False)
        # [N, M] @ [M, K]; autograd casts the result to the fp32 master weight's dtype
        grad_weight = torch._scaled_mm(go_fp8.t().contiguous(), _to_col_major(in_fp8), scale_a=inv_go,
                                       scale_b=inv_in, out_dtype=grad_out.dtype, use_fast_accum=False)
        return grad_input, grad_weight


@functools.cache
def _allow_in_graph():
    # torch.compile should see the FP8 matmul as one opaque node. Registering here rather than at
    # import keeps `import nanochat.fp8` from loading dynamo; layers exist before compile runs.
    torch._dynamo.allow_in_graph(_Float8Matmul)


def _sharing_parameters(cls, mod):
    """A cls(in_features, out_features) layer whose weight and bias are mod's Parameters (no copy)."""
    with torch.device("meta"):  # the shell's own parameters are replaced below: don't allocate them
        new = cls(mod.in_features, mod.out_features, bias=False)
    new.weight, new.bias = mod.weight, mod.bias
    new.train(mod.training)
    return new


class Float8Linear(nn.Linear):
    """nn.Linear whose matmul runs in FP8 (tensorwise scaling); the weight stays an fp32 master copy."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _allow_in_graph()

    def forward(self, input):
        input = input.to(common.COMPUTE_DTYPE)
        lead_shape = input.shape[:-1]
        if torch.is_grad_enabled() and self.weight.requires_grad and lead_shape.numel() % TOKEN_MULTIPLE:
            # fail here, with the reason, rather than inside torch._scaled_mm in the backward pass
            raise ValueError(f"Float8Linear: {lead_shape.numel()} tokens per call is not a multiple of "
                             f"{TOKEN_MULTIPLE}, which the FP8 weight gradient needs; train with "
                             f"device_batch_size * sequence_len a multiple of {TOKEN_MULTIPLE}")
        out = _Float8Matmul.apply(input.reshape(-1, self.in_features), self.weight)
        out = out.reshape(*lead_shape, self.out_features)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    from_float = classmethod(_sharing_parameters)  # a Float8Linear sharing mod's weight and bias (no copy)


@dataclass
class Float8LinearConfig:
    recipe_name: str = "tensorwise"

    @staticmethod
    def from_recipe_name(recipe_name):
        if recipe_name != "tensorwise":
            raise ValueError(f"Unsupported FP8 recipe {recipe_name!r}: only 'tensorwise' is implemented")
        return Float8LinearConfig(recipe_name)


def convert_to_float8_training(module, *, config=None, module_filter_fn=None):
    """Swap every nn.Linear in module (subclasses included) for a Float8Linear sharing its parameters.
    module_filter_fn(linear, fqn) -> bool picks which ones; config is accepted for torchao compatibility
    (tensorwise is the only recipe). Returns module, or the replacement if module itself is a Linear."""

    def eligible(mod, fqn):
        if not isinstance(mod, nn.Linear) or isinstance(mod, Float8Linear):
            return False
        return module_filter_fn is None or module_filter_fn(mod, fqn)

    for fqn, child in list(module.named_modules(remove_duplicate=False)):
        if fqn and eligible(child, fqn):
            parent_name, _, name = fqn.rpartition(".")
            setattr(module.get_submodule(parent_name), name, Float8Linear.from_float(child))
    return Float8Linear.from_float(module) if eligible(module, "") else module


@contextlib.contextmanager
def disable_fp8(model):
    """
    Temporarily swap every Float8 layer of model for a regular Linear sharing its weight (and bias), so
    evaluation and sampling run in the compute dtype with arbitrary shapes; the Float8 layers come back
    on exit. A no-op for a model without Float8 layers.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        if not name or "Float8" not in type(module).__name__:
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, _sharing_parameters(common.Linear, module))
        swapped.append((parent, child_name, module))
    try:
        yield model
    finally:
        for parent, child_name, module in swapped:
            setattr(parent, child_name, module)
