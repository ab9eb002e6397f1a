"""Paged decode and varlen prefill attention.

On CPU the references are checked against dense attention written another way (torch's
scaled_dot_product_attention on unpaged, per-sequence tensors); on the GPU the Triton kernels are
checked against the references.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kiln.kernels import triton_available
from kiln.kernels.paged_attention import (paged_decode_attention, paged_decode_attention_ref,
                                          paged_prefill_attention, paged_prefill_attention_ref,
                                          varlen_prefill_attention, varlen_prefill_attention_ref)

needs_gpu = pytest.mark.skipif(not triton_available(),
                               reason="needs an NVIDIA GPU with Triton: the kernel path only exists there")

# The kernels round softmax weights to the input dtype before the weights-times-values product (as
# FlashAttention does) and sum in another order; outputs are O(1), so a few ulps of the dtype.
TOL = {torch.float32: 2e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_decode_case(context_lens, heads, kv_heads, d, block_size, dtype=torch.float32, seed=0):
    """Dense per-sequence K/V scattered into random, non-contiguous cache blocks.

    Unused blocks, the slots after each context, and the block table's unused entries hold random
    values, so a kernel that reads past a context or the wrong block gets a different answer.
    """
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(n / block_size) for n in context_lens]
    num_blocks = sum(need) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g)
    block_tables = torch.randint(0, num_blocks, (len(context_lens), max(need) + 2), generator=g, dtype=torch.int32)
    dense_k, dense_v, used = [], [], 0
    for b, n in enumerate(context_lens):
        pages = order[used:used + need[b]]
        used += need[b]
        block_tables[b, :need[b]] = pages.int()
        dense_k.append(torch.randn(n, kv_heads, d, generator=g).to(dtype))
        dense_v.append(torch.randn(n, kv_heads, d, generator=g).to(dtype))
        for t in range(n):
            k_cache[pages[t // block_size], t % block_size] = dense_k[b][t]
            v_cache[pages[t // block_size], t % block_size] = dense_v[b][t]
    q = torch.randn(len(context_lens), heads, d, generator=g).to(dtype)
    return q, k_cache, v_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32), dense_k, dense_v


def sdpa(q, k, v, scale, mask=None, is_causal=False):
    """q [m, heads, d], k/v [n, kv_heads, d] -> [m, heads, d] through torch's SDPA."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, is_causal=is_causal, scale=scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_reference_is_dense_attention(block_size, heads, kv_heads, window):
    lens = [1, 7, 16, 33]
    q, k_cache, v_cache, tables, ctx, dense_k, dense_v = make_decode_case(lens, heads, kv_heads, 32, block_size)
    scale = 32 ** -0.5
    got = paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, scale, window)
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        mask = None if window is None else (n - 1 - pos < window)[None, :]  # the query sits at n - 1
        want = sdpa(q[b:b + 1], dense_k[b], dense_v[b], scale, mask)
        torch.testing.assert_close(got[b:b + 1], want, rtol=1e-5, atol=1e-5)


