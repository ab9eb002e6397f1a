"""Attention for the runtime: decode over a paged KV cache, and causal prefill over packed sequences.

Paged KV cache (Kwon et al. 2023, vLLM, arXiv:2309.06180): k_cache/v_cache are
[num_blocks, block_size, kv_heads, d]; sequence b's token t lives in block block_tables[b, t // block_size]
at slot t % block_size. context_lens[b] counts the tokens already written, the current one included.

Decode is split-K "flash decoding" (Dao et al. 2023, https://pytorch.org/blog/flash-decoding/): a
single query per sequence gives too few programs to fill the GPU, so each sequence's context is cut into
`num_splits` ranges attended in parallel; each writes its output and log-sum-exp, and a second small
kernel merges them (with one split, when the batch alone fills the GPU, the kernel writes the output). One
program serves all the query heads that share a KV head (GQA), so each key and value is read from memory
once. Prefill is FlashAttention-2 (Dao 2023, arXiv:2307.08691) over sequences packed back to back,
cu_seqlens marking where each starts; prefill over the paged cache splits the keys the same way when its
query tiles are too few to fill the GPU (a prefix-cache hit's few new tokens over a long prefix).

A sliding window of W keeps the keys at positions q_pos - W < k_pos <= q_pos, as kiln.layers.attention does.
Both kernels use exp2 with log2(e) folded into the scale, so their log-sum-exps are in base 2.

A quantized cache (kiln.quantization.kv_cache) holds int8 or float8_e4m3fn codes and `kv_scale` = [s_k, s_v]:
keys and values are read as codes and dequantized in registers. Every int8 and e4m3 code is exact in fp16,
bf16 and fp32, so the kernels convert codes to a float type for the matmuls and apply the scales outside them:
s_k joins the softmax scale, s_v multiplies the output (sum_j p_j (c_j s_v) = s_v sum_j p_j c_j). That type is
the query's, except e4m3 codes under a bf16 query, which go to fp16 (`CODES_FP16`): Hopper converts two e4m3
codes to fp16 in one instruction but to bf16 in five (in the sm_90 machine code of a 64-key decode step, 840
instructions against 1035; scripts/kernel_sass.py "decode split"). A bf16 query is exact in fp16 from 2^-14 to
65504 (below, fp16's subnormals keep it to 2^-24; beyond, it is clamped), and the probabilities round to fp16's
11 bits instead of bf16's 8. int8 codes keep the query's dtype: their conversion to fp16 is no cheaper.
Decode can also read a 1-byte cache as 16-bit words of two codes (`CODES_AS_PAIRS`, _decode_code_pairs_kernel):
the tiles then load as a bf16 cache's do, and a few packed instructions convert two words; it is off until timed
on a GPU.
"""

import functools
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references below still work
    triton = None

from kiln.kernels.pdl import pdl_args

if triton is not None:
    from kiln.kernels.pdl import allow_dependents, wait_for_inputs

_LOG2E = 1.4426950408889634
# Launch configurations, the fastest of a small sweep on an H100 (Llama-3-8B shapes, bf16): decode at
# batch 32, context 2048 (2.6 TB/s of KV read; 11 configs, 1.5-2.6 TB/s), prefill 4 x 2048 tokens
# (386 TFLOP/s; 8 configs, 175-386). Retune per GPU when the runtime grows an autotuning cache.
# BLOCK_N 64: at batch 512 and contexts of 128-256 keys (offline decode) a 128-key tile is mostly masked; on the
# H100, 112 us a layer against 137 (bf16 cache) and no slower at 2048 keys (scripts/bench_decode_attention.py).
DECODE_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=2, programs_per_sm=2)
# Decode over a 1-byte cache read as 16-bit words of two codes (_decode_code_pairs_kernel): in the sm_90 machine
# code a 64-key step issues about 515 instructions against 840-1035 for the codes read one by one
# (scripts/kernel_sass.py "decode"). Not yet timed on a GPU, so off; scripts/bench_decode_attention.py times both.
CODES_AS_PAIRS = False
PREFILL_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)  # for head_size <= 128


# ---------------------------------------------------------------- references (any device)

