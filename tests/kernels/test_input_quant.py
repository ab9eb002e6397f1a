"""InputQuant, the one description of a linear's quantized input: its torch pass is each format's own reference
math written out here, its buffers have each kind's shapes and types, and its kernel flags say what the norm,
activation and merge kernels must write (those kernels are checked against `quantize` under Triton's interpreter
and on the GPU)."""

import pytest
import torch

from kiln.kernels.fp8_quant import FP8_MAX, Fp8Rows
from kiln.kernels.input_quant import FP8_GROUPS, FP8_ROWS, FP8_STATIC, INT8_ROWS, InputQuant
from kiln.kernels.int8_gemm import Int8Rows

X = torch.randn(5, 96, generator=torch.Generator().manual_seed(0)).bfloat16() * 3
PREQUANT = (torch.rand(96, generator=torch.Generator().manual_seed(1)) + 0.5).bfloat16()


def e4m3_over(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def expected(kind: str, x: torch.Tensor, static: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of x [M, K] by each kind's rule (docs/quantization.md), in float32 math."""
    if kind == FP8_STATIC:
        scale = static.float().expand(x.shape[0], 1)
    elif kind == FP8_ROWS:
        scale = x.float().abs().amax(-1, keepdim=True) / FP8_MAX
    elif kind == FP8_GROUPS:  # groups of 32
        scale = x.float().reshape(x.shape[0], -1, 32).abs().amax(-1) / FP8_MAX
        return e4m3_over(x, scale.repeat_interleave(32, dim=1)), scale
    else:  # INT8_ROWS
        scale = x.float().abs().amax(-1, keepdim=True) / 127
        return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale
    return e4m3_over(x, scale), scale


@pytest.mark.parametrize("prequant", [None, PREQUANT])
@pytest.mark.parametrize("kind", [FP8_STATIC, FP8_ROWS, FP8_GROUPS, INT8_ROWS])
def test_quantize_is_each_kinds_rule_after_the_prequant_multiply(kind, prequant):
    static = torch.tensor([0.01]).bfloat16()  # |x| past 4.48 saturates
    spec = InputQuant(kind, scale=static if kind == FP8_STATIC else None, group=32 if kind == FP8_GROUPS else 0,
                      prequant=prequant)
    got = spec.quantize(X)
    x = X if prequant is None else X * prequant  # (in bf16, as the kernels round it)
    codes, scale = expected(kind, x, static)
    assert isinstance(got, Int8Rows if kind == INT8_ROWS else Fp8Rows)
    assert torch.equal(got.q.view(torch.uint8), codes.view(torch.uint8)), kind
    assert torch.allclose(got.scale, scale, rtol=1e-7, atol=0), kind


def test_buffers_and_kernel_flags_of_each_kind():
    """The codes' dtype and a row's scales ([M, 1] per token or static, [M, groups] per group, a short last group
    counted), and the kernels' constexprs: a scale per token is one group as wide as the program."""
    cases = {InputQuant(FP8_STATIC, scale=torch.ones(1)): (torch.float8_e4m3fn, 1, (True, False, 0)),
             InputQuant(FP8_ROWS): (torch.float8_e4m3fn, 1, (False, False, 128)),
             InputQuant(FP8_GROUPS, group=32): (torch.float8_e4m3fn, 4, (False, False, 32)),
             InputQuant(INT8_ROWS): (torch.int8, 1, (False, True, 0))}
    for spec, (codes, scales, flags) in cases.items():
        rows = spec.empty(3, 100, torch.device("cpu"))
        assert rows.q.shape == (3, 100) and rows.q.dtype == codes and rows.scale.shape == (3, scales), spec.kind
        assert rows.scale.dtype == torch.float32
        assert tuple(spec.kernel_flags(128).values()) == flags, spec.kind
