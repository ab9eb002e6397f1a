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
codes to fp16 in one instruction but to bf16 in five (in the sm_90 machine code of a 64-key decode step, 822
instructions against 986; scripts/kernel_sass.py "decode split" --num-stages 2). A bf16 query is exact in fp16
from 2^-14 to 65504 (below, fp16's subnormals keep it to 2^-24; beyond, it is clamped), and the probabilities
round to fp16's 11 bits instead of bf16's 8. int8 codes keep the query's dtype: their conversion to fp16 is no cheaper.
Decode reads a 1-byte cache as 16-bit words of two codes (`CODES_AS_PAIRS`, decode_code_pairs_kernel): the tiles
then load as a bf16 cache's do, and a few packed instructions convert two words to fp16, so under a bf16 query
both 1-byte formats multiply in fp16 there. Prefill and a float32 query read the codes one by one.
"""

import math
import os

import torch

try:
    import triton
except ImportError:  # CPU-only installs: the references below still work
    triton = None

from kiln.kernels import num_sms
from kiln.kernels.input_quant import FP8_GROUPS, FP8_STATIC, NO_QUANT_FLAGS
from kiln.kernels.pdl import pdl_args

if triton is not None:  # the kernels themselves (kiln/kernels/paged_attention_kernels.py)
    try:  # host-side TMA descriptors: Triton 3.3 and later
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        TensorDescriptor = None

    from kiln.kernels.paged_attention_kernels import (decode_code_pairs_kernel, decode_split_kernel, merge_kernel,
                                                      paged_prefill_kernel, prefill_kernel, prefill_tma_kernel)

_LOG2E = 1.4426950408889634
# Launch configurations, the fastest of a small sweep on an H100 (Llama-3-8B shapes, bf16): decode at
# batch 32, context 2048 (2.6 TB/s of KV read; 11 configs, 1.5-2.6 TB/s), prefill 4 x 2048 tokens
# (386 TFLOP/s; 8 configs, 175-386). Retune per GPU when the runtime grows an autotuning cache.
# BLOCK_N 64: at batch 512 and contexts of 128-256 keys (offline decode) a 128-key tile is mostly masked; on the
# H100, 112 us a layer against 137 (bf16 cache) and no slower at 2048 keys (scripts/bench_decode_attention.py).
DECODE_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=2, programs_per_sm=2)
# Heads of 129 to 256 (tiles of 256): prompts in small tiles, their 128 x 128 ones outgrowing shared memory.
MID_PREFILL_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
# Heads wider than 256: latent attention's cached rows (kiln.layers.mla; 576 wide, tiles of 1024). Tiles that fit
# an H100's 227 KB of shared memory by the sm_90 compiler (decode 97 KB with 16 query heads a program, prompts 64
# KB), with 8 warps to hold the 1024-wide accumulators; chosen blind, not yet timed. More than WIDE_MAX_GROUP query
# heads a program (DeepSeek-V3's 128 on one GPU: 288 KB at the least) do not fit, so decode attends them 16 at a
# time (_decode_in_head_chunks).
WIDE_HEAD = 256
WIDE_DECODE_CONFIG = dict(BLOCK_N=32, num_warps=8, num_stages=1)
WIDE_PREFILL_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=1)
WIDE_MAX_GROUP = 16
# Decode over a 1-byte cache read as 16-bit words of two codes (decode_code_pairs_kernel): in the sm_90 machine
# code a 64-key step issues 515 (e4m3) or 582 (int8) instructions against 822 or 1016 for the codes read one by
# one (scripts/kernel_sass.py "decode" --num-stages 2). Timed on an H200 (scripts/bench_decode_attention.py, ninth
# session): a layer at batch 512 and ~192 keys takes 76 us for e4m3 or int8 pairs against 95-100 read one by one
# (bf16: 86); at batch 64 and ~2048 keys, 73-76 against 121 with 128-key tiles.
CODES_AS_PAIRS = True
# The pairs kernel takes 128-key tiles where the block table spans PAIRS_LONG_CONTEXT keys or more. Timed on an H200
# (scripts/bench_decode_attention.py, twenty-eighth session; 4 warps, 2 stages), a layer of e4m3 pairs took, with
# 128-key tiles against 64: 75.3 against 83.7 us at batch 256 and ~512 keys, 71.1 against 83.3 at batch 128 and
# ~1024, 73.0 against 84.8 at batch 64 and ~2048, but 80.1 against 76.1 at batch 512 and ~192 (int8 pairs alike).
# So the bound is the smallest win measured. A CUDA graph's block table spans max_seq_len, so its decode steps take
# the long tiles whenever max_seq_len does: FP8 offline-3000 (~192 keys) ran 24,931.5 tokens/s with them against
# 25,011.3 without, while long-1000 went from 14,627.6 to 15,408.9. A 16-bit cache is faster with 64-key tiles at
# every length timed, so it keeps them.
PAIRS_LONG_CONTEXT, PAIRS_LONG_BLOCK_N = 512, 128
# The registers a thread of the pairs kernel may hold, by its tile's keys (Triton's maxnreg): fewer registers, more
# programs an SM to hide the loads' latency. In sm_90 code (scripts/kernel_sass.py "decode code pairs" --maxnreg N)
# the 64-key tile takes 117 (4 programs an SM) and fits in 96 without spilling (5, as the bf16 kernel's 96 give);
# the 128-key tile takes 143 (3) and fits in 128 with 6 spill stores (4). Shared memory allows 5-10. Timed on an
# H100 (forty-fourth session, scripts/bench_decode_attention.py, e4m3 and int8 codes): the 64-key tile at 96 took
# 73.6 us against 78.9 at 512 sequences of ~192 tokens and 4.9 against 5.3 at one of ~384; the 128-key tile at 128
# lost at every length it runs (85.2 against 82.0 us at 128 x ~1024), so it keeps the compiler's choice.
PAIRS_MAX_REGISTERS: dict[int, int] = {64: 96}
# The pairs kernel requests the next tile's words before it works on its own (decode_code_pairs_kernel's
# PREFETCH), so a program waits on memory once instead of once a tile. It costs a second tile of words in
# registers: in sm_90 code 144 a thread for 64-key tiles (3 programs an SM) and 225 for 128-key tiles (2), no
# spills. Off: slower at every batch and length timed on an H100 (forty-fourth session, e.g. 91.0 against 78.9 us
# at 512 x ~192, 103.5 against 84.5 at 64 x ~2048; scripts/bench_decode_attention.py).
PAIRS_PREFETCH = False
# Decode's split programs merge their parts themselves, the last one to finish a (sequence, KV head) doing it
# (_merge_if_last), instead of a merge kernel after them: one launch fewer a layer where decode splits, as at
# batch 1 (the merge took 1.6 us of 2.1 ms a W4A16 token on an H200). Off: timed on an H200, batch 1 took 6.4 us a
# layer against 4.4 with the merge kernel (scripts/bench_decode_attention.py, nineteenth session). Its counts live
# in one buffer per device (_split_counts): two decode calls at once on one device, from two engines on two streams,
# would share them, which one engine never does.
FUSED_MERGE = False
_SPLIT_COUNTS: dict = {}
PREFILL_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)  # fresh prompts, head_size <= 128
# Continuing chunks (paged_prefill_kernel, keys from the paged cache): 128 x 128 tiles took 0.389 ms for 4 x 1024
# tokens after 1024 against 0.419 with PREFILL_CONFIG's (H200, nineteenth session; 0.410 against 0.427 in the
# eighteenth; scripts/bench_prefill_attention.py).
PAGED_PREFILL_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)  # 16-bit q, head_size <= 128
# Fresh prompts' keys and values loaded by TMA (prefill_tma_kernel, Hopper and later) where the tensors allow it
# (_tma_layout); with this tile, or None: the plain kernel on PREFILL_CONFIG. On an H200 (nineteenth session) 4 x
# 2048 fresh tokens took 0.338 ms (407 TFLOP/s) against the plain kernel's 0.365 (scripts/bench_prefill_attention.py).
PREFILL_TMA_CONFIG: dict | None = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
# How fresh prompts attend a quantized cache's codes, read back from their slots (kiln.runtime.paged_batch):
# KILN_PREFILL_CODES (read per call, as KILN_PREFILL_ATTENTION is, so that one process can A/B it)
# - "plain": the plain kernel, converting each tile of codes to the matmuls' 16-bit type as it loads it;
# - "tma": the TMA kernel on the codes, converting each tile after TMA put it in shared memory;
# - "widened" (the default): the codes widened to that 16-bit type first, by torch (exact: int8 in q's type, e4m3 in fp16, which
#   CODES_FP16 matmuls take anyway), then the TMA kernel on those as on an unquantized cache: the same products, the
#   tiles going to the tensor cores straight from shared memory, for a pass writing twice the codes' bytes.
# On an H100 (forty-fourth session, scripts/bench_prefill_attention.py, 4 x 2048 fresh tokens, bf16 q) the codes
# took 0.495 ms plainly (278 TFLOP/s; e4m3 and int8 alike) and 0.491 (e4m3) and 0.441 (int8) by TMA, against 0.338
# for 16-bit keys: up to 1.3 s of prefill-1000 with an FP8 cache, were all its prompts fresh in packs of four.
# Widened first (forty-fifth session, H100, the widening's pass inside the time): 0.391 ms (e4m3) and 0.372 (int8),
# and 400 prefill-1000 requests with an FP8 cache took 24.91 s against plain's 25.64 (scripts/ab_runtime_setting.py).
PREFILL_CODES_SETTINGS = ("plain", "tma", "widened")
# The prefill kernels' softmax rescales lazily (_lazy_softmax_step: only once some row's max grew by more than 2^8
# in its weights, as FlashAttention-4 does; the sm_90 loop then skips 64 of its 563 instructions on most steps).
# Off: slower on an H200 in every kernel (nineteenth session: fresh 0.390 ms against 0.365, continuing 0.469 against
# 0.419, TMA 0.356 against 0.338; scripts/bench_prefill_attention.py).
PREFILL_LAZY_RESCALE = False


# ---------------------------------------------------------------- references (any device)

def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows]; 1-byte codes through a uint8 view, since torch's indexing kernels do not all take float8."""
    return x.view(torch.uint8)[rows].view(x.dtype) if x.element_size() == 1 else x[rows]


def _read(x: torch.Tensor, kv_scale: torch.Tensor | None, which: int) -> torch.Tensor:
    """Keys (which=0) or values (1) as float32: dequantized codes when the cache is quantized."""
    return x.float() if kv_scale is None else x.float() * kv_scale[which].float()


def _attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None,
                sinks: torch.Tensor | None = None):
    """Softmax attention in float32. q [m, heads, d], k/v [n, kv_heads, d], mask [m, n] (True = attend)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(groups, dim=1), v.float().repeat_interleave(groups, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", q.float(), k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hmn,nhd->mhd", softmax_with_sinks(scores, sinks), v).to(q.dtype)


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last dim of scores [heads, m, n] (float32); with sinks [heads] (gpt-oss), each head's sink
    logit joins the denominator as a key that no value follows."""
    if sinks is None:
        return scores.softmax(-1)
    sink = sinks.float()[:, None, None].expand(*scores.shape[:2], 1)
    return torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=None,
                               kv_scale=None, out=None, sinks=None):
    """q [batch, heads, d] -> [batch, heads, d]: each sequence's one new query over its cached keys. Every
    attention function here writes into `out` where given (a view of a larger output), else a new tensor, and
    takes `sinks` [heads] (softmax_with_sinks) or None."""
    block_size = k_cache.shape[1]
    out = torch.empty_like(q) if out is None else out
    for b, n in enumerate(context_lens.tolist()):
        pages = block_tables[b, :math.ceil(n / block_size)].long()
        lo = 0 if sliding_window is None else max(n - sliding_window, 0)
        k = _read(gather_rows(k_cache, pages).flatten(0, 1)[lo:n], kv_scale, 0)
        v = _read(gather_rows(v_cache, pages).flatten(0, 1)[lo:n], kv_scale, 1)
        out[b] = _attend_ref(q[b:b + 1], k, v, scale, None, sinks)[0]
    return out