def _packed(seq_lens, heads, kv_heads, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = sum(seq_lens)
    q = torch.randn(tokens, heads, d, generator=g).to(dtype)
    k = torch.randn(tokens, kv_heads, d, generator=g).to(dtype)
    v = torch.randn(tokens, kv_heads, d, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("window", [None, 3])
def test_prefill_reference_is_causal_attention_per_sequence(heads, kv_heads, window):
    lens = [1, 5, 12]
    q, k, v, cu = _packed(lens, heads, kv_heads, 16)
    got = varlen_prefill_attention_ref(q, k, v, cu, max(lens), 0.3, window)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        n = e - s
        if window is None:
            want = sdpa(q[s:e], k[s:e], v[s:e], 0.3, is_causal=True)
        else:  # a band below the diagonal: causal and within the window
            ones = torch.ones(n, n, dtype=torch.bool)
            want = sdpa(q[s:e], k[s:e], v[s:e], 0.3, mask=ones.tril() & ~ones.tril(-window))
        torch.testing.assert_close(got[s:e], want, rtol=1e-5, atol=1e-5)


DECODE_CASES = [  # context lens, heads, kv_heads, head_size, block_size, window
    ([1, 2, 17, 64], 8, 8, 64, 16, None),
    ([5, 100, 1000, 2049], 32, 8, 128, 16, None),
    ([300, 1, 77], 16, 2, 128, 32, 64),
    ([3000, 129], 28, 4, 128, 16, 1024),
    ([40, 9], 12, 12, 96, 8, None),
]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_kernel_matches_reference(dtype, case):
    lens, heads, kv_heads, d, block_size, window = DECODE_CASES[case]
    q, k_cache, v_cache, tables, ctx, _, _ = make_decode_case(lens, heads, kv_heads, d, block_size, dtype, case)
    args = [t.cuda() for t in (q, k_cache, v_cache, tables, ctx)]
    got = paged_decode_attention(*args, d ** -0.5, window)
    want = paged_decode_attention_ref(*args, d ** -0.5, window)
    print(f"paged_decode {dtype} case {case}: max err {(got - want).abs().max().item():.3g}")
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_writes_the_output_projections_fp8_input_bit_for_bit(dtype, case):
    """out_quant FP8_STATIC (an FP8 engine's output projection, KILN_FP8_ATTENTION_CODES): where the keys are split,
    the merge kernel returns Fp8Rows, the same bits as quantizing the kernel's own 16-bit output with that static
    scale (saturated values included); unsplit, the 16-bit output itself. FP8_GROUPS (FP8_BLOCK_SCALES): the same
    with a scale per group of a head's values, where the group divides the head size. INT8_ROWS (SmoothQuant): the
    16-bit output, which dense quantizes itself."""
    from kiln.kernels import paged_attention
    from kiln.kernels.fp8_quant import Fp8Rows, quantize_fp8_groups_ref, quantize_fp8_rows_ref
    from kiln.kernels.input_quant import FP8_GROUPS, FP8_STATIC, INT8_ROWS, InputQuant

    lens, heads, kv_heads, d, block_size, window = DECODE_CASES[case]
    q, k_cache, v_cache, tables, ctx, _, _ = make_decode_case(lens, heads, kv_heads, d, block_size, dtype, case)
    args = [t.cuda() for t in (q, k_cache, v_cache, tables, ctx)]
    plain = paged_decode_attention(*args, d ** -0.5, window)
    max_context = tables.shape[1] * block_size if window is None else min(tables.shape[1] * block_size, window)
    splits = paged_attention._num_splits(len(lens) * kv_heads, max_context,
                                         paged_attention.decode_block_n(False, max_context), plain.device)
    for over in (400, 900):  # max |output| to 400 of e4m3's 448, then to 900: half of them saturate
        scale = (plain.float().abs().amax() / over).to(dtype).reshape(1)
        got = paged_decode_attention(*args, d ** -0.5, window, out_quant=InputQuant(FP8_STATIC, scale))
        if splits == 1:
            assert torch.equal(got, plain)
            continue
        assert isinstance(got, Fp8Rows)
        want = quantize_fp8_rows_ref(plain.flatten(-2), scale)
        assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))
        assert torch.equal(got.scale, want.scale)
    for group in (32, 64, 128):  # FP8_BLOCK_SCALES' output projection: a scale per group of a head's values
        got = paged_decode_attention(*args, d ** -0.5, window, out_quant=InputQuant(FP8_GROUPS, group=group))
        if splits == 1 or d % group:  # (a group spanning heads: the 16-bit output, dense quantizes it)
            assert torch.equal(got, plain)
            continue
        want = quantize_fp8_groups_ref(plain.flatten(-2), group)
        assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8)), group
        assert torch.equal(got.scale, want.scale), group
    assert torch.equal(paged_decode_attention(*args, d ** -0.5, window, out_quant=InputQuant(INT8_ROWS)), plain)


PREFILL_CASES = [  # seq lens, heads, kv_heads, head_size, window
    ([1, 17, 64], 4, 4, 64, None),
    ([130, 300, 5], 32, 8, 128, None),
    ([200, 77], 16, 2, 128, 32),
    ([90], 6, 3, 80, None),
]


def test_prefill_attention_setting_names_its_allowed_values(monkeypatch):
    from kiln.kernels import paged_attention

    monkeypatch.delenv("KILN_PREFILL_ATTENTION", raising=False)
    assert paged_attention.prefill_attention_setting() == "triton"
    monkeypatch.setenv("KILN_PREFILL_ATTENTION", "fa3")
    with pytest.raises(ValueError, match="'fa3'.*triton.*flash"):
        paged_attention.prefill_attention_setting()


