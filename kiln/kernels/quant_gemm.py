"""Weight-only quantized matmul y = x W^T, W held as int4 groups (W4A16) or per-channel int8 (W8A16), in
kiln's checkpoint layout (kiln/quantization/weight_only.py): no repack at build or load time.

Decode is memory-bound: at batch 1 a layer's time is the time to stream its weights, so int4 weights can
be up to 4x and int8 up to 2x faster than bf16 if the kernel reads them once at full bandwidth. Two kernels:

- GEMV (a few rows of x): each program owns a block of output rows and streams their packed codes along the
  input dim, as int64 words of 16 codes, doing the multiply-adds on CUDA cores; a step of up to 256 words covers
  a 4096-wide row, so all of a program's loads are in flight at once. For int4 the group's scale and zero are
  applied once per word, not per weight: sum_k (u_k - z) s x_k = s (sum_k u_k x_k - z sum_k x_k), and the
  codes multiply x rounded to 16-bit fixed point two at a time (dp2a; kiln.kernels.words). Each thread holds one
  word of each of its outputs and the columns of x that word multiplies, so no value crosses threads until the
  final sum. Its epilogue variants: SiLU-and-mul, rotary with the KV-cache write, and an RMSNorm carried between
  two GEMVs (the residual added and the squares summed by one, the 1/rms applied by the next:
  w4a16_add_norm_matmul, `norm_in`). Programs of the same output block but different rows of x
  are adjacent in the launch order, so the weights come from L2 after the first read. int8 codes are read as
  int64 words of 8 (_w8_gemv_kernel), each made a float by one AND; per shape, timing may instead pick the
  full-precision GEMV (kiln.kernels.gemv) with int8 weights. Either applies the per-channel scale after the
  float32 sum.
- GEMM (3 to DEQUANT_MIN_ROWS - 1 rows): one int4 group per step. Each weight is dequantized once per tile of
  rows to exactly the reference's 16-bit value ((u - z) s, rounded once) by packed 16-bit arithmetic, two
  weights an instruction (_dequant_nibbles, inline PTX; scripts/kernel_sass.py counts the loop), so one
  float32 accumulator runs along the whole row on tensor cores and the loads pipeline freely. The two nibbles
  of a byte are columns 2j and 2j+1: x is split into its even and odd columns once per call (a copy of x,
  small beside the weights), so each nibble plane feeds one dot with contiguous x and nothing interleaves in
  registers. A tile of rows covers up to 64 (or 128) rows; when too few tiles of output columns would fill
  the GPU, the input dim is split (split-K), the partial sums written apart and added in a fixed order, so
  results are deterministic. Some tiles compute y^T = W x^T instead (WEIGHTS_LEFT), so that Hopper's MMA takes
  the unpacked weights from registers and they skip the round trip through shared memory; the tuner times
  both kinds.
- From DEQUANT_MIN_ROWS rows (prefill): int4 weights are dequantized by a Triton kernel (bit for bit the
  reference's dequantization) and cuBLAS multiplies, so the unpacking is done once, not once per row tile.
  int8 keeps its GEMM at every size: its tiles convert with one instruction per weight.

The int4 kernels time a few tiles per (N, K, rows of x, or their power-of-two bucket for the GEMM) the first
time a shape is seen, replayed from a CUDA graph over weight copies that overflow L2, as a decode step runs
them; the int8 GEMM autotunes with Triton's tuner. CUDA-graph capture warms up outside the graph, so tuning
never runs inside one (a shape first seen inside a capture takes the first tile). Results equal the references
(dequantize to x's dtype, then F.linear) up to the rounding of the dequantized weight to x's dtype and of the
sums: the tests bound the difference by 3 units of x's dtype in the last place of sum_k |x_k| |w_k|.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from kiln.kernels import rows_view
from kiln.kernels.activation import silu_and_mul_ref
from kiln.kernels.choices import KernelChoices
from kiln.kernels.gemv import (
    AUTOTUNE,  # (KILN_AUTOTUNE=0: first configs only)
    GEMV_MAX_ROWS,
    candidate_ms,
    fp8_word_tile,
    quick_bench,
    rows_bucket,
    scaled_gemv,
    sum_splits,
    weight_copies,
)
from kiln.kernels.fp8_group_gemm import fp8_group_gemm
from kiln.kernels.pdl import pdl_args
from kiln.kernels.rotary import apply_rotary_and_write_cache_ref, cache_code_args
from kiln.quantization.weight_only import dequantize_int4, dequantize_int8

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references below still work
    triton = None

log = logging.getLogger("kiln")

if triton is not None:
    from kiln.kernels.epilogue import add_residual_for_norm, pending_inv_rms, silu_times
    from kiln.kernels.gemv import fp8_word_row_sums
    from kiln.kernels.pdl import allow_dependents
    from kiln.kernels.rotary import cos_sin, rotate_pair, to_cache

# Rows of x up to which the GEMVs run (kiln.kernels.gemv's limit, shared by the int8 path): on the H200 the int4
# GEMV is 2.0x bf16 at 1 row and its time grows with the rows, while the GEMM is 1.2x bf16 at 4 rows
# (kiln/kernels/bench_quant_gemm.py, one decoder layer's linears).
# Rows of x from which int4 weights are dequantized to x's dtype by a Triton kernel and cuBLAS does the matmul:
# the fused GEMM unpacks the weights once per tile of up to 128 rows, the dequantization once in all. Measured
# on the H200 (bench_quant_gemm.py, one decoder layer): at 128 rows the GEMM is 0.67x bf16 and the
# dequantization 0.42x; at 256 rows both 0.49x.
DEQUANT_MIN_ROWS = 256
DEQUANT_BLOCK_N, DEQUANT_BLOCK_KB = 8, 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# (BLOCK_N, BLOCK_KW, warps) of the int4 GEMV, the first the untuned default: BLOCK_KW int64 words of each of
# BLOCK_N outputs a step, one word per thread and output. A step of 256 words covers a 4096-wide row at once: every
# load of the program is in flight together. On an H200 (Llama-3-8B shapes, one row, int32 words of 8 codes and
# twice the words a step) each of the first five won a shape; the rest were within 10% of the best on one. Tiles of
# one output, or of 8192 codes a step, lost on every shape by 24% or more and were dropped. On int64 words the
# fifth, (2, 256, 4), was 18-51% behind the best on all eight shapes and was dropped too (twenty-seventh session).
# (16, 128, 4), added untimed in the forty-sixth session, is the one tile whose threads each hold one word of 16
# outputs: x's 16 columns a thread converts, scales and sums once for 16 words, and the loop issues 2.95
# instructions a weight in sm_90 code against (8, 128, 4)'s 3.30 (scripts/kernel_sass.py "w4 gemv zero=True" --set
# K=14336). With the weights in L2 the GEMV ran only 18% faster on an H100 (scripts/probe_l2_prefetch.py): issue
# and latency bound it as much as DRAM. It holds 153 registers, 3 programs an SM; the tuner decides.
W4_GEMV_TILES = ((4, 256, 4), (8, 256, 4), (8, 256, 8), (16, 64, 4), (4, 128, 4), (8, 128, 4), (8, 64, 4),
                 (16, 128, 8), (16, 128, 4))
# The tiles the GEMV's epilogue variants (SiLU-and-mul, rotary) choose from: the four that came first or second for
# the plain GEMV of Llama-3-8B's qkv and fc_gate on an H200, symmetric and with zero points (fifteenth session,
# scripts/bench_w4_gemv_versions.py). Every candidate is compiled and timed at a first open, and the rotary variant's
# compile is the GEMV's slowest (libdevice's cos and sin; scripts/compile_kernels.py prints each one's seconds). Most
# of a cold W4A16 first open is the int4 GEMM's tiles, timed as the prefill graphs are captured (docs/performance.md).
W4_EPILOGUE_TILES = ((8, 256, 4), (4, 128, 4), (8, 64, 4), (8, 128, 4))

# (BLOCK_N, BLOCK_KW, warps) of the int8 GEMV (_w8_gemv_kernel), the first the untuned default: BLOCK_KW int64
# words of 8 codes each of BLOCK_N outputs a step, one word per thread and output, as the int4 GEMV's tiles. Each
# was the fastest of five on one of Llama-3-8B's shapes on an H200 (scripts/bench_int8_gemv_tiles.py); (8, 256, 4)
# was within 3% of the best on three and 9% on qkv. (8, 128, 4) and (4, 512, 4) never won and were dropped.
# (2, 256, 4), added untimed in the thirty-ninth session: o_proj's 4096 outputs are 512 programs of 8, under one
# wave on an H100 (about five 96-register programs an SM on 132 SMs), or 2,048 of 2. (16, 128, 4), added untimed in
# the forty-sixth session as the int4 GEMV's: one word of 16 outputs a thread, 2.96 instructions a weight in sm_90
# code against (8, 256, 4)'s 3.23 (scripts/kernel_sass.py "w8 gemv gated=False" --set K=14336), 80 registers.
W8_GEMV_TILES = ((8, 256, 4), (4, 256, 4), (8, 512, 4), (2, 256, 4), (16, 128, 4))
# The words the GEMVs read the codes as: 8 bytes, 16 int4 codes or 8 int8 ones. For int8, int32 words of 4 took 2%
# longer on a layer's four shapes (8.3, 5.5, 30.6 and 16.3 us against 8.0, 5.5, 28.8 and 17.1), and batch-1 decode
# 2% longer. For int4, int32 words of 8 took 3-6% longer on a layer's four shapes (46.1 against 44.7 us with zero
# points, 44.8 against 42.1 symmetric; scripts/bench_w4_gemv_versions.py), and batch-1 decode ran at 1.92x bf16
# against 1.78-1.90x in earlier sessions' runs on int32 words (twenty-seventh session).
WORD_DTYPE = torch.int64

# The engine plan's record of the kernels each quantization algorithm's linear layers run on CUDA (in the order
# of the rows they take), and elsewhere: weight-only formats dequantize, then multiply; FP8 and SmoothQuant multiply
# their codes in float32 (the emulated GEMM).
_W4 = "triton_w4a16_gemv_gemm"
_FP8 = "triton_fp8_gemv, torch_scaled_mm"
KERNEL_FOR_ALGO = {"W8A16": "triton_w8a16_gemv_gemm", "W4A16": _W4, "W4A16_AWQ": _W4, "W4A16_GPTQ": _W4,
                   "W4A8_AWQ": "triton_w4a16_gemv_gemm on e4m3 codes, triton_fp8_group_gemm from dequant_min_rows",
                   "FP8": _FP8, "FP8_PER_CHANNEL_PER_TOKEN": _FP8, "FP8_BLOCK_SCALES": "triton_fp8_group_gemv_gemm",
                   "W8A8_SQ_PER_CHANNEL": "triton_int8_quantize, then triton_w8a16_gemv or the faster of "
                                          "triton_int8_gemm and torch_int_mm"}
CODES_MULTIPLIED = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "W8A8_SQ_PER_CHANNEL")


def linear_plan(quant_algo: str | None) -> dict:
    """The plan entry of a model's quantized linear layers ({} when none is quantized)."""
    kernel = KERNEL_FOR_ALGO.get(quant_algo)
    if kernel is None:
        return {}
    other = "emulated_gemm_on_codes" if quant_algo in CODES_MULTIPLIED else "dequantize_then_matmul"
    w4 = {"dequant_min_rows": DEQUANT_MIN_ROWS}
    if quant_algo.startswith("W4A16"):  # (W4A8's row scale comes before the activation and the rotation)
        w4.update(gated_mlp_silu="gemv_epilogue", qkv_rotary_and_cache_write="gemv_epilogue")
    return {"quantized_linear": {"cuda": kernel, "other": other, "gemv_max_rows": GEMV_MAX_ROWS,
                                 **(w4 if quant_algo.startswith("W4") else {})}}


