"""The gated MLP's activation, silu(fc) * gate, fused over the runtime's `fc_gate` output.

The engine fuses fc and gate into one matmul whose output is [tokens, 2*I] = [fc | gate]; the kernel
reads each half once and writes the [tokens, I] product, instead of torch's three passes (silu, mul,
and the chunk copy). SiLU is from Elfwing et al. 2017, arXiv:1702.03118 (the GLU variant: Shazeer 2020,
arXiv:2002.05202).
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference below still works
    triton = None

from kiln.kernels.pdl import pdl_args

if triton is not None:
    from kiln.kernels.pdl import allow_dependents, wait_for_inputs


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2*I] = [fc | gate] -> silu(fc) * gate, [..., I]."""
    fc, gate = x.chunk(2, dim=-1)
    return F.silu(fc) * gate


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton version of `silu_and_mul_ref`, CUDA tensors."""
    inter = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], inter, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(inter, block))](
        rows, out, rows.stride(0), inter, BLOCK=block, num_warps=4, **pdl_args(x.device))
    return out.view(*x.shape[:-1], inter)


if triton is not None:

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, inter, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        allow_dependents(USE_PDL)
        wait_for_inputs(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        fc = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        gate = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0)
        f = fc.to(tl.float32)
        # silu in float32 rounded to x's dtype, then the multiply: the two roundings torch makes.
        act = (f / (1.0 + tl.exp(-f))).to(fc.dtype)
        tl.store(out_ptr + row * inter + cols, (act.to(tl.float32) * gate.to(tl.float32)).to(fc.dtype), mask=mask)