@needs_gpu
@pytest.mark.parametrize("kernel", ["tma-default", "plain", "flash"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
def test_prefill_kernel_matches_reference(dtype, case, kernel, monkeypatch):
    """With the default PREFILL_TMA_CONFIG (16-bit cases of power-of-two head sizes take the TMA kernel on Hopper),
    with the plain kernel alone, and with torch's FlashAttention-2 (KILN_PREFILL_ATTENTION=flash; float32 stays on
    the Triton kernels)."""
    from kiln.kernels import paged_attention

    if kernel == "plain":
        monkeypatch.setattr(paged_attention, "PREFILL_TMA_CONFIG", None)
    if kernel == "flash":
        monkeypatch.setenv("KILN_PREFILL_ATTENTION", "flash")
        assert paged_attention.flash_prefill_takes(torch.empty(1, 1, 64, dtype=dtype, device="cuda"), None) == (
            dtype != torch.float32)
    lens, heads, kv_heads, d, window = PREFILL_CASES[case]
    q, k, v, cu = (t.cuda() for t in _packed(lens, heads, kv_heads, d, dtype, case))
    got = varlen_prefill_attention(q, k, v, cu, max(lens), d ** -0.5, window)
    want = varlen_prefill_attention_ref(q, k, v, cu, max(lens), d ** -0.5, window)
    print(f"varlen_prefill {dtype} case {case}: max err {(got - want).abs().max().item():.3g}")
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


@needs_gpu
@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_kernel_rescales_when_row_maxima_rise_mid_prompt(dtype, lazy, monkeypatch):
    """Keys that grow along the prompt: each row's max keeps rising past the first tiles, so the kernel must
    rescale there; lazily (PREFILL_LAZY_RESCALE), it skips the rescale while no max grew by more than 2^8 in the
    softmax weights, and must still rescale when one did. The plain kernel (the TMA one has its own test)."""
    from kiln.kernels import paged_attention

    monkeypatch.setattr(paged_attention, "PREFILL_LAZY_RESCALE", lazy)
    monkeypatch.setattr(paged_attention, "PREFILL_TMA_CONFIG", None)
    lens, heads, kv_heads, d, window = PREFILL_CASES[1]
    q, k, v, cu = _packed(lens, heads, kv_heads, d, dtype, 1)
    k = k * torch.cat([torch.linspace(0.05, 4, n) for n in lens]).to(dtype)[:, None, None]
    q, k, v, cu = (t.cuda() for t in (q, k, v, cu))
    got = varlen_prefill_attention(q, k, v, cu, max(lens), d ** -0.5, window)
    want = varlen_prefill_attention_ref(q, k, v, cu, max(lens), d ** -0.5, window)
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


@needs_gpu
@pytest.mark.parametrize("tile", [(64, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2)])
@pytest.mark.parametrize("case", [1, 2])
@pytest.mark.parametrize("lazy", [False, True])
def test_prefill_tma_kernel_matches_reference_from_a_fused_qkv(tile, case, lazy, monkeypatch):
    """The fresh prompts' TMA kernel (Hopper and later; elsewhere the plain kernel runs, as the engine would), on
    keys and values as the engine passes them: views of one fused QKV row per token, whose key tiles run past a
    sequence's end into the next one's tokens."""
    from kiln.kernels import paged_attention as pa

    lens, heads, kv_heads, d, window = PREFILL_CASES[case]
    g = torch.Generator().manual_seed(case)
    qkv = torch.randn(sum(lens), (heads + 2 * kv_heads) * d, generator=g).to(torch.bfloat16).cuda()
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1)
    q, k, v = q.view(-1, heads, d), k.view(-1, kv_heads, d), v.view(-1, kv_heads, d)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32).cuda()
    monkeypatch.setattr(pa, "PREFILL_TMA_CONFIG", dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), tile)))
    monkeypatch.setattr(pa, "PREFILL_LAZY_RESCALE", lazy)
    assert pa._tma_layout(q, k, v, d) == (torch.cuda.get_device_capability()[0] >= 9)
    got = varlen_prefill_attention(q, k, v, cu, max(lens), d ** -0.5, window)
    want = varlen_prefill_attention_ref(q, k, v, cu, max(lens), d ** -0.5, window)
    torch.testing.assert_close(got, want, rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])


