"""Rotary position embedding (Su et al. 2021, arXiv:2104.09864) on q and k, in place.

GPT-NeoX "rotate half" layout, which kiln and Hugging Face use: dimension i pairs with i + d/2.
The kernel computes cos/sin from positions itself, so no [tokens, d] cos/sin table is read or built:
one launch rotates both q and k of a token with a single read and write of each. The runtime also has it
write the rotated keys and the values into their paged-cache slots (`apply_rotary_and_write_cache`), as codes
for a quantized cache, which saves the copy (and quantize) kernels a separate write costs in every decode step.
Models that norm each head of q and k before the rotation (Qwen3, Gemma 3: `HeadNorms`) have the same launch
norm them as it loads them: unfused, each norm was a copy of the strided heads and a norm kernel, four launches a
layer on decode's critical path.
"""

import os
from dataclasses import dataclass

import torch

from kiln.kernels.rmsnorm import rms_norm_ref
from kiln.quantization.kv_cache import QMAX, quantize

try:
    import triton
    import triton.language as tl

    try:
        from triton.language.extra import libdevice
    except ImportError:  # Triton < 3.0 keeps it under the CUDA backend
        from triton.language.extra.cuda import libdevice
except ImportError:  # CPU-only installs: the reference below still works
    triton = None

from kiln.kernels.pdl import pdl_args

if triton is not None:
    from kiln.kernels.pdl import allow_dependents, wait_for_inputs