def w4a16_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     group_size: int) -> torch.Tensor:
    """x [..., in] @ dequantize_int4(...)^T -> [..., out] in x's dtype."""
    return F.linear(x, dequantize_int4(packed, scale, zero, group_size, x.dtype))


def w4a16_silu_and_mul_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                                  zero: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """silu(fc) * gate of [fc | gate] = w4a16_matmul_ref(...): the gated MLP's fc_gate and activation."""
    return silu_and_mul_ref(w4a16_matmul_ref(x, packed, scale, zero, group_size))


def w4a16_qkv_rotary_matmul_ref(x, packed, scale, zero, group_size, heads, kv_heads, head_size, positions, inv_freq,
                                k_cache, v_cache, slots, kv_scale) -> torch.Tensor:
    """The fused QKV projection w4a16_matmul_ref(x, ...), then apply_rotary_and_write_cache_ref on its q, k and v
    (kiln.kernels.rotary): returns the projection with q and k rotated; the keys and values land in the caches."""
    qkv = w4a16_matmul_ref(x, packed, scale, zero, group_size)
    q, k, v = (t.unflatten(-1, (-1, head_size)) for t in
               qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1))
    apply_rotary_and_write_cache_ref(q, k, v, positions, inv_freq, k_cache, v_cache, slots, kv_scale)
    return torch.cat([q.flatten(-2), k.flatten(-2), v.flatten(-2)], dim=-1)


def w8a16_matmul_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ dequantize_int8(...)^T -> [..., out] in x's dtype."""
    return F.linear(x, dequantize_int8(q, scale, x.dtype))


def kernel_supports(device: torch.device, dtype: torch.dtype) -> bool:
    """The kernels run on CUDA for 16-bit activations; everything else takes the reference."""
    return device.type == "cuda" and dtype in KERNEL_DTYPES


def w4a16_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 group_size: int, integer_zeros: bool = True) -> torch.Tensor:
    """Triton version of `w4a16_matmul_ref`, same arguments and result (see the module docstring). With zeros that
    are not whole numbers (integer_zeros False: GGUF's Q4_1 and Q4_K kept as they are), rows the GEMV does not take
    go through the dequantized weight: _w4_gemm_kernel's 16-bit conversion takes z + 128 (bfloat16) or z + 1024
    (float16), where those formats step by 1, so it rounds a fractional zero."""
    rows = rows_view(x)
    if rows.shape[0] >= DEQUANT_MIN_ROWS or not (integer_zeros or gemv_takes(rows, packed)):
        y = F.linear(rows, w4a16_dequantize(packed, scale, zero, group_size, x.dtype))
    else:
        y = w4a16_fused_matmul(rows, packed, scale, zero, group_size)
    return y.view(*x.shape[:-1], packed.shape[0])