# ---- a quantized cache: int8 / float8_e4m3fn codes and kv_scale = [s_k, s_v] ------------------------------

CODE_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def to_codes(x: torch.Tensor, code_dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """x as codes of its absmax scale (round to nearest; e4m3's cast rounds), and the scale."""
    s = x.float().abs().max().item() / CODE_MAX[code_dtype]
    y = x.float() / s
    return (y.round().to(code_dtype) if code_dtype == torch.int8 else y.to(code_dtype)), s


@pytest.mark.parametrize("code_dtype", [torch.int8, torch.float8_e4m3fn])
def test_references_read_codes_times_their_scale(code_dtype):
    q, k_cache, v_cache, tables, ctx, _, _ = make_decode_case([3, 20, 9], 8, 2, 16, 4)
    (kc, sk), (vc, sv) = to_codes(k_cache * 3, code_dtype), to_codes(v_cache, code_dtype)
    kv_scale = torch.tensor([sk, sv])
    got = paged_decode_attention_ref(q, kc, vc, tables, ctx, 0.25, None, kv_scale)
    want = paged_decode_attention_ref(q, kc.float() * sk, vc.float() * sv, tables, ctx, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    q, k, v, cu = _packed([4, 11], 4, 2, 16)
    (kc, sk), (vc, sv) = to_codes(k, code_dtype), to_codes(v, code_dtype)
    got = varlen_prefill_attention_ref(q, kc, vc, cu, 11, 0.3, 3, torch.tensor([sk, sv]))
    want = varlen_prefill_attention_ref(q, kc.float() * sk, vc.float() * sv, cu, 11, 0.3, 3)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@needs_gpu
@pytest.mark.parametrize("code_dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("way", ["one by one", "pairs", "pairs prefetched", "pairs, registers capped"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", [0, 1, 2, 4])
def test_decode_kernel_reads_a_quantized_cache_like_the_reference(code_dtype, way, dtype, case, monkeypatch):
    """Both decode kernels of a 1-byte cache: codes read one by one, and as 16-bit words of two (CODES_AS_PAIRS),
    the latter also with the next tile requested a step ahead (PAIRS_PREFETCH) and with its registers capped
    (PAIRS_MAX_REGISTERS, the caps scripts/bench_decode_attention.py times)."""
    from kiln.kernels import paged_attention

    monkeypatch.setattr(paged_attention, "CODES_AS_PAIRS", way != "one by one")
    monkeypatch.setattr(paged_attention, "PAIRS_PREFETCH", way == "pairs prefetched")
    monkeypatch.setattr(paged_attention, "PAIRS_MAX_REGISTERS", {64: 96, 128: 128} if "capped" in way else {})
    lens, heads, kv_heads, d, block_size, window = DECODE_CASES[case]
    q, k_cache, v_cache, tables, ctx, _, _ = make_decode_case(lens, heads, kv_heads, d, block_size, dtype, case)
    (kc, sk), (vc, sv) = to_codes(k_cache * 3, code_dtype), to_codes(v_cache, code_dtype)
    kv_scale = torch.tensor([sk, sv], dtype=dtype, device="cuda")  # the layer's parameter, in the model dtype
    args = [t.cuda() for t in (q, kc, vc, tables, ctx)]
    got = paged_decode_attention(*args, d ** -0.5, window, kv_scale)
    want = paged_decode_attention_ref(*args, d ** -0.5, window, kv_scale)
    print(f"paged_decode {code_dtype} cache, {dtype} case {case}: max err {(got - want).abs().max().item():.3g}")
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


@needs_gpu
@pytest.mark.parametrize("cache", ["bf16", "int8 pairs"])
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_split_programs_merging_their_parts_match_the_reference(cache, case, monkeypatch):
    """FUSED_MERGE: the last split program of each (sequence, KV head) merges, no merge kernel; three launches in a
    row, since each must leave the counts at zero for the next."""
    from kiln.kernels import paged_attention

    monkeypatch.setattr(paged_attention, "FUSED_MERGE", True)
    monkeypatch.setattr(paged_attention, "_SPLIT_COUNTS", {})  # made by the first call that splits
    lens, heads, kv_heads, d, block_size, window = DECODE_CASES[case]
    q, k_cache, v_cache, tables, ctx, _, _ = make_decode_case(lens, heads, kv_heads, d, block_size, torch.bfloat16,
                                                              case)
    kv_scale = None
    if cache == "int8 pairs":
        (k_cache, sk), (v_cache, sv) = to_codes(k_cache, torch.int8), to_codes(v_cache, torch.int8)
        kv_scale = torch.tensor([sk, sv], dtype=torch.bfloat16, device="cuda")
    args = [t.cuda() for t in (q, k_cache, v_cache, tables, ctx)]
    want = paged_decode_attention_ref(*args, d ** -0.5, window, kv_scale)
    for _ in range(3):
        got = paged_decode_attention(*args, d ** -0.5, window, kv_scale)
        torch.testing.assert_close(got, want, rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])
    max_context = tables.shape[1] * block_size if window is None else min(tables.shape[1] * block_size, window)
    block_n = paged_attention.decode_block_n(cache == "int8 pairs", max_context)
    splits = paged_attention._num_splits(len(lens) * kv_heads, max_context, block_n, got.device)
    counts = paged_attention._SPLIT_COUNTS.get(got.device)
    assert (counts is not None) == (splits > 1)  # the fused path ran wherever the keys were split
    assert counts is None or not counts.any()  # and left its counts at zero


class LaunchCounter:
    """Stands in for a Triton kernel in its module: records each launch's grid (kernel[grid]) and runs it."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@needs_gpu
@pytest.mark.parametrize("code_dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", [0, 2, 3])
@pytest.mark.parametrize("codes_by", ["plain", "tma", "widened"])
def test_prefill_kernel_reads_quantized_keys_like_the_reference(code_dtype, dtype, case, codes_by, monkeypatch):
    """Each way of reading the codes (KILN_PREFILL_CODES): where the TMA kernel can read them (a 16-bit q, a
    power-of-two head size, Hopper), it must be the one that runs, but for "plain"."""
    from kiln.kernels import paged_attention

    monkeypatch.setenv("KILN_PREFILL_CODES", codes_by)
    lens, heads, kv_heads, d, window = PREFILL_CASES[case]
    q, k, v, cu = _packed(lens, heads, kv_heads, d, dtype, case)
    (kc, sk), (vc, sv) = to_codes(k * 3, code_dtype), to_codes(v, code_dtype)
    kv_scale = torch.tensor([sk, sv], dtype=dtype, device="cuda")
    q, kc, vc, cu = (t.cuda() for t in (q, kc, vc, cu))
    tma = LaunchCounter(paged_attention.prefill_tma_kernel)
    monkeypatch.setattr(paged_attention, "prefill_tma_kernel", tma)
    takes_tma = codes_by != "plain" and dtype != torch.float32 and d in (64, 128) and \
        torch.cuda.get_device_capability()[0] >= 9
    got = varlen_prefill_attention(q, kc, vc, cu, max(lens), d ** -0.5, window, kv_scale)
    assert len(tma.grids) == takes_tma
    want = varlen_prefill_attention_ref(q, kc, vc, cu, max(lens), d ** -0.5, window, kv_scale)
    print(f"varlen_prefill {code_dtype} codes, {dtype} case {case}, TMA {takes_tma}: "
          f"max err {(got - want).abs().max().item():.3g}")
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


def make_continuing_case(cached, new, heads, kv_heads, d, block_size, dtype=torch.float32, seed=0):
    """Sequences with `cached` tokens in the cache and `new` more (also in the cache, as the runtime writes
    them before attending), and the new tokens' queries packed back to back."""
    totals = [c + n for c, n in zip(cached, new)]
    _, k_cache, v_cache, tables, _, dense_k, dense_v = make_decode_case(totals, heads, kv_heads, d, block_size,
                                                                        dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(sum(new), heads, d, generator=g).to(dtype)
    cu = torch.tensor([0] + list(itertools.accumulate(new)), dtype=torch.int32)
    return q, k_cache, v_cache, tables, cu, torch.tensor(cached, dtype=torch.int32), dense_k, dense_v


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 6])
def test_continuing_prefill_reference_is_causal_attention_at_its_offset(heads, kv_heads, window):
    cached, new = [0, 9, 32, 5], [3, 7, 1, 20]
    q, k_cache, v_cache, tables, cu, ctx, dense_k, dense_v = make_continuing_case(cached, new, heads, kv_heads, 16, 8)
    got = paged_prefill_attention_ref(q, k_cache, v_cache, tables, cu, ctx, 0.25, window)
    for b, (c, n) in enumerate(zip(cached, new)):
        q_pos, k_pos = torch.arange(c, c + n)[:, None], torch.arange(c + n)[None, :]
        mask = (k_pos <= q_pos) & (True if window is None else q_pos - k_pos < window)
        want = sdpa(q[cu[b]:cu[b + 1]], dense_k[b], dense_v[b], 0.25, mask)
        torch.testing.assert_close(got[cu[b]:cu[b + 1]], want, rtol=1e-5, atol=1e-5)


