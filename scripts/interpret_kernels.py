"""Run the kernels that hold inline PTX under Triton's CPU interpreter, against their references, with the PTX
swapped for the same arithmetic in plain Triton (the interpreter cannot run PTX): the int4 GEMM with the weights on
either side of the MMA; decode attention over int8 and e4m3 caches, codes read one by one or as pairs, and its split
programs merging their parts themselves (FUSED_MERGE); the prefill attention kernels (the fresh prompts' TMA one
too) on each candidate tile of scripts/bench_prefill_attention.py, with the softmax rescaled at every step and
lazily; the e4m3 MMA GEMV, FP8_BLOCK_SCALES' group GEMM (and W4A8_AWQ's prompt matmul through it), SmoothQuant's
int8 GEMM (no PTX, but its tiles, masks and splits are only timed on a GPU), and the int4 GEMV on every tile and on
x of mixed magnitudes (kiln.kernels.words takes plain Triton for its dp2a and prmt under the interpreter), and
SmoothQuant's activation pass bit for bit; rotary with its cache write, one head a program and all in one, and the
int4 GEMV of a fused QKV with rotary as its epilogue (kiln.kernels.rotary takes Triton's cos, sin and products in
place of libdevice's under the interpreter); and the fc_gate GEMM with SiLU-and-mul as its epilogue on each
candidate tile (no PTX, but its grouped order, TMA edges and epilogue run only on Hopper). It checks the kernels'
indexing, masks and splits on a machine without a GPU; the PTX itself is checked by the GPU tests.

    pip install --no-deps --target /tmp/triton_site triton==3.6.0
    pip install --no-deps --target /tmp/np_site numpy==2.2.6   # the interpreter needs numpy < 2.3
    TRITON_INTERPRET=1 PYTHONPATH=/tmp/np_site:/tmp/triton_site:. python scripts/interpret_kernels.py [ONLY]

ONLY runs the checks whose function names contain it (fp8_group, int8, ...).

fp16 throughout: the interpreter's bfloat16 arithmetic is not torch's.
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

from kiln.kernels import gemv
from kiln.kernels import paged_attention as pa
from kiln.kernels import paged_attention_kernels as pk
from kiln.kernels import quant_gemm as qg
from kiln.kernels import rotary
from kiln.kernels.activation import silu_and_mul_ref
from kiln.kernels.input_quant import FP8_GROUPS, FP8_ROWS, FP8_STATIC, INT8_ROWS, InputQuant
from kiln.kernels.quant_gemm import w8a16_matmul_ref
from kiln.kernels.rmsnorm import rms_norm_ref
from kiln.quantization.fp8 import fp8_gemm_emulated, quantize_fp8_per_token, quantize_fp8_weight
from kiln.quantization.weight_only import dequantize_int4, quantize_int4_groups, quantize_int8_per_channel


@triton.jit
def _dequant_nibbles_plain(w, s, z, dtype: tl.constexpr):
    """qg._dequant_nibbles without PTX: (u - z) s of each nibble plane, rounded once."""
    w = w.to(tl.int32)
    return (((w & 0xF).to(tl.float32) - z) * s).to(dtype), (((w >> 4).to(tl.float32) - z) * s).to(dtype)


@triton.jit
def _e4m3_plain(b):
    """An e4m3 byte's value, from its sign, exponent and mantissa fields."""
    e, m = ((b >> 3) & 15).to(tl.float32), (b & 7).to(tl.float32)
    value = tl.where(e == 0, m / 8.0 * 0.015625, (1.0 + m / 8.0) * tl.exp2(e - 7.0))
    return tl.where((b >> 7) & 1 == 1, -value, value).to(tl.float16)


@triton.jit
def _int8_plain(b):
    return tl.where(b >= 128, b - 256, b).to(tl.float16)


@triton.jit
def _code_pairs_plain(w, INT8: tl.constexpr):
    """pk._code_pairs without PTX: the low byte of each word is the even column."""
    w = w.to(tl.int32)
    if INT8:
        return _int8_plain(w & 0xFF), _int8_plain((w >> 8) & 0xFF)
    return _e4m3_plain(w & 0xFF), _e4m3_plain((w >> 8) & 0xFF)


def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err, top = (got.float() - want.float()).abs().max().item(), want.float().abs().max().item()
    print(f"{name:<60} max err {err:.3g} (|ref| {top:.3g})", flush=True)
    if err > 2 ** -9 * top:  # fp16 output rounding, with room for the summation order
        raise SystemExit(f"{name}: differs from the reference")


def int4_gemm() -> None:
    for m, n, k, group, zero in ((5, 96, 256, 128, False), (37, 130, 384, 64, True), (3, 64, 200, 32, True)):
        x = torch.randn(m, k).half()
        packed, scale, z = quantize_int4_groups(torch.randn(n, k), group, zero, torch.float16)
        want = x.float() @ dequantize_int4(packed, scale, z, group, torch.float16).float().T
        for tile in ((16, 64, 1, 4, 2), (32, 64, 2, 4, 2)):
            for left in (False, True):
                for as_is in (False, True):
                    y = torch.empty(m, n, dtype=torch.float16)
                    qg._run_w4_gemm(x, packed, scale, z, group, y, (*tile, left, as_is))
                    check(f"w4 gemm m{m} n{n} k{k} g{group} zero={zero} tile {tile} left={left} x as is={as_is}",
                          y, want)