def w4a16_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Triton version of `dequantize_int4` (kiln/quantization/weight_only.py), bit for bit: [out, in] in dtype."""
    return _w4_dequantize(packed, scale, zero, group_size, dtype, scaled=True)


def w4_centered_codes(packed: torch.Tensor, zero: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """The int4 codes less their zero point, u - z in [-15, 15], as e4m3 [out, in] (exact): the weights of an FP8
    GEMM whose group scales are the int4 format's (W4A8_AWQ's prompt-sized matmuls, `w4a8_matmul`)."""
    return _w4_dequantize(packed, None, zero, group_size, torch.float8_e4m3fn, scaled=False)


def _w4_dequantize(packed, scale, zero, group_size: int, dtype: torch.dtype, scaled: bool) -> torch.Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    s = scale if scaled else packed  # unread when SCALED is False
    z = zero if zero is not None else s  # unread when HAS_ZERO is False
    grid = (triton.cdiv(n, DEQUANT_BLOCK_N), triton.cdiv(k // 2, DEQUANT_BLOCK_KB))
    _w4_dequant_kernel[grid](packed, s, z, out, n, k, GROUP=group_size, HAS_ZERO=zero is not None, SCALED=scaled,
                             BLOCK_N=DEQUANT_BLOCK_N, BLOCK_KB=DEQUANT_BLOCK_KB)
    return out


def w4a8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                zero: torch.Tensor | None, group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """W4A8_AWQ's matmul of prompt-sized batches on FP8 tensor cores: e4m3 codes of x [M, K] with their static
    scale [1], by the int4 weight. Its codes less their zero point are e4m3 exactly (w4_centered_codes), so
    FP8_BLOCK_SCALES' group GEMM multiplies them, each group's sum scaled by the group's int4 scale and x's:
        y = sum over groups g of (xq . (u - z))_g * s_g * x_scale
    (kiln.quantization.w4a8's math: (xq @ dequantized w^T) * x_scale, up to float32 summation order). The codes
    are written once a call, as W4A16 dequantizes its weights once for cuBLAS from DEQUANT_MIN_ROWS rows."""
    rows = rows_view(xq)
    groups = -(-packed.shape[1] * 2 // group_size)
    # x's scale is one for every row and group: a [1, G] row read with a zero row stride
    x_scales = x_scale.float().reshape(1, 1).expand(1, groups).contiguous().expand(rows.shape[0], groups)
    # the group scales column-major, as FP8_BLOCK_SCALES' engine stores them (a step's scales one vector: see
    # fp8_group_gemm._CONFIGS); a copy of G x N values beside the N x K codes written above
    col_scales = scale.t().contiguous().t()
    return fp8_group_gemm(rows, x_scales, w4_centered_codes(packed, zero, group_size), col_scales, group_size,
                          out_dtype)


def w4a16_fused_matmul(rows: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                       group_size: int) -> torch.Tensor:
    """x [m, in] (unit stride along in) -> [m, out] by the GEMV or the GEMM kernel, weights read packed."""
    y = torch.empty(rows.shape[0], packed.shape[0], dtype=rows.dtype, device=rows.device)
    if gemv_takes(rows, packed):
        _w4_gemv(rows, packed.view(WORD_DTYPE), scale, zero, group_size, y)
    else:
        _w4_gemm(rows, packed, scale, zero, group_size, y)
    return y


def w4a16_silu_and_mul_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                              group_size: int, norm_in: tuple | None = None) -> torch.Tensor | None:
    """silu(fc) * gate of [fc | gate] = w4a16_matmul(x, ...) (the gated MLP's fc_gate weights [fc; gate]), in one
    launch: the GEMV with the activation as its epilogue, rounding as w4a16_matmul then silu_and_mul do. None
    where the GEMV does not run (more than GEMV_MAX_ROWS rows, or codes not readable as words): the caller
    multiplies and activates apart. `norm_in` (squares, eps): x is an RMSNorm's input times its weight, the norm's
    1/rms still to apply (w4a16_add_norm_matmul's output)."""
    if not gemv_takes(x, packed) or packed.shape[0] % 2:
        return None
    rows = rows_view(x)
    words = packed.view(WORD_DTYPE)
    y = torch.empty(rows.shape[0], packed.shape[0] // 2, dtype=rows.dtype, device=rows.device)
    key = ("gemv silu", *words.shape, group_size, zero is not None, rows.shape[0], rows.dtype, norm_in is not None)
    run = functools.partial(_run_w4_gemv, gated=True, norm_in=norm_in)
    tile = _tuned_tile(key, W4_EPILOGUE_TILES, run, rows, words, scale, zero, group_size, y)
    run(rows, words, scale, zero, group_size, y, tile)
    return y.view(*x.shape[:-1], y.shape[1])


def w4a16_qkv_rotary_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                            group_size: int, heads: int, kv_heads: int, head_size: int, positions: torch.Tensor,
                            inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slots: torch.Tensor, kv_scale: torch.Tensor | None,
                            norm_in: tuple | None = None) -> torch.Tensor | None:
    """The fused QKV projection w4a16_matmul(x, ...) [rows, (heads + 2 kv_heads) head_size] followed by
    kiln.kernels.rotary.apply_rotary_and_write_cache on its q, k and v, in one launch: the GEMV with rotary as its
    epilogue, the same bits. None where the GEMV does not run (more than GEMV_MAX_ROWS rows, codes not readable
    as words, or no tile that divides half a head): the caller projects, then rotates. `norm_in` as
    w4a16_silu_and_mul_matmul's."""
    tiles = [tile for tile in W4_EPILOGUE_TILES if (head_size // 2) % tile[0] == 0]
    if not gemv_takes(x, packed) or head_size % 2 or not tiles:
        return None
    rows = rows_view(x)
    words = packed.view(WORD_DTYPE)
    y = torch.empty(rows.shape[0], packed.shape[0], dtype=rows.dtype, device=rows.device)
    key = ("gemv rotary", *words.shape, group_size, zero is not None, rows.shape[0], rows.dtype, head_size,
           norm_in is not None)
    run = functools.partial(_run_w4_qkv_rotary, rotary=(heads, kv_heads, head_size, positions, inv_freq, k_cache,
                                                         v_cache, slots, kv_scale), norm_in=norm_in)
    # (timing a tile writes this step's keys and values to their slots, the same bits each time)
    tile = _tuned_tile(key, tiles, run, rows, words, scale, zero, group_size, y)
    run(rows, words, scale, zero, group_size, y, tile)
    return y.view(*x.shape[:-1], y.shape[1])


def w4a16_add_norm_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                          group_size: int, residual: torch.Tensor, norm_weight: torch.Tensor) -> tuple | None:
    """An int4 GEMV whose output joins the residual stream before an RMSNorm (the attention's and the MLP's output
    projections), the norm begun in its epilogue: (h = w4a16_matmul(x, ...) + residual as torch rounds both,
    h times norm_weight rounded once, squares [rows, programs] float32: each program's sum of h's squares). The
    GEMV that reads the norm's output takes the last two as x and `norm_in` and applies the 1/rms to its sums, so
    no norm kernel runs (kiln.layers.normalization.PendingNorm). None where the GEMV does not run, and for float16:
    there the stream times the weight, not yet normalized, can overflow where the norm's output does not."""
    if x.dtype == torch.float16 or not gemv_takes(x, packed):
        return None
    rows = rows_view(x)
    words = packed.view(WORD_DTYPE)
    n = packed.shape[0]
    h = torch.empty(rows.shape[0], n, dtype=rows.dtype, device=rows.device)
    weighted = torch.empty_like(h)
    squares = torch.empty(rows.shape[0] * triton.cdiv(n, min(t[0] for t in W4_GEMV_TILES)), dtype=torch.float32,
                          device=rows.device)  # (as many as the narrowest tile's programs)
    key = ("gemv add-norm", *words.shape, group_size, zero is not None, rows.shape[0], rows.dtype)
    run = functools.partial(_run_w4_gemv, add_norm=(residual.reshape(-1, n).contiguous(), norm_weight, weighted,
                                                    squares))
    tile = _tuned_tile(key, W4_GEMV_TILES, run, rows, words, scale, zero, group_size, h)
    run(rows, words, scale, zero, group_size, h, tile)
    parts = triton.cdiv(n, tile[0])
    shape = (*x.shape[:-1], n)
    return h.view(shape), weighted.view(shape), squares[:rows.shape[0] * parts].view(rows.shape[0], parts)


def fp8_qkv_rotary_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                          out_dtype: torch.dtype, heads: int, kv_heads: int, head_size: int, positions: torch.Tensor,
                          inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                          kv_scale: torch.Tensor | None) -> torch.Tensor | None:
    """FP8's fused QKV projection of e4m3 codes (xq [m, K] with x_scale [m, 1], m <= GEMV_MAX_ROWS; wq e4m3 with
    column scales w_scale) in out_dtype, followed by kiln.kernels.rotary.apply_rotary_and_write_cache on its q, k
    and v, in one launch, where the plain QKV GEMV runs the e4m3 word kernel (kiln.kernels.gemv.fp8_word_tile):
    its tile's word steps, half its outputs a program, each paired with the same dims of the head's other half.
    None otherwise (or where half a head is not whole programs): the caller projects, then rotates."""
    rows, x_scale = rows_view(xq), x_scale.reshape(-1).float().contiguous()
    tile = fp8_word_tile(rows, x_scale, wq, w_scale, out_dtype)
    if tile is None or head_size % 2 or (head_size // 2) % max(tile[1] // 2, 1):
        return None
    y = torch.empty(rows.shape[0], wq.shape[0], dtype=out_dtype, device=xq.device)
    run_fp8_qkv_rotary(rows, x_scale, wq, w_scale, y, tile,
                       (heads, kv_heads, head_size, positions, inv_freq, k_cache, v_cache, slots, kv_scale))
    return y.view(*xq.shape[:-1], y.shape[1])


def run_fp8_qkv_rotary(rows, x_scale, wq, w_scale, y: torch.Tensor, tile: tuple, rotary: tuple) -> None:
    """One launch of _fp8_qkv_rotary_kernel for the plain GEMV's word `tile`; `rotary` as _run_w4_qkv_rotary's."""
    heads, kv_heads, head_size, positions, inv_freq, k_cache, v_cache, slots, kv_scale = rotary
    _, block_n, block_kw, warps, by_bits = tile
    block_n = max(block_n // 2, 1)  # (and as many dims of the head's other half: the plain tile's bytes)
    programs = (heads + 2 * kv_heads) * (head_size // 2 // block_n)
    _fp8_qkv_rotary_kernel[(rows.shape[0], programs, 1)](
        rows, x_scale, wq.view(torch.int64), w_scale, y, positions, inv_freq, k_cache, v_cache, slots,
        kv_scale if kv_scale is not None else inv_freq, rows.stride(0), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), heads, kv_heads, K=rows.shape[1], HEAD=head_size,
        **cache_code_args(k_cache, kv_scale), BY_BITS=by_bits, BLOCK_N=block_n, BLOCK_KW=block_kw, num_warps=warps,
        **pdl_args(rows.device))


def _run_w4_qkv_rotary(rows, words, scale, zero, group_size: int, y: torch.Tensor, tile: tuple, rotary: tuple,
                       norm_in: tuple | None = None) -> None:
    """One launch of _w4_qkv_rotary_kernel with `tile`; `rotary` the heads and cache of w4a16_qkv_rotary_matmul,
    `norm_in` as _run_w4_gemv's."""
    heads, kv_heads, head_size, positions, inv_freq, k_cache, v_cache, slots, kv_scale = rotary
    block_n, block_kw, warps = tile
    programs = (heads + 2 * kv_heads) * (head_size // 2 // block_n)
    _w4_qkv_rotary_kernel[(rows.shape[0], programs, 1)](
        rows, words, scale, zero if zero is not None else scale, y, positions, inv_freq, k_cache, v_cache, slots,
        kv_scale if kv_scale is not None else inv_freq, **_pending_norm_args(norm_in, scale),
        stride_xm=rows.stride(0), kc_tok_stride=k_cache.stride(0), kc_head_stride=k_cache.stride(1),
        vc_tok_stride=v_cache.stride(0), vc_head_stride=v_cache.stride(1), q_heads=heads, kv_heads=kv_heads,
        K=rows.shape[1], GROUP=group_size, HAS_ZERO=zero is not None, HEAD=head_size,
        **cache_code_args(k_cache, kv_scale), BLOCK_N=block_n, BLOCK_KW=block_kw, num_warps=warps,
        **pdl_args(rows.device))


def _w4_gemv(rows: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
             group_size: int, y: torch.Tensor) -> None:
    """y = rows @ dequantize_int4(...)^T by _w4_gemv_kernel (codes read as int64 words), its tile picked per shape
    by timing the candidates as the GEMM's are."""
    key = ("gemv", *words.shape, group_size, zero is not None, rows.shape[0], rows.dtype)
    tile = _tuned_tile(key, W4_GEMV_TILES, _run_w4_gemv, rows, words, scale, zero, group_size, y)
    _run_w4_gemv(rows, words, scale, zero, group_size, y, tile)


def _run_w4_gemv(rows: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 group_size: int, y: torch.Tensor, tile: tuple, gated: bool = False, norm_in: tuple | None = None,
                 add_norm: tuple | None = None) -> None:
    """One int4 GEMV with `tile` = (BLOCK_N, BLOCK_KW, warps); programs of the same outputs and another row of x are
    adjacent in the launch order, so the second row reads the weights from L2. `gated`: y = silu(fc) * gate of
    the weights' two halves (`w4a16_silu_and_mul_matmul`). `norm_in` (squares, eps): rows are an RMSNorm's input
    times its weight, and `squares` [rows, parts] the sums that give its 1/rms (`_pending_norm_args`). `add_norm`
    (residual, norm weight, weighted, squares): y gets the output plus `residual`, `weighted` that times the norm's
    weight, and `squares` (flat, at least rows x programs) each program's sum of squares (w4a16_add_norm_matmul)."""
    block_n, block_kw, warps = tile
    n = y.shape[1]
    residual, norm_weight, weighted, squares_out = add_norm if add_norm is not None else (y, y, y, y)
    _w4_gemv_kernel[(rows.shape[0], triton.cdiv(n, block_n), 1)](
        rows, words, scale, zero if zero is not None else scale, y, **_pending_norm_args(norm_in, scale),
        res_ptr=residual, nw_ptr=norm_weight, g_ptr=weighted, sq_out_ptr=squares_out, N=n, K=rows.shape[1],
        stride_xm=rows.stride(0), GROUP=group_size, HAS_ZERO=zero is not None, EVEN_N=n % block_n == 0,
        BLOCK_N=block_n, BLOCK_KW=block_kw, GATED=gated, ADD_NORM=add_norm is not None, num_warps=warps,
        **pdl_args(rows.device))


def _pending_norm_args(norm_in: tuple | None, unread: torch.Tensor) -> dict:
    """The int4 GEMVs' arguments for x an RMSNorm's input times its weight (kiln.kernels.epilogue.pending_inv_rms):
    norm_in (squares [rows, parts] float32, eps), or None for x as it is (`unread` stands in for the pointer)."""
    if norm_in is None:
        return {"sq_in_ptr": unread, "parts_in": 1, "eps": 0.0, "NORM_PARTS": 0}
    squares, eps = norm_in
    return {"sq_in_ptr": squares, "parts_in": squares.shape[1], "eps": eps,
            "NORM_PARTS": triton.next_power_of_2(squares.shape[1])}


def gemv_takes(x: torch.Tensor, packed: torch.Tensor) -> bool:
    """Whether the int4 or int8 GEMV on words (and its epilogue variants) runs x [..., in] against these codes: 1-2
    rows, codes read as int64 words."""
    return x.numel() // x.shape[-1] <= GEMV_MAX_ROWS and _reads_as_words(packed)


def _reads_as_words(codes: torch.Tensor) -> bool:
    """Whether a GEMV can read the codes (int4 pairs or int8, a byte each) as int64 words: rows of whole words
    (in % 16 == 0 for int4, % 8 for int8), aligned."""
    return codes.is_contiguous() and codes.shape[1] % 8 == 0 and codes.data_ptr() % 8 == 0


def _w4_gemm(rows: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
             group_size: int, y: torch.Tensor) -> None:
    """y = rows @ dequantize_int4(...)^T by _w4_gemm_kernel, its tiles and split-K picked per shape."""
    key = (*packed.shape, group_size, zero is not None, rows_bucket(rows.shape[0]), rows.dtype)
    tile = _tuned_tile(key, _w4_gemm_tiles(rows_bucket(rows.shape[0])), _run_w4_gemm, rows, packed, scale, zero,
                       group_size, y)
    _run_w4_gemm(rows, packed, scale, zero, group_size, y, tile)


def _tuned_tile(key: tuple, tiles, run, rows, packed, scale, zero, group_size: int, y) -> tuple:
    """The tile `run` (the GEMV's or the GEMM's launcher) takes for `key`: the fastest of `tiles`, timed the first
    time the key is seen over weight copies, as a decode step runs them; the first tile while tuning is off or a
    CUDA graph captures (a capture cannot time)."""
    if key not in _PICKED and AUTOTUNE and not torch.cuda.is_current_stream_capturing():
        copies = _int4_weight_copies(packed, scale, zero)
        ms = candidate_ms(list(tiles), lambda t: [
            functools.partial(run, rows, *w, group_size, y, t) for w in copies])
        _PICKED[key] = _logged_pick(("int4", *key), ms)
    return _PICKED.get(key, tiles[0])


def _logged_pick(key: tuple, ms: dict) -> tuple | None:
    """The fastest of the timed candidates {tile: ms}, logged with the next two (what a run's output needs to say
    which kernel each shape took: tiles win or lose by a few percent between GPUs)."""
    ranked = sorted(ms, key=ms.get)
    named = {None: "the full-precision GEMV"}  # (the int8 GEMV's other kind)
    log.info("tuned %s: %s", " ".join(map(str, key)),
             "; ".join(f"{named.get(t, t)} {ms[t] * 1e3:.1f} us" for t in ranked[:3]))
    return ranked[0]


def _int4_weight_copies(packed, scale, zero) -> list[tuple]:
    """(packed, scale, zero) and clones of it, for timing (weight_copies)."""
    if zero is None:
        return [(p, s, None) for p, s in weight_copies(packed, scale)]
    return weight_copies(packed, scale, zero)


def _run_w4_gemm(rows: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 group_size: int, y: torch.Tensor, tile: tuple) -> None:
    """One int4 GEMM with `tile`, x handed over as the tile takes it (see X_AS_IS in _w4_gemm_kernel): the timed
    call of the tuner, so a tile that needs x's columns split by a copy first pays for that copy."""
    block_m, block_n, split, warps, stages, weights_left, x_as_is = tile
    m, n, kb, groups = rows.shape[0], packed.shape[0], packed.shape[1], scale.shape[1]  # kb bytes: x's column pairs
    if x_as_is:
        xe, xo = rows, rows
    else:
        xe, xo = rows.unflatten(1, (kb, 2)).permute(2, 0, 1).contiguous()  # [even columns], [odd columns]
    per_split = -(-groups // split)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    out = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=y.device)
    _w4_gemm_kernel[grid](xe, xo, packed, scale, zero if zero is not None else scale,  # (zero unread without it)
                          m, n, kb, groups, per_split, out, rows.stride(0), GROUP=group_size,
                          HAS_ZERO=zero is not None, EVEN_K=kb % (group_size // 2) == 0, SPLIT=split,
                          BLOCK_M=block_m, BLOCK_N=block_n, WEIGHTS_LEFT=weights_left, X_AS_IS=x_as_is,
                          num_warps=warps, num_stages=stages)
    if split > 1:
        sum_splits(out, y)


def _w4_gemm_tiles(bucket: int) -> list[tuple]:
    """Candidate (BLOCK_M, BLOCK_N, SPLIT, warps, stages, WEIGHTS_LEFT, X_AS_IS): one tile of rows covers the batch
    where it can, so the weights are unpacked once; the first is the untuned default."""
    block_m = min(max(bucket, 16), 64)
    tiles = [(block_m, *shape) for shape in _W4_GEMM_SHAPES]
    tiles += [(block_m, *shape[:-1], True) for shape in _W4_GEMM_SHAPES if shape[0] <= 128]
    if bucket >= 128:
        tiles += [(128, n, split, 8, 3, False, False) for n, split in ((128, 1), (128, 2), (64, 2), (128, 4))]
    return tiles


# The tile each int4 GEMV and GEMM key runs, chosen by timing the candidates the first time the key is seen; until
# then (tuning off, or a CUDA graph capturing: a capture cannot time, and its replays would keep whatever ran) the
# first candidate.
_PICKED = KernelChoices("int4_tile")  # kept on disk for the next start (kiln.kernels.choices)


def w8a16_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Triton version of `w8a16_matmul_ref`, same arguments and result (see the module docstring)."""
    rows, (n, k) = rows_view(x), q.shape
    if rows.shape[0] <= GEMV_MAX_ROWS:  # a GEMV, the per-channel scale after the sum
        return _w8_gemv(rows, q, scale).view(*x.shape[:-1], n)
    y = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    args = (rows, q, scale, y, rows.shape[0], n, k, rows.stride(0), rows_bucket(rows.shape[0]))
    grid = lambda meta: (triton.cdiv(rows.shape[0], meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _launch(_w8_gemm_kernel, grid, args)
    return y.view(*x.shape[:-1], n)


def w8a16_silu_and_mul_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """silu(fc) * gate of [fc | gate] = w8a16_matmul(x, q, scale) (the gated MLP's fc_gate weights [fc; gate]), in
    one launch: the int8 GEMV with the activation as its epilogue, as w4a16_silu_and_mul_matmul is for int4. None
    where that GEMV does not run (more than GEMV_MAX_ROWS rows, or codes not readable as words)."""
    if not gemv_takes(x, q) or q.shape[0] % 2:
        return None
    rows, words = rows_view(x), q.view(WORD_DTYPE)
    y = torch.empty(rows.shape[0], q.shape[0] // 2, dtype=rows.dtype, device=rows.device)
    run = functools.partial(_run_w8_gemv, gated=True)
    tile = _w8_tile(("gemv silu", *q.shape, rows.shape[0], rows.dtype, rows.device.index), W8_GEMV_TILES, run,
                    rows, words, scale, y)
    run(rows, words, scale, y, tile)
    return y.view(*x.shape[:-1], y.shape[1])


def w8a16_qkv_rotary_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, heads: int, kv_heads: int,
                            head_size: int, positions: torch.Tensor, inv_freq: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, slots: torch.Tensor,
                            kv_scale: torch.Tensor | None) -> torch.Tensor | None:
    """The fused QKV projection w8a16_matmul(x, q, scale) followed by apply_rotary_and_write_cache on its q, k and v,
    in one launch: the int8 GEMV with w4a16_qkv_rotary_matmul's epilogue, the same bits. None where the GEMV does
    not run (more than GEMV_MAX_ROWS rows, codes not readable as words, or no tile that divides half a head)."""
    tiles = [tile for tile in W8_GEMV_TILES if (head_size // 2) % tile[0] == 0]
    if not gemv_takes(x, q) or head_size % 2 or not tiles:
        return None
    rows, words = rows_view(x), q.view(WORD_DTYPE)
    y = torch.empty(rows.shape[0], q.shape[0], dtype=rows.dtype, device=rows.device)
    run = functools.partial(_run_w8_qkv_rotary, rotary=(heads, kv_heads, head_size, positions, inv_freq, k_cache,
                                                        v_cache, slots, kv_scale))
    # (timing a tile writes this step's keys and values to their slots, the same bits each time)
    tile = _w8_tile(("gemv rotary", *q.shape, rows.shape[0], rows.dtype, rows.device.index, head_size), tiles, run,
                    rows, words, scale, y)
    run(rows, words, scale, y, tile)
    return y.view(*x.shape[:-1], y.shape[1])


# The kernel each int8 GEMV key runs: a tile of _w8_gemv_kernel (or of its epilogue variants), or for the plain GEMV
# None, the full-precision GEMV with int8 weights (kiln.kernels.gemv), chosen by timing the candidates the first
# time the key is seen; until then the first candidate, W8_GEMV_TILES[0].
_W8_PICKED = KernelChoices("w8_gemv")


def _w8_gemv(rows: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """rows [m <= GEMV_MAX_ROWS, k] @ dequantize_int8(q, scale)^T, the scale after the float32 sum: by
    _w8_gemv_kernel where the codes read as int64 words, else (or where timing found it faster) by the
    full-precision GEMV."""
    if not _reads_as_words(q):
        return scaled_gemv(rows, None, q, scale, rows.dtype)
    y = torch.empty(rows.shape[0], q.shape[0], dtype=rows.dtype, device=rows.device)
    words = q.view(WORD_DTYPE)
    tile = _w8_tile(("gemv", *q.shape, rows.shape[0], rows.dtype, rows.device.index), [*W8_GEMV_TILES, None],
                    _run_w8_gemv, rows, words, scale, y)
    return _run_w8_gemv(rows, words, scale, y, tile)


def _w8_tile(key: tuple, candidates: list, run, rows, words, scale, y) -> tuple | None:
    """The candidate `run` (an int8 GEMV's launcher) takes for `key` (kind, N, K, rows, dtype, GPU, ...): the
    fastest, timed the first time the key is seen over weight copies, as a decode step runs them; the first while
    tuning is off or a CUDA graph captures (a capture cannot time)."""
    if key not in _W8_PICKED and AUTOTUNE and not torch.cuda.is_current_stream_capturing():
        ms = candidate_ms(list(candidates), lambda tile: [
            functools.partial(run, rows, w, s, y, tile) for w, s in weight_copies(words, scale)])
        _W8_PICKED[key] = _logged_pick((f"int8 {key[0]}", *key[1:4]), ms)
    return _W8_PICKED.get(key, candidates[0])


def _run_w8_gemv(rows: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, y: torch.Tensor,
                 tile: tuple | None, gated: bool = False) -> torch.Tensor:
    """One int8 GEMV into y by _w8_gemv_kernel with `tile` = (BLOCK_N, BLOCK_KW, warps), or (tile None) by the
    full-precision GEMV, which returns its own output. `gated`: y = silu(fc) * gate of the weights' two halves
    (`w8a16_silu_and_mul_matmul`)."""
    if tile is None:
        assert not gated, "the full-precision GEMV has no SiLU epilogue"
        return scaled_gemv(rows, None, words.view(torch.int8), scale, rows.dtype)
    block_n, block_kw, warps = tile
    n = y.shape[1]
    _w8_gemv_kernel[(rows.shape[0], triton.cdiv(n, block_n), 1)](
        rows, words, scale, y, n, rows.shape[1], rows.stride(0), EVEN_N=n % block_n == 0, BLOCK_N=block_n,
        BLOCK_KW=block_kw, GATED=gated, num_warps=warps, **pdl_args(rows.device))
    return y


def _run_w8_qkv_rotary(rows, words, scale, y: torch.Tensor, tile: tuple, rotary: tuple) -> None:
    """One launch of _w8_qkv_rotary_kernel with `tile`; `rotary` as _run_w4_qkv_rotary's."""
    heads, kv_heads, head_size, positions, inv_freq, k_cache, v_cache, slots, kv_scale = rotary
    block_n, block_kw, warps = tile
    programs = (heads + 2 * kv_heads) * (head_size // 2 // block_n)
    _w8_qkv_rotary_kernel[(rows.shape[0], programs, 1)](
        rows, words, scale, y, positions, inv_freq, k_cache, v_cache, slots,
        kv_scale if kv_scale is not None else inv_freq, rows.stride(0), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), heads, kv_heads, K=rows.shape[1], HEAD=head_size,
        **cache_code_args(k_cache, kv_scale), BLOCK_N=block_n, BLOCK_KW=block_kw, num_warps=warps,
        **pdl_args(rows.device))


def _launch(kernel, grid, args, **meta) -> None:
    """Run `kernel` through its autotuner, or with its first config when AUTOTUNE is off."""
    tuned, configs = _TUNED[kernel]
    if not AUTOTUNE:
        kernel[grid(configs[0].kwargs)](*args, **meta, **configs[0].kwargs)
    else:
        tuned[grid](*args, **meta)


if triton is not None:
    from kiln.kernels.words import SYMMETRIC_ZERO, gemv_program, w4_row_sums, w8_row_sums

    # (BLOCK_N, SPLIT, warps, stages, WEIGHTS_LEFT, X_AS_IS) of the int4 GEMM, BLOCK_M from the rows
    # (_w4_gemm_tiles, which adds the X_AS_IS twin of each tile up to 128 wide: wider ones spill registers).
    # Split-K for the shapes with few output tiles (4096 outputs are 32 tiles of 128 on a GPU of 132 SMs). The last
    # puts the weights on the MMA's left, unpacked in registers (see _w4_gemm_kernel): timed on an H200 (ninth
    # session, bench_quant_gemm), the left side won only Llama-3-8B's fc_gate at 64 rows (57.1 against 60.2 us),
    # with this tile; the other left tiles lost everywhere and were dropped (each candidate lengthens a first open).
    _W4_GEMM_SHAPES = tuple((*shape, False, False) for shape in (
        (64, 1, 4, 4), (128, 1, 4, 4), (128, 1, 8, 3), (256, 1, 8, 3), (64, 2, 4, 4), (128, 2, 4, 4),
        (64, 4, 4, 4), (128, 4, 4, 4), (128, 8, 4, 3), (256, 4, 8, 3), (32, 4, 4, 4), (64, 8, 4, 4))) + (
        (128, 1, 8, 3, True, False),)
    _W8_GEMM_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_KB": kb}, num_warps=w, num_stages=s)
                        for m, n, kb, w, s in ((16, 64, 64, 4, 4), (16, 32, 128, 4, 4), (32, 64, 64, 4, 4),
                                               (64, 64, 64, 4, 3), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3),
                                               (128, 128, 64, 8, 3), (64, 128, 64, 4, 4))]


    @triton.jit
    def _w4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, sq_in_ptr, parts_in, eps, res_ptr, nw_ptr, g_ptr,
                        sq_out_ptr, N, K: tl.constexpr, stride_xm, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                        USE_PDL: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                        GATED: tl.constexpr = False, NORM_PARTS: tl.constexpr = 0, ADD_NORM: tl.constexpr = False):
        """y [rows, N] = x @ W^T, BLOCK_N outputs a program (w4_row_sums). GATED: the weight rows are [fc; gate]
        (2N of them) and y is silu(fc) * gate: each program sums BLOCK_N fc rows and the gate rows N further on, and
        the activation is the epilogue (no fc_gate output, no second launch).
        An RMSNorm pending between two GEMVs (kiln.kernels.epilogue): NORM_PARTS > 0 says x is a norm's input times
        its weight and the sums take its 1/rms (pending_inv_rms over the parts_in sums of squares at sq_in_ptr, eps);
        ADD_NORM says y joins the residual stream (res_ptr) before the next norm (weight nw_ptr): y_ptr gets the
        stream, g_ptr the next GEMV's input, sq_out_ptr this program's sum of squares (add_residual_for_norm)."""
        allow_dependents(USE_PDL)
        G: tl.constexpr = (K + GROUP - 1) // GROUP
        m, n0, outs = gemv_program(N, BLOCK_N, EVEN_N)
        y, y_gate = w4_row_sums(x_ptr + m * stride_xm, w_ptr + n0.to(tl.int64) * (K // 16),
                                s_ptr + n0.to(tl.int64) * G, z_ptr + n0.to(tl.int64) * G, outs, tl.cast(N, tl.int64),
                                GATED, K, GROUP, HAS_ZERO, (K // 16) % BLOCK_KW == 0, BLOCK_N, BLOCK_KW, USE_PDL)
        if NORM_PARTS > 0:
            inv_rms = pending_inv_rms(sq_in_ptr, m, parts_in, K, eps, NORM_PARTS)
            y, y_gate = y * inv_rms, y_gate * inv_rms
        y = y.to(y_ptr.dtype.element_ty)  # as F.linear rounds its output
        if GATED:
            y = silu_times(y, y_gate.to(y_ptr.dtype.element_ty))
        out = n0 + tl.arange(0, BLOCK_N)
        if ADD_NORM:
            add_residual_for_norm(y, m, n0, N, res_ptr, nw_ptr, y_ptr, g_ptr, sq_out_ptr, BLOCK_N)
        else:
            tl.store(y_ptr + m * N + out, y, mask=out < N)

    @triton.jit
    def _w8_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K: tl.constexpr, stride_xm, USE_PDL: tl.constexpr,
                        EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                        GATED: tl.constexpr = False):
        """y [rows, N] = (x @ q^T) * s, BLOCK_N outputs a program: W8A16's GEMV with int8 codes q read as int64
        words of 8 (kiln.kernels.words.w8_row_sums: one AND and one FMA a weight, where the full-precision GEMV,
        kiln.kernels.gemv, converts each code apart). GATED: as _w4_gemv_kernel's, y = silu(fc) * gate of the
        weight rows [fc; gate], the gate rows N further on summed with the same x."""
        allow_dependents(USE_PDL)
        m, n0, outs = gemv_program(N, BLOCK_N, EVEN_N)
        y, y_gate = w8_row_sums(x_ptr + m * stride_xm, w_ptr + n0.to(tl.int64) * (K // 8), s_ptr + n0, outs,
                                tl.cast(N, tl.int64), GATED, K, (K // 8) % BLOCK_KW == 0, BLOCK_N, BLOCK_KW, USE_PDL)
        y = y.to(y_ptr.dtype.element_ty)  # as F.linear rounds its output
        if GATED:
            y = silu_times(y, y_gate.to(y_ptr.dtype.element_ty))
        out = n0 + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + m * N + out, y, mask=out < N)

    @triton.jit
    def _w8_qkv_rotary_kernel(x_ptr, w_ptr, s_ptr, y_ptr, pos_ptr, freq_ptr, kc_ptr, vc_ptr, slot_ptr, kvs_ptr,
                              stride_xm, kc_tok_stride, kc_head_stride, vc_tok_stride, vc_head_stride, q_heads,
                              kv_heads, K: tl.constexpr, HEAD: tl.constexpr, QUANT: tl.constexpr,
                              QMAX: tl.constexpr, USE_PDL: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_KW: tl.constexpr):
        """_w4_qkv_rotary_kernel for int8 codes with a scale per output (w8_row_sums), the same rotary epilogue."""
        allow_dependents(USE_PDL)
        m, head, dims, freq, n0 = _rotary_program(freq_ptr, HEAD, BLOCK_N)
        y1, y2 = w8_row_sums(x_ptr + m * stride_xm, w_ptr + n0 * (K // 8), s_ptr + n0, tl.arange(0, BLOCK_N),
                             HEAD // 2, True, K, (K // 8) % BLOCK_KW == 0, BLOCK_N, BLOCK_KW, USE_PDL)
        _rotary_epilogue(y1, y2, m, head, dims, freq, y_ptr, pos_ptr, kc_ptr, vc_ptr, slot_ptr, kvs_ptr,
                         kc_tok_stride, kc_head_stride, vc_tok_stride, vc_head_stride, q_heads, kv_heads, HEAD, QUANT,
                         QMAX)

    @triton.jit
    def _w4_qkv_rotary_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, pos_ptr, freq_ptr, kc_ptr, vc_ptr, slot_ptr, kvs_ptr,
                              sq_in_ptr, parts_in, eps, stride_xm, kc_tok_stride, kc_head_stride, vc_tok_stride,
                              vc_head_stride, q_heads, kv_heads, K: tl.constexpr, GROUP: tl.constexpr,
                              HAS_ZERO: tl.constexpr, HEAD: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
                              USE_PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                              NORM_PARTS: tl.constexpr = 0):
        """The fused QKV projection y [rows, (q_heads + 2 kv_heads) HEAD] with rotary as its epilogue, as
        kiln.kernels.rotary.apply_rotary_and_write_cache leaves it: q and k heads rotated (rotate-half: dim i pairs
        with i + HEAD / 2), and the keys and values written to their cache slot (as codes with a quantized cache).
        Program (row, p) sums dims i0 .. i0 + BLOCK_N of the first half of a head and the same dims of its second
        half (w4_row_sums, paired HEAD / 2 rows further on), so each rotation pair is in one program. NORM_PARTS as
        _w4_gemv_kernel's: x is an RMSNorm's input times its weight, the sums take its 1/rms."""
        allow_dependents(USE_PDL)
        G: tl.constexpr = (K + GROUP - 1) // GROUP
        m, head, dims, freq, n0 = _rotary_program(freq_ptr, HEAD, BLOCK_N)
        y1, y2 = w4_row_sums(x_ptr + m * stride_xm, w_ptr + n0 * (K // 16), s_ptr + n0 * G, z_ptr + n0 * G,
                             tl.arange(0, BLOCK_N), HEAD // 2, True, K, GROUP, HAS_ZERO, (K // 16) % BLOCK_KW == 0,
                             BLOCK_N, BLOCK_KW, USE_PDL)
        if NORM_PARTS > 0:
            inv_rms = pending_inv_rms(sq_in_ptr, m, parts_in, K, eps, NORM_PARTS)
            y1, y2 = y1 * inv_rms, y2 * inv_rms
        _rotary_epilogue(y1, y2, m, head, dims, freq, y_ptr, pos_ptr, kc_ptr, vc_ptr, slot_ptr, kvs_ptr,
                         kc_tok_stride, kc_head_stride, vc_tok_stride, vc_head_stride, q_heads, kv_heads, HEAD, QUANT,
                         QMAX)

    @triton.jit
    def _fp8_qkv_rotary_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, pos_ptr, freq_ptr, kc_ptr, vc_ptr, slot_ptr,
                               kvs_ptr, stride_xm, kc_tok_stride, kc_head_stride, vc_tok_stride, vc_head_stride,
                               q_heads, kv_heads, K: tl.constexpr, HEAD: tl.constexpr, QUANT: tl.constexpr,
                               QMAX: tl.constexpr, BY_BITS: tl.constexpr, USE_PDL: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
        """_w4_qkv_rotary_kernel for FP8's fused QKV projection: e4m3 weights times e4m3 codes of x (x's row scale
        at xs_ptr, the weights' column scales at ws_ptr), the codes read as int64 words
        (kiln.kernels.gemv.fp8_word_row_sums), then the same rotary epilogue."""
        allow_dependents(USE_PDL)
        m, head, dims, freq, n0 = _rotary_program(freq_ptr, HEAD, BLOCK_N)
        y1, y2 = fp8_word_row_sums(x_ptr + m * stride_xm, xs_ptr + m, w_ptr + n0 * (K // 8), ws_ptr + n0,
                                   tl.arange(0, BLOCK_N), HEAD // 2, True, K, BLOCK_KW, BY_BITS, USE_PDL)
        _rotary_epilogue(y1, y2, m, head, dims, freq, y_ptr, pos_ptr, kc_ptr, vc_ptr, slot_ptr, kvs_ptr,
                         kc_tok_stride, kc_head_stride, vc_tok_stride, vc_head_stride, q_heads, kv_heads, HEAD, QUANT,
                         QMAX)

    @triton.jit
    def _rotary_program(freq_ptr, HEAD: tl.constexpr, BLOCK_N: tl.constexpr):
        """(x's row m, the head, the dims i0 .. i0 + BLOCK_N of its first half, their rotary frequencies, the
        first output row n0) of a QKV GEMV's program (m, p) with the rotary epilogue."""
        HALF: tl.constexpr = HEAD // 2
        m = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1) // (HALF // BLOCK_N)
        i0 = tl.program_id(1) % (HALF // BLOCK_N) * BLOCK_N
        dims = i0 + tl.arange(0, BLOCK_N)
        freq = tl.load(freq_ptr + dims)  # a constant of the model: read before the wait
        return m, head, dims, freq, (head * HEAD + i0).to(tl.int64)

    @triton.jit
    def _rotary_epilogue(y1, y2, m, head, dims, freq, y_ptr, pos_ptr, kc_ptr, vc_ptr, slot_ptr, kvs_ptr,
                         kc_tok_stride, kc_head_stride, vc_tok_stride, vc_head_stride, q_heads, kv_heads,
                         HEAD: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr):
        """The QKV GEMVs' rotary epilogue, as kiln.kernels.rotary.apply_rotary_and_write_cache: y1, y2 (float32)
        are dims `dims` of a head's two halves, rounded to the output's dtype as F.linear rounds its output; q and
        k rotate (rotate-half), v does not; keys and values also go to their cache slot (as codes with a quantized
        cache)."""
        HALF: tl.constexpr = HEAD // 2
        y1, y2 = y1.to(y_ptr.dtype.element_ty), y2.to(y_ptr.dtype.element_ty)
        if head < q_heads + kv_heads:  # q and k rotate, v does not
            cos, sin = cos_sin(tl.load(pos_ptr + m).to(tl.float32) * freq)
            y1, y2 = rotate_pair(y1, y2, cos, sin)
        out = y_ptr + m * ((q_heads + 2 * kv_heads) * HEAD) + head * HEAD + dims
        tl.store(out, y1)
        tl.store(out + HALF, y2)
        if head >= q_heads:  # a key or a value: its cache slot too
            slot = tl.load(slot_ptr + m).to(tl.int64)
            if head < q_heads + kv_heads:
                scale = tl.load(kvs_ptr).to(tl.float32) if QUANT != 0 else 1.0
                cache = kc_ptr + slot * kc_tok_stride + (head - q_heads) * kc_head_stride + dims
            else:
                scale = tl.load(kvs_ptr + 1).to(tl.float32) if QUANT != 0 else 1.0
                cache = vc_ptr + slot * vc_tok_stride + (head - q_heads - kv_heads) * vc_head_stride + dims
            tl.store(cache, to_cache(y1, scale, QUANT, QMAX))
            tl.store(cache + HALF, to_cache(y2, scale, QUANT, QMAX))

    # Two 16-bit floats per register: bytes b0..b3 of the codes (one register, 4 elements of the tile) spread to
    # [b0, b1] and [b2, b3] (prmt), a nibble of each ORed into the mantissa of MAGIC (lop3) gives MAGIC + u, exact;
    # minus MAGIC + z is u - z, exact; times s is one rounding of an exact product, as the reference rounds
    # (u - z) s in float32 to its dtype: 16 instructions for 8 weights.
    # Operands: $0 $1 low nibbles, $2 $3 high nibbles (2 elements a register), $4 the 4 code bytes, $5 $6 the
    # scales, $7 $8 MAGIC + z. (PTX: prmt, lop3 with LUT 0xEA = (a & b) | c; bf16x2 arithmetic needs sm_90.)
    _NIBBLES_ASM = """{{
    .reg .b32 t0, t1, h0, h1;
    prmt.b32 t0, $4, 0, 0x4140;
    prmt.b32 t1, $4, 0, 0x4342;
    shr.b32 h0, t0, 4;
    shr.b32 h1, t1, 4;
    lop3.b32 t0, t0, 0x000F000F, {magic}, 0xEA;
    lop3.b32 t1, t1, 0x000F000F, {magic}, 0xEA;
    lop3.b32 h0, h0, 0x000F000F, {magic}, 0xEA;
    lop3.b32 h1, h1, 0x000F000F, {magic}, 0xEA;
    sub.rn.{t} t0, t0, $7;
    sub.rn.{t} t1, t1, $8;
    sub.rn.{t} h0, h0, $7;
    sub.rn.{t} h1, h1, $8;
    mul.rn.{t} $0, t0, $5;
    mul.rn.{t} $1, t1, $6;
    mul.rn.{t} $2, h0, $5;
    mul.rn.{t} $3, h1, $6;
    }}"""
    # MAGIC per dtype: 2^7 (bf16, 7 mantissa bits) and 2^10 (fp16), so MAGIC + u for u < 16 is exact.
    _BF16_NIBBLES = tl.constexpr(_NIBBLES_ASM.format(magic="0x43004300", t="bf16x2"))
    _F16_NIBBLES = tl.constexpr(_NIBBLES_ASM.format(magic="0x64006400", t="f16x2"))

    @triton.jit
    def _dequant_nibbles(w, s, z, dtype: tl.constexpr):
        """uint8 codes [k, n] (low nibble column 2j, high 2j+1), scales and zeros [1, n] in float32 -> the two
        nibble planes' weights (u - z) s in `dtype`, each [k, n]."""
        s16 = tl.broadcast_to(s.to(dtype), w.shape)
        if dtype == tl.bfloat16:
            zc = tl.broadcast_to((z + 128.0).to(dtype), w.shape)
            return tl.inline_asm_elementwise(_BF16_NIBBLES, "=r,=r,=r,=r,r,r,r,r,r", [w, s16, zc],
                                             dtype=(s16.dtype, s16.dtype), is_pure=True, pack=4)
        zc = tl.broadcast_to((z + 1024.0).to(dtype), w.shape)
        return tl.inline_asm_elementwise(_F16_NIBBLES, "=r,=r,=r,=r,r,r,r,r,r", [w, s16, zc],
                                         dtype=(s16.dtype, s16.dtype), is_pure=True, pack=4)

    @triton.jit
    def _w4_gemm_kernel(xe_ptr, xo_ptr, w_ptr, s_ptr, z_ptr, M, N, KB, G, per_split, out_ptr, stride_xm,
                        GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WEIGHTS_LEFT: tl.constexpr = False,
                        X_AS_IS: tl.constexpr = False):
        # One group per step. Its codes u become (u - z) s rounded once to x's dtype (_dequant_nibbles): the
        # reference's dequantized weights bit for bit, so one accumulator runs over the whole row. Low nibbles are
        # the even columns (xe), high nibbles the odd ones (xo), each [M, KB] with unit stride. X_AS_IS: xe_ptr is x
        # itself ([M, 2 KB], rows stride_xm apart), each group's columns loaded whole and split into their even and
        # odd halves in registers, instead of by a copy of x before the launch (one kernel and a round trip to memory
        # per GEMM: 2.1-3.6 us of each 64-row GEMM on an H200, bench_quant_gemm's tuned times against its sweep's).
        # Program (i, j, s) owns rows tile i, outputs tile j and groups [s per_split, (s + 1) per_split).
        # Rows and outputs past the end read the last one instead (their results are not stored), so with whole
        # groups (EVEN_K) no load needs a mask; pointers advance by a group per step.
        # WEIGHTS_LEFT computes y^T = W x^T: the unpacked weights are the MMA's left operand, which Hopper's wgmma
        # takes from registers, so they never go through shared memory (sm_90 machine code of the 64-row, group-128
        # tiles: no shared-memory store in the loop, against 18-33 with the weights on the right;
        # scripts/kernel_sass.py "w4 gemm"). x^T is then the right operand, read from shared memory as the weights were.
        HALF: tl.constexpr = GROUP // 2
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm_in, rn_in = tl.minimum(rm, M - 1), tl.minimum(rn, N - 1)
        g_start = tl.program_id(2) * per_split
        hb = tl.arange(0, HALF)
        if X_AS_IS:
            gb = tl.arange(0, GROUP)
            xe_p = xe_ptr + rm_in[:, None].to(tl.int64) * stride_xm + g_start * GROUP + gb[None, :]
            xo_p = xe_p
        else:
            x_off = rm_in[:, None].to(tl.int64) * KB + g_start * HALF + hb[None, :]
            xe_p, xo_p = xe_ptr + x_off, xo_ptr + x_off
        if WEIGHTS_LEFT:  # codes [BLOCK_N, HALF]: y^T = W x^T, the unpacked weights the MMA's register operand
            w_p = w_ptr + rn_in[:, None].to(tl.int64) * KB + g_start * HALF + hb[None, :]
            acc_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        else:  # codes [HALF, BLOCK_N]: y = x W^T
            w_p = w_ptr + rn_in[None, :].to(tl.int64) * KB + g_start * HALF + hb[:, None]
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        s_p, z_p = s_ptr + rn_in * G + g_start, z_ptr + rn_in * G + g_start
        for grp in range(g_start, tl.minimum(g_start + per_split, G)):
            if EVEN_K:
                w = tl.load(w_p)
                if X_AS_IS:
                    xe, xo = tl.split(tl.reshape(tl.load(xe_p), [BLOCK_M, HALF, 2]))
                else:
                    xe, xo = tl.load(xe_p), tl.load(xo_p)
            else:
                k_ok = hb + grp * HALF < KB
                w = tl.load(w_p, mask=k_ok[None, :] if WEIGHTS_LEFT else k_ok[:, None], other=0)
                if X_AS_IS:
                    x = tl.load(xe_p, mask=(gb + grp * GROUP < 2 * KB)[None, :], other=0.0)
                    xe, xo = tl.split(tl.reshape(x, [BLOCK_M, HALF, 2]))
                else:
                    xe = tl.load(xe_p, mask=k_ok[None, :], other=0.0)
                    xo = tl.load(xo_p, mask=k_ok[None, :], other=0.0)
            s = tl.load(s_p).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_p).to(tl.float32)
            else:
                z = tl.full([BLOCK_N], SYMMETRIC_ZERO, tl.float32)
            if WEIGHTS_LEFT:
                lo, hi = _dequant_nibbles(w, s[:, None], z[:, None], xe.dtype)
                acc_t = tl.dot(lo, tl.trans(xe), acc_t)
                acc_t = tl.dot(hi, tl.trans(xo), acc_t)
            else:
                lo, hi = _dequant_nibbles(w, s[None, :], z[None, :], xe.dtype)
                acc = tl.dot(xe, lo, acc)
                acc = tl.dot(xo, hi, acc)
            x_step: tl.constexpr = GROUP if X_AS_IS else HALF
            xe_p, xo_p, w_p, s_p, z_p = xe_p + x_step, xo_p + x_step, w_p + HALF, s_p + 1, z_p + 1
        if WEIGHTS_LEFT:
            acc = tl.trans(acc_t)
        m_ok, n_ok = rm < M, rn < N
        out = rm[:, None].to(tl.int64) * N + rn[None, :]
        if SPLIT == 1:
            tl.store(out_ptr + out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
        else:  # this split's partial sums, added up in a fixed order by gemv.sum_splits
            tl.store(out_ptr + tl.program_id(2).to(tl.int64) * M * N + out, acc, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _w4_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K: tl.constexpr, GROUP: tl.constexpr,
                           HAS_ZERO: tl.constexpr, SCALED: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_KB: tl.constexpr):
        # (u - z) * s in float32, one rounding to the output dtype: the reference's arithmetic exactly. Not SCALED:
        # u - z alone (integers of at most 15 in magnitude, exact in any float output, e4m3 included).
        HALF: tl.constexpr = GROUP // 2
        G: tl.constexpr = (K + GROUP - 1) // GROUP
        kb_total: tl.constexpr = K // 2
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        byte = tl.program_id(1) * BLOCK_KB + tl.arange(0, BLOCK_KB)
        ok = (rows < N)[:, None] & (byte < kb_total)[None, :]
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * kb_total + byte[None, :], mask=ok, other=0).to(tl.int32)
        sg = rows[:, None] * G + (byte // HALF)[None, :]
        if HAS_ZERO:
            z = tl.load(z_ptr + sg, mask=ok, other=0.0).to(tl.float32)
        else:
            z = SYMMETRIC_ZERO
        lo, hi = (w & 0xF).to(tl.float32) - z, (w >> 4).to(tl.float32) - z
        if SCALED:
            s = tl.load(s_ptr + sg, mask=ok, other=0.0).to(tl.float32)
            lo, hi = lo * s, hi * s
        vals = tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * BLOCK_KB))  # columns 2j, 2j + 1 side by side
        cols = tl.program_id(1) * 2 * BLOCK_KB + tl.arange(0, 2 * BLOCK_KB)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], vals.to(out_ptr.dtype.element_ty),
                 mask=(rows < N)[:, None] & (cols < K)[None, :])

    @triton.jit
    def _w8_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, M_BUCKET,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr):
        # int8 codes are exact in 16-bit floats (|q| <= 127), so the dot runs on them and the scale comes last.
        BLOCK_K: tl.constexpr = 2 * BLOCK_KB  # same byte-per-row tile as the int4 kernel, in int8 columns
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            ok = cols < K
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + cols[None, :],
                        mask=m_ok[:, None] & ok[None, :], other=0.0)
            w = tl.load(w_ptr + rn[None, :].to(tl.int64) * K + cols[:, None], mask=ok[:, None] & n_ok[None, :],
                        other=0)
            acc = tl.dot(x, w.to(x.dtype), acc)
        s = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        y = y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(y, (acc * s[None, :]).to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    _TUNED = {kernel: (triton.autotune(configs=configs, key=["N", "K", "M_BUCKET"], do_bench=quick_bench,
                                       cache_results=True)(kernel), configs)
              for kernel, configs in ((_w8_gemm_kernel, _W8_GEMM_CONFIGS),)}