# Fresh prompts' attention by torch's FlashAttention-2 varlen forward (aten._flash_attention_forward) instead of
# the Triton kernels. In the third session torch's took 259 us for 4 x 2048 tokens on an H100 against the Triton
# prefill's 356; in the thirty-fifth, 0.498 ms against the TMA kernel's 0.332 (scripts/bench_prefill_attention.py
# --quick). So it is off; KILN_PREFILL_ATTENTION=flash turns it on (read per call, like the decode stream's
# setting) to compare on other GPUs and torch builds.
PREFILL_ATTENTION_SETTINGS = ("triton", "flash")


def prefill_attention_setting() -> str:
    setting = os.environ.get("KILN_PREFILL_ATTENTION", "triton")
    if setting not in PREFILL_ATTENTION_SETTINGS:
        raise ValueError(f"KILN_PREFILL_ATTENTION={setting!r}: allowed values are triton (the default) and flash")
    return setting


def prefill_codes_setting() -> str:
    setting = os.environ.get("KILN_PREFILL_CODES", "widened")
    if setting not in PREFILL_CODES_SETTINGS:
        raise ValueError(f"KILN_PREFILL_CODES={setting!r}: allowed values are widened (the default), plain and tma")
    return setting


def flash_prefill_takes(q: torch.Tensor, kv_scale) -> bool:
    """Whether torch's flash kernel takes these prompts: 16-bit keys (not a quantized cache's codes), a head
    size it has kernels for, an Ampere or later GPU, and a torch built with it."""
    return (kv_scale is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and torch.cuda.get_device_capability(q.device)[0] >= 8
            and torch.backends.cuda.is_flash_attention_available())


