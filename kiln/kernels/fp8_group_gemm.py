"""The GEMM of FP8_BLOCK_SCALES: e4m3 activations and weights, each with a scale per group of `group` inputs.

    y[m, n] = sum over groups g of (sum over k in g of xq[m, k] wq[n, k]) * x_scale[m, g] * w_scale[n, g]

x_scale [M, G] comes with the codes (kiln.kernels.fp8_quant.quantize_fp8_groups), w_scale [N, G] is the
checkpoint's (a row's own scale per group, or, imported, its 128 x 128 block's scale on each of the block's rows);
either may be stored in any order (the engine stores w_scale column-major: see _CONFIGS).
Each group's products are summed in float32 on the tensor cores (one FP8 MMA step of `group` inputs, the K tile),
then scaled, as DeepSeek-V3's FP8 GEMMs do: the scales never meet the codes before the sum. Up to 16 rows
(decode) run a weights-left variant split over the input dim, for the wgmma's 64-row side and enough programs.
The torch reference dequantizes both sides and multiplies in float32: the same numbers up to the order of the
float32 sums. Neither kernel has run on a GPU yet: tests/quantization/test_gpu_quant2.py holds their checks.
"""

from __future__ import annotations

import torch

from kiln.kernels import num_sms, rows_view

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference below
    triton = None

from kiln.kernels.gemv import AUTOTUNE, quick_bench, rows_bucket, sum_splits


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """codes [R, K] with scales [R, ceil(K / group)] -> float32 [R, K]."""
    return q.float() * scale.float().repeat_interleave(group, dim=1)[:, :q.shape[1]]


def fp8_group_gemm_ref(xq, x_scale, wq, w_scale, group: int, out_dtype: torch.dtype) -> torch.Tensor:
    """The reference: both sides dequantized, multiplied in float32."""
    return (dequantize_groups(xq, x_scale, group) @ dequantize_groups(wq, w_scale, group).T).to(out_dtype)


def fp8_group_gemm(xq, x_scale, wq, w_scale, group: int, out_dtype: torch.dtype,
                   gemv_parts: int | None = None) -> torch.Tensor:
    """xq [M, K] e4m3 with x_scale [M, G] float32, wq [N, K] e4m3 with w_scale [N, G] -> y [M, N] (CUDA).
    gemv_parts: the GEMV's split of the input dim (tests and benches; default gemv_split's)."""
    rows, (n, k) = rows_view(xq), wq.shape
    m = rows.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m <= GEMV_ROWS:
        return _group_gemv(rows, x_scale, wq, w_scale, group, y, gemv_parts)
    args = (rows, x_scale, wq, w_scale, y, m, n, k, rows.stride(0), *x_scale.stride(), *w_scale.stride(),
            rows_bucket(m))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    # Inside a CUDA graph's capture the tuner launches the tile it kept for this key: every capture runs its
    # forward once before (kiln.runtime.cuda_graphs.capture_graph), which times the candidates outside the graph,
    # as quant_gemm's tuned GEMMs rely on.
    if AUTOTUNE:
        _tuned_kernel[grid](*args, GROUP=group)
    else:
        config = _CONFIGS[0]
        _fp8_group_gemm_kernel[grid(config.kwargs)](*args, GROUP=group, **config.kwargs,
                                                    num_warps=config.num_warps, num_stages=config.num_stages)
    return y


# Decode: up to 16 rows run weights-left (GEMV_TILE), the input dim split so that the grid has two programs an SM.
GEMV_ROWS = 16
GEMV_TILE = (64, 4, 4)  # (BLOCK_N, warps, stages); not yet timed on a GPU


