"""Activations to FP8 (e4m3) for the FP8 GEMMs, in one pass: x [M, K] -> (x_q float8_e4m3fn [M, K], scale [M, 1]).

The torch expression of the same math (kiln.quantization.fp8: x.float(), divide, clamp, cast, and the row
max for per-token scales) is four or five kernels, each reading or writing the whole activation; ahead of every
FP8 GEMM of a decoder layer that costs more than the GEMM saves at large batches. Here each program quantizes
one row held in registers: one read of x, one write of x_q.

Same numbers as the reference, bit for bit: the scale is max|x| / 448 (per token) or the calibrated static
scale, divided with IEEE rounding (div_rn), the quotient saturated to +-448 and rounded to nearest even.
"""

from __future__ import annotations

import torch

from kiln.kernels.rmsnorm import _rows

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: kiln.quantization.fp8 keeps the torch reference
    triton = None

from kiln.kernels.pdl import pdl_args

if triton is not None:
    from kiln.kernels.pdl import allow_dependents, wait_for_inputs

FP8_MAX = 448.0  # largest finite e4m3fn value
MIN_SCALE = 1e-12  # an all-zero row or token still gets a finite, positive scale


def quantize_fp8_rows(x: torch.Tensor, static_scale: torch.Tensor | None = None):
    """x [M, K] (CUDA) -> (x_q [M, K] float8_e4m3fn, scale [M, 1] float32); per-token scales when static_scale
    is None, else the [1] static scale on every row."""
    rows = _rows(x)
    m, k = rows.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    assert block <= 65536, f"quantize_fp8_rows: a row of {k} is over the kernel's 65536"
    _quantize_rows_kernel[(m,)](
        rows, static_scale if static_scale is not None else scale, q, scale, rows.stride(0), k,
        STATIC=static_scale is not None, BLOCK=block, num_warps=min(max(block // 1024, 1), 16), **pdl_args(x.device))
    return q, scale


if triton is not None:
    _FP8_MAX, _MIN_SCALE = tl.constexpr(FP8_MAX), tl.constexpr(MIN_SCALE)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, static_ptr, q_ptr, scale_ptr, x_stride, K, STATIC: tl.constexpr,
                              BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        allow_dependents(USE_PDL)
        wait_for_inputs(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if STATIC:
            s = tl.load(static_ptr).to(tl.float32)
        else:
            s = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=0), _FP8_MAX), _MIN_SCALE)
        q = tl.clamp(tl.math.div_rn(x, s), -_FP8_MAX, _FP8_MAX)
        tl.store(q_ptr + row * K + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + row, s)
