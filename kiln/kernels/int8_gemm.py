"""The GEMMs of W8A8_SQ_PER_CHANNEL (SmoothQuant) on the GPU: int8 activations with a scale per token, int8 weights
with a scale per output channel.

    y[m, n] = (sum over k of xq[m, k] wq[n, k]) * x_scale[m] * w_scale[n]

`quantize_int8_rows` turns a layer's input into codes and row scales in one pass, one program a row, with the
SmoothQuant input scale of a layer that follows no norm (`prequant_scaling_factor`) multiplied in as it reads:
the torch math was seven elementwise kernels, each reading or writing the whole activation.

`int8_scaled_gemm` sums the products in int32 on the tensor cores (exact, as torch._int_mm) and applies both scales
in its epilogue, writing the model dtype. The other candidate is cuBLAS's int8 GEMM (torch._int_mm, which needs
more than 16 rows) followed by the scales as two more kernels over the [M, N] int32 result; which is faster for
a shape is timed at its first call and kept (kiln.kernels.choices), as the int4 and FP8 GEMVs choose. Both give the
same bits: (float32(sum) * x_scale) * w_scale, rounded once. Up to GEMV_MAX_ROWS rows (decode) run
kiln.kernels.gemv.scaled_gemv on the codes instead: W8A16's tuned GEMV, its float32 sum exact while partial sums
stay under 2^24 (then float32 rounding only, as the CPU emulation).

Where the kernel before a linear writes its codes and scales itself (`Int8Rows`: the RMSNorms before qkv and fc_gate,
whose smoothing is folded into the norm, and SiLU-and-mul before mlp.proj, its prequant scale multiplied in), the
separate pass is skipped. On an H200 (thirty-first session) the pass and
the GEMMs equal their references bit for bit (tests/quantization/test_gpu_quant2.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kiln.kernels import divide_exactly, row_program, rows_view, triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch math below
    triton = None

from kiln.kernels.choices import KernelChoices
from kiln.kernels.gemv import AUTOTUNE, GEMV_MAX_ROWS, candidate_ms, rows_bucket, scaled_gemv, weight_copies
from kiln.kernels.pdl import pdl_args

if triton is not None:
    from kiln.kernels.pdl import allow_dependents, wait_for_inputs

INT8_MAX = 127
MIN_SCALE = 1e-12  # an all-zero token still gets a finite, positive scale
INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA needs M > 16: smaller batches are padded to 24 rows
INT_MM_PAD_ROWS = 24
INT_MM_ALIGN = 8  # ... and K, N multiples of 8
ROUND_MAGIC = 12582912.0  # 2^23 + 2^22: y + it - it rounds a float32 |y| < 2^22 to an integer, ties to even


class Int8Rows(NamedTuple):
    """SmoothQuant's input already quantized: codes [M, K] int8 and each row's scale [M, 1] float32. The RMSNorm and
    SiLU-and-mul kernels write these when a SmoothQuant linear reads their output
    (kiln.models.base.DecoderLayer.fuse_input_quantization), saving the separate pass."""

    q: torch.Tensor
    scale: torch.Tensor


def quantize_int8_rows_ref(x: torch.Tensor, prequant: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (times prequant [K], in x's dtype, where given) -> (codes int8 [M, K], scale float32 [M, 1]) with
    each row's max |x| at 127, rounded to nearest even."""
    if prequant is not None:
        x = x * prequant
    scale = divide_exactly(x.abs().amax(dim=-1, keepdim=True).float(), INT8_MAX).clamp(min=MIN_SCALE)
    return torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_int8_activation(x: torch.Tensor, prequant: torch.Tensor | None = None):
    """quantize_int8_rows_ref's result: by the Triton pass on CUDA, the torch math elsewhere (the same bits)."""
    if x.is_cuda and triton_available():
        return quantize_int8_rows(x, prequant)
    return quantize_int8_rows_ref(x, prequant)