def int4_gemv() -> None:
    """Rows of whole words (in % 8 == 0); the last shape's rows are not a whole number of 512-word steps. The
    fractional case has zeros that are not whole numbers (GGUF's Q4_1 and Q4_K kept, kiln.quantization.gguf_import)."""
    for m, n, k, group, zero in ((1, 96, 256, 128, False), (2, 38, 1024, 64, True), (1, 22, 14336 // 4, 128, True),
                                 (2, 40, 576, 32, "fractional")):
        x = torch.randn(m, k).half()
        packed, scale, z = quantize_int4_groups(torch.randn(n, k), group, bool(zero), torch.float16)
        if zero == "fractional":
            z = (z.float() + torch.rand(z.shape) - 0.5).half()
        want = x.float() @ dequantize_int4(packed, scale, z, group, torch.float16).float().T
        for tile in qg.W4_GEMV_TILES:
            y = torch.empty(m, n, dtype=torch.float16)
            qg._run_w4_gemv(x, packed.view(qg.WORD_DTYPE), scale, z, group, y, tile)
            check(f"w4 gemv m{m} n{n} k{k} g{group} zero={zero} tile {tile}", y, want)
            if n % 2 == 0:  # the weights as [fc; gate] of a gated MLP, the activation in the epilogue
                gated = torch.empty(m, n // 2, dtype=torch.float16)
                qg._run_w4_gemv(x, packed.view(qg.WORD_DTYPE), scale, z, group, gated, tile, gated=True)
                check(f"w4 gemv silu m{m} n{n} k{k} g{group} zero={zero} tile {tile}", gated, silu_and_mul_ref(y))


def int4_gemv_magnitudes() -> None:
    """The int4 GEMV's integer dot products (kiln.kernels.words._word_int_sums) on x of large, small and mixed
    magnitudes and a row of zeros: each word's fixed point scaled on its own."""
    m, n, k = 4, 64, 1024
    packed, scale, z = quantize_int4_groups(torch.randn(n, k), 128, True, torch.float16)
    x = torch.randn(m, k)
    x[0] *= 200.0
    x[1] *= 1e-3
    x[2, ::16] *= 500.0  # one large column a word: the rest lose low bits to it
    x[3] = 0.0
    x = x.half()
    want = x.float() @ dequantize_int4(packed, scale, z, 128, torch.float16).float().T
    for tile in qg.W4_GEMV_TILES:
        y = torch.empty(m, n, dtype=torch.float16)
        qg._run_w4_gemv(x, packed.view(qg.WORD_DTYPE), scale, z, 128, y, tile)
        for row, name in enumerate(("x 200", "x 1e-3", "one large column a word", "zeros")):
            check(f"w4 gemv {name} tile {tile}", y[row], want[row])


def decode_attention() -> None:
    cases = (([40, 100, 7], 8, 2, 64, 32, None, 4), ([300, 1, 77], 16, 2, 128, 32, 64, 4),
             ([33, 9], 12, 12, 96, 8, None, 1),
             ([1100, 30], 4, 2, 64, 32, None, 4))  # lens, heads, kv heads, head size, page, window, SMs (the last:
    # a block table of PAIRS_LONG_CONTEXT keys or more, so the pairs kernel takes its long-context tile)
    for lens, heads, kv_heads, d, page, window, sms in cases:
        pa.num_sms = lambda index, sms=sms: sms  # the split count without a GPU to ask
        blocks = -(-max(lens) // page)
        tables = torch.randperm(len(lens) * blocks).int().view(len(lens), blocks)
        ctx, q = torch.tensor(lens, dtype=torch.int32), torch.randn(len(lens), heads, d).half()
        x = torch.randn(2, len(lens) * blocks, page, kv_heads, d) * 50
        for code in (torch.int8, torch.float8_e4m3fn):
            k, v = x.clamp(-127, 127).round().to(code) if code == torch.int8 else x.clamp(-448, 448).to(code)
            args = (q, k, v, tables, ctx, d ** -0.5, window, torch.tensor([0.02, 0.03]))
            want = pa.paged_decode_attention_ref(*args)
            for pairs in (False, True):
                pa.CODES_AS_PAIRS = pairs
                check(f"decode {str(code)[6:]} lens {lens} d{d} pairs={pairs}", pa.paged_decode_attention(*args), want)
            into = torch.zeros(len(lens) + 2, heads, d).half()  # a mixed step's output: the decode rows a view of it
            pa.paged_decode_attention(*args, out=into[1:-1])
            check(f"decode {str(code)[6:]} lens {lens} d{d} into a view", into[1:-1], want)
        fp8_attention_codes(q, k, v, tables, ctx, d, window, lens)
    pa.CODES_AS_PAIRS = False


@triton.jit
def _to_e4m3_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n).to(tl.float8e4nv), mask=i < n)


def interpreter_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x (float32) cast to e4m3 by the interpreter itself. Its cast is wrong where rounding carries into the
    exponent (Triton 3.6: 1.99 becomes 1.0, 31.4 becomes 16), so a kernel's codes are compared with this cast of
    the exact quotients: that checks the kernel's arithmetic; the bits against torch's cast are the GPU test's."""
    flat = x.float().contiguous().view(-1)
    y = torch.empty(flat.shape, dtype=torch.float8_e4m3fn)
    _to_e4m3_kernel[(triton.cdiv(flat.numel(), 1024),)](flat, y, flat.numel(), BLOCK=1024)
    return y.view(x.shape)


def interpreter_group_codes(x: torch.Tensor, group: int):
    """quantize_fp8_groups_ref of x [rows, K] with the codes cast by the interpreter (interpreter_e4m3): (codes,
    scales) that a kernel writing group-scaled Fp8Rows must equal bit for bit under the interpreter."""
    from kiln.kernels.fp8_quant import FP8_MAX, from_groups, quantize_fp8_groups_ref, to_groups

    scales = quantize_fp8_groups_ref(x, group).scale
    exact = from_groups(to_groups(x, group) / scales[..., None], x.shape[1])
    return interpreter_e4m3(exact.clamp(-FP8_MAX, FP8_MAX)), scales


def equal_group_codes(got, x: torch.Tensor, group: int) -> bool:
    """Whether Fp8Rows `got` holds x's group-scaled codes and scales (interpreter_group_codes)."""
    codes, scales = interpreter_group_codes(x, group)
    return torch.equal(got.q.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(got.scale, scales)


def fp8_attention_codes(q, k, v, tables, ctx, d, window, lens) -> None:
    """FP8's static scale as out_quant: where the merge kernel runs, it writes the codes of the 16-bit output over
    the scale (Fp8Rows), saturated ones included; unsplit, the 16-bit output itself."""
    from kiln.kernels.fp8_quant import FP8_MAX, Fp8Rows

    args = (q, k, v, tables, ctx, d ** -0.5, window, torch.tensor([0.02, 0.03]))
    plain = pa.paged_decode_attention(*args)
    for scale in (plain.float().abs().amax() / 400, plain.float().abs().amax() / 900):  # the second saturates
        scale = scale.half().reshape(1)
        got = pa.paged_decode_attention(*args, out_quant=InputQuant(FP8_STATIC, scale))
        if not isinstance(got, Fp8Rows):
            if not torch.equal(got, plain):
                raise SystemExit(f"decode fp8 codes lens {lens}: the unsplit output changed")
            continue
        want = interpreter_e4m3((plain.flatten(-2).float() / scale.float()).clamp(-FP8_MAX, FP8_MAX))
        same = (torch.equal(got.q.view(torch.uint8), want.view(torch.uint8))
                and torch.equal(got.scale, scale.float().expand(len(lens), 1)))
        print(f"{'decode fp8 codes lens ' + str(lens) + ' d' + str(d):<60} bit-equal {same}", flush=True)
        if not same:
            raise SystemExit(f"decode fp8 codes lens {lens}: not the quantized output")
    for group in (d, d // 2):  # an FP8_BLOCK_SCALES output projection: a scale per group of a head's values
        got = pa.paged_decode_attention(*args, out_quant=InputQuant(FP8_GROUPS, group=group))
        if not isinstance(got, Fp8Rows):
            if not torch.equal(got, plain):
                raise SystemExit(f"decode fp8 group codes lens {lens}: the unsplit output changed")
            continue
        same = equal_group_codes(got, plain.flatten(-2), group)
        print(f"{'decode fp8 group codes lens ' + str(lens) + ' d' + str(d) + ' g' + str(group):<60} bit-equal "
              f"{same}", flush=True)
        if not same:
            raise SystemExit(f"decode fp8 group codes lens {lens} group {group}: not the quantized output")


def fused_merge() -> None:
    """Decode's split programs merging their parts themselves (pa.FUSED_MERGE), over a 16-bit cache and over
    codes read as pairs, against the references; the counts must be back at zero after each call."""
    pa.num_sms = lambda index: 16  # enough programs per SM wanted that every sequence splits
    pairs, pa.FUSED_MERGE = pa.CODES_AS_PAIRS, True
    for lens, heads, kv_heads, d, window, code in (([300, 70, 129], 8, 2, 64, None, None),
                                                   ([200, 5], 4, 1, 128, 96, torch.int8)):
        page, blocks = 16, -(-max(lens) // 16)
        tables = torch.randperm(len(lens) * blocks).int().view(len(lens), blocks)
        ctx, q = torch.tensor(lens, dtype=torch.int32), torch.randn(len(lens), heads, d).half()
        x = torch.randn(2, len(lens) * blocks, page, kv_heads, d)
        k, v = (x * 40).clamp(-127, 127).round().to(code) if code else x.half()
        scale = torch.tensor([0.02, 0.03]) if code else None
        args = (q, k, v, tables, ctx, d ** -0.5, window, scale)
        assert pa._num_splits(len(lens) * kv_heads, blocks * page, pa.DECODE_CONFIG["BLOCK_N"], q.device) > 1
        pa.CODES_AS_PAIRS = code is not None
        check(f"decode fused merge lens {lens} d{d} {code or 'fp16'}", pa.paged_decode_attention(*args),
              pa.paged_decode_attention_ref(*args))
        if pa._SPLIT_COUNTS[q.device].any():
            raise SystemExit("fused merge: counts left nonzero")
    pa.FUSED_MERGE, pa.CODES_AS_PAIRS = False, pairs


def prefill_attention() -> None:
    """Fresh prompts and continuing chunks on each tile of scripts/bench_prefill_attention.py's candidates (their
    masks and diagonal tiles differ by BLOCK_M and BLOCK_N), against the references."""
    from bench_prefill_attention import CANDIDATES, TMA_CANDIDATES

    pa.num_sms = lambda index: 4  # the split count without a GPU to ask
    heads, kv_heads, d, page = 4, 2, 128, 32
    lens, chunks = [100, 37, 150], [(40, 70), (200, 5), (0, 33)]
    q = torch.randn(sum(lens), heads, d).half()
    k, v = torch.randn(2, sum(lens), kv_heads, d).half()
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    fresh = (q, k, v, cu, max(lens), d ** -0.5)
    blocks = max(-(-(c + n) // page) for c, n in chunks)
    caches = torch.randn(2, len(chunks) * blocks, page, kv_heads, d).half()
    tables = torch.randperm(len(chunks) * blocks).int().view(len(chunks), blocks)
    new = [n for _, n in chunks]
    continuing = (torch.randn(sum(new), heads, d).half(), *caches, tables,
                  torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32),
                  torch.tensor([c for c, _ in chunks], dtype=torch.int32), d ** -0.5, None, None, max(new))
    # keys that grow along each prompt: row maxima keep rising past the first tiles, so the lazy rescaling
    # (_lazy_softmax_step) rescales mid-prompt as well as skipping
    rising = (q, k * torch.linspace(0.05, 4, k.shape[0])[:, None, None].half(), v, cu, max(lens), d ** -0.5)
    current, windowed = (pa.PREFILL_CONFIG, pa.PAGED_PREFILL_CONFIG, pa.PREFILL_TMA_CONFIG), (*fresh, 40)
    for lazy in (False, True):  # the softmax rescaled at every step, and lazily (PREFILL_LAZY_RESCALE)
        pa.PREFILL_LAZY_RESCALE = lazy
        pa.PREFILL_TMA_CONFIG = None  # the plain kernels first
        for config in CANDIDATES:
            pa.PREFILL_CONFIG = pa.PAGED_PREFILL_CONFIG = config
            tile = f"tile {tuple(config.values())} lazy={lazy}"
            check(f"prefill fresh rising keys {tile}", pa.varlen_prefill_attention(*rising),
                  pa.varlen_prefill_attention_ref(*rising))
            check(f"prefill fresh {tile}", pa.varlen_prefill_attention(*fresh), pa.varlen_prefill_attention_ref(*fresh))
            check(f"prefill continuing {tile}", pa.paged_prefill_attention(*continuing),
                  pa.paged_prefill_attention_ref(*continuing))
        pa.PREFILL_CONFIG, pa.PAGED_PREFILL_CONFIG = current[:2]
        for config in TMA_CANDIDATES:  # the fresh prompts' TMA kernel: tiles loaded past a sequence's end, windows
            pa.PREFILL_TMA_CONFIG = config
            tile = f"tile {tuple(config.values())} lazy={lazy}"
            check(f"prefill fresh TMA {tile}", pa.varlen_prefill_attention(*fresh),
                  pa.varlen_prefill_attention_ref(*fresh))
            check(f"prefill fresh TMA {tile} window 40", pa.varlen_prefill_attention(*windowed),
                  pa.varlen_prefill_attention_ref(*windowed))
            check(f"prefill fresh TMA rising keys {tile}", pa.varlen_prefill_attention(*rising),
                  pa.varlen_prefill_attention_ref(*rising))
        pa.PREFILL_TMA_CONFIG = current[2]
    pa.PREFILL_LAZY_RESCALE = False
    prefill_codes(fresh, TMA_CANDIDATES)


def prefill_codes(fresh: tuple, tma_tiles) -> None:
    """Fresh prompts over a quantized cache's codes (as kiln.runtime.paged_batch reads them back from their
    slots), by the plain kernel, and by the TMA kernel on each of its tiles over the codes and over them widened
    (KILN_PREFILL_CODES). fp16 queries only: Triton 3.6's interpreter gets bf16 wrong (the plain kernel, checked on
    GPUs, was off by 3e7 here), so a bf16 query's fp16 matmuls over e4m3 codes (CODES_FP16) are left to the GPU
    test."""
    q, k, v, cu, max_len, scale = fresh
    kv_scale = torch.tensor([0.02, 0.03])
    current = pa.PREFILL_TMA_CONFIG
    for code in (torch.int8, torch.float8_e4m3fn):
        codes = [(x.float() * 50).clamp(-127, 127).round().to(code) if code == torch.int8
                 else (x.float() * 50).clamp(-448, 448).to(code) for x in (k, v)]
        args = (q, *codes, cu, max_len, scale, None, kv_scale)
        want = pa.varlen_prefill_attention_ref(*args)
        for setting in pa.PREFILL_CODES_SETTINGS:
            os.environ["KILN_PREFILL_CODES"] = setting
            for config in tma_tiles if setting != "plain" else [current]:
                pa.PREFILL_TMA_CONFIG = config
                check(f"prefill fresh {str(code)[6:]} codes, {setting} {tuple(config.values())}",
                      pa.varlen_prefill_attention(*args), want)
    os.environ.pop("KILN_PREFILL_CODES")
    pa.PREFILL_TMA_CONFIG = current


def fp8_dot_gemv() -> None:
    """Codes of x given (the interpreter's own e4m3 rounding is not the GPU's, so not x quantized by the kernel)."""
    for rows, n, k in ((1, 130, 600), (2, 70, 512), (2, 200, 1000)):
        wq, ws = quantize_fp8_weight(torch.randn(n, k), torch.float16, per_channel=True)
        xq, xs = quantize_fp8_per_token(torch.randn(rows, k).half())
        want = fp8_gemm_emulated(xq, xs, wq, ws, torch.float16)
        for tile in gemv.FP8_DOT_TILES:
            y = torch.empty(rows, n, dtype=torch.float16)
            gemv._run_gemv((xq, wq, y, xs.reshape(-1).float().contiguous(), ws.float(), False), tile)
            check(f"fp8 dot gemv {rows}x{n}x{k} tile {tile}", y, want)


def fp8_word_gemv() -> None:
    """The e4m3 GEMV on int64 words, its codes made floats by bit operations (the hardware conversion is inline
    PTX, which the interpreter cannot run: the GPU test checks both give the same bits); outputs and input dims
    that are not whole tiles, codes of every byte value but NaN (subnormals and negatives among them)."""
    g = torch.Generator().manual_seed(3)
    for rows, n, k in ((1, 36, 520), (2, 64, 1024), (2, 40, 256)):
        wq, xq = (_random_e4m3_codes(shape, g) for shape in ((n, k), (rows, k)))
        xs, ws = torch.rand(rows, generator=g) + 0.5, torch.rand(n, generator=g) * 1e-2
        want = fp8_gemm_emulated(xq, xs[:, None], wq, ws, torch.float32)
        for tile in _word_tiles_by_bits():
            y = torch.empty(rows, n, dtype=torch.float32)
            gemv._run_gemv((xq, wq, y, xs, ws, False), tile)
            check(f"fp8 word gemv {rows}x{n}x{k} tile {tile}", y, want)


def fp8_word_gemv_silu() -> None:
    """The word GEMV's gated epilogue (the FP8 fc_gate with SiLU-and-mul and the down projection's static codes):
    its codes and scales equal those of the plain word GEMV on the same tile (the same sums, bit for bit), then
    silu_and_mul_ref and the static quantization (as the interpreter casts: interpreter_e4m3). fp16 (the
    interpreter's bf16 is wrong); some products saturate."""
    from kiln.kernels.fp8_quant import FP8_MAX

    g = torch.Generator().manual_seed(4)
    for rows, inter, k in ((1, 36, 520), (2, 64, 1024)):
        wq, xq = (_random_e4m3_codes(shape, g) for shape in ((2 * inter, k), (rows, k)))
        xs, ws = torch.rand(rows, generator=g) + 0.5, torch.rand(2 * inter, generator=g) * 1e-4
        out_scale = torch.tensor([0.02]).half()
        for tile in _word_tiles_by_bits():
            plain = torch.empty(rows, 2 * inter, dtype=torch.float16)
            gemv._run_gemv((xq, wq, plain, xs, ws, False), tile)
            got = gemv.run_fp8_silu_and_mul(xq, xs, wq, ws, out_scale, torch.float16, tile)
            want = interpreter_e4m3((silu_and_mul_ref(plain).float() / out_scale.float()).clamp(-FP8_MAX, FP8_MAX))
            label = f"fp8 word gemv silu {rows}x{inter}x{k} tile {tile}"
            if not (torch.equal(got.q.view(torch.uint8), want.view(torch.uint8))
                    and torch.equal(got.scale, out_scale.float().expand(rows, 1))):
                raise SystemExit(f"{label}: codes or scales differ from the reference")
            print(f"{label:<60} codes and scales equal", flush=True)


def _word_tiles_by_bits() -> list:
    """Each BLOCK_N of the e4m3 word tiles, converting by bit operations (the hardware's conversion is inline PTX),
    in steps of 32 words so that short rows take several."""
    return [("words", n, 32, 4, True) for n in sorted({tile[1] for tile in gemv.FP8_WORD_TILES})]


def _random_e4m3_codes(shape, g) -> torch.Tensor:
    b = torch.randint(0, 256, shape, generator=g, dtype=torch.int32)
    return torch.where((b & 0x7F) == 0x7F, b - 1, b).to(torch.uint8).view(torch.float8_e4m3fn)  # (no NaN)


def fp8_group_gemm() -> None:
    """FP8_BLOCK_SCALES' GEMM on every tile: groups of 32-128 inputs, a short last group (576 = 4.5 x 128), rows and
    outputs that no tile divides. Codes of x from the reference (the interpreter rounds some e4m3 values wrong), whose
    group scales the kernel's pass must match."""
    from kiln.kernels import fp8_group_gemm as gg
    from kiln.kernels.fp8_quant import quantize_fp8_groups, quantize_fp8_groups_ref
    from kiln.quantization.fp8_block import quantize_fp8_groups_weight

    for m, n, k, group in ((1, 130, 576, 128), (3, 70, 576, 64), (17, 64, 96, 32), (40, 200, 512, 128)):
        x = torch.randn(m, k).half() * 3
        xq, xs = quantize_fp8_groups_ref(x, group)
        check(f"fp8 group scales {m}x{k} group {group}", quantize_fp8_groups(x, group).scale, xs)
        wq, ws = quantize_fp8_groups_weight(torch.randn(n, k), group, torch.float16)
        want = gg.fp8_group_gemm_ref(xq, xs, wq, ws, group, torch.float16)
        for order, scales in (("row-major", ws), ("column-major", ws.t().contiguous().t())):  # (the engine's)
            for config in gg._CONFIGS:
                y = torch.empty(m, n, dtype=torch.float16)
                grid = (triton.cdiv(m, config.kwargs["BLOCK_M"]), triton.cdiv(n, config.kwargs["BLOCK_N"]))
                gg._fp8_group_gemm_kernel[grid](xq, xs, wq, scales, y, m, n, k, xq.stride(0), *xs.stride(),
                                                *scales.stride(), gg.rows_bucket(m), GROUP=group, **config.kwargs)
                check(f"fp8 group gemm {m}x{n}x{k} group {group} {order} scales {config.kwargs}", y, want)
        if m <= gg.GEMV_ROWS:  # the weights-left kernel, unsplit and split over the input dim
            for parts in (1, 3):
                got = gg.fp8_group_gemm(xq, xs, wq, ws.t().contiguous().t(), group, torch.float16, gemv_parts=parts)
                check(f"fp8 group gemv {m}x{n}x{k} group {group} in {parts} parts", got, want)


def w4a8_prefill() -> None:
    """W4A8_AWQ's prompt-sized matmul: the int4 codes less their zero point written as e4m3 (exactly), then the FP8
    group GEMM with the int4 group scales and x's static scale; symmetric and with zero points, a short last group."""
    for m, n, k, group, zero in ((256, 96, 256, 128, False), (260, 70, 576, 128, True), (256, 40, 192, 32, True)):
        packed, scale, zeros = quantize_int4_groups(torch.randn(n, k), group, zero, torch.float16)
        codes = qg.w4_centered_codes(packed, zeros, group)
        want_codes = dequantize_int4(packed, torch.ones_like(scale), zeros, group, torch.float32)
        if not torch.equal(codes.float(), want_codes):
            raise SystemExit(f"w4 centered codes {n}x{k} zero={zero}: differ from the reference")
        x_scale = torch.tensor([0.0123])
        xq = quantize_fp8_per_token(torch.randn(m, k).half())[0]  # (any e4m3 codes: the static scale is given)
        want = ((xq.float() @ dequantize_int4(packed, scale, zeros, group, torch.float32).T) * x_scale).half()
        check(f"w4a8 prefill {m}x{n}x{k} group {group} zero={zero}",
              qg.w4a8_matmul(xq, x_scale, packed, scale, zeros, group, torch.float16), want)


def int8_gemv() -> None:
    """W8A16's GEMV on int64 words of codes (subnormal floats, like the int4 GEMV's), every tile; N and K that no
    tile divides; where N is even, the weights as [fc; gate] with SiLU-and-mul as the epilogue."""
    for rows, n, k in ((1, 130, 600), (2, 70, 512), (2, 33, 4104)):
        x, (q, scale) = torch.randn(rows, k).half(), quantize_int8_per_channel(torch.randn(n, k), torch.float16)
        q[:, ::7] = -128  # imported codes (compressed-tensors) reach -128, kiln's stop at -127
        want = w8a16_matmul_ref(x, q, scale)
        for tile in qg.W8_GEMV_TILES:
            y = torch.empty(rows, n, dtype=torch.float16)
            got = qg._run_w8_gemv(x, q.view(qg.WORD_DTYPE), scale, y, tile)
            check(f"int8 gemv {rows}x{n}x{k} tile {tile}", got, want)
            if n % 2 == 0:
                gated = torch.empty(rows, n // 2, dtype=torch.float16)
                qg._run_w8_gemv(x, q.view(qg.WORD_DTYPE), scale, gated, tile, gated=True)
                check(f"int8 gemv silu {rows}x{n}x{k} tile {tile}", gated, silu_and_mul_ref(got))


def int8_gemm_tiles() -> None:
    """SmoothQuant's activation pass (with and without the prequant scale) bit for bit, its int8 GEMM with the
    scales in the epilogue on every candidate tile (rows and outputs that no tile divides, K that no BLOCK_K does),
    and decode's GEMV on the int8 codes."""
    from kiln.kernels import int8_gemm as ig

    for m, n, k in ((3, 70, 200), (17, 130, 576), (40, 200, 512)):
        x = torch.randn(m, k).half() * torch.linspace(0.1, 4, k).half()
        x[0] = 0
        x[0, :8] = torch.tensor([127, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -126.5])  # scale 1: ties, to even
        prequant = (torch.rand(k) + 0.5).half()
        for p in (None, prequant):
            got, want = ig.quantize_int8_rows(x, p), ig.quantize_int8_rows_ref(x, p)
            if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                raise SystemExit(f"int8 rows {m}x{k} prequant={p is not None}: differ from the reference")
            print(f"int8 rows {m}x{k} prequant={p is not None}: codes and scales equal", flush=True)
        xq, xs = want
        wq, ws = quantize_int8_per_channel(torch.randn(n, k), torch.float16)
        wq[:, ::7] = -128
        ref = ig.int8_gemm_ref(xq, xs, wq, ws, torch.float16)
        for tile in ig._tiles(gemv.rows_bucket(m)) + ig._tiles(128)[-3:]:
            y = torch.empty(m, n, dtype=torch.float16)
            check(f"int8 gemm {m}x{n}x{k} tile {tile}", ig._run(xq, xs.reshape(m), wq, ws, y, tile), ref)
        for config in gemv._CONFIGS[:2]:  # decode's 2 rows by the GEMV on the codes (the interpreter cannot tune it)
            y = torch.empty(2, n, dtype=torch.float16)
            gemv._gemv_kernel.fn[gemv.gemv_grid(2, n, config.kwargs["BLOCK_N"])](
                xq, wq, y, xs.reshape(-1)[:2].contiguous(), ws, n, k, xq.stride(0), wq.stride(0), 2, HAS_X_SCALE=True,
                HAS_W_SCALE=True, QUANTIZE_X=False, USE_PDL=False, **config.kwargs)
            check(f"int8 gemv 2x{n}x{k} {config.kwargs}", y, ref[:2])


def rms_norm_cases(sizes, out_quant: InputQuant):
    """For each (rows, hidden), with and without the residual add: (label, the RMSNorm kernel's output quantized
    as out_quant, the reference's 16-bit norm), the residual sums checked on the way."""
    from kiln.kernels.rmsnorm import rms_norm, rms_norm_ref

    for rows, hidden in sizes:
        x, res = torch.randn(rows, hidden).half() * 3, torch.randn(rows, hidden).half()
        weight = (torch.rand(hidden) + 0.5).half()
        for residual in (None, res):
            got = rms_norm(x, weight, 1e-5, residual, out_quant)
            normed = rms_norm_ref(x, weight, 1e-5, residual)
            if residual is not None:
                (got, got_sum), (normed, want_sum) = got, normed
                check(f"rms_norm {rows}x{hidden} residual sum", got_sum, want_sum)
            yield f"{rows}x{hidden} residual={residual is not None}", got, normed


def rms_norm_int8_rows() -> None:
    """The RMSNorm writing SmoothQuant's int8 input (with and without the residual add): codes and row scales bit
    for bit those of the norm's 16-bit output put through quantize_int8_rows_ref; hidden sizes no power of two."""
    from kiln.kernels import int8_gemm as ig

    for label, got, normed in rms_norm_cases(((3, 576), (5, 200)), InputQuant(INT8_ROWS)):
        want = ig.quantize_int8_rows_ref(normed)
        if not (torch.equal(got.q, want[0]) and torch.equal(got.scale, want[1])):
            raise SystemExit(f"rms_norm int8 rows {label}: differ from the reference")
        print(f"rms_norm int8 rows {label}: codes and scales equal", flush=True)


def silu_and_mul_plain() -> None:
    """The 16-bit product alone (no out_quant): the engine's activation for every batch the int4 or FP8 epilogues do
    not take. (Session 34 found it multiplying by an unread placeholder on the GPU: the quantized checks below
    compare against the torch product, so only this one reads the plain kernel.)"""
    from kiln.kernels.activation import silu_and_mul, silu_and_mul_ref

    for rows, inter in ((1, 1500), (5, 576)):
        x = torch.randn(rows, 2 * inter).half() * 4
        check(f"silu_and_mul plain {rows}x{inter}", silu_and_mul(x), silu_and_mul_ref(x))


def silu_and_mul_int8_rows() -> None:
    """SiLU-and-mul writing SmoothQuant's int8 input of mlp.proj, its prequant scale multiplied in: codes and row
    scales bit for bit those of the 16-bit product put through quantize_int8_rows_ref with that scale."""
    from kiln.kernels import int8_gemm as ig
    from kiln.kernels.activation import silu_and_mul, silu_and_mul_ref

    for rows, inter in ((3, 576), (4, 1500)):
        x, prequant = torch.randn(rows, 2 * inter).half() * 2, (torch.rand(inter) + 0.5).half()
        got = silu_and_mul(x, InputQuant(INT8_ROWS, prequant=prequant))
        want = ig.quantize_int8_rows_ref(silu_and_mul_ref(x), prequant)
        if not (torch.equal(got.q, want[0]) and torch.equal(got.scale, want[1])):
            raise SystemExit(f"silu_and_mul int8 rows {rows}x{inter}: differ from the reference")
        print(f"silu_and_mul int8 rows {rows}x{inter}: codes and scales equal", flush=True)


def fp8_groups_written_by_norm_and_activation() -> None:
    """The RMSNorm (with and without the residual add) and SiLU-and-mul writing FP8_BLOCK_SCALES' input: codes and
    group scales bit for bit those of the 16-bit output put through quantize_fp8_groups_ref (the codes as the
    interpreter casts: interpreter_group_codes). Sizes with a short last group."""
    from kiln.kernels.activation import silu_and_mul, silu_and_mul_ref

    def compare(label, got, x, group):
        if not equal_group_codes(got, x, group):
            raise SystemExit(f"{label}: codes or scales differ from the reference")
        print(f"{label:<60} codes and scales equal", flush=True)

    for size, group in (((3, 576), 128), ((5, 200), 64)):
        for label, got, normed in rms_norm_cases([size], InputQuant(FP8_GROUPS, group=group)):
            compare(f"rms_norm fp8 groups {label} g{group}", got, normed, group)
    for rows, inter, group in ((3, 576, 128), (4, 1500, 32)):
        x = torch.randn(rows, 2 * inter).half() * 2
        got = silu_and_mul(x, InputQuant(FP8_GROUPS, group=group))
        compare(f"silu_and_mul fp8 groups {rows}x{inter} g{group}", got, silu_and_mul_ref(x), group)


def fp8_rows_written_by_norm_and_activation() -> None:
    """The RMSNorm (with and without the residual add) and SiLU-and-mul writing FP8's input over its static scale
    (some values saturate; SiLU-and-mul with W4A8_AWQ's prequant scale too) and FP8_PER_CHANNEL_PER_TOKEN's with a
    scale per token: scales bit for bit the torch reference's (InputQuant.quantize), codes those of the 16-bit
    values over them (as the interpreter casts: interpreter_e4m3). Sizes no power of two."""
    from kiln.kernels.activation import silu_and_mul
    from kiln.kernels.fp8_quant import FP8_MAX

    def compare(label, got, x, spec):
        scale = spec.quantize(x).scale
        want = interpreter_e4m3((x.float() / scale).clamp(-FP8_MAX, FP8_MAX))
        if not (torch.equal(got.q.view(torch.uint8), want.view(torch.uint8)) and torch.equal(got.scale, scale)):
            raise SystemExit(f"{label}: codes or scales differ from the reference")
        print(f"{label:<60} codes and scales equal", flush=True)

    for spec in (InputQuant(FP8_STATIC, torch.tensor([0.01]).half()), InputQuant(FP8_ROWS)):  # static: past 4.48
        for label, got, normed in rms_norm_cases([(3, 576)], spec):
            compare(f"rms_norm {spec.kind} {label}", got, normed, spec)
        x = torch.randn(4, 2 * 1500).half() * 4
        compare(f"silu_and_mul {spec.kind} 4x1500", silu_and_mul(x, spec), silu_and_mul_ref(x), spec)
    # W4A8_AWQ's mlp.proj: the product times AWQ's prequant scale (rounded to the dtype), then static codes
    spec = InputQuant(FP8_STATIC, torch.tensor([0.01]).half(), prequant=(torch.rand(1500) + 0.5).half())
    x = torch.randn(4, 2 * 1500).half() * 4
    compare("silu_and_mul fp8_static prequant 4x1500", silu_and_mul(x, spec), spec.premultiplied(silu_and_mul_ref(x)),
            spec)


def rotary_with_cache_write() -> None:
    """One head a program (decode's few tokens) and every head in one (more tokens), fused QKV views."""
    for tokens, heads, kv_heads, d in ((1, 32, 8, 128), (3, 12, 4, 64), (17, 12, 4, 64)):
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d).half()
        q, k, v = (t.view(tokens, -1, d) for t in qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1))
        caches, slots = torch.zeros(2, 4 * tokens, kv_heads, d).half(), torch.randperm(4 * tokens)[:tokens]
        positions, freqs = torch.randint(0, 8192, (tokens,)), 500000.0 ** -(torch.arange(0, d, 2).float() / d)
        want = [t.clone() for t in (q, k, *caches)]
        rotary.apply_rotary_and_write_cache_ref(*want[:2], v, positions, freqs, *want[2:], slots)
        rotary.apply_rotary_and_write_cache(q, k, v, positions, freqs, caches[0], caches[1], slots)
        for name, got, expected in zip("q k k_cache v_cache".split(), (q, k, *caches), want):
            check(f"rotary {tokens} tokens {heads}/{kv_heads} heads d{d}: {name}", got, expected)


def int4_qkv_rotary() -> None:
    """The int4 GEMV of a fused QKV projection with rotary and the cache write as its epilogue, on every tile that
    divides half a head, against the same tile's GEMV followed by the rotary kernel."""
    for m, heads, kv_heads, d, k in ((1, 4, 2, 64, 512), (2, 6, 2, 32, 1024)):
        n = (heads + 2 * kv_heads) * d
        x, positions = torch.randn(m, k).half(), torch.randint(0, 8192, (m,))
        packed, scale, z = quantize_int4_groups(torch.randn(n, k), 128, True, torch.float16)
        freqs, slots = 500000.0 ** -(torch.arange(0, d, 2).float() / d), torch.randperm(4 * m)[:m]
        for tile in [t for t in qg.W4_GEMV_TILES if (d // 2) % t[0] == 0]:
            want, want_caches = torch.empty(m, n, dtype=torch.float16), torch.zeros(2, 4 * m, kv_heads, d).half()
            qg._run_w4_gemv(x, packed.view(qg.WORD_DTYPE), scale, z, 128, want, tile)
            q, kk, v = (t.view(m, -1, d) for t in want.split([heads * d, kv_heads * d, kv_heads * d], dim=1))
            rotary.apply_rotary_and_write_cache(q, kk, v, positions, freqs, *want_caches, slots)
            got, caches = torch.empty(m, n, dtype=torch.float16), torch.zeros(2, 4 * m, kv_heads, d).half()
            qg._run_w4_qkv_rotary(x, packed.view(qg.WORD_DTYPE), scale, z, 128, got, tile,
                                  (heads, kv_heads, d, positions, freqs, *caches, slots, None))
            for name, a, b in (("qkv", got, want), ("k_cache", caches[0], want_caches[0]),
                               ("v_cache", caches[1], want_caches[1])):
                check(f"w4 gemv rotary m{m} {heads}/{kv_heads} heads d{d} tile {tile}: {name}", a, b)


def int4_pending_norm() -> None:
    """An RMSNorm split between two int4 GEMVs (kiln.kernels.epilogue): the first, on every tile, adds the residual
    and sums its squares (the stream and the norm's weighted input bit for bit); the second, as the SiLU and the
    rotary epilogue variants, applies the norm's 1/rms to its sums, against the norm then the same GEMV."""
    m, n, k, eps, d, heads, kv_heads = 2, 256, 512, 1e-5, 32, 4, 2
    words = lambda packed: packed.view(qg.WORD_DTYPE)  # noqa: E731
    x, residual = torch.randn(m, k).half(), (torch.randn(m, n) * 4).half()
    norm_weight = (torch.rand(n) + 0.5).half()
    packed, scale, z = quantize_int4_groups(torch.randn(n, k), 128, True, torch.float16)
    out = torch.empty(m, n, dtype=torch.float16)
    qg._run_w4_gemv(x, words(packed), scale, z, 128, out, qg.W4_GEMV_TILES[0])
    normed, stream = rms_norm_ref(out, norm_weight, eps, residual)
    for tile in qg.W4_GEMV_TILES:
        h, weighted, squares = torch.empty_like(out), torch.empty_like(out), torch.empty(m * n // tile[0])
        qg._run_w4_gemv(x, words(packed), scale, z, 128, h, tile, add_norm=(residual, norm_weight, weighted, squares))
        same = torch.equal(h, stream) and torch.equal(weighted, (h.float() * norm_weight.float()).half())
        if not same:
            raise SystemExit(f"w4 gemv add-norm tile {tile}: the stream or the weighted input differs")
        check(f"w4 gemv add-norm tile {tile}: squares", squares.view(m, -1).sum(1), h.float().pow(2).sum(1))
    norm_in = (squares.view(m, -1), eps)
    gate_up, g_scale, g_z = quantize_int4_groups(torch.randn(96, n), 128, True, torch.float16)
    qkv, q_scale, q_z = quantize_int4_groups(torch.randn((heads + 2 * kv_heads) * d, n), 128, True, torch.float16)
    positions, freqs = torch.randint(0, 8192, (m,)), 500000.0 ** -(torch.arange(0, d, 2).float() / d)
    for tile in qg.W4_EPILOGUE_TILES:
        want, got = torch.empty(m, 48, dtype=torch.float16), torch.empty(m, 48, dtype=torch.float16)
        qg._run_w4_gemv(normed, words(gate_up), g_scale, g_z, 128, want, tile, gated=True)
        qg._run_w4_gemv(weighted, words(gate_up), g_scale, g_z, 128, got, tile, gated=True, norm_in=norm_in)
        check(f"w4 gemv silu of a pending norm tile {tile}", got, want)
        if (d // 2) % tile[0]:
            continue
        results = []
        for rows, pending in ((normed, None), (weighted, norm_in)):
            y, caches = torch.empty(m, qkv.shape[0], dtype=torch.float16), torch.zeros(2, 4, kv_heads, d).half()
            qg._run_w4_qkv_rotary(rows, words(qkv), q_scale, q_z, 128, y, tile,
                                  (heads, kv_heads, d, positions, freqs, *caches, torch.tensor([3, 1]), None), pending)
            results.append((y, caches))
        check(f"w4 gemv rotary of a pending norm tile {tile}: qkv", results[1][0], results[0][0])
        check(f"w4 gemv rotary of a pending norm tile {tile}: caches", results[1][1], results[0][1])


def int8_qkv_rotary() -> None:
    """The int8 GEMV of a fused QKV projection with the same epilogue, against the same tile's GEMV followed by the
    rotary kernel (a 16-bit cache: the interpreter cannot run the rotary kernel's rounding to codes)."""
    for m, heads, kv_heads, d, k in ((1, 4, 2, 64, 512), (2, 6, 2, 32, 1032)):
        n = (heads + 2 * kv_heads) * d
        x, positions = torch.randn(m, k).half(), torch.randint(0, 8192, (m,))
        q_codes, scale = quantize_int8_per_channel(torch.randn(n, k), torch.float16)
        words = q_codes.view(qg.WORD_DTYPE)
        freqs, slots = 500000.0 ** -(torch.arange(0, d, 2).float() / d), torch.randperm(4 * m)[:m]
        for tile in [t for t in qg.W8_GEMV_TILES if (d // 2) % t[0] == 0]:
            want, want_caches = torch.empty(m, n, dtype=torch.float16), torch.zeros(2, 4 * m, kv_heads, d).half()
            qg._run_w8_gemv(x, words, scale, want, tile)
            q, kk, v = (t.view(m, -1, d) for t in want.split([heads * d, kv_heads * d, kv_heads * d], dim=1))
            rotary.apply_rotary_and_write_cache(q, kk, v, positions, freqs, *want_caches, slots)
            got, caches = torch.empty(m, n, dtype=torch.float16), torch.zeros(2, 4 * m, kv_heads, d).half()
            qg._run_w8_qkv_rotary(x, words, scale, got, tile, (heads, kv_heads, d, positions, freqs, *caches, slots,
                                                               None))
            for name, a, b in (("qkv", got, want), ("k_cache", caches[0], want_caches[0]),
                               ("v_cache", caches[1], want_caches[1])):
                check(f"int8 gemv rotary m{m} {heads}/{kv_heads} heads d{d} tile {tile}: {name}", a, b)


def fp8_qkv_rotary() -> None:
    """The e4m3 word GEMV of a fused QKV projection with rotary and the cache write as its epilogue, each word
    BLOCK_N (converting by bit operations), against the same tile's plain GEMV followed by the rotary kernel. Within
    rounding, not bit for bit: the interpreter sums a one-output tile (the epilogue's half of a 2-output one) in
    another order (numpy's pairwise sum); the GPU test compares bits."""
    g = torch.Generator().manual_seed(5)
    for m, heads, kv_heads, d, k in ((1, 4, 2, 64, 512), (2, 6, 2, 32, 1032)):
        n = (heads + 2 * kv_heads) * d
        wq, xq = (_random_e4m3_codes(shape, g) for shape in ((n, k), (m, k)))
        xs, ws = torch.rand(m, generator=g) + 0.5, torch.rand(n, generator=g) * 1e-4
        positions, slots = torch.randint(0, 8192, (m,), generator=g), torch.randperm(4 * m, generator=g)[:m]
        freqs = 500000.0 ** -(torch.arange(0, d, 2).float() / d)
        for tile in _word_tiles_by_bits():
            want, want_caches = torch.empty(m, n, dtype=torch.float16), torch.zeros(2, 4 * m, kv_heads, d).half()
            gemv._run_gemv((xq, wq, want, xs, ws, False), tile)
            q, kk, v = (t.view(m, -1, d) for t in want.split([heads * d, kv_heads * d, kv_heads * d], dim=1))
            rotary.apply_rotary_and_write_cache(q, kk, v, positions, freqs, *want_caches, slots)
            got, caches = torch.empty(m, n, dtype=torch.float16), torch.zeros(2, 4 * m, kv_heads, d).half()
            qg.run_fp8_qkv_rotary(xq, xs, wq, ws, got, tile, (heads, kv_heads, d, positions, freqs, *caches, slots,
                                                             None))
            for name, a, b in (("qkv", got, want), ("k_cache", caches[0], want_caches[0]),
                               ("v_cache", caches[1], want_caches[1])):
                check(f"fp8 word gemv rotary m{m} {heads}/{kv_heads} heads d{d} tile {tile}: {name}", a, b)


def gated_gemm_tiles() -> None:
    from kiln.kernels import gated_gemm

    g = torch.Generator().manual_seed(5)
    for rows, inter, k in ((300, 200, 136), (70, 48, 40)):  # no tile divides rows, I or K
        x = torch.randn(rows, k, generator=g).half()
        w = (torch.randn(2 * inter, k, generator=g) / k ** 0.5).half()
        # and groups of 2 row tiles, the last group short: the grouped order's edge
        for cfg in [*gated_gemm.GATED_GEMM_CONFIGS, dict(gated_gemm.GATED_GEMM_CONFIGS[-1], BLOCK_M=32, GROUP_M=2)]:
            tile = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K} group {GROUP_M} persistent={PERSISTENT}".format(**cfg)
            check(f"gated gemm {rows}x{inter}x{k} tile {tile}", gated_gemm.silu_and_mul_gemm(x, w, cfg),
                  gated_gemm.silu_and_mul_gemm_ref(x, w))


CHECKS = (int4_gemm, int4_gemv, int4_gemv_magnitudes, decode_attention, fused_merge, prefill_attention, fp8_dot_gemv,
          fp8_word_gemv, fp8_word_gemv_silu, fp8_group_gemm, w4a8_prefill, int8_gemv, int8_gemm_tiles,
          rms_norm_int8_rows, silu_and_mul_plain, silu_and_mul_int8_rows, fp8_groups_written_by_norm_and_activation,
          fp8_rows_written_by_norm_and_activation, rotary_with_cache_write, int4_qkv_rotary, int4_pending_norm,
          int8_qkv_rotary, fp8_qkv_rotary,
          gated_gemm_tiles)


def main(only: str = "") -> None:
    """Every check, or those whose function names contain `only`."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 (see the module docstring)")
    torch.manual_seed(0)
    qg._dequant_nibbles, pk._code_pairs = _dequant_nibbles_plain, _code_pairs_plain
    for check_kernel in CHECKS:
        if only in check_kernel.__name__:
            check_kernel()

if __name__ == "__main__":
    main(*sys.argv[1:2])
