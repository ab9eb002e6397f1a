"""RMSNorm with an optional fused residual add (Zhang & Sennrich 2019, arXiv:1910.07467).

In a pre-norm decoder every layer does `residual = x + residual; x = norm(residual)`: fusing the add
into the norm reads each row once and writes it twice, instead of three reads and two writes. The sum
is rounded to x's dtype before it is normalised, as the unfused add would round it (and transformers does),
so fusing changes no bit.

When the linear that reads the norm's output takes quantized input (`out_quant`, kiln.kernels.input_quant), the
kernel writes it: the row rounded to x's dtype, then quantized as that linear's own pass would, so the pass
disappears and no bit changes. Static-scale FP8 divides and casts; a scale per token (SmoothQuant's int8,
FP8_PER_CHANNEL_PER_TOKEN's e4m3) or per group (FP8_BLOCK_SCALES) takes the row's or group's max as well, one
reduction more, since the whole row is in the program.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference below still works
    triton = None

from kiln.kernels import rows_view
from kiln.kernels.input_quant import NO_QUANT_FLAGS, InputQuant
from kiln.kernels.pdl import pdl_args

if triton is not None:
    from kiln.kernels.fp8_quant import to_e4m3, to_e4m3_groups
    from kiln.kernels.int8_gemm import to_int8_row
    from kiln.kernels.pdl import allow_dependents, wait_for_inputs


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 unit_offset: bool = False):
    """normed, or (normed, x + residual) when residual is given; the sum is the next residual. The normed row is
    rounded to x's dtype, then times the weight; with `unit_offset` (Gemma) it is scaled by 1 + w in float32 and
    rounded once."""
    summed = x if residual is None else x + residual
    h = summed.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    normed = (h * (1.0 + weight.float())).to(x.dtype) if unit_offset else weight * h.to(x.dtype)
    return normed if residual is None else (normed, summed)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out_quant: InputQuant | None = None):
    """Triton version of `rms_norm_ref`, same arguments and results; x: [..., hidden], CUDA. With `out_quant` the
    normed rows come back quantized as out_quant.quantize would: Fp8Rows or Int8Rows [rows, hidden]."""
    hidden = x.shape[-1]
    rows = rows_view(x)
    res = None if residual is None else rows_view(residual)
    if out_quant is None:
        out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        scale_in = row_scale = weight  # (unread)
    else:
        assert weight.dtype == x.dtype, "rms_norm: quantized output needs the weight in x's dtype"
        assert out_quant.prequant is None, \
            "rms_norm: no prequant scale (SmoothQuant folds a norm-fed linear's smoothing into the norm)"
        out = out_quant.empty(rows.shape[0], hidden, x.device)
        scale_in = weight if out_quant.scale is None else out_quant.scale
        row_scale = out.scale
    res_out = None if residual is None else torch.empty_like(rows)
    block, num_warps = program_shape(rows.shape[0], hidden)
    assert block <= 65536, f"rms_norm: hidden size {hidden} is over the kernel's 65536"
    flags = NO_QUANT_FLAGS if out_quant is None else out_quant.kernel_flags(block)  # (the program holds the row)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, res if res is not None else rows, weight, out.q if out_quant else out,
        res_out if res_out is not None else rows, scale_in, row_scale, rows.stride(0),
        0 if res is None else res.stride(0), hidden, eps, HAS_RESIDUAL=res is not None, **flags,
        BLOCK=max(block, flags["FP8_GROUP"]), num_warps=num_warps, **pdl_args(x.device))
    out = out if out_quant else out.view(*x.shape[:-1], hidden)
    return out if residual is None else (out, res_out.view(x.shape))


def program_shape(rows: int, hidden: int) -> tuple[int, int]:
    """(BLOCK, warps) of the one program a row: the whole row sits in registers, up to 64K elements (every LLM
    hidden size). scripts/bench_pointwise.py sweeps the warps. On an H200 (twenty-fifth session) 16 warps for a
    4096-wide row was up to 23% faster alone, writing e4m3 codes from memory-cold inputs, but the batch-512 decode
    step did not change with it (5.8 us a call either way), so the shape stays."""
    block = triton.next_power_of_2(hidden)
    return block, min(max(block // 512, 1), 16)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, fp8_scale_ptr, row_scale_ptr, x_stride,
                         res_stride, n, eps, HAS_RESIDUAL: tl.constexpr, FP8_OUT: tl.constexpr,
                         INT8_OUT: tl.constexpr, FP8_GROUP: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        allow_dependents(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # a weight: read before the wait
        wait_for_inputs(USE_PDL)
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        h = x.to(tl.float32)
        if HAS_RESIDUAL:
            h += tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
            h = h.to(x.dtype)
            tl.store(res_out_ptr + row * n + cols, h, mask=mask)
            h = h.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n + eps)
        # Round to x's dtype before the weight multiply, as the reference (and transformers) does;
        # the product of two 16-bit floats is exact in float32, so the one rounding below matches torch's.
        normed = (h * rstd).to(x.dtype).to(tl.float32)
        if FP8_OUT:  # the normed row in x's dtype (what the unfused norm would store), then to e4m3
            s = tl.load(fp8_scale_ptr).to(tl.float32)
            tl.store(out_ptr + row * n + cols, to_e4m3((w * normed).to(x.dtype).to(tl.float32), s), mask=mask)
            tl.store(row_scale_ptr + row, s)
        elif INT8_OUT:  # the normed row in x's dtype, then its own int8 scale (masked columns are 0: not the max)
            q, s = to_int8_row((w * normed).to(x.dtype).to(tl.float32))
            tl.store(out_ptr + row * n + cols, q, mask=mask)
            tl.store(row_scale_ptr + row, s)
        elif FP8_GROUP > 0:  # the normed row in x's dtype, then a scale per group (masked columns are 0)
            q, s = to_e4m3_groups((w * normed).to(x.dtype).to(tl.float32), FP8_GROUP)
            tl.store(out_ptr + row * n + cols, q, mask=mask)
            groups = tl.arange(0, BLOCK // FP8_GROUP)
            tl.store(row_scale_ptr + row * tl.cdiv(n, FP8_GROUP) + groups, s, mask=groups < tl.cdiv(n, FP8_GROUP))
        else:
            tl.store(out_ptr + row * n + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)
