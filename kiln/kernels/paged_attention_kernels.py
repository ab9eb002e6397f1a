"""The Triton kernels of kiln.kernels.paged_attention (its docstring says what they compute and how), apart from
the references and launchers there. CUDA only: import it where Triton is installed.
"""

import triton
import triton.language as tl

from kiln.kernels.fp8_quant import to_e4m3, to_e4m3_groups
from kiln.kernels.pdl import allow_dependents, wait_for_inputs


# Integers that change from step to step (the block table's width, the number of key splits). Triton compiles a
# kernel anew for each integer's divisibility by 16 and equality to 1: a step meeting a new combination compiled
# paged_prefill_kernel for 1.16 s in prefill-1000's timed run (docs/performance.md, twenty-second session). Read as
# scalars, they gain nothing from specializing.
VARYING_INTS = ("bt_sb", "num_splits")


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
def _lazy_softmax_step(s, m, l, acc, v, qk_scale, IEEE: tl.constexpr):
    """_online_softmax_step for the prefill kernels, which multiply more than they stream: s is raw scores (q k^T,
    masked ones -inf) and m a running max in the same units that moves only once some row's max grew by more than
    2^8 in p (FlashAttention-4's lazy rescaling). p = exp2(s qk_scale - m qk_scale) stays below 2^8 meanwhile, and
    the accumulator's rescale, a multiply per element of it, is skipped on the steps where no max moved that far,
    most steps past the first few. The scale goes in with the max's subtraction: one FFMA a score, not two ops."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    if tl.max((m_new - m) * qk_scale, axis=0) > 8.0:
        alpha = tl.exp2((m - m_new) * qk_scale)
        acc = acc * alpha[:, None]
        l = l * alpha
        m = m_new
    p = tl.exp2(s * qk_scale - (m * qk_scale)[:, None])  # masked scores are -inf: p = 0
    return m, l + tl.sum(p, axis=1), acc + _dot(p.to(v.dtype), v, IEEE)


@triton.jit
def _prefill_softmax_step(s, m, l, acc, v, qk_scale, IEEE: tl.constexpr, LAZY: tl.constexpr):
    """The prefill kernels' step over raw scores s: lazily rescaled (LAZY; m then stays in raw units, see
    _running_lse) or as decode does it."""
    if LAZY:
        return _lazy_softmax_step(s, m, l, acc, v, qk_scale, IEEE)
    return _online_softmax_step(s * qk_scale, m, l, acc, v, IEEE)


@triton.jit
def _running_lse(m, l, qk_scale, LAZY: tl.constexpr):
    """log2 of a row's softmax mass in scaled units, from _prefill_softmax_step's running max and sum."""
    if LAZY:
        return m * qk_scale + tl.log2(l)
    return m + tl.log2(l)


@triton.jit
def _sink_kept(sink_ptr, h, lse):
    """The share of a row's softmax mass its keys keep beside its head's sink logit (gpt-oss: the sink joins the
    denominator, no value follows it): 1 / (1 + 2^(sink log2(e) - lse)), lse the keys' log2 mass in scaled units.
    (A row with no keys, l = 0: lse -inf, 0 kept.)"""
    sink = tl.load(sink_ptr + h).to(tl.float32) * 1.4426950408889634
    return 1.0 / (1.0 + tl.exp2(sink - lse))


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
def _split_keys(ctx_ptr, b, split, window, num_splits, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi): the keys of sequence b that decode split `split` folds in, whole tiles but the last."""
    ctx = tl.load(ctx_ptr + b)
    first = tl.maximum(ctx - window, 0) if HAS_WINDOW else 0
    split_len = tl.cdiv(tl.cdiv(ctx - first, num_splits), BLOCK_N) * BLOCK_N
    lo = first + split * split_len
    return lo, tl.minimum(lo + split_len, ctx)


