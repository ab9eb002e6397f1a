"""The gated MLP's activation, silu(fc) * gate, fused over the runtime's `fc_gate` output.

The engine fuses fc and gate into one matmul whose output is [tokens, 2*I] = [fc | gate]; the kernel
reads each half once and writes the [tokens, I] product, instead of torch's three passes (silu, mul,
and the chunk copy). SiLU is from Elfwing et al. 2017, arXiv:1702.03118 (the GLU variant: Shazeer 2020,
arXiv:2002.05202).

When the linear that reads the product (mlp.proj) takes quantized input (`out_quant`, kiln.kernels.input_quant),
the kernel writes it, from the product as rounded to x's dtype, as that linear's own pass would: one pass less, no
bit changed. Where proj has a prequant scale (SmoothQuant's, AWQ's for W4A8_AWQ) its input is the product times
it. A scale per token (int8, or FP8_PER_CHANNEL_PER_TOKEN's e4m3) needs the row's max: a program then takes the
whole row.
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference below still works
    triton = None

from kiln.kernels import rows_view
from kiln.kernels.input_quant import NO_QUANT_FLAGS, WHOLE_ROW, InputQuant
from kiln.kernels.pdl import pdl_args

if triton is not None:
    from kiln.kernels.epilogue import silu_times
    from kiln.kernels.fp8_quant import to_e4m3, to_e4m3_groups
    from kiln.kernels.int8_gemm import to_int8_row
    from kiln.kernels.pdl import allow_dependents, wait_for_inputs


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2*I] = [fc | gate] -> silu(fc) * gate, [..., I]."""
    fc, gate = x.chunk(2, dim=-1)
    return F.silu(fc) * gate


def silu_and_mul(x: torch.Tensor, out_quant: InputQuant | None = None):
    """Triton version of `silu_and_mul_ref`, CUDA tensors. With `out_quant` the product comes back quantized as
    out_quant.quantize would: Fp8Rows or Int8Rows [rows, I]."""
    inter = x.shape[-1] // 2
    rows = rows_view(x)
    block, num_warps = program_shape(rows.shape[0], inter)
    if out_quant is None:
        out = torch.empty(rows.shape[0], inter, dtype=x.dtype, device=x.device)
        codes, scale, prequant, row_scale = out, None, None, None
        flags = NO_QUANT_FLAGS
    else:
        out = out_quant.empty(rows.shape[0], inter, x.device)
        codes, scale, prequant, row_scale = out.q, out_quant.scale, out_quant.prequant, out.scale
        if out_quant.kind in WHOLE_ROW:  # the row's max sets its scale: one program takes the whole row
            block = triton.next_power_of_2(inter)
            num_warps = min(max(block // 1024, 4), 16)
        flags = out_quant.kernel_flags(block)
        block = max(block, flags["FP8_GROUP"])  # (whole groups a program: both are powers of two)
    unread = codes  # stands in for the pointers a variant does not read
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(inter, block))](
        rows, codes, unread if scale is None else scale, unread if prequant is None else prequant,
        unread if row_scale is None else row_scale, rows.stride(0), inter, **flags,
        PREQUANT=prequant is not None, BLOCK=block, num_warps=num_warps, **pdl_args(x.device))
    return out if out_quant else out.view(*x.shape[:-1], inter)


def program_shape(rows: int, inter: int) -> tuple[int, int]:
    """(columns of a row each program takes, warps). scripts/bench_pointwise.py sweeps both. On an H200 (twenty-fifth
    session), with memory-cold inputs, (2048, 8) was within 3% of this shape from 256 rows on, and the batch-512
    decode step did not change with it (12.1 us a call against 11.8), so the shape stays. Untried in an engine:
    at 64 rows (1024, 8) took 2.6 us against 3.4 writing e4m3 codes."""
    return 1024, 4


if triton is not None:

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, scale_ptr, prequant_ptr, row_scale_ptr, x_stride, inter,
                             FP8_OUT: tl.constexpr, INT8_OUT: tl.constexpr, FP8_GROUP: tl.constexpr,
                             PREQUANT: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        """scale_ptr: FP8's static scale [1] (FP8_OUT); prequant_ptr: the linear's prequant scale [inter]
        (PREQUANT), which multiplies the product first; a scale per row (INT8_OUT, or FP8_GROUP as wide as BLOCK)
        needs BLOCK to cover the row."""
        allow_dependents(USE_PDL)
        wait_for_inputs(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        fc = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        gate = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0)
        y = silu_times(fc, gate)
        if PREQUANT:  # times the prequant scale, rounded to the dtype as torch multiplies
            p = tl.load(prequant_ptr + cols, mask=mask, other=0.0)
            y = (y.to(tl.float32) * p.to(tl.float32)).to(y.dtype)
        if FP8_OUT:
            s = tl.load(scale_ptr).to(tl.float32)
            tl.store(out_ptr + row * inter + cols, to_e4m3(y.to(tl.float32), s), mask=mask)
            if tl.program_id(1) == 0:
                tl.store(row_scale_ptr + row, s)
        elif INT8_OUT:  # the row's codes
            q, s = to_int8_row(y.to(tl.float32))
            tl.store(out_ptr + row * inter + cols, q, mask=mask)
            tl.store(row_scale_ptr + row, s)
        elif FP8_GROUP > 0:  # the program's whole groups, each its own scale (masked columns are 0)
            q, s = to_e4m3_groups(y.to(tl.float32), FP8_GROUP)
            tl.store(out_ptr + row * inter + cols, q, mask=mask)
            groups = tl.program_id(1) * (BLOCK // FP8_GROUP) + tl.arange(0, BLOCK // FP8_GROUP)
            tl.store(row_scale_ptr + row * tl.cdiv(inter, FP8_GROUP) + groups, s,
                     mask=groups < tl.cdiv(inter, FP8_GROUP))
        else:
            tl.store(out_ptr + row * inter + cols, y, mask=mask)