def flash_varlen_prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, sliding_window=None, out=None):
    """varlen_prefill_attention by torch's FlashAttention-2 (GQA as it is: k and v keep their fewer heads). Its
    window (left, right) counts the keys beside the query's own: kiln's W is (W - 1, 0)."""
    window = {} if sliding_window is None else dict(window_size_left=sliding_window - 1, window_size_right=0)
    cu = cu_seqlens.to(torch.int32)
    got = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, True, False,
                                                  scale=scale, **window)[0]
    if out is None:
        return got
    return out.copy_(got)


def varlen_prefill_attention_ref(q, k, v, cu_seqlens, max_seqlen, scale, sliding_window=None, kv_scale=None,
                                 out=None, sinks=None):
    """Causal attention within each packed sequence; q [tokens, heads, d], k/v [tokens, kv_heads, d]
    (codes when kv_scale is given)."""
    out = torch.empty_like(q) if out is None else out
    k, v = _read(k, kv_scale, 0), _read(v, kv_scale, 1)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        pos = torch.arange(end - start, device=q.device)
        mask = pos[None, :] <= pos[:, None]
        if sliding_window is not None:
            mask &= pos[:, None] - pos[None, :] < sliding_window
        out[start:end] = _attend_ref(q[start:end], k[start:end], v[start:end], scale, mask, sinks)
    return out


def paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale,
                                sliding_window=None, kv_scale=None, max_query_len=None, out=None, sinks=None):
    """Prompts that continue a cached prefix (or an earlier chunk): sequence b's new queries
    q[cu[b]:cu[b+1]] sit at positions context_lens[b] onwards and attend causally over its cached keys,
    their own included (already written to the cache). max_query_len (the longest one's new tokens) sizes
    the kernel's grid; the reference does not need it."""
    block_size = k_cache.shape[1]
    out = torch.empty_like(q) if out is None else out
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
        out[start:end] = _attend_ref(q[start:end], k, v, scale, mask, sinks)
    return out


# ---------------------------------------------------------------- Triton launchers (CUDA)

def _num_splits(programs: int, max_context: int, block_n: int, device: torch.device) -> int:
    """Enough splits for a few programs per SM, never more than there are key tiles.

    Chosen from shapes alone (the block table's width bounds every context), so no host-device sync.
    """
    tiles = triton.cdiv(max_context, block_n)
    per_sm = DECODE_CONFIG["programs_per_sm"]
    return max(1, min(triton.cdiv(per_sm * num_sms(device.index or 0), programs), tiles, 64))


def decode_block_n(pairs: bool, max_context: int) -> int:
    """Keys a tile of the decode kernel: pairs, whether it reads a 1-byte cache as pairs of codes (_reads_code_pairs);
    max_context, the most keys its block table spans (a shape, so no host-device sync)."""
    return PAIRS_LONG_BLOCK_N if pairs and max_context >= PAIRS_LONG_CONTEXT else DECODE_CONFIG["BLOCK_N"]


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=None,
                           kv_scale=None, out=None, out_quant=None, sinks=None):
    """Triton version of `paged_decode_attention_ref`, same arguments and result. CUDA tensors.

    out_quant: the input the output projection wants (kiln.kernels.input_quant). Where the merge kernel runs (the
    keys are split) and it is e4m3 (FP8's static scale, or FP8_BLOCK_SCALES' groups where the group divides the
    head size), the merge writes that input itself and the result is Fp8Rows [batch, heads x head size], bit for
    bit out_quant.quantize of the 16-bit output: the projection reads codes instead of quantizing its input in a
    pass (or, in FP8's GEMV, in every program). Elsewhere the 16-bit output, as without it."""
    batch, heads, head_size = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.stride(-1) == 1
    group = heads // kv_heads
    max_context = block_tables.shape[1] * block_size
    if sliding_window is not None:
        max_context = min(max_context, sliding_window)
    pairs = _reads_code_pairs(q, k_cache)
    block_d = max(32 if pairs else 16, triton.next_power_of_2(head_size))
    wide = block_d > WIDE_HEAD
    if wide and group > WIDE_MAX_GROUP:
        return _decode_in_head_chunks(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window,
                                      kv_scale, out, sinks)
    cfg = WIDE_DECODE_CONFIG if wide else DECODE_CONFIG
    block_n = cfg["BLOCK_N"] if wide else decode_block_n(pairs, max_context)
    splits = _num_splits(batch * kv_heads, max_context, block_n, q.device)
    one = splits == 1  # a large batch fills the GPU unsplit: the kernel writes the output, no merge
    # codes: the merge kernel writes Fp8Rows of its own (the split kernel's 16-bit `out` then stays unwritten)
    codes = _merge_writes(out_quant, head_size) and not one and not FUSED_MERGE and out is None
    out = torch.empty_like(q) if out is None else out
    partial = out if one else torch.empty(batch, heads, splits, head_size, dtype=torch.float32, device=q.device)
    lse = None if one else torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    if pairs:  # the same bytes as 16-bit words: [blocks, page, kv heads, head_size / 2]
        flags = dict(INT8=k_cache.dtype == torch.int8, PREFETCH=PAIRS_PREFETCH)
        k_cache, v_cache = k_cache.view(torch.int16), v_cache.view(torch.int16)
    else:
        flags = dict(CODES_FP16=_codes_fp16(q, k_cache), IEEE=q.dtype == torch.float32)
    # (the fused merge leaves sinks out: the merge kernel applies them)
    counts = None if one or not FUSED_MERGE or sinks is not None else _split_counts(q.device, batch * kv_heads)
    kernel = decode_code_pairs_kernel if pairs else decode_split_kernel
    kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, kv_scale, block_tables, context_lens, partial, lse, out, counts, sinks,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        out.stride(0), out.stride(1), scale * _LOG2E, sliding_window or 0, group, head_size, splits,
        PAGE=block_size, HAS_WINDOW=sliding_window is not None, HAS_SCALE=kv_scale is not None,
        ONE_SPLIT=one, FUSED_MERGE=counts is not None, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n, BLOCK_D=block_d, HAS_SINK=sinks is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **flags, **_register_cap(pairs, block_n),
        **pdl_args(q.device))
    if codes:
        fp8 = out_quant.empty(batch, heads * head_size, q.device)
        _merge_splits(partial, lse, fp8.q.view(batch, heads, head_size), q, out_quant, fp8.scale, sinks)
        return fp8
    if not one and counts is None:
        _merge_splits(partial, lse, out, q, sinks=sinks)
    return out