def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows]; 1-byte codes through a uint8 view, since torch's indexing kernels do not all take float8."""
    return x.view(torch.uint8)[rows].view(x.dtype) if x.element_size() == 1 else x[rows]


def _read(x: torch.Tensor, kv_scale: torch.Tensor | None, which: int) -> torch.Tensor:
    """Keys (which=0) or values (1) as float32: dequantized codes when the cache is quantized."""
    return x.float() if kv_scale is None else x.float() * kv_scale[which].float()


def _attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None):
    """Softmax attention in float32. q [m, heads, d], k/v [n, kv_heads, d], mask [m, n] (True = attend)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(groups, dim=1), v.float().repeat_interleave(groups, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", q.float(), k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hmn,nhd->mhd", scores.softmax(-1), v).to(q.dtype)


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=None,
                               kv_scale=None):
    """q [batch, heads, d] -> [batch, heads, d]: each sequence's one new query over its cached keys."""
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    for b, n in enumerate(context_lens.tolist()):
        pages = block_tables[b, :math.ceil(n / block_size)].long()
        lo = 0 if sliding_window is None else max(n - sliding_window, 0)
        k = _read(gather_rows(k_cache, pages).flatten(0, 1)[lo:n], kv_scale, 0)
        v = _read(gather_rows(v_cache, pages).flatten(0, 1)[lo:n], kv_scale, 1)
        out[b] = _attend_ref(q[b:b + 1], k, v, scale, None)[0]
    return out


def varlen_prefill_attention_ref(q, k, v, cu_seqlens, max_seqlen, scale, sliding_window=None, kv_scale=None):
    """Causal attention within each packed sequence; q [tokens, heads, d], k/v [tokens, kv_heads, d]
    (codes when kv_scale is given)."""
    out = torch.empty_like(q)
    k, v = _read(k, kv_scale, 0), _read(v, kv_scale, 1)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        pos = torch.arange(end - start, device=q.device)
        mask = pos[None, :] <= pos[:, None]
        if sliding_window is not None:
            mask &= pos[:, None] - pos[None, :] < sliding_window
        out[start:end] = _attend_ref(q[start:end], k[start:end], v[start:end], scale, mask)
    return out


def paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale,
                                sliding_window=None, kv_scale=None, max_query_len=None):
    """Prompts that continue a cached prefix (or an earlier chunk): sequence b's new queries
    q[cu[b]:cu[b+1]] sit at positions context_lens[b] onwards and attend causally over its cached keys,
    their own included (already written to the cache). max_query_len (the longest one's new tokens) sizes
    the kernel's grid; the reference does not need it."""
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for b, (start, end, ctx) in enumerate(zip(bounds[:-1], bounds[1:], context_lens.tolist())):
        total = ctx + end - start
        pages = block_tables[b, :math.ceil(total / block_size)].long()
        k = _read(gather_rows(k_cache, pages).flatten(0, 1)[:total], kv_scale, 0)
        v = _read(gather_rows(v_cache, pages).flatten(0, 1)[:total], kv_scale, 1)
        q_pos = torch.arange(ctx, total, device=q.device)[:, None]
        k_pos = torch.arange(total, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= q_pos - k_pos < sliding_window
        out[start:end] = _attend_ref(q[start:end], k, v, scale, mask)
    return out


# ---------------------------------------------------------------- Triton launchers (CUDA)

@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(programs: int, max_context: int, block_n: int, device: torch.device) -> int:
    """Enough splits for a few programs per SM, never more than there are key tiles.

    Chosen from shapes alone (the block table's width bounds every context), so no host-device sync.
    """
    tiles = triton.cdiv(max_context, block_n)
    per_sm = DECODE_CONFIG["programs_per_sm"]
    return max(1, min(triton.cdiv(per_sm * _num_sms(device.index or 0), programs), tiles, 64))


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=None,
                           kv_scale=None):
    """Triton version of `paged_decode_attention_ref`, same arguments and result. CUDA tensors."""
    batch, heads, head_size = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.stride(-1) == 1
    group = heads // kv_heads
    max_context = block_tables.shape[1] * block_size
    if sliding_window is not None:
        max_context = min(max_context, sliding_window)
    cfg = DECODE_CONFIG
    block_n = cfg["BLOCK_N"]
    splits = _num_splits(batch * kv_heads, max_context, block_n, q.device)
    out = torch.empty_like(q)
    one = splits == 1  # a large batch fills the GPU unsplit: the kernel writes the output, no merge
    partial = out if one else torch.empty(batch, heads, splits, head_size, dtype=torch.float32, device=q.device)
    lse = None if one else torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    pairs = _reads_code_pairs(q, k_cache)
    extra = {}
    if pairs:  # the same bytes as 16-bit words: [blocks, page, kv heads, head_size / 2]
        extra = dict(INT8=k_cache.dtype == torch.int8)
        k_cache, v_cache = k_cache.view(torch.int16), v_cache.view(torch.int16)
    kernel = _decode_code_pairs_kernel if pairs else _decode_split_kernel
    kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, kv_scale, block_tables, context_lens, partial, lse,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        out.stride(0), out.stride(1), scale * _LOG2E, sliding_window or 0, group, head_size, splits,
        PAGE=block_size, HAS_WINDOW=sliding_window is not None, HAS_SCALE=kv_scale is not None,
        CODES_FP16=_codes_fp16(q, k_cache), IEEE=q.dtype == torch.float32, ONE_SPLIT=one,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=max(32 if pairs else 16, triton.next_power_of_2(head_size)), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **extra, **pdl_args(q.device))
    if not one:
        _merge_splits(partial, lse, out)
    return out


