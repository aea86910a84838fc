"""
nanochat.fp8: model conversion, the recipe switch and the quantiser on CPU; the FP8 matmul itself
(torch._scaled_mm) against a bf16 Linear where an sm89+ CUDA GPU exists.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import common
from nanochat.fp8 import (EPS, Float8Linear, Float8LinearConfig, _Float8Matmul, _to_col_major, _to_fp8,
                          convert_to_float8_training, disable_fp8, fp8_tokens_error)

FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
MANTISSA_BITS = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}

has_fp8_gpu = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


class BiasFreeLinear(nn.Linear):
    """A project-style nn.Linear subclass (computes in the activation dtype)."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class Block(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = nn.LayerNorm(n)
        self.fc = BiasFreeLinear(n, 4 * n, bias=False)
        self.proj = nn.Linear(4 * n, n)  # with a bias
        self.gate = BiasFreeLinear(12, 2, bias=False)  # too small for FP8: the filter rejects it


class TinyNet(nn.Module):
    def __init__(self, n=32, n_layer=2, vocab=50):
        super().__init__()
        self.wte = nn.Embedding(vocab, n)
        self.blocks = nn.ModuleList([Block(n) for _ in range(n_layer)])
        self.lm_head = BiasFreeLinear(n, vocab + 14, bias=False)


def linears(model):
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}


def dims_divisible_by_16(mod, fqn):
    return mod.in_features % 16 == 0 and mod.out_features % 16 == 0


# -----------------------------------------------------------------------------
# Conversion

def test_convert_replaces_exactly_the_filtered_linears():
    model = TinyNet()
    before = dict(model.named_modules())
    seen = []

    def filter_fn(mod, fqn):
        seen.append(fqn)
        return dims_divisible_by_16(mod, fqn) and fqn != "blocks.1.proj"

    assert convert_to_float8_training(model, module_filter_fn=filter_fn) is model
    assert sorted(seen) == sorted(linears(TinyNet()))  # asked once about every Linear, by dotted path
    expected = {"blocks.0.fc", "blocks.0.proj", "blocks.1.fc", "lm_head"}
    for name, mod in model.named_modules():
        if name in expected:
            assert type(mod) is Float8Linear, name
        else:
            assert mod is before[name], f"{name} should be left alone"
    assert {name for name, mod in model.named_modules() if isinstance(mod, Float8Linear)} == expected