def _decode_in_head_chunks(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, kv_scale,
                           out=None, sinks=None) -> torch.Tensor:
    """paged_decode_attention WIDE_MAX_GROUP query heads at a time, each run against its kv head's view of the
    cache: for wide heads whose groups outgrow one program."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    out = torch.empty_like(q) if out is None else out
    for kv in range(kv_heads):
        cache = (k_cache[:, :, kv:kv + 1], v_cache[:, :, kv:kv + 1])
        for first in range(kv * group, (kv + 1) * group, WIDE_MAX_GROUP):
            chunk = slice(first, min(first + WIDE_MAX_GROUP, (kv + 1) * group))
            paged_decode_attention(q[:, chunk], *cache, block_tables, context_lens, scale, sliding_window, kv_scale,
                                   out=out[:, chunk], sinks=None if sinks is None else sinks[chunk])
    return out


def _prefill_config(block_d: int, narrow: dict) -> dict:
    """A prompt kernel's tile: `narrow` for heads up to 128, smaller ones for wider heads."""
    if block_d <= 128:
        return narrow
    return WIDE_PREFILL_CONFIG if block_d > WIDE_HEAD else MID_PREFILL_CONFIG


def _register_cap(pairs: bool, block_n: int) -> dict:
    """The pairs kernel's maxnreg launch option for this tile (PAIRS_MAX_REGISTERS), or none."""
    return {"maxnreg": PAIRS_MAX_REGISTERS[block_n]} if pairs and block_n in PAIRS_MAX_REGISTERS else {}