CONTINUING_CASES = [  # cached, new, heads, kv_heads, head_size, block_size, window
    ([1024, 1024, 1000], [32, 5, 77], 32, 8, 128, 32, None),
    ([1024], [32], 32, 8, 128, 32, None),  # a prefix-cache hit: few programs, the keys split among many more
    ([100, 60, 7], [512, 300, 256], 32, 8, 128, 32, None),  # enough programs: one split, no merge
    ([0, 17, 64], [64, 130, 1], 4, 2, 64, 16, None),
    ([300, 40], [90, 200], 16, 2, 128, 32, 48),
    ([0], [100], 32, 8, 128, 32, None),  # a fresh prompt alone (a prefill graph's step): split keys, some empty
]


@needs_gpu
@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", range(len(CONTINUING_CASES)))
def test_continuing_prefill_kernel_matches_reference(dtype, case, lazy, monkeypatch):
    """Over the paged cache, splits merged by their log-sum-exp; with the softmax rescaled at every step and lazily
    (PREFILL_LAZY_RESCALE: the running max in raw units, which the stored log-sum-exp must convert)."""
    from kiln.kernels import paged_attention

    monkeypatch.setattr(paged_attention, "PREFILL_LAZY_RESCALE", lazy)
    cached, new, heads, kv_heads, d, block_size, window = CONTINUING_CASES[case]
    q, k_cache, v_cache, tables, cu, ctx, _, _ = make_continuing_case(cached, new, heads, kv_heads, d, block_size,
                                                                      dtype, case)
    args = [t.cuda() for t in (q, k_cache, v_cache, tables, cu, ctx)]
    got = paged_prefill_attention(*args, d ** -0.5, window, max_query_len=max(new))
    want = paged_prefill_attention_ref(*args, d ** -0.5, window)
    print(f"paged_prefill {dtype} case {case}: max err {(got - want).abs().max().item():.3g}")
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