def _reads_code_pairs(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Decode over an int8 or e4m3 cache by 16-bit words of two codes (CODES_AS_PAIRS): a 16-bit query and an
    even head size."""
    return (CODES_AS_PAIRS and cache.dtype in (torch.int8, torch.float8_e4m3fn) and q.dtype != torch.float32
            and cache.shape[-1] % 2 == 0)


def _codes_fp16(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """An e4m3 cache read by a bf16 query: the matmuls run in fp16 (see the module docstring)."""
    return cache.dtype == torch.float8_e4m3fn and q.dtype == torch.bfloat16


def _merge_splits(partial: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> None:
    """out[r, h] = the splits' partial outputs [r, h, s] weighted by their softmax mass (lse, base 2)."""
    rows, heads, splits, head_size = partial.shape
    _merge_kernel[(rows, heads)](
        partial, lse, out, out.stride(0), out.stride(1), heads, head_size, splits,
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=triton.next_power_of_2(head_size), num_warps=4,
        **pdl_args(out.device))


def varlen_prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, sliding_window=None, kv_scale=None):
    """Triton version of `varlen_prefill_attention_ref`, same arguments and result. CUDA tensors."""
    tokens, heads, head_size = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    out = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(head_size))
    cfg = PREFILL_CONFIG if block_d <= 128 else dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    assert cfg["BLOCK_M"] % cfg["BLOCK_N"] == 0, "the diagonal tiles must tile the query block"
    grid = (triton.cdiv(max_seqlen, cfg["BLOCK_M"]), cu_seqlens.shape[0] - 1, heads)
    _prefill_kernel[grid](
        q, k, v, kv_scale, out, cu_seqlens, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), out.stride(0), out.stride(1), scale * _LOG2E, sliding_window or 0, heads // k.shape[1],
        head_size, HAS_WINDOW=sliding_window is not None, HAS_SCALE=kv_scale is not None,
        CODES_FP16=_codes_fp16(q, k), IEEE=q.dtype == torch.float32, BLOCK_D=block_d, **cfg)
    return out


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale,
                            sliding_window=None, kv_scale=None, max_query_len=None):
    """Triton version of `paged_prefill_attention_ref`, same arguments and result. CUDA tensors.
    max_query_len (the longest sequence's new tokens) sizes the grid; without it, q's length does."""
    tokens, heads, head_size = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    block_d = max(16, triton.next_power_of_2(head_size))
    cfg = PREFILL_CONFIG if block_d <= 128 else dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    tiles, seqs = triton.cdiv(max_query_len or tokens, cfg["BLOCK_M"]), cu_seqlens.shape[0] - 1
    # A few new tokens after a long prefix (a prefix-cache hit) make few programs, each streaming the whole
    # context: split the keys across programs as decode does, and merge.
    max_context = block_tables.shape[1] * block_size
    if sliding_window is not None:
        max_context = min(max_context, sliding_window + cfg["BLOCK_M"] + cfg["BLOCK_N"])
    splits = _num_splits(tiles * seqs * heads, max_context, cfg["BLOCK_N"], q.device)
    out = torch.empty_like(q)
    one = splits == 1
    partial = out if one else torch.empty(tokens, heads, splits, head_size, dtype=torch.float32, device=q.device)
    lse = None if one else torch.empty(tokens, heads, splits, dtype=torch.float32, device=q.device)
    _paged_prefill_kernel[(tiles, seqs, heads * splits)](
        q, k_cache, v_cache, kv_scale, partial, lse, cu_seqlens, context_lens, block_tables, q.stride(0),
        q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0), out.stride(0),
        out.stride(1), scale * _LOG2E, sliding_window or 0, heads // kv_heads, head_size, splits, PAGE=block_size,
        HAS_WINDOW=sliding_window is not None, HAS_SCALE=kv_scale is not None,
        CODES_FP16=_codes_fp16(q, k_cache), IEEE=q.dtype == torch.float32, ONE_SPLIT=one, BLOCK_D=block_d, **cfg)
    if not one:
        _merge_splits(partial, lse, out)
    return out