@dataclass(frozen=True)
class HeadNorms:
    """RMSNorms over each head of q and of k, applied before the rotation (Qwen3's and Gemma 3's q_norm and
    k_norm): their weights [head_size] in the activations' dtype, eps, and whether they scale by 1 + w (Gemma)."""

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float
    unit_offset: bool = False

    def apply_ref(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Norm q [tokens, heads, d] and k in place, as kiln.layers.normalization.RMSNorm computes it."""
        for x, weight in ((q, self.q_weight), (k, self.k_weight)):
            x.copy_(rms_norm_ref(x, weight, self.eps, unit_offset=self.unit_offset))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                     norms: HeadNorms | None = None):
    """Rotate q [tokens, heads, d] and k [tokens, kv_heads, d] in place and return them (normed first by `norms`).

    angle = position * inv_freq in float32; cos and sin are cast to x's dtype before the multiplies.
    """
    if norms is not None:
        norms.apply_ref(q, k)
    angles = positions.float()[:, None] * inv_freq.float().to(positions.device)[None, :]
    emb = torch.cat([angles, angles], dim=-1)[:, None, :]
    for x in (q, k):
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x.copy_(x * cos + _rotate_half(x) * sin)
    return q, k


def apply_rotary_and_write_cache_ref(q, k, v, positions, inv_freq, k_cache, v_cache, slots, kv_scale=None,
                                     norms: HeadNorms | None = None):
    """`apply_rotary_ref`, then k_cache[slots] = k and v_cache[slots] = v; caches [slots, kv_heads, d]. With
    kv_scale ([s_k, s_v]) the caches hold int8 or float8 codes, quantize(k, s_k) and quantize(v, s_v)
    (kiln.quantization.kv_cache)."""
    apply_rotary_ref(q, k, positions, inv_freq, norms)
    for cache, x, which in ((k_cache, k, 0), (v_cache, v, 1)):
        if kv_scale is not None:
            x = quantize(x, kv_scale[which], cache.dtype)
        if cache.element_size() == 1:  # (no index_copy_ for float8 on the CPU: copy the bytes)
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        cache.index_copy_(0, slots, x)
    return q, k


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                 norms: HeadNorms | None = None):
    """Triton version of `apply_rotary_ref`: rotates in place, returns (q, k). CUDA tensors.

    q and k may be strided views (say, slices of a fused QKV output) as long as head_size is contiguous.
    """
    return _launch(q, k, positions, inv_freq, None, None, norms)


def apply_rotary_and_write_cache(q, k, v, positions, inv_freq, k_cache, v_cache, slots, kv_scale=None,
                                 norms: HeadNorms | None = None):
    """Triton version of `apply_rotary_and_write_cache_ref`, one launch, the same codes bit for bit. CUDA."""
    assert v.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    return _launch(q, k, positions, inv_freq, (v, k_cache, v_cache, slots), kv_scale, norms)


_CODES = {None: 0, torch.int8: 1, torch.float8_e4m3fn: 2}  # the cache's element type -> the kernel's QUANT


def cache_code_args(k_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> dict:
    """The QUANT and QMAX constants of `to_cache` for this cache: its codes' type, or none without kv_scale."""
    code = None if kv_scale is None else k_cache.dtype
    return {"QUANT": _CODES[code], "QMAX": QMAX.get(code, 0.0)}


# Tokens up to which each program rotates one head (of q, or of k with its values): a decode step's few tokens
# spread over q_heads + kv_heads programs, not one program that walks every head in turn. On an H200 the one
# program of a batch-1 step took 4.2 us (Llama-3-8B, kiln.bench.profile_decode with KILN_PDL=0), a chain of
# dependent loads on one SM.
HEAD_PER_PROGRAM_MAX_TOKENS = 16
# Beyond that, BLOCK_H heads a program on 2 warps (cos and sin computed once per BLOCK_H heads). On an H200
# (scripts/bench_rotary.py, Llama-3-8B heads, 64 to 8,192 tokens) it ran 1.1-1.4x faster than the shape it
# replaced with a bf16 cache and 4.2-5.2x faster with an FP8 or INT8 cache, and at most 20% behind the fastest of
# the 18 shapes swept from 256 tokens on (35% at 64). The old shape, all of q's heads in one program on 4 warps,
# needed 161 registers a thread with a quantized cache: few of its programs fit on an SM.
BLOCK_H, BLOCK_H_WARPS = 8, 2


def program_shape(tokens: int, heads: int, kv_heads: int, block_d: int) -> tuple[int, int]:
    """(heads each program rotates, a power of two; its warps). scripts/bench_rotary.py sweeps both."""
    if tokens <= HEAD_PER_PROGRAM_MAX_TOKENS:
        return 1, max(1, min(4, block_d // 64))
    return min(BLOCK_H, triton.next_power_of_2(max(heads, kv_heads))), BLOCK_H_WARPS


# the kernel's NORM: no head norms, RMSNorms rounding before the weight, Gemma's scaling by 1 + w
_NORM = {None: 0, False: 1, True: 2}


def _launch(q, k, positions, inv_freq, cache, kv_scale, norms):
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "apply_rotary: head_size must be the contiguous dim"
    tokens, heads, head_size = q.shape
    kv_heads = k.shape[1]
    v, k_cache, v_cache, slots = cache if cache is not None else (k, k, k, positions)  # unread without cache
    block_d = triton.next_power_of_2(head_size // 2)
    block_h, num_warps = program_shape(tokens, heads, kv_heads, block_d)
    q_programs = triton.cdiv(heads, block_h)
    _rotary_kernel[(tokens, q_programs + triton.cdiv(kv_heads, block_h))](
        q, k, positions, inv_freq, q.stride(0), q.stride(1), k.stride(0), k.stride(1), heads, kv_heads,
        head_size // 2, q_programs, v, k_cache, v_cache, slots, v.stride(0), v.stride(1), k_cache.stride(0),
        k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), kv_scale if kv_scale is not None else inv_freq,
        *((norms.q_weight, norms.k_weight, norms.eps) if norms else (q, k, 0.0)),
        WRITE_CACHE=cache is not None, **cache_code_args(k_cache, kv_scale),
        NORM=_NORM[norms.unit_offset if norms else None], BLOCK_H=block_h,
        BLOCK_D=block_d, num_warps=num_warps, **pdl_args(q.device))
    return q, k


if triton is not None:
    # Under Triton's interpreter (TRITON_INTERPRET=1, the kernel tests on a CPU) libdevice's functions return
    # nothing; numpy's cos, sin and products, which it runs instead, are correctly rounded as libdevice's are.
    INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

    @triton.jit
    def mul_rn(a, b):
        """a * b rounded on its own: never contracted with a following add into an FMA."""
        if INTERPRETED:
            y = a * b
        else:
            y = libdevice.mul_rn(a, b)
        return y

    @triton.jit
    def to_cache(x, s, QUANT: tl.constexpr, QMAX: tl.constexpr):
        """New keys or values as the cache stores them: as they are, or codes (kv_cache.quantize's math: IEEE
        division, clamp, then round half to even for int8, the e4m3 cast's rounding for float8)."""
        # One return: Triton compiles the statements after a `return` inside a constexpr `if` too.
        if QUANT == 0:
            y = x
        else:
            c = tl.clamp(tl.math.div_rn(x.to(tl.float32), s), -QMAX, QMAX)
            if QUANT == 1:
                y = libdevice.rint(c).to(tl.int8)
            else:
                y = c.to(tl.float8e4nv)
        return y

    @triton.jit
    def cos_sin(angle):
        """libdevice's cos and sin of float32 angles, not the approximate PTX ones: angles reach max_position
        radians."""
        if INTERPRETED:
            c, s = tl.cos(angle), tl.sin(angle)
        else:
            c, s = libdevice.cos(angle), libdevice.sin(angle)
        return c, s

    @triton.jit
    def rotate_pair(x1, x2, cos, sin):
        """(x1 cos - x2 sin, x2 cos + x1 sin) in x1's dtype, cos and sin (float32) rounded to it first and each
        product rounded, as torch's elementwise ops do, so 16-bit results match the reference (also the int4
        GEMV's rotary epilogue, kiln.kernels.quant_gemm, which must give the same bits)."""
        c, s = cos.to(x1.dtype).to(tl.float32), sin.to(x1.dtype).to(tl.float32)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        # mul_rn: a product the compiler may not contract with the sum into an FMA. A plain `*` was contracted,
        # and into a different FMA in each kernel (one skipped product rounding, not always the same one).
        out1 = (mul_rn(f1, c).to(x1.dtype).to(tl.float32) - mul_rn(f2, s).to(x1.dtype).to(tl.float32)).to(x1.dtype)
        out2 = (mul_rn(f2, c).to(x1.dtype).to(tl.float32) + mul_rn(f1, s).to(x1.dtype).to(tl.float32)).to(x1.dtype)
        return out1, out2

    @triton.jit
    def _head_norm(x1, x2, w_ptr, i, half, eps, NORM: tl.constexpr):
        """The two halves of heads [BLOCK_H, BLOCK_D] (masked entries 0) RMS-normed over the head with weight w:
        rms_norm_ref's math (float32, rounded to x's dtype before the weight; NORM 2: times 1 + w, rounded once)."""
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / (2 * half) + eps)[:, None]
        w1 = tl.load(w_ptr + i, mask=i < half, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + half + i, mask=i < half, other=0.0).to(tl.float32)
        if NORM == 1:
            y1 = (w1 * (f1 * rstd).to(x1.dtype).to(tl.float32)).to(x1.dtype)
            y2 = (w2 * (f2 * rstd).to(x1.dtype).to(tl.float32)).to(x1.dtype)
        else:
            y1 = (f1 * rstd * (1.0 + w1)).to(x1.dtype)
            y2 = (f2 * rstd * (1.0 + w2)).to(x1.dtype)
        return y1, y2

    @triton.jit
    def _rotate_heads(x_ptr, tok_stride, head_stride, token, h, heads, half, cos, sin, cache_ptr, c_tok_stride,
                      c_head_stride, slot, scale, norm_ptr, eps, WRITE_CACHE: tl.constexpr, QUANT: tl.constexpr,
                      QMAX: tl.constexpr, NORM: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rotate heads h ([BLOCK_H, 1], those below `heads`) of one token in place (normed first, with NORM), and
        write them to the cache's slot if asked."""
        i = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < heads) & (i < half)
        ptr = x_ptr + token * tok_stride + h * head_stride + i
        x1 = tl.load(ptr, mask=mask, other=0.0)
        x2 = tl.load(ptr + half, mask=mask, other=0.0)
        if NORM != 0:
            x1, x2 = _head_norm(x1, x2, norm_ptr, i, half, eps, NORM)
        out1, out2 = rotate_pair(x1, x2, cos[None, :], sin[None, :])
        tl.store(ptr, out1, mask=mask)
        tl.store(ptr + half, out2, mask=mask)
        if WRITE_CACHE:
            cache = cache_ptr + slot * c_tok_stride + h * c_head_stride + i
            tl.store(cache, to_cache(out1, scale, QUANT, QMAX), mask=mask)
            tl.store(cache + half, to_cache(out2, scale, QUANT, QMAX), mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, pos_ptr, freq_ptr, q_tok_stride, q_head_stride, k_tok_stride, k_head_stride,
                       q_heads, k_heads, half, q_programs, v_ptr, kc_ptr, vc_ptr, slot_ptr, v_tok_stride,
                       v_head_stride, kc_tok_stride, kc_head_stride, vc_tok_stride, vc_head_stride, kvs_ptr,
                       qn_ptr, kn_ptr, eps, WRITE_CACHE: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
                       NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
        # Program (token, j) rotates BLOCK_H heads of the token: q's for j < q_programs, else k's, whose values
        # it also copies to the cache. With NORM, q's heads are normed by qn's weight and k's by kn's first.
        allow_dependents(USE_PDL)
        i = tl.arange(0, BLOCK_D)
        freq = tl.load(freq_ptr + i, mask=i < half, other=0.0)  # a constant of the model: read before the wait
        wait_for_inputs(USE_PDL)
        token = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        cos, sin = cos_sin(tl.load(pos_ptr + token).to(tl.float32) * freq)
        if j < q_programs:
            h = j * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
            _rotate_heads(q_ptr, q_tok_stride, q_head_stride, token, h, q_heads, half, cos, sin, q_ptr, 0, 0, 0, 1.0,
                          qn_ptr, eps, False, 0, QMAX, NORM, BLOCK_D)
        else:
            h = (j - q_programs) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
            slot = tl.load(slot_ptr + token).to(tl.int64) if WRITE_CACHE else 0
            s_k, s_v = 1.0, 1.0
            if QUANT != 0:  # [s_k, s_v] of a quantized cache
                s_k, s_v = tl.load(kvs_ptr).to(tl.float32), tl.load(kvs_ptr + 1).to(tl.float32)
            _rotate_heads(k_ptr, k_tok_stride, k_head_stride, token, h, k_heads, half, cos, sin, kc_ptr,
                          kc_tok_stride, kc_head_stride, slot, s_k, kn_ptr, eps, WRITE_CACHE, QUANT, QMAX, NORM,
                          BLOCK_D)
            if WRITE_CACHE:  # the values go to their slot unrotated, as two halves like the keys
                d = tl.arange(0, BLOCK_D)[None, :]
                for part in tl.static_range(2):
                    mask = (h < k_heads) & (d < half)
                    v = tl.load(v_ptr + token * v_tok_stride + h * v_head_stride + part * half + d, mask=mask)
                    tl.store(vc_ptr + slot * vc_tok_stride + h * vc_head_stride + part * half + d,
                             to_cache(v, s_v, QUANT, QMAX), mask=mask)
