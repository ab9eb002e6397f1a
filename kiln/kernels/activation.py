"""The gated MLP's activation, silu(fc) * gate, fused over the runtime's `fc_gate` output.

The engine fuses fc and gate into one matmul whose output is [tokens, 2*I] = [fc | gate]; the kernel
reads each half once and writes the [tokens, I] product, instead of torch's three passes (silu, mul,
and the chunk copy). SiLU is from Elfwing et al. 2017, arXiv:1702.03118 (the GLU variant: Shazeer 2020,
arXiv:2002.05202).

With `fp8_scale` (the static activation scale of the FP8 linear that reads the product) the kernel writes e4m3
codes of the product as rounded to x's dtype, as kiln.kernels.fp8_quant would: one pass less, no bit changed.
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference below still works
    triton = None

from kiln.kernels import rows_view
from kiln.kernels.fp8_quant import Fp8Rows
from kiln.kernels.pdl import pdl_args

if triton is not None:
    from kiln.kernels.fp8_quant import to_e4m3
    from kiln.kernels.pdl import allow_dependents, wait_for_inputs


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2*I] = [fc | gate] -> silu(fc) * gate, [..., I]."""
    fc, gate = x.chunk(2, dim=-1)
    return F.silu(fc) * gate


def silu_and_mul(x: torch.Tensor, fp8_scale: torch.Tensor | None = None):
    """Triton version of `silu_and_mul_ref`, CUDA tensors. With `fp8_scale` (a static activation scale [1])
    the product comes back as Fp8Rows [rows, I], quantized with it."""
    inter = x.shape[-1] // 2
    rows = rows_view(x)
    quantize = fp8_scale is not None
    out = torch.empty(rows.shape[0], inter, dtype=torch.float8_e4m3fn if quantize else x.dtype, device=x.device)
    row_scale = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device) if quantize else None
    block, num_warps = program_shape(rows.shape[0], inter)
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(inter, block))](
        rows, out, fp8_scale if quantize else out, row_scale if quantize else out, rows.stride(0), inter,
        FP8_OUT=quantize, BLOCK=block, num_warps=num_warps, **pdl_args(x.device))
    return Fp8Rows(out, row_scale) if quantize else out.view(*x.shape[:-1], inter)


def program_shape(rows: int, inter: int) -> tuple[int, int]:
    """(columns of a row each program takes, warps). scripts/bench_pointwise.py sweeps both. On an H200 (twenty-fifth
    session), with memory-cold inputs, (2048, 8) was within 3% of this shape from 256 rows on, and the batch-512
    decode step did not change with it (12.1 us a call against 11.8), so the shape stays. Untried in an engine:
    at 64 rows (1024, 8) took 2.6 us against 3.4 writing e4m3 codes."""
    return 1024, 4


if triton is not None:

    @triton.jit
    def silu_times(fc, gate):
        """silu(fc) * gate in fc's dtype: silu in float32 rounded to the dtype, then the multiply rounded, the two
        roundings torch makes (also the int4 GEMV's epilogue, kiln.kernels.quant_gemm)."""
        f = fc.to(tl.float32)
        act = (f / (1.0 + tl.exp(-f))).to(fc.dtype)
        return (act.to(tl.float32) * gate.to(tl.float32)).to(fc.dtype)

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, fp8_scale_ptr, row_scale_ptr, x_stride, inter, FP8_OUT: tl.constexpr,
                             BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        allow_dependents(USE_PDL)
        wait_for_inputs(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        fc = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        gate = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0)
        y = silu_times(fc, gate)
        if FP8_OUT:
            s = tl.load(fp8_scale_ptr).to(tl.float32)
            tl.store(out_ptr + row * inter + cols, to_e4m3(y.to(tl.float32), s), mask=mask)
            if tl.program_id(1) == 0:
                tl.store(row_scale_ptr + row, s)
        else:
            tl.store(out_ptr + row * inter + cols, y, mask=mask)