def test_converted_layers_share_the_original_parameters():
    model = TinyNet()
    old = linears(model)
    params_before = [id(p) for p in model.parameters()]
    ptrs_before = {name: p.data_ptr() for name, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    convert_to_float8_training(model, module_filter_fn=dims_divisible_by_16)
    for name, new in linears(model).items():
        assert new.weight is old[name].weight and new.bias is old[name].bias, name
    assert [id(p) for p in model.parameters()] == params_before  # an optimizer built earlier still fits
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == ptrs_before
    assert list(model.state_dict()) == keys_before  # checkpoints stay loadable
    assert not any(p.is_meta for p in model.parameters())


def test_convert_without_filter_takes_every_linear_and_is_idempotent():
    model = TinyNet()
    convert_to_float8_training(model)
    converted = linears(model)
    assert len(converted) == 7 and all(type(m) is Float8Linear for m in converted.values())
    convert_to_float8_training(model)
    assert linears(model) == converted  # the same objects: nothing converted twice


def test_convert_a_bare_linear():
    lin = nn.Linear(32, 16)
    new = convert_to_float8_training(lin)
    assert type(new) is Float8Linear and new.weight is lin.weight and new.bias is lin.bias
    assert convert_to_float8_training(lin, module_filter_fn=lambda m, fqn: False) is lin


def test_from_float_keeps_shape_and_mode():
    lin = BiasFreeLinear(48, 32, bias=False).eval()
    new = Float8Linear.from_float(lin)
    assert (new.in_features, new.out_features, new.bias) == (48, 32, None)
    assert new.weight.data_ptr() == lin.weight.data_ptr() and not new.training


def test_disable_fp8_runs_plain_linears_on_the_same_parameters_and_restores_the_fp8_ones():
    model = TinyNet()
    convert_to_float8_training(model, module_filter_fn=dims_divisible_by_16)
    fp8_layers = {name: mod for name, mod in linears(model).items() if isinstance(mod, Float8Linear)}
    with disable_fp8(model) as plain_model:
        assert plain_model is model
        for name, fp8 in fp8_layers.items():
            plain = model.get_submodule(name)
            assert type(plain) is common.Linear, name
            assert plain.weight is fp8.weight and plain.bias is fp8.bias, name
        x = model.wte(torch.tensor([[1, 2, 3]]))  # on CPU, where an FP8 matmul would raise
        assert model.blocks[0].proj(model.blocks[0].fc(x)).shape == (1, 3, 32)
    assert {name: mod for name, mod in linears(model).items() if name in fp8_layers} == fp8_layers


def test_float8_matmul_is_registered_with_dynamo():
    Float8Linear(16, 16)  # registration happens when the first layer is built
    from torch._dynamo import trace_rules
    assert trace_rules.is_callable_allowed(_Float8Matmul)


def test_recipe_names():
    assert Float8LinearConfig.from_recipe_name("tensorwise").recipe_name == "tensorwise"
    for name in ("rowwise", "rowwise_with_gw_hp", "Tensorwise", ""):
        with pytest.raises(ValueError, match="tensorwise"):
            Float8LinearConfig.from_recipe_name(name)


@pytest.mark.skipif(has_fp8_gpu, reason="checks the error raised where FP8 matmuls are unavailable")
def test_forward_without_fp8_gpu_raises_clear_error():
    layer = Float8Linear.from_float(nn.Linear(32, 16))
    with pytest.raises(RuntimeError, match="sm89"):
        layer(torch.randn(16, 32))


# -----------------------------------------------------------------------------
# Micro-batch shape: the FP8 weight gradient contracts over B * T tokens, which must be a multiple of 16

@pytest.mark.parametrize("batch, seq", [(32, 2048), (1, 16), (3, 112), (16, 7)])
def test_token_counts_that_fit_fp8(batch, seq):
    assert fp8_tokens_error(batch, seq) is None


@pytest.mark.parametrize("batch, seq", [(3, 100), (1, 2047), (5, 9)])
def test_token_counts_that_do_not_fit_fp8_name_a_fix_that_fits(batch, seq):
    message = fp8_tokens_error(batch, seq)
    assert f"{batch} x {seq} = {batch * seq}" in message and "multiple of 16" in message
    fixed_seq = int(message.split("--max-seq-len ")[1].split()[0])
    fixed_batch = int(message.split("--device-batch-size ")[1].split()[0])
    assert fixed_seq >= seq and fp8_tokens_error(batch, fixed_seq) is None
    assert fixed_batch >= batch and fp8_tokens_error(fixed_batch, seq) is None


def test_base_train_rejects_fp8_micro_batches_at_startup(capsys):
    from scripts import base_train
    with pytest.raises(SystemExit) as e:
        base_train.parse_args(["--fp8", "--device-batch-size=3", "--max-seq-len=100"])
    assert e.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--fp8" in last_line and "--max-seq-len 112" in last_line and "--device-batch-size 4" in last_line
    base_train.parse_args(["--fp8", "--device-batch-size=3", "--max-seq-len=112"])  # a fitting shape passes
    base_train.parse_args(["--device-batch-size=3", "--max-seq-len=100"])  # without --fp8 nothing to check


def test_training_call_with_a_bad_token_count_fails_before_the_matmul():
    # on a GPU this would otherwise crash inside torch._scaled_mm in the backward pass
    layer = Float8Linear.from_float(nn.Linear(32, 16))
    with pytest.raises(ValueError, match="multiple of 16"):
        layer(torch.randn(3, 5, 32))


# -----------------------------------------------------------------------------
# Quantiser helpers

def outlier_tensor(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 96, generator=gen) * 3
    x[3, 5], x[10, 0] = 250.0, -1000.0  # amax comes from a single element
    return x


@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES)
def test_to_fp8_scales_amax_to_the_fp8_max(fp8_dtype):
    x = outlier_tensor()
    x_fp8, inv_scale = _to_fp8(x, fp8_dtype)
    fp8_max = torch.finfo(fp8_dtype).max
    assert x_fp8.dtype == fp8_dtype and x_fp8.shape == x.shape
    assert inv_scale.dtype == torch.float32 and inv_scale.ndim == 0
    values = x_fp8.float()
    assert torch.isfinite(values).all()
    assert values.abs().max().item() == fp8_max  # saturated at the top, never beyond
    assert values[10, 0].item() == -fp8_max
    assert inv_scale.item() == pytest.approx(1000.0 / fp8_max, rel=1e-6)