@triton.jit
def _merge_if_last(part_ptr, lse_ptr, out_ptr, count_ptr, b, kvh, group, head_size, num_splits, o_sb, o_sh,
                   BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """merge_kernel's work for the heads of one (sequence, KV head), done by whichever of its split programs
    finishes last, so no merge kernel follows (FUSED_MERGE). Each program counts itself in once its partial is
    stored; the count's release and acquire order those stores before the last program's loads, which bypass L1
    (.cg), and the last program sets the count back to 0 for the next launch."""
    tl.debug_barrier()  # every thread of this program has stored its part
    counter = count_ptr + b * tl.num_programs(1) + kvh
    if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
        g, d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
        heads = kvh * group + g
        mask = (g < group)[:, None] & (d < head_size)[None, :]
        first = (b * tl.num_programs(1) * group + heads) * num_splits  # split 0's row of each head
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        # Online, as merge_kernel weighs by exp2(lse - max lse). Split 0 always holds keys, so m is finite from it.
        for split in range(num_splits):
            lse = tl.load(lse_ptr + first + split, mask=g < group, other=0.0, cache_modifier=".cg")
            part = tl.load(part_ptr + (first + split)[:, None] * head_size + d[None, :], mask=mask, other=0.0,
                           cache_modifier=".cg")
            m_new = tl.maximum(m, lse)
            alpha, w = tl.exp2(m - m_new), tl.exp2(lse - m_new)
            acc = acc * alpha[:, None] + w[:, None] * part
            total = total * alpha + w
            m = m_new
        tl.store(out_ptr + b * o_sb + heads[:, None] * o_sh + d[None, :],
                 (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit(do_not_specialize=VARYING_INTS)
def decode_split_kernel(q_ptr, k_ptr, v_ptr, kvs_ptr, bt_ptr, ctx_ptr, part_ptr, lse_ptr, out_ptr, count_ptr,
                        sink_ptr, q_sb, q_sh, k_sblk, k_stok, k_sh, v_sblk, v_stok, v_sh, bt_sb, o_sb, o_sh,
                        scale_log2, window, group, head_size, num_splits,
                        PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SCALE: tl.constexpr,
                        CODES_FP16: tl.constexpr, IEEE: tl.constexpr, ONE_SPLIT: tl.constexpr,
                        FUSED_MERGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, HAS_SINK: tl.constexpr, USE_PDL: tl.constexpr):
    """One split of one sequence's keys for the query heads of one KV head: a normalised partial output
    and its log-sum-exp for the merge; with ONE_SPLIT, part_ptr is the output itself and no merge runs. With
    FUSED_MERGE the last split program to finish merges into out_ptr (o_sb, o_sh), counting in count_ptr.
    HAS_SINK (sink_ptr [heads]): the whole output's share beside the sink (_sink_kept), with ONE_SPLIT; the
    merge applies it to split parts."""
    allow_dependents(USE_PDL)
    wait_for_inputs(USE_PDL)
    b, kvh, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    lo, hi = _split_keys(ctx_ptr, b, split, window, num_splits, HAS_WINDOW, BLOCK_N)

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
    if HAS_SINK and ONE_SPLIT:  # its share beside the sink (heads past the group: a valid index, rows masked)
        kept = _sink_kept(sink_ptr, tl.minimum(heads, kvh * group + group - 1), m + tl.log2(l))
        out = acc * (v_scale * kept / tl.where(empty, 1.0, l))[:, None]
    else:  # (split parts: the merge applies the sink)
        out = acc * (v_scale / tl.where(empty, 1.0, l))[:, None]
    mask = (g < group)[:, None] & d_ok[None, :]
    if ONE_SPLIT:
        tl.store(part_ptr + b * o_sb + heads[:, None] * o_sh + d[None, :], out.to(part_ptr.dtype.element_ty),
                 mask=mask)
    else:
        row = (b * tl.num_programs(1) * group + heads) * num_splits + split  # partial: [b, heads, splits, d]
        tl.store(part_ptr + row[:, None] * head_size + d[None, :], out, mask=mask)
        tl.store(lse_ptr + row, tl.where(empty, float("-inf"), m + tl.log2(l)), mask=g < group)
        if FUSED_MERGE:
            _merge_if_last(part_ptr, lse_ptr, out_ptr, count_ptr, b, kvh, group, head_size, num_splits, o_sb, o_sh,
                           BLOCK_G, BLOCK_D)


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
def _tile_rows(bt_ptr, b, bt_sb, start, hi, j_ok, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """(keys t = start..start+BLOCK_N, which are before hi, each one's page, the mask of their words) of a decode
    tile over a paged cache."""
    t = start + tl.arange(0, BLOCK_N)
    ok = t < hi
    page = tl.load(bt_ptr + b * bt_sb + t // PAGE, mask=ok, other=0).to(tl.int64)
    return t, ok, page, ok[:, None] & j_ok[None, :]


@triton.jit(do_not_specialize=VARYING_INTS)
def decode_code_pairs_kernel(q_ptr, k_ptr, v_ptr, kvs_ptr, bt_ptr, ctx_ptr, part_ptr, lse_ptr, out_ptr, count_ptr,
                             sink_ptr, q_sb, q_sh, k_sblk, k_stok, k_sh, v_sblk, v_stok, v_sh, bt_sb, o_sb, o_sh,
                             scale_log2, window, group, head_size, num_splits,
                             PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SCALE: tl.constexpr,
                             ONE_SPLIT: tl.constexpr, FUSED_MERGE: tl.constexpr, BLOCK_G: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr,
                             PREFETCH: tl.constexpr, HAS_SINK: tl.constexpr, USE_PDL: tl.constexpr):
    """decode_split_kernel over an int8 or e4m3 cache (INT8) viewed as int16 words (k_ptr, v_ptr and their
    strides count words): each word holds the codes of columns 2j and 2j+1. The query is split into its even
    and odd columns, so s = q_even k_even^T + q_odd k_odd^T, and the output is kept as its even and odd
    halves, stored interleaved at the end. The tiles are loaded as 16-bit words, as a bf16 cache's are.
    PREFETCH: each step requests the next tile's words before it works on its own (held in registers, a second
    tile's worth), so a program waits on memory once, not once a tile."""
    allow_dependents(USE_PDL)
    wait_for_inputs(USE_PDL)
    b, kvh, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    lo, hi = _split_keys(ctx_ptr, b, split, window, num_splits, HAS_WINDOW, BLOCK_N)

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
    if PREFETCH:  # the first tile's words
        t, ok_next, page, kv_mask = _tile_rows(bt_ptr, b, bt_sb, lo, hi, j_ok, PAGE, BLOCK_N)
        k_next = _load_pages(k_ptr, page, t, kvh, j, kv_mask, k_sblk, k_stok, k_sh, PAGE)
        v_next = _load_pages(v_ptr, page, t, kvh, j, kv_mask, v_sblk, v_stok, v_sh, PAGE)
    for start in range(lo, hi, BLOCK_N):
        if PREFETCH:  # this tile's words arrived during the last step; the next tile's arrive during this one
            ok, k_words, v_words = ok_next, k_next, v_next
            t, ok_next, page, kv_mask = _tile_rows(bt_ptr, b, bt_sb, start + BLOCK_N, hi, j_ok, PAGE, BLOCK_N)
            k_next = _load_pages(k_ptr, page, t, kvh, j, kv_mask, k_sblk, k_stok, k_sh, PAGE)
            v_next = _load_pages(v_ptr, page, t, kvh, j, kv_mask, v_sblk, v_stok, v_sh, PAGE)
        else:
            t, ok, page, kv_mask = _tile_rows(bt_ptr, b, bt_sb, start, hi, j_ok, PAGE, BLOCK_N)
            k_words = _load_pages(k_ptr, page, t, kvh, j, kv_mask, k_sblk, k_stok, k_sh, PAGE)
        k_even, k_odd = _code_pairs(k_words, INT8)
        s = tl.dot(q_even, tl.trans(k_even))
        s = tl.dot(q_odd, tl.trans(k_odd), s) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        if not PREFETCH:
            v_words = _load_pages(v_ptr, page, t, kvh, j, kv_mask, v_sblk, v_stok, v_sh, PAGE)
        v_even, v_odd = _code_pairs(v_words, INT8)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])  # masked scores are -inf: p = 0
        alpha = tl.exp2(m - m_new)
        p16 = p.to(tl.float16)
        acc_even = tl.dot(p16, v_even, acc_even * alpha[:, None])
        acc_odd = tl.dot(p16, v_odd, acc_odd * alpha[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new

    empty = l == 0.0  # a split past the end of a short context
    if HAS_SINK and ONE_SPLIT:  # as in decode_split_kernel
        kept = _sink_kept(sink_ptr, tl.minimum(heads, kvh * group + group - 1), m + tl.log2(l))
        norm = (v_scale * kept / tl.where(empty, 1.0, l))[:, None]
    else:
        norm = (v_scale / tl.where(empty, 1.0, l))[:, None]
    if ONE_SPLIT:
        out = part_ptr + b * o_sb + heads[:, None] * o_sh + 2 * j[None, :]
    else:
        row = (b * tl.num_programs(1) * group + heads) * num_splits + split  # partial: [b, heads, splits, d]
        out = part_ptr + row[:, None] * head_size + 2 * j[None, :]
        tl.store(lse_ptr + row, tl.where(empty, float("-inf"), m + tl.log2(l)), mask=g < group)
    tl.store(out, (acc_even * norm).to(part_ptr.dtype.element_ty), mask=mask)
    tl.store(out + 1, (acc_odd * norm).to(part_ptr.dtype.element_ty), mask=mask)
    if FUSED_MERGE and not ONE_SPLIT:
        _merge_if_last(part_ptr, lse_ptr, out_ptr, count_ptr, b, kvh, group, head_size, num_splits, o_sb, o_sh,
                       BLOCK_G, BLOCK_D)


@triton.jit(do_not_specialize=VARYING_INTS)
def merge_kernel(part_ptr, lse_ptr, out_ptr, like_ptr, fp8_scale_ptr, row_scale_ptr, sink_ptr, o_sb, o_sh, heads,
                 head_size, num_splits, FP8_OUT: tl.constexpr, FP8_GROUP: tl.constexpr, BLOCK_S: tl.constexpr,
                 BLOCK_D: tl.constexpr, HAS_SINK: tl.constexpr, USE_PDL: tl.constexpr):
    """out[b, h] = the splits' parts weighted by their softmax mass. FP8_OUT: out holds e4m3 codes of the output
    rounded to like_ptr's dtype (the query's: what the 16-bit output would hold) over the static scale
    fp8_scale_ptr [1], as the next linear would quantize it, and row_scale_ptr [b] gets that scale (Fp8Rows).
    FP8_GROUP (a divisor of head_size): the codes have a scale per group of that many of the head's values, as
    FP8_BLOCK_SCALES' linear would quantize them, and row_scale_ptr [b, heads x head_size / FP8_GROUP] gets them."""
    allow_dependents(USE_PDL)
    wait_for_inputs(USE_PDL)
    b, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    s, d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    row = (b * heads + h) * num_splits + s
    lse = tl.load(lse_ptr + row, mask=s < num_splits, other=float("-inf"))
    top = tl.max(lse, axis=0)  # a query sees at least one key (itself): the max is finite
    w = tl.exp2(lse - top)
    parts = tl.load(part_ptr + row[:, None] * head_size + d[None, :],
                    mask=(s < num_splits)[:, None] & (d < head_size)[None, :], other=0.0)
    out = tl.sum(w[:, None] * parts, axis=0) / tl.sum(w, axis=0)
    if HAS_SINK:
        out = out * _sink_kept(sink_ptr, h, top + tl.log2(tl.sum(w, axis=0)))
    if FP8_OUT:
        scale = tl.load(fp8_scale_ptr).to(tl.float32)
        out = to_e4m3(out.to(like_ptr.dtype.element_ty).to(tl.float32), scale)
        if h == 0:
            tl.store(row_scale_ptr + b, scale)
    elif FP8_GROUP > 0:  # values past head_size are 0: their groups' scales are not stored
        out, group_scales = to_e4m3_groups(out.to(like_ptr.dtype.element_ty).to(tl.float32), FP8_GROUP)
        g, per_head = tl.arange(0, BLOCK_D // FP8_GROUP), head_size // FP8_GROUP
        tl.store(row_scale_ptr + (b * heads + h) * per_head + g, group_scales, mask=g < per_head)
    tl.store(out_ptr + b * o_sb + h * o_sh + d, out.to(out_ptr.dtype.element_ty), mask=d < head_size)


@triton.jit
def _prefill_step(q, k_ptrs, v_ptrs, k_st, v_st, kstart, rows, d_ok, m, l, acc, qk_scale, window, n,
                  CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                  LAZY: tl.constexpr):
    """Fold keys kstart..kstart+BLOCK_N of one sequence into the running softmax of q's rows."""
    cols = kstart + tl.arange(0, BLOCK_N)
    kv_mask = d_ok[None, :]
    if CAUSAL:  # the diagonal tile can also run past the sequence's end
        kv_mask = (cols < n)[:, None] & kv_mask
    k = tl.load(k_ptrs + kstart * k_st, mask=kv_mask, other=0.0).to(q.dtype)
    s = _dot(q, tl.trans(k), IEEE)
    if CAUSAL:
        s = tl.where((cols[None, :] <= rows[:, None]) & (cols < n)[None, :], s, float("-inf"))
    if HAS_WINDOW:
        s = tl.where(rows[:, None] - cols[None, :] < window, s, float("-inf"))
    v = tl.load(v_ptrs + kstart * v_st, mask=kv_mask, other=0.0).to(q.dtype)
    return _prefill_softmax_step(s, m, l, acc, v, qk_scale, IEEE, LAZY)


@triton.jit
def _sequence(cu_ptr, seq):
    """(start, n): where sequence `seq`'s new tokens start in the packed stream, and how many it has."""
    start = tl.load(cu_ptr + seq)
    n = tl.load(cu_ptr + seq + 1) - start
    return start.to(tl.int64), n  # token offsets times strides can pass 2**31


@triton.jit
def _query_tile(q_ptr, start, n, tile, h, q_st, q_sh, head_size, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                EVEN_D: tl.constexpr):
    """A prefill program's queries: (rows, d, d_ok, q) of tile `tile` of a sequence's new tokens. EVEN_D: the head
    size is BLOCK_D, so d_ok is a constant and the key and value loads carry no mask on d."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < (BLOCK_D if EVEN_D else head_size)
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
def prefill_kernel(q_ptr, k_ptr, v_ptr, kvs_ptr, o_ptr, cu_ptr, sink_ptr, q_st, q_sh, k_st, k_sh, v_st, v_sh, o_st,
                   o_sh, scale_log2, window, group, head_size,
                   HAS_WINDOW: tl.constexpr, HAS_SCALE: tl.constexpr, CODES_FP16: tl.constexpr,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   EVEN_D: tl.constexpr, LAZY: tl.constexpr, HAS_SINK: tl.constexpr):
    # The last query tiles first: causal work grows with the tile, and the GPU starts programs in order, so the
    # longest ones start first and the short ones fill the end of the grid (FlashAttention-2's ordering).
    tile, seq, h = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, n = _sequence(cu_ptr, seq)
    if tile * BLOCK_M >= n:  # the grid is sized for the longest sequence
        return
    rows, d, d_ok, q = _query_tile(q_ptr, start, n, tile, h, q_st, q_sh, head_size, BLOCK_M, BLOCK_D, EVEN_D)
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
                                  window, n, False, HAS_WINDOW, IEEE, BLOCK_N, LAZY)
    hi = tl.minimum(diag + BLOCK_M, n)  # causal: no key after the tile's last query
    for kstart in range(diag, hi, BLOCK_N):
        m, l, acc = _prefill_step(q, k_ptrs, v_ptrs, k_st, v_st, kstart, rows, d_ok, m, l, acc, qk_scale,
                                  window, n, True, HAS_WINDOW, IEEE, BLOCK_N, LAZY)
    if HAS_SINK:
        v_kept = v_scale * _sink_kept(sink_ptr, h, _running_lse(m, l, qk_scale, LAZY))
        _store_tile(o_ptr, start, rows, n, h, d, d_ok, o_st, o_sh, acc, l, v_kept)
    else:
        _store_tile(o_ptr, start, rows, n, h, d, d_ok, o_st, o_sh, acc, l, v_scale)


@triton.jit
def _prefill_tma_step(q, k_desc, v_desc, row0, col, kstart, rows, m, l, acc, qk_scale, window, n,
                      CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr, LAZY: tl.constexpr):
    """_prefill_step with the key and value tiles loaded by TMA (tensor descriptors): rows past the sequence's end
    are the next sequence's tokens or, past the tensor, zeros; the causal mask drops their scores."""
    cols = kstart + tl.arange(0, BLOCK_N)
    k = k_desc.load([row0 + kstart, col]).to(q.dtype)  # (a quantized cache's codes: exact in q's dtype)
    s = tl.dot(q, tl.trans(k))
    if CAUSAL:
        s = tl.where((cols[None, :] <= rows[:, None]) & (cols < n)[None, :], s, float("-inf"))
    if HAS_WINDOW:
        s = tl.where(rows[:, None] - cols[None, :] < window, s, float("-inf"))
    v = v_desc.load([row0 + kstart, col]).to(q.dtype)
    return _prefill_softmax_step(s, m, l, acc, v, qk_scale, False, LAZY)


@triton.jit
def prefill_tma_kernel(q_ptr, k_desc, v_desc, kvs_ptr, o_ptr, cu_ptr, sink_ptr, q_st, q_sh, o_st, o_sh, scale_log2,
                       window, group, HAS_WINDOW: tl.constexpr, HAS_SCALE: tl.constexpr, CODES_FP16: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, LAZY: tl.constexpr,
                       HAS_SINK: tl.constexpr):
    """prefill_kernel for a 16-bit q of head size BLOCK_D, its key and value tiles loaded by Hopper's TMA: k_desc
    and v_desc are 2-D descriptors over [tokens, kv heads x head size] with blocks of [BLOCK_N, BLOCK_D], of 16-bit
    keys and values or (HAS_SCALE) the codes of a quantized cache, which convert as in prefill_kernel. (Triton 3.6
    warp-specializes loops on Blackwell only, so the loads and the MMAs share warps here, as in prefill_kernel:
    what changes is how the tiles arrive.)"""
    tile, seq, h = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, n = _sequence(cu_ptr, seq)
    if tile * BLOCK_M >= n:
        return
    rows, d, d_ok, q = _query_tile(q_ptr, start, n, tile, h, q_st, q_sh, BLOCK_D, BLOCK_M, BLOCK_D, True)
    q = _codes_query(q, CODES_FP16)
    qk_scale, v_scale = _kv_scales(kvs_ptr, scale_log2, HAS_SCALE)
    row0, col = start.to(tl.int32), (h // group) * BLOCK_D  # descriptor offsets are 32-bit
    m = tl.full([BLOCK_M], -1e30, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    diag = tile * BLOCK_M
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(diag - window + 1, 0) // BLOCK_N * BLOCK_N
    for kstart in range(lo, diag, BLOCK_N):
        m, l, acc = _prefill_tma_step(q, k_desc, v_desc, row0, col, kstart, rows, m, l, acc, qk_scale, window,
                                      n, False, HAS_WINDOW, BLOCK_N, LAZY)
    for kstart in range(diag, tl.minimum(diag + BLOCK_M, n), BLOCK_N):
        m, l, acc = _prefill_tma_step(q, k_desc, v_desc, row0, col, kstart, rows, m, l, acc, qk_scale, window,
                                      n, True, HAS_WINDOW, BLOCK_N, LAZY)
    if HAS_SINK:
        v_kept = v_scale * _sink_kept(sink_ptr, h, _running_lse(m, l, qk_scale, LAZY))
        _store_tile(o_ptr, start, rows, n, h, d, d_ok, o_st, o_sh, acc, l, v_kept)
    else:
        _store_tile(o_ptr, start, rows, n, h, d, d_ok, o_st, o_sh, acc, l, v_scale)


@triton.jit(do_not_specialize=VARYING_INTS)
def paged_prefill_kernel(q_ptr, k_ptr, v_ptr, kvs_ptr, o_ptr, lse_ptr, cu_ptr, ctx_ptr, bt_ptr, sink_ptr, q_st, q_sh,
                         k_sblk, k_stok, k_sh, v_sblk, v_stok, v_sh, bt_sb, o_st, o_sh,
                         scale_log2, window, group, head_size, num_splits,
                         PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SCALE: tl.constexpr,
                         CODES_FP16: tl.constexpr, IEEE: tl.constexpr, ONE_SPLIT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         EVEN_D: tl.constexpr, LAZY: tl.constexpr, HAS_SINK: tl.constexpr):
    """FlashAttention-2 for new queries over a paged cache: keys are found through the block table. With
    several splits, each program folds one share of the keys and stores a partial output [token, head,
    split] with its log-sum-exp, for the merge. The last query tiles first, as in prefill_kernel."""
    tile, seq, hs = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    h, split = hs // num_splits, hs % num_splits
    start, n = _sequence(cu_ptr, seq)
    if tile * BLOCK_M >= n:
        return
    rows, d, d_ok, q = _query_tile(q_ptr, start, n, tile, h, q_st, q_sh, head_size, BLOCK_M, BLOCK_D, EVEN_D)
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
        s = _dot(q, tl.trans(k), IEEE)
        keep = (t[None, :] <= q_pos[:, None]) & ok[None, :]
        if HAS_WINDOW:
            keep = keep & (q_pos[:, None] - t[None, :] < window)
        s = tl.where(keep, s, float("-inf"))
        v = _load_pages(v_ptr, page, t, kvh, d, kv_mask, v_sblk, v_stok, v_sh, PAGE).to(q.dtype)
        m, l, acc = _prefill_softmax_step(s, m, l, acc, v, qk_scale, IEEE, LAZY)
    if ONE_SPLIT and HAS_SINK:
        v_kept = v_scale * _sink_kept(sink_ptr, h, _running_lse(m, l, qk_scale, LAZY))
        _store_tile(o_ptr, start, rows, n, h, d, d_ok, o_st, o_sh, acc, l, v_kept)
    elif ONE_SPLIT:
        _store_tile(o_ptr, start, rows, n, h, d, d_ok, o_st, o_sh, acc, l, v_scale)
    else:
        empty = l == 0.0  # no key of this split is visible to the row (or a padding row)
        out = acc * (v_scale / tl.where(empty, 1.0, l))[:, None]
        row = ((start + rows) * (tl.num_programs(2) // num_splits) + h) * num_splits + split
        row_ok = rows < n
        tl.store(o_ptr + row[:, None] * head_size + d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + row, tl.where(empty, float("-inf"), _running_lse(m, l, qk_scale, LAZY)), mask=row_ok)