def _split_counts(device: torch.device, n: int) -> torch.Tensor | None:
    """FUSED_MERGE's zeroed int32 counts, one per (sequence, KV head), which the kernels leave zeroed; None where
    they cannot be had: more than the buffer holds, or a first call inside a CUDA-graph capture (the buffer must
    outlive the graph's memory pool; kiln's captures run each forward once before, which makes it)."""
    counts = _SPLIT_COUNTS.get(device)
    if counts is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counts = _SPLIT_COUNTS[device] = torch.zeros(1 << 16, dtype=torch.int32, device=device)
    return counts if n <= counts.numel() else None


def _reads_code_pairs(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Decode over an int8 or e4m3 cache by 16-bit words of two codes (CODES_AS_PAIRS): a 16-bit query and an
    even head size."""
    return (CODES_AS_PAIRS and cache.dtype in (torch.int8, torch.float8_e4m3fn) and q.dtype != torch.float32
            and cache.shape[-1] % 2 == 0)


def _codes_fp16(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """An e4m3 cache read by a bf16 query: the matmuls run in fp16 (see the module docstring)."""
    return cache.dtype == torch.float8_e4m3fn and q.dtype == torch.bfloat16


def _merge_writes(out_quant, head_size: int) -> bool:
    """Whether the merge kernel can write this input: one program a head, so e4m3 codes over a static scale or
    with a scale per group within a head, and no prequant scale to multiply in (W4A8_AWQ's output projection).
    (A scale per token needs the max of every head's output.)"""
    return out_quant is not None and out_quant.prequant is None and (
        out_quant.kind == FP8_STATIC or out_quant.kind == FP8_GROUPS and head_size % out_quant.group == 0)


def _merge_splits(partial: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, q: torch.Tensor,
                  out_quant=None, row_scale: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> None:
    """out[r, h] = the splits' partial outputs [r, h, s] weighted by their softmax mass (lse, base 2); with
    out_quant (_merge_writes), as its e4m3 codes of the output rounded to q's dtype, and row_scale [r, scales a
    row] gets the scales; sinks [heads], the share kept beside each head's sink."""
    rows, heads, splits, head_size = partial.shape
    flags = NO_QUANT_FLAGS if out_quant is None else out_quant.kernel_flags(0)  # (_merge_writes: no whole rows)
    scale_in = lse if out_quant is None or out_quant.scale is None else out_quant.scale
    merge_kernel[(rows, heads)](
        partial, lse, out, q, scale_in, row_scale if row_scale is not None else lse, sinks,
        out.stride(0), out.stride(1), heads, head_size, splits, FP8_OUT=flags["FP8_OUT"], FP8_GROUP=flags["FP8_GROUP"],
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=triton.next_power_of_2(head_size),
        HAS_SINK=sinks is not None, num_warps=4, **pdl_args(out.device))


def varlen_prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, sliding_window=None, kv_scale=None,
                             out=None, sinks=None):
    """Triton version of `varlen_prefill_attention_ref`, same arguments and result. CUDA tensors. With
    KILN_PREFILL_ATTENTION=flash, torch's FlashAttention-2 where it takes the inputs (flash_prefill_takes); a
    quantized cache's codes as KILN_PREFILL_CODES says (PREFILL_CODES_SETTINGS)."""
    tokens, heads, head_size = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    if prefill_attention_setting() == "flash" and flash_prefill_takes(q, kv_scale) and sinks is None:
        return flash_varlen_prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, sliding_window, out)
    out = torch.empty_like(q) if out is None else out
    block_d = max(16, triton.next_power_of_2(head_size))
    cfg = _prefill_config(block_d, PREFILL_CONFIG)
    assert cfg["BLOCK_M"] % cfg["BLOCK_N"] == 0, "the diagonal tiles must tile the query block"
    grid = (triton.cdiv(max_seqlen, cfg["BLOCK_M"]), cu_seqlens.shape[0] - 1, heads)
    codes_fp16 = _codes_fp16(q, k)
    codes_by = "plain" if kv_scale is None else prefill_codes_setting()
    tma = PREFILL_TMA_CONFIG
    if tma is not None and (kv_scale is None or codes_by != "plain") and _tma_layout(q, k, v, block_d, kv_scale):
        if codes_by == "widened":
            k, v = (x.to(torch.float16 if codes_fp16 else q.dtype) for x in (k, v))
        assert tma["BLOCK_M"] % tma["BLOCK_N"] == 0, "the diagonal tiles must tile the query block"
        grid = (triton.cdiv(max_seqlen, tma["BLOCK_M"]), cu_seqlens.shape[0] - 1, heads)
        k_desc, v_desc = (_rows_descriptor(x, tma["BLOCK_N"]) for x in (k, v))
        prefill_tma_kernel[grid](
            q, k_desc, v_desc, kv_scale, out, cu_seqlens, sinks, q.stride(0), q.stride(1), out.stride(0),
            out.stride(1), scale * _LOG2E, sliding_window or 0, heads // k.shape[1],
            HAS_WINDOW=sliding_window is not None, HAS_SCALE=kv_scale is not None, CODES_FP16=codes_fp16,
            BLOCK_D=block_d, LAZY=PREFILL_LAZY_RESCALE, HAS_SINK=sinks is not None, **tma)
        return out
    prefill_kernel[grid](
        q, k, v, kv_scale, out, cu_seqlens, sinks, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), out.stride(0), out.stride(1), scale * _LOG2E, sliding_window or 0, heads // k.shape[1],
        head_size, HAS_WINDOW=sliding_window is not None, HAS_SCALE=kv_scale is not None,
        CODES_FP16=codes_fp16, IEEE=q.dtype == torch.float32, BLOCK_D=block_d, EVEN_D=head_size == block_d,
        LAZY=PREFILL_LAZY_RESCALE, HAS_SINK=sinks is not None, **cfg)
    return out


def _tma_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_d: int, kv_scale=None) -> bool:
    """Whether the TMA kernel can read k and v: a 16-bit q; k and v in q's dtype, or with kv_scale a quantized
    cache's codes; head size a power of two up to 128 (its tiles' size), each token's heads side by side (a [tokens,
    kv heads x head size] matrix), 16-byte aligned rows, and a GPU with TMA (the interpreter runs it anywhere)."""
    kv_dtypes = (q.dtype,) if kv_scale is None else (torch.int8, torch.float8_e4m3fn)
    if TensorDescriptor is None or not (q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype
                                        and k.dtype in kv_dtypes and q.shape[2] == block_d <= 128):
        return False
    for x in (k, v):
        if x.stride(1) != block_d or x.data_ptr() % 16 or x.stride(0) * x.element_size() % 16:
            return False
    return not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] >= 9