@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES)
def test_to_fp8_round_trip_within_fp8_precision(fp8_dtype):
    x = outlier_tensor()
    x_fp8, inv_scale = _to_fp8(x, fp8_dtype)
    dequant = x_fp8.float() * inv_scale
    half_ulp = 2.0 ** -(MANTISSA_BITS[fp8_dtype] + 1)  # relative rounding error of a normal number
    normal = x.abs() > x.abs().max() * 2.0 ** -6  # well clear of the subnormal range
    rel_err = ((dequant - x).abs() / x.abs())[normal]
    assert rel_err.max().item() <= half_ulp * 1.0001
    assert (dequant - x).abs().max().item() <= x.abs().max().item() * half_ulp


def test_to_fp8_handles_zeros_and_bf16():
    zeros_fp8, inv_scale = _to_fp8(torch.zeros(8, 8), torch.float8_e4m3fn)
    assert torch.equal(zeros_fp8.float(), torch.zeros(8, 8))
    assert inv_scale.item() == pytest.approx(EPS / 448.0, rel=1e-6)  # amax floored at EPS
    x = outlier_tensor().bfloat16()
    x_fp8, inv_scale = _to_fp8(x, torch.float8_e4m3fn)
    assert x_fp8.float().abs().max().item() == 448.0
    assert (x_fp8.float() * inv_scale - x.float()).abs().max().item() <= 1000.0 / 16


def test_to_fp8_stays_within_the_fp8_range():
    # amax * scale can round a hair above fp8_max in fp32, and e4m3fn has no inf to overflow into:
    # every element must still come back finite and at most fp8_max in magnitude
    x = torch.tensor([448.0 * (1 + 2 ** -10), 3.0, -1e-3, 448.0])
    for fp8_dtype in FP8_DTYPES:
        values = _to_fp8(x, fp8_dtype)[0].float()
        assert torch.isfinite(values).all() and values.abs().max().item() <= torch.finfo(fp8_dtype).max


@pytest.mark.parametrize("shape", [(5, 3), (16, 64), (2, 7)])
def test_to_col_major(shape):
    x = torch.randn(*shape)
    y = _to_col_major(x)
    assert y.shape == x.shape and torch.equal(y, x)
    assert y.stride() == (1, shape[0])
    assert y.t().is_contiguous()


# -----------------------------------------------------------------------------
# The FP8 GEMMs (CUDA, sm89 or newer)

def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.skipif(not has_fp8_gpu, reason="torch._scaled_mm in FP8 needs a CUDA GPU with sm89 or newer")
@pytest.mark.parametrize("bias", [False, True])
def test_float8_linear_matches_bf16_linear(bias):
    torch.manual_seed(0)
    ref = nn.Linear(256, 512, bias=bias, device="cuda")
    fp8 = Float8Linear.from_float(nn.Linear(256, 512, bias=bias, device="cuda"))
    with torch.no_grad():
        fp8.weight.copy_(ref.weight)
        if bias:
            fp8.bias.copy_(ref.bias)
    x_ref = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x_fp8 = x_ref.detach().clone().requires_grad_(True)
    grad_out = torch.randn(4, 64, 512, device="cuda", dtype=torch.bfloat16)

    y_ref = F.linear(x_ref, ref.weight.bfloat16(), ref.bias.bfloat16() if bias else None)
    y_fp8 = fp8(x_fp8)
    y_ref.backward(grad_out)
    y_fp8.backward(grad_out.to(y_fp8.dtype))

    assert y_fp8.shape == y_ref.shape
    assert fp8.weight.grad.dtype == torch.float32  # gradients land on the fp32 master weight
    assert x_fp8.grad.dtype == torch.bfloat16
    # e4m3 keeps ~2 significant digits, e5m2 fewer: a few percent of relative error is expected
    assert rel_err(y_fp8, y_ref) < 0.08
    assert rel_err(x_fp8.grad, x_ref.grad) < 0.15
    assert rel_err(fp8.weight.grad, ref.weight.grad) < 0.15
    if bias:
        assert rel_err(fp8.bias.grad, ref.bias.grad) < 1e-2