def quantize_int8_rows(x: torch.Tensor, prequant: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8_rows_ref on CUDA, one program a row."""
    rows = rows_view(x)
    m, k = rows.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block, warps = row_program(k, "quantize_int8_rows")
    _quantize_int8_kernel[(m,)](rows, rows if prequant is None else prequant, q, scale, rows.stride(0), k,
                                PREQUANT=prequant is not None, BLOCK=block, num_warps=warps, **pdl_args(x.device))
    return q, scale


def int8_gemm_ref(xq, x_scale, wq, w_scale, out_dtype: torch.dtype) -> torch.Tensor:
    """The reference: the integer products summed in float32 (exact while partial sums stay under 2^24), then
    the scales."""
    acc = xq.float() @ wq.float().T
    return (acc * x_scale * w_scale.float()[None, :]).to(out_dtype)


def int8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """(xq [M, K] @ wq [N, K]^T) * x_scale [M, 1] * w_scale [N] -> [M, N] in out_dtype, on any device."""
    if not (xq.is_cuda and triton_available()):
        return int8_gemm_ref(xq, x_scale, wq, w_scale, out_dtype)
    if xq.shape[0] <= GEMV_MAX_ROWS:
        return scaled_gemv(xq, x_scale, wq, w_scale, out_dtype)
    return int8_scaled_gemm(xq, x_scale, wq, w_scale, out_dtype)


# The kernel each (N, K, rows bucket, dtype, device) runs: a tile of _int8_gemm_kernel, or INT_MM (cuBLAS), chosen by
# timing them the first time the key is seen; until then (tuning off, or a capture, which cannot time) the first tile.
INT_MM = "int_mm"
_PICKED = KernelChoices("int8_gemm")


def int8_scaled_gemm(xq, x_scale, wq, w_scale, out_dtype: torch.dtype) -> torch.Tensor:
    """int8_gemm_ref on CUDA by the faster of the Triton GEMM (scales in its epilogue) and torch._int_mm."""
    rows, (n, k) = rows_view(xq), wq.shape
    m = rows.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    x_scale = x_scale.reshape(m).float()
    tiles = _tiles(rows_bucket(m)) + ([INT_MM] if _int_mm_fits(k, n) else [])
    key = (n, k, rows_bucket(m), out_dtype, xq.device.index)
    if key not in _PICKED and AUTOTUNE and not torch.cuda.is_current_stream_capturing():
        ms = candidate_ms(tiles, lambda tile: [
            functools.partial(_run, rows, x_scale, w, s, y, tile) for w, s in weight_copies(wq, w_scale)])
        _PICKED[key] = min(ms, key=ms.get)
    return _run(rows, x_scale, wq, w_scale, y, _PICKED.get(key, tiles[0]))


def _int_mm_fits(k: int, n: int) -> bool:
    return k % INT_MM_ALIGN == 0 and n % INT_MM_ALIGN == 0


def _run(rows, x_scale, wq, w_scale, y, tile) -> torch.Tensor:
    """One GEMM into y: by torch._int_mm and the scales after it, or by _int8_gemm_kernel with `tile` =
    (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    m, n, k = rows.shape[0], *wq.shape
    if tile == INT_MM:
        padded = F.pad(rows, (0, 0, 0, INT_MM_PAD_ROWS - m)) if m < INT_MM_MIN_ROWS else rows
        acc = torch._int_mm(padded, wq.T)[:m]
        y.copy_(acc.float() * x_scale[:, None] * w_scale.float()[None, :])
        return y
    block_m, block_n, block_k, warps, stages = tile
    _int8_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        rows, x_scale, wq, w_scale, y, m, n, k, rows.stride(0), wq.stride(0), EVEN_K=k % block_k == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y


# (BLOCK_N, BLOCK_K, warps, stages) of the GEMM, BLOCK_M from the rows (_tiles). Not yet timed on a GPU; each
# compiles for sm_90 without spills, 64 and 128 rows to Hopper's int8 wgmma (scripts/kernel_sass.py "int8 gemm").
_GEMM_SHAPES = ((128, 128, 4, 4), (64, 128, 4, 4), (256, 128, 8, 3), (128, 64, 4, 5))


def _tiles(bucket: int) -> list[tuple]:
    """Candidate (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): one tile of rows covers a small batch, so each weight
    tile is read once; prompt-sized batches also try 128 rows. The first is the untuned default."""
    block_m = min(max(bucket, 16), 64)
    tiles = [(block_m, *shape) for shape in _GEMM_SHAPES]
    if bucket >= 128:
        tiles += [(128, n, kb, 8, s) for n, kb, _, s in _GEMM_SHAPES[:3]]
    return tiles


if triton is not None:
    _INT8_MAX, _MIN_SCALE, _ROUND_MAGIC = tl.constexpr(float(INT8_MAX)), tl.constexpr(MIN_SCALE), tl.constexpr(
        ROUND_MAGIC)

    @triton.jit
    def to_int8_row(x):
        """A float32 row (zeros where masked) -> (int8 codes, its scale): max |x| / 127 with IEEE division, each
        element divided by it (div_rn) and rounded to nearest even (the ROUND_MAGIC add: libdevice's rint has no
        interpreter twin), as quantize_int8_rows_ref. The RMSNorm kernel writes SmoothQuant's input with it too."""
        s = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=0), _INT8_MAX), _MIN_SCALE)
        y = tl.clamp(tl.math.div_rn(x, s), -_INT8_MAX, _INT8_MAX)
        return ((y + _ROUND_MAGIC) - _ROUND_MAGIC).to(tl.int8), s

    @triton.jit
    def _quantize_int8_kernel(x_ptr, p_ptr, q_ptr, scale_ptr, x_stride, K, PREQUANT: tl.constexpr,
                              BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        """One row: times the prequant scale (rounded to x's dtype, as torch multiplies two bf16 tensors), then
        to_int8_row."""
        allow_dependents(USE_PDL)
        wait_for_inputs(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        if PREQUANT:
            p = tl.load(p_ptr + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) * p.to(tl.float32)).to(x_ptr.dtype.element_ty)
        q, s = to_int8_row(x.to(tl.float32))
        tl.store(q_ptr + row * K + cols, q, mask=mask)
        tl.store(scale_ptr + row, s)

    @triton.jit
    def _int8_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, stride_xm, stride_wn,
                          EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        """A [BLOCK_M, BLOCK_N] tile of y: int8 MMAs into an int32 accumulator, then (float32(acc) * x's row
        scale) * w's column scale, the order of int8_gemm_ref, rounded once to y's dtype. EVEN_K (BLOCK_K divides
        K, as on every real model's shapes) drops the K mask from the loop."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        cols = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + cols[None, :]
        w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + cols[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        for k0 in range(0, K, BLOCK_K):
            ok = (k0 + cols < K) | EVEN_K
            x = tl.load(x_ptrs + k0, mask=m_ok[:, None] & ok[None, :], other=0)
            w = tl.load(w_ptrs + k0, mask=ok[:, None] & n_ok[None, :], other=0)
            acc = tl.dot(x, w, acc, out_dtype=tl.int32)
        xs = tl.load(xs_ptr + rm, mask=m_ok, other=0.0)
        ws = tl.load(ws_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