@needs_gpu
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_latent_attention_rows_match_the_reference(dtype, heads):
    """Latent attention's cache (kiln.layers.mla): one 576-wide row a token (kv_lora 512 + rope 64) that every head
    reads as its key and as its value, one tensor for both. Tiles for heads over 256 wide (WIDE_*), and decode of
    more than 16 heads a kv head attended 16 at a time: DeepSeek-V2-Lite's 16 and V3's 128 on one GPU."""
    d, scale = 576, 192 ** -0.5
    q, cache, _, tables, ctx, _, _ = make_decode_case([7, 300, 33], heads, 1, d, 32, dtype, seed=heads)
    args = [t.cuda() for t in (q, cache, cache, tables, ctx)]
    got, want = paged_decode_attention(*args, scale), paged_decode_attention_ref(*args, scale)
    print(f"latent decode {dtype} {heads} heads: max err {(got - want).abs().max().item():.3g}")
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])

    q, k, _, cu = (t.cuda() for t in _packed([5, 70], heads, 1, d, dtype, seed=heads))
    got = varlen_prefill_attention(q, k, k, cu, 70, scale)
    torch.testing.assert_close(got, varlen_prefill_attention_ref(q, k, k, cu, 70, scale), rtol=TOL[dtype],
                               atol=TOL[dtype])

    q, cache, _, tables, cu, ctx, _, _ = make_continuing_case([40, 3], [9, 20], heads, 1, d, 16, dtype, heads)
    args = [t.cuda() for t in (q, cache, cache, tables, cu, ctx)]
    got = paged_prefill_attention(*args, scale, max_query_len=20)
    torch.testing.assert_close(got, paged_prefill_attention_ref(*args, scale), rtol=TOL[dtype], atol=TOL[dtype])


