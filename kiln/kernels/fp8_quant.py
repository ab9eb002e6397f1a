"""Activations to FP8 (e4m3) for the FP8 GEMMs, in one pass: x [M, K] -> (x_q float8_e4m3fn [M, K], scale [M, 1]).

The torch expression of the same math (kiln.quantization.fp8: x.float(), divide, clamp, cast, and the row
max for per-token scales) is four or five kernels, each reading or writing the whole activation; ahead of every
FP8 GEMM of a decoder layer that costs more than the GEMM saves at large batches. Here each program quantizes
one row held in registers: one read of x, one write of x_q.

Same numbers as the reference, bit for bit: the scale is max|x| / 448 (per token) or the calibrated static
scale, divided with IEEE rounding (div_rn), the quotient saturated to +-448 and rounded to nearest even.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kiln.kernels import divide_exactly, row_program, rows_view, triton_available

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


class Fp8Rows(NamedTuple):
    """Activations already quantized for an FP8 linear: codes [M, K] float8_e4m3fn and each row's scale [M, 1]
    float32 (or, quantized by groups, each row's scale per group of inputs, [M, ceil(K / group)]). The RMSNorm and
    SiLU-and-mul kernels write these directly when the linear that reads their output has a static scale
    (kiln.models.base.DecoderLayer.fuse_input_quantization), saving the separate pass below."""

    q: torch.Tensor
    scale: torch.Tensor


def quantize_fp8_rows_ref(x: torch.Tensor, static_scale: torch.Tensor | None = None) -> Fp8Rows:
    """The torch math of `quantize_fp8_rows` (any device)."""
    if static_scale is None:
        scale = divide_exactly(x.abs().amax(dim=-1, keepdim=True).float(), FP8_MAX).clamp(min=MIN_SCALE)
    else:
        scale = static_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    return Fp8Rows((x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale)


def to_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """[R, K] -> float32 [R, ceil(K / group), group], the last group padded with zeros."""
    r, k = x.shape
    groups = -(-k // group)
    return torch.nn.functional.pad(x.float(), (0, groups * group - k)).view(r, groups, group)


def from_groups(grouped: torch.Tensor, k: int) -> torch.Tensor:
    """to_groups' inverse: [R, G, group] -> [R, k], the padding dropped."""
    return grouped.reshape(grouped.shape[0], -1)[:, :k].contiguous()


def quantize_fp8_groups_ref(x: torch.Tensor, group: int) -> Fp8Rows:
    """x [M, K] -> codes [M, K] and one scale per row and group of `group` inputs, [M, ceil(K / group)] float32
    (the last group may be short): each group's max |x| maps to 448."""
    grouped = to_groups(x, group)
    scale = divide_exactly(grouped.abs().amax(dim=-1), FP8_MAX).clamp(min=MIN_SCALE)
    q = (grouped / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Fp8Rows(from_groups(q, x.shape[1]), scale)


def quantize_activation_groups(x: torch.Tensor, group: int) -> Fp8Rows:
    """x [M, K] -> Fp8Rows with a scale per row and group: the Triton pass on CUDA, the torch math elsewhere."""
    if x.is_cuda and triton_available():
        return quantize_fp8_groups(x, group)
    return quantize_fp8_groups_ref(x, group)


def quantize_fp8_groups(x: torch.Tensor, group: int) -> Fp8Rows:
    """quantize_fp8_groups_ref on CUDA, one program a row."""
    rows = rows_view(x)
    m, k = rows.shape
    groups = -(-k // group)
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    block, warps = row_program(max(k, group), "quantize_fp8_groups")
    _quantize_groups_kernel[(m,)](rows, q, scale, rows.stride(0), k, groups, GROUP=group, BLOCK=block,
                                  num_warps=warps, **pdl_args(x.device))
    return Fp8Rows(q, scale)


def quantize_activation(x: torch.Tensor, static_scale: torch.Tensor | None = None) -> Fp8Rows:
    """x [M, K] -> Fp8Rows: the Triton pass on CUDA, the torch math elsewhere (the same numbers)."""
    if x.is_cuda and triton_available():
        return quantize_fp8_rows(x, static_scale)
    return quantize_fp8_rows_ref(x, static_scale)


def quantize_fp8_rows(x: torch.Tensor, static_scale: torch.Tensor | None = None) -> Fp8Rows:
    """x [M, K] (CUDA) -> (x_q [M, K] float8_e4m3fn, scale [M, 1] float32); per-token scales when static_scale
    is None, else the [1] static scale on every row."""
    rows = rows_view(x)
    m, k = rows.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block, warps = row_program(k, "quantize_fp8_rows")
    _quantize_rows_kernel[(m,)](
        rows, static_scale if static_scale is not None else scale, q, scale, rows.stride(0), k,
        STATIC=static_scale is not None, BLOCK=block, num_warps=warps, **pdl_args(x.device))
    return Fp8Rows(q, scale)


if triton is not None:
    _FP8_MAX, _MIN_SCALE = tl.constexpr(FP8_MAX), tl.constexpr(MIN_SCALE)

    @triton.jit
    def to_e4m3(y, s):
        """float32 y / s saturated to +-448 and rounded to e4m3, as quantize_fp8_rows_ref does (the kernels that
        write Fp8Rows share it)."""
        return tl.clamp(tl.math.div_rn(y, s), -_FP8_MAX, _FP8_MAX).to(tl.float8e4nv)

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
        tl.store(q_ptr + row * K + cols, to_e4m3(x, s), mask=mask)
        tl.store(scale_ptr + row, s)

    @triton.jit
    def to_e4m3_groups(y, GROUP: tl.constexpr):
        """A row y [BLOCK] in float32 (zeros past its end; BLOCK a multiple of GROUP) -> (its e4m3 codes [BLOCK],
        the scales [BLOCK // GROUP] of its groups of GROUP inputs), as quantize_fp8_groups_ref (the kernels that
        write group-scaled Fp8Rows share it)."""
        grouped = tl.reshape(y, (y.shape[0] // GROUP, GROUP))
        s = tl.maximum(tl.math.div_rn(tl.max(tl.abs(grouped), axis=1), _FP8_MAX), _MIN_SCALE)
        return tl.reshape(to_e4m3(grouped, s[:, None]), (y.shape[0],)), s

    @triton.jit
    def _quantize_groups_kernel(x_ptr, q_ptr, scale_ptr, x_stride, K, G, GROUP: tl.constexpr, BLOCK: tl.constexpr,
                                USE_PDL: tl.constexpr):
        """One row, each group of GROUP inputs with its own scale, as quantize_fp8_groups_ref."""
        allow_dependents(USE_PDL)
        wait_for_inputs(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        q, s = to_e4m3_groups(x, GROUP)
        tl.store(q_ptr + row * K + cols, q, mask=mask)
        groups = tl.arange(0, BLOCK // GROUP)
        tl.store(scale_ptr + row * G + groups, s, mask=groups < G)