def gemv_split(n: int, groups: int, sms: int, block_n: int = GEMV_TILE[0]) -> int:
    """How many parts the input dim's groups are split into: enough for 2 programs an SM, at most one group each."""
    return max(1, min(groups, -(-2 * sms // -(-n // block_n))))


def _group_gemv(rows, x_scale, wq, w_scale, group: int, y, parts: int | None) -> torch.Tensor:
    """rows [m <= 16, K] by the weights-left kernel, split over the input dim (sum_splits adds the parts)."""
    m, (n, k) = rows.shape[0], wq.shape
    groups = -(-k // group)
    block_n, warps, stages = GEMV_TILE
    split = parts or gemv_split(n, groups, num_sms(rows.device.index or 0) if rows.is_cuda else 4)
    per_split = -(-groups // split)
    split = -(-groups // per_split)  # (no empty part)
    out = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=y.device)
    _fp8_group_gemv_kernel[(triton.cdiv(n, block_n), split)](
        rows, x_scale, wq, w_scale, out, m, n, k, rows.stride(0), *x_scale.stride(), *w_scale.stride(), per_split,
        GROUP=group, BLOCK_N=block_n, SPLIT=split, num_warps=warps, num_stages=stages)
    if split > 1:
        sum_splits(out, y)
    return y


if triton is not None:
    # (BLOCK_M, BLOCK_N, warps, stages): from decode rows (16: the smallest MMA tile) to prompt-sized ones. In sm_90
    # code (scripts/kernel_sass.py "fp8 group gemm") these need no spills: 64 and 128 rows run Hopper's FP8 wgmma
    # (QGMMA), 16 and 32 rows convert the codes to fp16 for mma.sync. Each group step loads a scale per output
    # column: stored column-major (Fp8BlockMethod.prepare) they are one contiguous vector a step, which frees the
    # registers that made 128 x 128 on 8 warps spill (255 registers and 13 spill stores with row-major scales, 201
    # and none now). 128 x 256 still spills (170): the scaled sum holds two accumulators a step.
    _CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                for bm, bn, w, s in ((16, 64, 4, 4), (16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 4, 3),
                                     (64, 256, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3))]

    @triton.jit
    def _fp8_group_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, stride_xm, stride_xsm, stride_xsg,
                               stride_wsn, stride_wsg, M_BUCKET, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for g in range(0, tl.cdiv(K, GROUP)):
            cols = g * GROUP + tl.arange(0, GROUP)
            ok = cols < K  # (a short last group reads zeros past K)
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=m_ok[:, None] & ok[None, :],
                        other=0.0)
            w = tl.load(w_ptr + rn[None, :].to(tl.int64) * K + cols[:, None], mask=ok[:, None] & n_ok[None, :],
                        other=0.0)
            xs = tl.load(xs_ptr + rm.to(tl.int64) * stride_xsm + g * stride_xsg, mask=m_ok, other=0.0)
            ws = tl.load(ws_ptr + rn.to(tl.int64) * stride_wsn + g * stride_wsg, mask=n_ok, other=0.0).to(tl.float32)
            acc += tl.dot(x, w) * (xs[:, None] * ws[None, :])
        y = y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    _tuned_kernel = triton.autotune(configs=_CONFIGS, key=["N", "K", "M_BUCKET", "GROUP"], do_bench=quick_bench,
                                    cache_results=True)(_fp8_group_gemm_kernel)

    @triton.jit
    def _fp8_group_gemv_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, stride_xm, stride_xsm, stride_xsg,
                               stride_wsn, stride_wsg, per_split, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                               SPLIT: tl.constexpr):
        """Up to 16 rows, weights-left as kiln.kernels.gemv's e4m3 MMA GEMV: y^T = W x^T with x's rows padded to
        16, the weights the MMA's M side (64 outputs a program: Hopper's FP8 wgmma, no conversion of the codes).
        Program (i, s) owns outputs i*BLOCK_N.. over groups s*per_split.. of the input dim; with SPLIT > 1 it
        writes its part in float32 to y_ptr [SPLIT, M, N] for sum_splits."""
        x_rows = tl.arange(0, 16)
        cols = tl.arange(0, GROUP)
        outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        out_ok, row_ok = outs < N, x_rows < M
        first = tl.program_id(1) * per_split
        last = tl.minimum(first + per_split, tl.cdiv(K, GROUP))
        acc = tl.zeros([BLOCK_N, 16], tl.float32)
        for g in range(first, last):
            k = g * GROUP + cols
            ok = k < K
            w = tl.load(w_ptr + outs[:, None].to(tl.int64) * K + k[None, :], mask=out_ok[:, None] & ok[None, :],
                        other=0.0)
            x = tl.load(x_ptr + x_rows[:, None] * stride_xm + k[None, :], mask=row_ok[:, None] & ok[None, :],
                        other=0.0)
            xs = tl.load(xs_ptr + x_rows * stride_xsm + g * stride_xsg, mask=row_ok, other=0.0)
            ws = tl.load(ws_ptr + outs.to(tl.int64) * stride_wsn + g * stride_wsg, mask=out_ok,
                         other=0.0).to(tl.float32)
            acc += tl.dot(w, tl.trans(x)) * (ws[:, None] * xs[None, :])
        y_ptrs = y_ptr + tl.program_id(1).to(tl.int64) * M * N + x_rows[None, :] * N + outs[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[None, :] & out_ok[:, None])