@needs_gpu
@pytest.mark.parametrize("code_dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("heads", [16, 128])
def test_latent_rows_in_codes_decode_like_the_reference(heads, code_dtype):
    """A quantized latent cache: 1-byte codes of the 576-wide rows under one scale for keys and values, read as
    16-bit words of two codes (CODES_AS_PAIRS) in WIDE_DECODE_CONFIG's tiles."""
    dtype = torch.bfloat16
    q, cache, _, tables, ctx, _, _ = make_decode_case([7, 300, 33], heads, 1, 576, 32, dtype, seed=heads)
    codes, s = to_codes(cache, code_dtype)
    kv_scale = torch.tensor([s, s], dtype=dtype, device="cuda")
    args = [t.cuda() for t in (q, codes, codes, tables, ctx)]
    got = paged_decode_attention(*args, 192 ** -0.5, None, kv_scale)
    want = paged_decode_attention_ref(*args, 192 ** -0.5, None, kv_scale)
    print(f"latent decode {code_dtype} {heads} heads: max err {(got - want).abs().max().item():.3g}")
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lazy", [False, True])
def test_attention_sinks_match_the_reference(dtype, lazy, monkeypatch):
    """gpt-oss's sinks (a logit per head in each softmax's denominator, random here, some far above the scores):
    decode with one split and with several (the merge applies them), fresh prompts on the plain kernel and on the
    TMA kernel, and prompts continuing a cache with one split and with several."""
    from kiln.kernels import paged_attention

    monkeypatch.setattr(paged_attention, "PREFILL_LAZY_RESCALE", lazy)
    heads, kv_heads, d = 8, 2, 64
    sinks = (torch.randn(heads) * 2 + torch.tensor([0, 0, 0, 0, 0, 0, 8.0, -8.0])).cuda()
    for lens in ([3, 9], [700, 2000]):  # few keys: one split at batch 2 on most GPUs; many: several
        q, k_cache, v_cache, tables, ctx, _, _ = make_decode_case(lens, heads, kv_heads, d, 16, dtype, 1)
        args = [t.cuda() for t in (q, k_cache, v_cache, tables, ctx)]
        got = paged_decode_attention(*args, d ** -0.5, None, sinks=sinks)
        torch.testing.assert_close(got, paged_decode_attention_ref(*args, d ** -0.5, None, sinks=sinks),
                                   rtol=TOL[dtype], atol=TOL[dtype])
    q, k, v, cu = (t.cuda() for t in _packed([5, 130], heads, kv_heads, d, dtype, 2))
    for tma in (None, paged_attention.PREFILL_TMA_CONFIG):
        monkeypatch.setattr(paged_attention, "PREFILL_TMA_CONFIG", tma)
        got = varlen_prefill_attention(q, k, v, cu, 130, d ** -0.5, 16, sinks=sinks)
        torch.testing.assert_close(got, varlen_prefill_attention_ref(q, k, v, cu, 130, d ** -0.5, 16, sinks=sinks),
                                   rtol=TOL[dtype], atol=TOL[dtype])
    for cached, new in (([40, 3], [9, 20]), ([2000], [3])):  # the second splits the keys (a prefix hit)
        q, k_cache, v_cache, tables, cu, ctx, _, _ = make_continuing_case(cached, new, heads, kv_heads, d, 16, dtype, 3)
        args = [t.cuda() for t in (q, k_cache, v_cache, tables, cu, ctx)]
        got = paged_prefill_attention(*args, d ** -0.5, max_query_len=max(new), sinks=sinks)
        torch.testing.assert_close(got, paged_prefill_attention_ref(*args, d ** -0.5, sinks=sinks),
                                   rtol=TOL[dtype], atol=TOL[dtype])


def test_sinks_reference_is_a_softmax_over_one_more_key_with_no_value():
    """The reference's sinks, written another way: a key whose score is the sink and whose value is zero."""
    q, k_cache, v_cache, tables, ctx, dense_k, dense_v = make_decode_case([5, 12], 4, 2, 16, 4)
    sinks = torch.tensor([0.5, -1.0, 3.0, 0.0])
    got = paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, 0.25, sinks=sinks)
    for b in range(2):
        k, v = dense_k[b].repeat_interleave(2, dim=1), dense_v[b].repeat_interleave(2, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b], k) * 0.25
        probs = torch.cat([scores, sinks[:, None]], dim=1).softmax(-1)
        want = torch.einsum("hn,nhd->hd", probs, torch.cat([v, torch.zeros(1, 4, 16)]))
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-6)