def _rows_descriptor(x: torch.Tensor, block_rows: int):
    """x [tokens, kv heads, head size] as a TMA descriptor over [tokens, kv heads x head size], in tiles of
    [block_rows, head size]: a tile at (token, head x head size) is block_rows tokens of one head."""
    tokens, heads, d = x.shape
    return TensorDescriptor(x, shape=[tokens, heads * d], strides=[x.stride(0), 1], block_shape=[block_rows, d])


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale,
                            sliding_window=None, kv_scale=None, max_query_len=None, out=None, sinks=None):
    """Triton version of `paged_prefill_attention_ref`, same arguments and result. CUDA tensors.
    max_query_len (the longest sequence's new tokens) sizes the grid; without it, q's length does."""
    tokens, heads, head_size = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    block_d = max(16, triton.next_power_of_2(head_size))
    # float32's 128 x 128 tiles outgrow shared memory (257 KB against the H200's 227)
    cfg = _prefill_config(block_d, PAGED_PREFILL_CONFIG if q.element_size() == 2 else PREFILL_CONFIG)
    tiles, seqs = triton.cdiv(max_query_len or tokens, cfg["BLOCK_M"]), cu_seqlens.shape[0] - 1
    # A few new tokens after a long prefix (a prefix-cache hit) make few programs, each streaming the whole
    # context: split the keys across programs as decode does, and merge.
    max_context = block_tables.shape[1] * block_size
    if sliding_window is not None:
        max_context = min(max_context, sliding_window + cfg["BLOCK_M"] + cfg["BLOCK_N"])
    splits = _num_splits(tiles * seqs * heads, max_context, cfg["BLOCK_N"], q.device)
    out = torch.empty_like(q) if out is None else out
    one = splits == 1
    partial = out if one else torch.empty(tokens, heads, splits, head_size, dtype=torch.float32, device=q.device)
    lse = None if one else torch.empty(tokens, heads, splits, dtype=torch.float32, device=q.device)
    paged_prefill_kernel[(tiles, seqs, heads * splits)](
        q, k_cache, v_cache, kv_scale, partial, lse, cu_seqlens, context_lens, block_tables, sinks, q.stride(0),
        q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0), out.stride(0),
        out.stride(1), scale * _LOG2E, sliding_window or 0, heads // kv_heads, head_size, splits, PAGE=block_size,
        HAS_WINDOW=sliding_window is not None, HAS_SCALE=kv_scale is not None,
        CODES_FP16=_codes_fp16(q, k_cache), IEEE=q.dtype == torch.float32, ONE_SPLIT=one, BLOCK_D=block_d,
        EVEN_D=head_size == block_d, LAZY=PREFILL_LAZY_RESCALE, HAS_SINK=sinks is not None, **cfg)
    if not one:
        _merge_splits(partial, lse, out, q, sinks=sinks)
    return out