# ---------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        # float32 inputs would otherwise go through TF32 (10-bit mantissa) and miss the reference.
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _online_softmax_step(s, m, l, acc, v, IEEE: tl.constexpr):
        """One FlashAttention step: fold scores s [rows, n] (base-2 logits) and values v [n, d] in."""
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])  # masked scores are -inf: p = 0
        alpha = tl.exp2(m - m_new)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        return m_new, l * alpha + tl.sum(p, axis=1), acc

    @triton.jit
    def _codes_query(q, CODES_FP16: tl.constexpr):
        """q as the matmuls over cache codes take it: fp16 for a bf16 query of a quantized cache, the keys and
        values converting to q's dtype after it (see the module docstring)."""
        if CODES_FP16:
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
        return q

    @triton.jit
    def _kv_scales(kvs_ptr, scale_log2, HAS_SCALE: tl.constexpr):
        """(the score scale with s_k folded in, s_v): the codes of a quantized cache need both."""
        qk_scale = scale_log2
        v_scale = 1.0
        if HAS_SCALE:
            qk_scale = scale_log2 * tl.load(kvs_ptr).to(tl.float32)
            v_scale = tl.load(kvs_ptr + 1).to(tl.float32)
        return qk_scale, v_scale

    @triton.jit
    def _load_pages(ptr, page, t, kvh, d, mask, s_blk, s_tok, s_h, PAGE: tl.constexpr):
        """Rows t of one KV head of a paged cache (page: each row's block, from the block table)."""
        return tl.load(ptr + page[:, None] * s_blk + (t % PAGE)[:, None] * s_tok + kvh * s_h + d[None, :],
                       mask=mask, other=0.0)

    @triton.jit
    def _decode_split_kernel(q_ptr, k_ptr, v_ptr, kvs_ptr, bt_ptr, ctx_ptr, part_ptr, lse_ptr, q_sb, q_sh,
                             k_sblk, k_stok, k_sh, v_sblk, v_stok, v_sh, bt_sb, o_sb, o_sh,
                             scale_log2, window, group, head_size, num_splits,
                             PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SCALE: tl.constexpr,
                             CODES_FP16: tl.constexpr, IEEE: tl.constexpr, ONE_SPLIT: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             USE_PDL: tl.constexpr):
        """One split of one sequence's keys for the query heads of one KV head: a normalised partial output
        and its log-sum-exp for the merge; with ONE_SPLIT, part_ptr is the output itself and no merge runs."""
        allow_dependents(USE_PDL)
        wait_for_inputs(USE_PDL)
        b, kvh, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        ctx = tl.load(ctx_ptr + b)
        first = tl.maximum(ctx - window, 0) if HAS_WINDOW else 0
        # This split's range of keys, in whole tiles so that only the last tile is partial.
        split_len = tl.cdiv(tl.cdiv(ctx - first, num_splits), BLOCK_N) * BLOCK_N
        lo = first + split * split_len
        hi = tl.minimum(lo + split_len, ctx)

        g, d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
        heads = kvh * group + g
        d_ok = d < head_size
        q = tl.load(q_ptr + b * q_sb + heads[:, None] * q_sh + d[None, :],
                    mask=(g < group)[:, None] & d_ok[None, :], other=0.0)
        q = _codes_query(q, CODES_FP16)
        qk_scale, v_scale = _kv_scales(kvs_ptr, scale_log2, HAS_SCALE)
        # A finite start for the running max keeps exp2(m - m_new) free of inf - inf.
        m = tl.full([BLOCK_G], -1e30, tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            ok = t < hi
            page = tl.load(bt_ptr + b * bt_sb + t // PAGE, mask=ok, other=0).to(tl.int64)
            kv_mask = ok[:, None] & d_ok[None, :]
            k = _load_pages(k_ptr, page, t, kvh, d, kv_mask, k_sblk, k_stok, k_sh, PAGE).to(q.dtype)
            s = _dot(q, tl.trans(k), IEEE) * qk_scale
            s = tl.where(ok[None, :], s, float("-inf"))
            v = _load_pages(v_ptr, page, t, kvh, d, kv_mask, v_sblk, v_stok, v_sh, PAGE).to(q.dtype)
            m, l, acc = _online_softmax_step(s, m, l, acc, v, IEEE)

        empty = l == 0.0  # a split past the end of a short context
        out = acc * (v_scale / tl.where(empty, 1.0, l))[:, None]
        mask = (g < group)[:, None] & d_ok[None, :]
        if ONE_SPLIT:
            tl.store(part_ptr + b * o_sb + heads[:, None] * o_sh + d[None, :], out.to(part_ptr.dtype.element_ty),
                     mask=mask)
        else:
            row = (b * tl.num_programs(1) * group + heads) * num_splits + split  # partial: [b, heads, splits, d]
            tl.store(part_ptr + row[:, None] * head_size + d[None, :], out, mask=mask)
            tl.store(lse_ptr + row, tl.where(empty, float("-inf"), m + tl.log2(l)), mask=g < group)

    @triton.jit
    def _code_pairs(w, INT8: tl.constexpr):
        """int16 words of two codes (the low byte is the even column) -> (even, odd) codes as fp16, exactly, two
        words at a time. e4m3: one cvt.rn.f16x2.e4m3x2 a word, then a byte permute per plane. int8: a byte
        permute puts each code under the fp16 exponent of 1024 (0x64), the sign bit flipped, so the half reads
        1024 + 128 + c, and one packed subtract of 1152 leaves c."""
        if INT8:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 e, o, k; mov.b32 k, 0x64806480; prmt.b32 e, $2, 0x64646464, 0x4240; "
                "prmt.b32 o, $2, 0x64646464, 0x4341; xor.b32 e, e, 0x00800080; xor.b32 o, o, 0x00800080; "
                "sub.f16x2 $0, e, k; sub.f16x2 $1, o, k; }",
                "=r,=r,r", [w], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
        return tl.inline_asm_elementwise(
            "{ .reg .b32 a, b; .reg .b16 w0, w1; mov.b32 {w0, w1}, $2; cvt.rn.f16x2.e4m3x2 a, w0; "
            "cvt.rn.f16x2.e4m3x2 b, w1; prmt.b32 $0, a, b, 0x5410; prmt.b32 $1, a, b, 0x7632; }",
            "=r,=r,r", [w], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)

    @triton.jit
    def _decode_code_pairs_kernel(q_ptr, k_ptr, v_ptr, kvs_ptr, bt_ptr, ctx_ptr, part_ptr, lse_ptr, q_sb, q_sh,
                                  k_sblk, k_stok, k_sh, v_sblk, v_stok, v_sh, bt_sb, o_sb, o_sh,
                                  scale_log2, window, group, head_size, num_splits,
                                  PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SCALE: tl.constexpr,
                                  CODES_FP16: tl.constexpr, IEEE: tl.constexpr, ONE_SPLIT: tl.constexpr,
                                  BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                  INT8: tl.constexpr, USE_PDL: tl.constexpr):
        """_decode_split_kernel over an int8 or e4m3 cache (INT8) viewed as int16 words (k_ptr, v_ptr and their
        strides count words): each word holds the codes of columns 2j and 2j+1. The query is split into its even
        and odd columns, so s = q_even k_even^T + q_odd k_odd^T, and the output is kept as its even and odd
        halves, stored interleaved at the end. The tiles are loaded as 16-bit words, as a bf16 cache's are."""
        allow_dependents(USE_PDL)
        wait_for_inputs(USE_PDL)
        b, kvh, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        ctx = tl.load(ctx_ptr + b)
        first = tl.maximum(ctx - window, 0) if HAS_WINDOW else 0
        split_len = tl.cdiv(tl.cdiv(ctx - first, num_splits), BLOCK_N) * BLOCK_N
        lo = first + split * split_len
        hi = tl.minimum(lo + split_len, ctx)

        HALF: tl.constexpr = BLOCK_D // 2
        g, j = tl.arange(0, BLOCK_G), tl.arange(0, HALF)  # j: word j holds columns 2j, 2j + 1
        heads = kvh * group + g
        j_ok = j < head_size // 2
        mask = (g < group)[:, None] & j_ok[None, :]
        q_row = q_ptr + b * q_sb + heads[:, None] * q_sh + 2 * j[None, :]
        q_even = _codes_query(tl.load(q_row, mask=mask, other=0.0), True)
        q_odd = _codes_query(tl.load(q_row + 1, mask=mask, other=0.0), True)
        qk_scale, v_scale = _kv_scales(kvs_ptr, scale_log2, HAS_SCALE)
        m = tl.full([BLOCK_G], -1e30, tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc_even = tl.zeros([BLOCK_G, HALF], tl.float32)
        acc_odd = tl.zeros([BLOCK_G, HALF], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            ok = t < hi
            page = tl.load(bt_ptr + b * bt_sb + t // PAGE, mask=ok, other=0).to(tl.int64)
            kv_mask = ok[:, None] & j_ok[None, :]
            k_even, k_odd = _code_pairs(_load_pages(k_ptr, page, t, kvh, j, kv_mask, k_sblk, k_stok, k_sh, PAGE),
                                        INT8)
            s = tl.dot(q_even, tl.trans(k_even))
            s = tl.dot(q_odd, tl.trans(k_odd), s) * qk_scale
            s = tl.where(ok[None, :], s, float("-inf"))
            v_even, v_odd = _code_pairs(_load_pages(v_ptr, page, t, kvh, j, kv_mask, v_sblk, v_stok, v_sh, PAGE),
                                        INT8)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])  # masked scores are -inf: p = 0
            alpha = tl.exp2(m - m_new)
            p16 = p.to(tl.float16)
            acc_even = tl.dot(p16, v_even, acc_even * alpha[:, None])
            acc_odd = tl.dot(p16, v_odd, acc_odd * alpha[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new

        empty = l == 0.0  # a split past the end of a short context
        norm = (v_scale / tl.where(empty, 1.0, l))[:, None]
        if ONE_SPLIT:
            out = part_ptr + b * o_sb + heads[:, None] * o_sh + 2 * j[None, :]
        else:
            row = (b * tl.num_programs(1) * group + heads) * num_splits + split  # partial: [b, heads, splits, d]
            out = part_ptr + row[:, None] * head_size + 2 * j[None, :]
            tl.store(lse_ptr + row, tl.where(empty, float("-inf"), m + tl.log2(l)), mask=g < group)
        tl.store(out, (acc_even * norm).to(part_ptr.dtype.element_ty), mask=mask)
        tl.store(out + 1, (acc_odd * norm).to(part_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _merge_kernel(part_ptr, lse_ptr, out_ptr, o_sb, o_sh, heads, head_size, num_splits,
                      BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
        allow_dependents(USE_PDL)
        wait_for_inputs(USE_PDL)
        b, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
        s, d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
        row = (b * heads + h) * num_splits + s
        lse = tl.load(lse_ptr + row, mask=s < num_splits, other=float("-inf"))
        w = tl.exp2(lse - tl.max(lse, axis=0))  # a query sees at least one key (itself): the max is finite
        parts = tl.load(part_ptr + row[:, None] * head_size + d[None, :],
                        mask=(s < num_splits)[:, None] & (d < head_size)[None, :], other=0.0)
        out = tl.sum(w[:, None] * parts, axis=0) / tl.sum(w, axis=0)
        tl.store(out_ptr + b * o_sb + h * o_sh + d, out.to(out_ptr.dtype.element_ty), mask=d < head_size)

    @triton.jit
    def _prefill_step(q, k_ptrs, v_ptrs, k_st, v_st, kstart, rows, d_ok, m, l, acc, qk_scale, window, n,
                      CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
        """Fold keys kstart..kstart+BLOCK_N of one sequence into the running softmax of q's rows."""
        cols = kstart + tl.arange(0, BLOCK_N)
        kv_mask = d_ok[None, :]
        if CAUSAL:  # the diagonal tile can also run past the sequence's end
            kv_mask = (cols < n)[:, None] & kv_mask
        k = tl.load(k_ptrs + kstart * k_st, mask=kv_mask, other=0.0).to(q.dtype)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        if CAUSAL:
            s = tl.where((cols[None, :] <= rows[:, None]) & (cols < n)[None, :], s, float("-inf"))
        if HAS_WINDOW:
            s = tl.where(rows[:, None] - cols[None, :] < window, s, float("-inf"))
        v = tl.load(v_ptrs + kstart * v_st, mask=kv_mask, other=0.0).to(q.dtype)
        return _online_softmax_step(s, m, l, acc, v, IEEE)

    @triton.jit
    def _sequence(cu_ptr, seq):
        """(start, n): where sequence `seq`'s new tokens start in the packed stream, and how many it has."""
        start = tl.load(cu_ptr + seq)
        n = tl.load(cu_ptr + seq + 1) - start
        return start.to(tl.int64), n  # token offsets times strides can pass 2**31

    @triton.jit
    def _query_tile(q_ptr, start, n, tile, h, q_st, q_sh, head_size, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """A prefill program's queries: (rows, d, d_ok, q) of tile `tile` of a sequence's new tokens."""
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_size
        q = tl.load(q_ptr + (start + rows)[:, None] * q_st + h * q_sh + d[None, :],
                    mask=(rows < n)[:, None] & d_ok[None, :], other=0.0)
        return rows, d, d_ok, q

    @triton.jit
    def _store_tile(o_ptr, start, rows, n, h, d, d_ok, o_st, o_sh, acc, l, v_scale):
        """Normalise a prefill tile's accumulator and store its rows (l is 0 only on padding rows past n)."""
        out = acc * (v_scale / tl.where(l == 0.0, 1.0, l))[:, None]
        tl.store(o_ptr + (start + rows)[:, None] * o_st + h * o_sh + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=(rows < n)[:, None] & d_ok[None, :])

    @triton.jit
    def _prefill_kernel(q_ptr, k_ptr, v_ptr, kvs_ptr, o_ptr, cu_ptr, q_st, q_sh, k_st, k_sh, v_st, v_sh, o_st,
                        o_sh, scale_log2, window, group, head_size,
                        HAS_WINDOW: tl.constexpr, HAS_SCALE: tl.constexpr, CODES_FP16: tl.constexpr,
                        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        tile, seq, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start, n = _sequence(cu_ptr, seq)
        if tile * BLOCK_M >= n:  # the grid is sized for the longest sequence
            return
        rows, d, d_ok, q = _query_tile(q_ptr, start, n, tile, h, q_st, q_sh, head_size, BLOCK_M, BLOCK_D)
        q = _codes_query(q, CODES_FP16)
        kvh = h // group
        qk_scale, v_scale = _kv_scales(kvs_ptr, scale_log2, HAS_SCALE)
        m = tl.full([BLOCK_M], -1e30, tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        k_ptrs = k_ptr + (start + tl.arange(0, BLOCK_N))[:, None] * k_st + kvh * k_sh + d[None, :]
        v_ptrs = v_ptr + (start + tl.arange(0, BLOCK_N))[:, None] * v_st + kvh * v_sh + d[None, :]
        diag = tile * BLOCK_M  # keys before the tile's first query need no causal mask (FlashAttention-2)
        lo = 0
        if HAS_WINDOW:  # nor any before its first query's window
            lo = tl.maximum(diag - window + 1, 0) // BLOCK_N * BLOCK_N
        for kstart in range(lo, diag, BLOCK_N):
            m, l, acc = _prefill_step(q, k_ptrs, v_ptrs, k_st, v_st, kstart, rows, d_ok, m, l, acc, qk_scale,
                                      window, n, False, HAS_WINDOW, IEEE, BLOCK_N)
        hi = tl.minimum(diag + BLOCK_M, n)  # causal: no key after the tile's last query
        for kstart in range(diag, hi, BLOCK_N):
            m, l, acc = _prefill_step(q, k_ptrs, v_ptrs, k_st, v_st, kstart, rows, d_ok, m, l, acc, qk_scale,
                                      window, n, True, HAS_WINDOW, IEEE, BLOCK_N)
        _store_tile(o_ptr, start, rows, n, h, d, d_ok, o_st, o_sh, acc, l, v_scale)


    @triton.jit
    def _paged_prefill_kernel(q_ptr, k_ptr, v_ptr, kvs_ptr, o_ptr, lse_ptr, cu_ptr, ctx_ptr, bt_ptr, q_st, q_sh,
                              k_sblk, k_stok, k_sh, v_sblk, v_stok, v_sh, bt_sb, o_st, o_sh,
                              scale_log2, window, group, head_size, num_splits,
                              PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SCALE: tl.constexpr,
                              CODES_FP16: tl.constexpr, IEEE: tl.constexpr, ONE_SPLIT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """FlashAttention-2 for new queries over a paged cache: keys are found through the block table. With
        several splits, each program folds one share of the keys and stores a partial output [token, head,
        split] with its log-sum-exp, for the merge."""
        tile, seq, hs = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
        h, split = hs // num_splits, hs % num_splits
        start, n = _sequence(cu_ptr, seq)
        if tile * BLOCK_M >= n:
            return
        rows, d, d_ok, q = _query_tile(q_ptr, start, n, tile, h, q_st, q_sh, head_size, BLOCK_M, BLOCK_D)
        q = _codes_query(q, CODES_FP16)
        ctx = tl.load(ctx_ptr + seq)
        kvh = h // group
        q_pos = ctx + rows
        qk_scale, v_scale = _kv_scales(kvs_ptr, scale_log2, HAS_SCALE)
        m = tl.full([BLOCK_M], -1e30, tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = tl.minimum(ctx + tile * BLOCK_M + BLOCK_M, ctx + n)  # causal: no key after the tile's last query
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(ctx + tile * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
        if not ONE_SPLIT:  # this split's share of the keys, in whole tiles
            split_len = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
            lo = lo + split * split_len
            hi = tl.minimum(lo + split_len, hi)
        for kstart in range(lo, hi, BLOCK_N):
            t = kstart + tl.arange(0, BLOCK_N)
            ok = t < hi
            page = tl.load(bt_ptr + seq * bt_sb + t // PAGE, mask=ok, other=0).to(tl.int64)
            kv_mask = ok[:, None] & d_ok[None, :]
            k = _load_pages(k_ptr, page, t, kvh, d, kv_mask, k_sblk, k_stok, k_sh, PAGE).to(q.dtype)
            s = _dot(q, tl.trans(k), IEEE) * qk_scale
            keep = (t[None, :] <= q_pos[:, None]) & ok[None, :]
            if HAS_WINDOW:
                keep = keep & (q_pos[:, None] - t[None, :] < window)
            s = tl.where(keep, s, float("-inf"))
            v = _load_pages(v_ptr, page, t, kvh, d, kv_mask, v_sblk, v_stok, v_sh, PAGE).to(q.dtype)
            m, l, acc = _online_softmax_step(s, m, l, acc, v, IEEE)
        if ONE_SPLIT:
            _store_tile(o_ptr, start, rows, n, h, d, d_ok, o_st, o_sh, acc, l, v_scale)
        else:
            empty = l == 0.0  # no key of this split is visible to the row (or a padding row)
            out = acc * (v_scale / tl.where(empty, 1.0, l))[:, None]
            row = ((start + rows) * (tl.num_programs(2) // num_splits) + h) * num_splits + split
            row_ok = rows < n
            tl.store(o_ptr + row[:, None] * head_size + d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
            tl.store(lse_ptr + row, tl.where(empty, float("-inf"), m + tl.log2(l)), mask=row_ok)
