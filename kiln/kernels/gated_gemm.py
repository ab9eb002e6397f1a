"""The gated MLP's fc_gate GEMM with SiLU-and-mul as its epilogue, for prompt-sized row counts.

kiln runs a 16-bit fc_gate as one cuBLAS GEMM into [rows, 2*I] = [fc | gate], then `silu_and_mul` reads that back
and writes [rows, I]. In prefill-1000 the activation alone took 1.44 s of about 63 (a pass over 0.7 GB a layer
and step, at the copy bandwidth). Here each program multiplies a tile of x by the matching tiles of both halves'
weight rows (two accumulators, in effect one tile twice as wide) and writes silu(fc) * gate: the [rows, 2*I]
intermediate is never written. Operands arrive by TMA (Hopper and later); the weights stay in the engine's
[fc | gate] layout, the gate tile being the fc tile's rows I further on.

Rounding as the unfused path: fc and gate are rounded to the output dtype (as F.linear rounds its output) before
the float32 activation, whose product is rounded once more.

Off by default (`KILN_GATED_GEMM=1` turns it on): on an H200 it measured 16% slower than cuBLAS plus the
activation at 8192 rows, 3% at 2048 (scripts/bench_prefill_gemm.py; docs/performance.md, twentieth session).
Triton's GEMM reached 547-578 TFLOP/s here against cuBLAS's 707, more than the saved pass wins back.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kiln.kernels import num_sms

try:
    import triton
    import triton.language as tl

    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # Triton before 3.4: no host descriptors, so no kernel here
        TensorDescriptor = None
except ImportError:  # CPU-only installs: the reference below still works
    triton = None
    TensorDescriptor = None

# Candidates for scripts/bench_prefill_gemm.py, the first the default: 128 x 128 tiles of each half hold two
# float32 accumulators of 64 registers a thread on 8 warps; a stage is 48 KB of shared memory (x, fc, gate).
# PERSISTENT: one program an SM walks the tiles, its tile and K loops flattened into one that Triton pipelines
# across tiles (the next tile's loads start during this one's epilogue).
GATED_GEMM_CONFIGS = [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PERSISTENT=False, num_warps=8,
                           num_stages=4),
                      dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PERSISTENT=False, num_warps=8,
                           num_stages=3),
                      dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, PERSISTENT=False, num_warps=4,
                           num_stages=4),
                      dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PERSISTENT=False, num_warps=4,
                           num_stages=4),
                      dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PERSISTENT=True, num_warps=8,
                           num_stages=3),
                      dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, PERSISTENT=True, num_warps=4,
                           num_stages=4)]
GATED_GEMM_CONFIG = GATED_GEMM_CONFIGS[0]
MIN_ROWS = 256  # below, the GEMV (1-2 rows) or cuBLAS's small-M kernels; prompts are where the pass costs


def gated_gemm_enabled() -> bool:
    return os.environ.get("KILN_GATED_GEMM", "0") == "1"


def silu_and_mul_gemm_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [rows, K], weight [2*I, K] = [fc | gate] rows -> silu(x fc^T) * (x gate^T) [rows, I], each product rounded
    to x's dtype first, as F.linear then silu_and_mul round."""
    fc, gate = F.linear(x, weight).float().chunk(2, dim=-1)
    return (F.silu(fc) * gate).to(x.dtype)


def can_run(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether silu_and_mul_gemm takes x and weight: 16-bit CUDA tensors of one dtype on a GPU with TMA (or the
    interpreter), rows of x and the weight contiguous and 16-byte aligned, K a multiple of 8 (16-byte rows) and I
    too (the output's)."""
    if TensorDescriptor is None or x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if weight.dtype != x.dtype or x.stride(1) != 1 or not weight.is_contiguous():
        return False
    k, inter = x.shape[1], weight.shape[0] // 2
    if weight.shape[1] != k or k % 8 or inter % 8 or x.stride(0) % 8 or x.data_ptr() % 16 or weight.data_ptr() % 16:
        return False
    return not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] >= 9


def silu_and_mul_gemm(x: torch.Tensor, weight: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """Triton version of `silu_and_mul_gemm_ref`, same arguments and result up to the matmul's summation order;
    where `can_run`."""
    cfg = dict(config or GATED_GEMM_CONFIG)
    rows, k = x.shape
    inter = weight.shape[0] // 2
    y = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    x_desc = TensorDescriptor(x, shape=[rows, k], strides=[x.stride(0), 1], block_shape=[bm, bk])
    w_desc = TensorDescriptor(weight, shape=[2 * inter, k], strides=[k, 1], block_shape=[bn, bk])
    y_desc = TensorDescriptor(y, shape=[rows, inter], strides=[inter, 1], block_shape=[bm, bn])
    tiles = triton.cdiv(rows, bm) * triton.cdiv(inter, bn)
    sms = num_sms(x.device.index or 0) if x.is_cuda else 4  # (4 under the interpreter)
    programs = min(tiles, sms) if cfg["PERSISTENT"] else tiles
    _silu_and_mul_gemm_kernel[(programs,)](x_desc, w_desc, y_desc, rows, inter, k, programs, **cfg)
    return y


if triton is not None:

    @triton.jit
    def _silu_and_mul_gemm_kernel(x_desc, w_desc, y_desc, M, I, K, programs, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                                  PERSISTENT: tl.constexpr):
        """y = silu(x fc^T) * (x gate^T), tile by tile (_gated_tile): program p takes tile p, or with PERSISTENT
        tiles p, p + programs, ..."""
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(I, BLOCK_N)
        if PERSISTENT:
            for tile in tl.range(tl.program_id(0), tiles, programs, flatten=True):
                _gated_tile(x_desc, w_desc, y_desc, tile, M, I, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
        else:
            _gated_tile(x_desc, w_desc, y_desc, tl.program_id(0), M, I, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)

    @triton.jit
    def _gated_tile(x_desc, w_desc, y_desc, tile, M, I, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """Output tile `tile` (m, n), in groups of GROUP_M row tiles (tiles in flight together share weight tiles
        in L2): y[m, n] = silu(x[m] fc[n]^T) * (x[m] gate[n]^T). A fc tile that runs past I reads gate rows, and
        a gate tile past 2 I reads zeros: both only feed outputs past I, which the store drops."""
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(I, BLOCK_N)
        in_group = tile % (GROUP_M * tiles_n)  # a group: GROUP_M row tiles (fewer in the last) by every column tile
        first_m = tile // (GROUP_M * tiles_n) * GROUP_M
        size_m = min(tiles_m - first_m, GROUP_M)
        m0 = (first_m + in_group % size_m) * BLOCK_M
        n0 = in_group // size_m * BLOCK_N
        acc_fc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):  # TMA fills past K with zeros
            a = x_desc.load([m0, k0])
            acc_fc = tl.dot(a, w_desc.load([n0, k0]).T, acc_fc)
            acc_gate = tl.dot(a, w_desc.load([I + n0, k0]).T, acc_gate)
        dtype = y_desc.dtype
        fc = acc_fc.to(dtype).to(tl.float32)  # as F.linear rounds its output
        gate = acc_gate.to(dtype).to(tl.float32)
        y_desc.store([m0, n0], (fc / (1.0 + tl.exp(-fc)) * gate).to(dtype))
