"""Grouped MoE: the alignment (every held pair once, blocks of one expert), the reference against the
formula written per token, and the Triton kernel against the reference, with expert parallelism's
dropped experts, every activation, and (on the GPU) no host sync, so a CUDA graph replays it.

The kernel tests run on CUDA, or on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1 PYTHONPATH=<site with triton> pytest tests/kernels/test_moe_kernel.py`)."""

import dataclasses
import importlib.util
import os

import pytest
import torch

from kiln.kernels import triton_available
from kiln.kernels.moe import ExpertBiases, ExpertCodes, Router, fused_moe, fused_moe_ref, moe_align, route, route_ref
from kiln.layers.mlp import ACTIVATIONS
from kiln.quantization.fp8 import Fp8ExpertMethod
from kiln.quantization.fp8_block import Fp8GroupExpertMethod
from kiln.quantization.weight_only import Int4ExpertMethod, Int8ExpertMethod

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if triton_available() else "cpu"
needs_kernel = pytest.mark.skipif(not (triton_available() or INTERPRETER),
                                  reason="needs an NVIDIA GPU with Triton, or TRITON_INTERPRET=1 with Triton")
needs_gpu = pytest.mark.skipif(not triton_available(), reason="CUDA graphs and sync checks need an NVIDIA GPU")

# The kernel rounds where the reference does (each matmul, the activation, each product), so the two
# differ by the order of float32 sums inside the matmuls: in 16-bit that flips a rounded intermediate by
# one ulp now and then, which moves the output by about one ulp of its scale; two ulps of the largest
# output bound it. float32 (no TF32) differs by sum order alone, ~hidden * 2**-24 relative.
ULP = {torch.float32: 2 ** -23, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


def routing(tokens, num_experts, top_k, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(tokens, num_experts, generator=g).softmax(-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return experts, weights / weights.sum(-1, keepdim=True)


def expert_weights(num_local, hidden, inter, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    fc = torch.randn(num_local, inter, hidden, generator=g) / hidden ** 0.5
    gate = torch.randn(num_local, inter, hidden, generator=g) / hidden ** 0.5
    proj = torch.randn(num_local, hidden, inter, generator=g) / inter ** 0.5
    return fc.to(dtype), gate.to(dtype), proj.to(dtype)


@pytest.mark.parametrize("tokens,num_experts,top_k,first,num_local,block_m",
                         [(1, 8, 2, 0, 8, 16), (37, 8, 2, 0, 8, 16), (50, 6, 3, 2, 2, 4), (9, 4, 2, 2, 2, 64)])
def test_align_puts_every_held_pair_once_in_blocks_of_its_expert(tokens, num_experts, top_k, first, num_local,
                                                                 block_m):
    experts, _ = routing(tokens, num_experts, top_k, seed=tokens)
    sorted_pairs, block_expert = moe_align(experts, first, num_local, block_m)
    pairs = tokens * top_k
    flat = experts.reshape(-1)
    held = [p for p in range(pairs) if first <= flat[p] < first + num_local]
    real = sorted_pairs[sorted_pairs < pairs]
    assert sorted(real.tolist()) == held  # every held pair once, no other pair
    assert (sorted_pairs[sorted_pairs >= pairs] == pairs).all()  # the rest is padding
    assert sorted_pairs.numel() == block_expert.numel() * block_m >= pairs + num_local * (block_m - 1)
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_pairs[b * block_m:(b + 1) * block_m]
        rows = rows[rows < pairs]
        if e < 0:
            assert rows.numel() == 0
        else:
            assert (flat[rows] == first + e).all()
    active = block_expert[block_expert >= 0]
    assert (active.diff() >= 0).all()  # experts' runs are in order, each run one stretch of blocks


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_reference_is_the_weighted_sum_of_each_tokens_experts(act):
    tokens, hidden, inter, top_k, first, num_local = 7, 12, 10, 2, 2, 3
    experts, weights = routing(tokens, 6, top_k, seed=1)
    fc, gate, proj = (w.double() for w in expert_weights(num_local, hidden, inter, seed=2))
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = torch.zeros_like(x)
    for t in range(tokens):
        for s in range(top_k):
            i = int(experts[t, s]) - first
            if 0 <= i < num_local:  # others are another rank's experts
                h = ACTIVATIONS[act](fc[i] @ x[t]) * (gate[i] @ x[t])
                expected[t] += weights[t, s].double() * (proj[i] @ h)
    got = fused_moe_ref(x, fc, gate, proj, experts, weights.double(), first, act)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert expected.abs().min() == 0 and expected.abs().max() > 0.1  # some tokens dropped, others not


def run_both(tokens, num_experts, top_k, first, num_local, hidden, inter, dtype, act, fused_layout, seed=0,
             by_pair=False):
    experts, weights = routing(tokens, num_experts, top_k, seed)
    fc, gate, proj = (w.to(DEVICE) for w in expert_weights(num_local, hidden, inter, seed + 1, dtype))
    if fused_layout:  # the engine's fc_gate: fc and gate are two views of one [local, 2*inter, hidden] tensor
        fc, gate = torch.cat([fc, gate], dim=1).chunk(2, dim=1)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 2)).to(dtype).to(DEVICE)
    args = (x, fc, gate, proj, experts.to(DEVICE), weights.to(dtype).to(DEVICE), first, act)
    return fused_moe(*args, by_pair=by_pair), fused_moe_ref(*args)


def assert_within_ulps(got, want, dtype):
    scale = want.abs().max().item()
    assert scale > 0.1  # the outputs are not all dropped
    err = (got.float() - want.float()).abs().max().item()
    print(f"fused_moe {dtype}: max err {err:.3g} (scale {scale:.3g})")
    bound = 2 * ULP[dtype] * scale if dtype != torch.float32 else 1e-5 * scale
    assert err <= bound, f"max error {err} over {bound}"


KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@needs_kernel
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("tokens,num_experts,top_k,first,num_local,hidden,inter,by_pair", [
    (1, 8, 2, 0, 8, 64, 96, False),  # decode by the grouped GEMMs: two rows, 16-row blocks
    (45, 8, 2, 0, 8, 80, 72, False),  # ragged tiles in every dim
    (300, 6, 3, 2, 2, 64, 48, False),  # expert parallelism: 2 of 6 experts held, 64-row blocks
    (1, 8, 2, 0, 8, 64, 96, True),  # decode by pair: one GEMV a pair
    (3, 6, 2, 2, 3, 80, 200, True),  # by pair, expert parallelism (3 of 6 held), ragged output tiles and K steps
])
def test_kernel_matches_reference(dtype, tokens, num_experts, top_k, first, num_local, hidden, inter, by_pair):
    got, want = run_both(tokens, num_experts, top_k, first, num_local, hidden, inter, dtype, "silu",
                         fused_layout=True, by_pair=by_pair)
    assert_within_ulps(got, want, dtype)


def expert_codes(weight: torch.Tensor, fmt: str, dtype: torch.dtype) -> ExpertCodes:
    """A stacked [local, out, in] weight as a quantized format's ExpertCodes (the expert methods' quantize)."""
    method = {"int8": Int8ExpertMethod(), "e4m3": Fp8ExpertMethod(), "e4m3_g32": Fp8GroupExpertMethod(32),
              "int4_g32": Int4ExpertMethod(32, False), "int4_g64_zp": Int4ExpertMethod(64, True)}[fmt]
    t = method.quantize(weight, dtype)
    group = getattr(method, "group_size", 0)
    return ExpertCodes(t["weight"], t["weights_scaling_factor"], t.get("zero_point"), group)


def fused_codes(fc: ExpertCodes, gate: ExpertCodes) -> tuple[ExpertCodes, ExpertCodes]:
    """fc and gate as the engine holds them: two views of one fused [fc | gate] set of tensors."""
    parts = [None if a is None else torch.cat([a, b], dim=1) for a, b in
             ((fc.codes, gate.codes), (fc.scale, gate.scale), (fc.zero, gate.zero))]
    return ExpertCodes(*parts, fc.group).halves()


@needs_kernel
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("fmt", ["int8", "e4m3", "e4m3_g32", "int4_g32", "int4_g64_zp"])
@pytest.mark.parametrize("tokens,num_experts,top_k,first,num_local,hidden,inter,quantized,by_pair", [
    (1, 8, 2, 0, 8, 64, 128, "all", False),  # decode: 16-row blocks, 128-input steps (int4: a group's)
    (45, 8, 2, 0, 8, 192, 64, "all", False),  # ragged row blocks and output tiles
    (300, 6, 3, 2, 2, 64, 192, "all", False),  # expert parallelism, 64-row blocks
    (45, 8, 2, 0, 8, 192, 64, "proj", False),  # fc and gate excluded (exclude_modules), proj quantized
    (1, 8, 2, 0, 8, 64, 128, "all", True),  # decode by pair
    (3, 6, 2, 2, 3, 192, 64, "all", True),  # by pair: expert parallelism, two int4 groups a step's length apart
])
def test_quantized_experts_kernel_matches_reference(dtype, fmt, tokens, num_experts, top_k, first, num_local,
                                                    hidden, inter, quantized, by_pair):
    """W8A16, FP8, FP8_BLOCK_SCALES and W4A16 experts (codes, scales, zeros) with fc and gate as views of the
    engine's fused fc_gate tensors: the kernel dequantizes each tile as the reference dequantizes each expert."""
    experts, weights = routing(tokens, num_experts, top_k, seed=tokens)
    fc, gate, proj = expert_weights(num_local, hidden, inter, seed=7)
    fc_q, gate_q = fused_codes(expert_codes(fc, fmt, dtype), expert_codes(gate, fmt, dtype))
    if quantized == "proj":
        fc_q, gate_q = fc.to(dtype), gate.to(dtype)
    proj_q = expert_codes(proj, fmt, dtype)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(3)).to(dtype)
    on_device = lambda w: w.to(DEVICE) if isinstance(w, torch.Tensor) else ExpertCodes(  # noqa: E731
        w.codes.to(DEVICE), w.scale.to(DEVICE), None if w.zero is None else w.zero.to(DEVICE), w.group)
    args = [on_device(t) for t in (x, fc_q, gate_q, proj_q, experts, weights.to(dtype))] + [first, "silu"]
    got, want = fused_moe(*args, by_pair=by_pair), fused_moe_ref(*args)
    assert_within_ulps(got, want, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", KERNEL_DTYPES[1:])  # (16-bit activations: the words' scaling assumes them)
@pytest.mark.parametrize("fmt", ["int4_g32", "int4_g64_zp", "int8", "e4m3"])
@pytest.mark.parametrize("tokens,first,num_local", [(1, 0, 8), (2, 2, 3)])  # (expert parallelism: pairs not held)
def test_experts_by_pair_read_words_in_the_engine_layout(monkeypatch, dtype, fmt, tokens, first, num_local):
    """int4, int8 and e4m3 experts held as the engine holds them (fc and gate halves of one fused tensor on the
    device) go by words of codes (_pair_words_kernel), gated and plain;
    their output matches the reference and the tile kernel's, which the words replace (KILN_MOE_WORDS=0).
    Separate fc and gate tensors keep the tile kernel. (e4m3 codes become floats by the hardware's conversion on
    the GPU, by bit operations under Triton's interpreter.)"""
    from kiln.kernels import moe

    monkeypatch.setattr(moe, "PAIR_WORDS", frozenset({"int4", "int8", "e4m3"}))
    monkeypatch.setattr(moe, "E4M3_BY_BITS", INTERPRETER)

    experts, weights = routing(tokens, 8, 2, seed=11)
    fc, gate, proj = expert_weights(num_local, 256, 96, seed=11)
    fc_q, gate_q = (expert_codes(w, fmt, dtype) for w in (fc, gate))
    fc_q, gate_q = ExpertCodes(*(None if a is None else torch.cat([a, b], dim=1).to(DEVICE) for a, b in (
        (fc_q.codes, gate_q.codes), (fc_q.scale, gate_q.scale), (fc_q.zero, gate_q.zero))), fc_q.group).halves()
    proj_q = expert_codes(proj, fmt, dtype)
    proj_q = ExpertCodes(*(None if t is None else t.to(DEVICE) for t in (proj_q.codes, proj_q.scale, proj_q.zero)),
                         proj_q.group)
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(4)).to(dtype).to(DEVICE)
    assert moe._pair_words_args(x, fc_q, gate_q) is not None
    assert moe._pair_words_args(x, proj_q, None) is not None
    assert moe._pair_words_args(x, *(expert_codes(w, fmt, dtype) for w in (fc, gate))) is None  # (two tensors)
    args = [x, fc_q, gate_q, proj_q, experts.to(DEVICE), weights.to(dtype).to(DEVICE), first, "silu"]
    by_words = fused_moe(*args, by_pair=True)
    monkeypatch.setattr(moe, "PAIR_WORDS", frozenset())
    by_tiles = fused_moe(*args, by_pair=True)
    want = fused_moe_ref(*args)
    assert_within_ulps(by_words, want, dtype)
    assert_within_ulps(by_tiles, want, dtype)


def test_pair_words_take_only_experts_whose_codes_read_as_words(monkeypatch):
    """Which experts the words kernel takes (no GPU needed): int4 and int8 fc and gate as halves of one fused
    tensor, proj alone, under 16-bit activations, e4m3 too, each where KILN_MOE_WORDS names it; not float32
    activations, fc and gate apart, rows of part of a word, or scales not one a row (or a row's group) in contiguous
    rows."""
    from kiln.kernels import moe

    fc, gate, proj = expert_weights(4, 64, 48, seed=12)
    x16, x32 = torch.randn(1, 64).to(torch.bfloat16), torch.randn(1, 64)

    def fused(fmt, fc=fc, gate=gate):
        a, b = (expert_codes(w, fmt, torch.bfloat16) for w in (fc, gate))
        return ExpertCodes(*(None if t is None else torch.cat([t, u], dim=1) for t, u in (
            (a.codes, b.codes), (a.scale, b.scale), (a.zero, b.zero))), a.group).halves()

    for fmt, codes in (("int4_g32", 2), ("int4_g64_zp", 2), ("int8", 1), ("e4m3", 3)):
        words, *_, gap, tile, kind = moe._pair_words_args(x16, *fused(fmt))
        assert (gap, kind, words.dtype) == (48, codes, torch.int64)
        assert moe._pair_words_args(x16, expert_codes(proj, fmt, torch.bfloat16), None)[4] == 0
        assert moe._pair_words_args(x32, *fused(fmt)) is None
        assert moe._pair_words_args(x16, *(expert_codes(w, fmt, torch.bfloat16) for w in (fc, gate))) is None
    narrow = [w[..., :56] for w in (fc, gate)]  # 56 inputs: 3.5 words of int4 codes, 7 of int8
    assert moe._pair_words_args(x16[:, :56], *fused("int4_g32", *narrow)) is None
    assert moe._pair_words_args(x16[:, :56], *fused("int8", *narrow)) is not None
    fc_q, gate_q = fused("int4_g32")
    strided = ExpertCodes(fc_q.codes, fc_q.scale[..., :1], None, 64)  # scales of every other group: not rows
    assert moe._pair_words_args(x16, strided, None) is None
    int8 = expert_codes(proj, "int8", torch.bfloat16)
    assert moe._pair_words_args(x16[:, :48], ExpertCodes(int8.codes, int8.scale[:, :1]), None) is None  # (a scale
    # an expert, not a row: the kernels read one a row)
    monkeypatch.setattr(moe, "PAIR_WORDS", frozenset({"e4m3"}))
    assert moe._pair_words_args(x16, *fused("e4m3"))[-1] == 3 and moe._pair_words_args(x16, *fused("int8")) is None


@needs_kernel
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("by_pair", [False, True])
def test_kernel_matches_reference_for_each_activation(act, by_pair):
    got, want = run_both(20, 4, 2, 0, 4, 48, 40, torch.float32, act, fused_layout=False, seed=5, by_pair=by_pair)
    assert_within_ulps(got, want, torch.float32)


@needs_kernel
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("fmt", [None, "int4_g32"])
@pytest.mark.parametrize("tokens,by_pair", [(1, True), (3, True), (40, False)])
def test_gpt_oss_experts_match_the_reference(dtype, fmt, tokens, by_pair):
    """gpt-oss's experts: biases on fc, gate and proj (proj's before the routing weight) and the clamped GLU,
    quick_gelu(min(fc, 7)) * (clamp(gate, -7, 7) + 1), on the engine's fused fc_gate layout; the weights scaled
    so that a share of fc and gate lands past the limit (checked), by pair and by the grouped GEMMs."""
    experts, weights = routing(tokens, 8, 2, seed=9)
    fc, gate, proj = (w * 4 for w in expert_weights(8, 64, 48, seed=9, dtype=torch.float32))
    g = torch.Generator().manual_seed(10)
    bias = [torch.randn(8, n, generator=g).to(dtype).to(DEVICE) for n in (96, 64)]  # [fc | gate] fused, proj
    biases = ExpertBiases(*bias[0].chunk(2, dim=1), bias[1], limit=7.0)
    x = torch.randn(tokens, 64, generator=g).to(dtype)
    assert (torch.einsum("th,eih->tei", x.float(), torch.cat([fc, gate], 1)).abs() > 7).float().mean() > 0.05
    if fmt:
        (fc, gate), proj = fused_codes(*(expert_codes(w, fmt, dtype) for w in (fc, gate))), \
            expert_codes(proj, fmt, dtype)
    else:
        fc, gate = (t.to(dtype) for t in torch.cat([fc, gate], dim=1).chunk(2, dim=1))
        proj = proj.to(dtype)
    on_device = lambda w: w.to(DEVICE) if isinstance(w, torch.Tensor) else ExpertCodes(  # noqa: E731
        w.codes.to(DEVICE), w.scale.to(DEVICE), None if w.zero is None else w.zero.to(DEVICE), w.group)
    args = [on_device(t) for t in (x, fc, gate, proj)] + [experts.to(DEVICE), weights.to(dtype).to(DEVICE), 0,
                                                          "quick_gelu"]
    got = fused_moe(*args, by_pair=by_pair, biases=biases)
    assert_within_ulps(got, fused_moe_ref(*args, biases=biases), dtype)


def test_reference_routes_as_transformers_writes_it():
    """softmax in float32, top-k, renormed when asked, cast: Mixtral's and Qwen-MoE's routing, written out."""
    logits = torch.randn(5, 12, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    for normalize in (False, True):
        weights, experts = route_ref(logits, Router(3, normalize), torch.bfloat16)
        for t in range(5):
            probs = [float(v) for v in torch.softmax(logits[t].float(), -1)]
            top = sorted(range(12), key=lambda e: -probs[e])[:3]
            assert experts[t].tolist() == top
            chosen = torch.tensor([probs[e] for e in top])
            want = chosen / chosen.sum() if normalize else chosen
            assert torch.equal(weights[t], want.to(torch.bfloat16))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,num_experts,router", [
    (1, 128, Router(8, True)),  # Qwen3-MoE's 128 experts and top 8
    (7, 60, Router(4, False)),  # Qwen2-MoE's 60 (not a power of two), not renormed
    (33, 8, Router(2, True)),  # Mixtral's
    (3, 512, Router(10, True)),  # a top-k not a power of two
    (2, 256, Router(8, True, True, groups=8, topk_groups=4, scaling=2.5)),  # DeepSeek-V3's groups
    (5, 160, Router(8, True, True, scaling=2.5)),  # GLM-4.5's 160 experts, one group
    (9, 12, Router(3, False, True, groups=4, topk_groups=2)),  # groups of 3, unnormed
    (4, 160, Router(6, False, scaling=16.0)),  # a softmax router's weights scaled (DeepSeek-V2's)
    (3, 160, Router(6, False, groups=8, topk_groups=2, scaling=16.0))])  # its groups of the best probabilities
def test_route_kernel_matches_reference(dtype, tokens, num_experts, router):
    g = torch.Generator().manual_seed(tokens + num_experts)
    logits = (3 * torch.randn(tokens, num_experts, generator=g)).to(dtype).to(DEVICE)
    if router.sigmoid:  # a balance bias of the logits' order: it moves the choice
        router = dataclasses.replace(router, bias=torch.randn(num_experts, generator=g).to(dtype).to(DEVICE))
    weights, experts = route(logits, router, dtype)
    want_weights, want_experts = route_ref(logits, router, dtype)
    # the same experts, but where 16-bit logits tie (512 bf16 values do), which torch.topk leaves unspecified
    chooses = torch.softmax(logits.float(), -1) if not router.sigmoid else logits.float().sigmoid() + router.bias
    assert torch.equal(chooses.gather(1, experts), chooses.gather(1, want_experts))
    assert all(len(set(row)) == router.top_k for row in experts.tolist())
    # The float32 scores differ by exp's rounding (the GPU's ex2.approx of x log2(e): ~|x| 2^-24 relative,
    # |x| up to ~20 here) and the sums' order: 64 float32 ulps bound it. Cast, that is at most one ulp of the dtype.
    ulps = 64 * ULP[torch.float32] if dtype == torch.float32 else ULP[dtype]
    ours, want = weights.float().sort(-1).values, want_weights.float().sort(-1).values  # (sigmoid: any order)
    assert ((ours - want).abs() <= ulps * want).all()
    assert weights.dtype == dtype and experts.dtype == torch.int64


@needs_kernel
@pytest.mark.parametrize("tile", [(8, 128, 4), (32, 64, 2), (64, 256, 8), (8, 512, 4), (8, 1024, 8)])
@pytest.mark.parametrize("fmt", [None, "int4_g64_zp", "int4_g32", "e4m3_g32"])
def test_pair_gemv_tiles_match_the_reference(monkeypatch, tile, fmt):
    """Every tile shape scripts/bench_moe_pair_gemv.py may pick (outputs a program, inputs a step, warps), on float
    and grouped experts: a step of several groups (each read with its own scale and zero), and one past K."""
    from kiln.kernels import moe

    monkeypatch.setattr(moe, "PAIR_TILE", dict.fromkeys(moe.PAIR_TILE, tile))
    experts, weights = routing(1, 8, 3, seed=7)
    fc, gate, proj = expert_weights(8, 256, 96, seed=7)
    if fmt:
        (fc, gate), proj = fused_codes(*(expert_codes(w, fmt, torch.float32) for w in (fc, gate))), \
            expert_codes(proj, fmt, torch.float32)
    on_device = lambda w: w.to(DEVICE) if isinstance(w, torch.Tensor) else ExpertCodes(  # noqa: E731
        w.codes.to(DEVICE), nan_padded(w.scale), None if w.zero is None else nan_padded(w.zero), w.group)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(3))
    args = [on_device(t) for t in (x, fc, gate, proj, experts, weights)] + [0, "silu"]
    assert_within_ulps(fused_moe(*args, by_pair=True), fused_moe_ref(*args), torch.float32)


def nan_padded(t: torch.Tensor) -> torch.Tensor:
    """t on the device, each row followed by NaNs: a kernel that reads a scale past a row's last group reads NaN
    (what lay there by chance made such a read fail one run in a few, fortieth session)."""
    padded = torch.full((*t.shape[:-1], t.shape[-1] + 4), float("nan"), dtype=t.dtype, device=DEVICE)
    padded[..., :t.shape[-1]] = t
    return padded[..., :t.shape[-1]]


def test_decode_goes_by_pair_unless_tokens_share_experts(monkeypatch):
    """One token always (its top-k experts are distinct); more when there are four experts a pair or more (they
    rarely share one); KILN_MOE_BY_PAIR forces either way."""
    from kiln.kernels.moe import _by_pair

    monkeypatch.delenv("KILN_MOE_BY_PAIR", raising=False)
    assert _by_pair(1, 8, 8) and _by_pair(4, 32, 128) and not _by_pair(5, 40, 128) and not _by_pair(2, 4, 8)
    monkeypatch.setenv("KILN_MOE_BY_PAIR", "0")
    assert not _by_pair(1, 8, 128)
    monkeypatch.setenv("KILN_MOE_BY_PAIR", "1")
    assert _by_pair(64, 512, 8)


@needs_gpu
@pytest.mark.parametrize("tokens,by_pair", [(4, False), (1, True)])  # decode's graphs capture both paths
def test_kernel_makes_no_host_sync_and_replays_in_a_cuda_graph(tokens, by_pair):
    num_experts, top_k, hidden, inter, dtype = 8, 2, 128, 256, torch.bfloat16
    fc, gate, proj = (w.cuda() for w in expert_weights(num_experts, hidden, inter, 0, dtype))
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    experts, weights = (t.cuda() for t in routing(tokens, num_experts, top_k, seed=1))
    weights = weights.to(dtype)
    fused_moe(x, fc, gate, proj, experts, weights, 0, "silu", by_pair)  # compile outside the checks
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_moe(x, fc, gate, proj, experts, weights, 0, "silu", by_pair)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, fc, gate, proj, experts, weights, 0, "silu", by_pair)
    new_experts, new_weights = routing(tokens, num_experts, top_k, seed=2)
    experts.copy_(new_experts)
    weights.copy_(new_weights)
    x.copy_(torch.randn(tokens, hidden, device="cuda", dtype=dtype))
    graph.replay()
    assert_within_ulps(out, fused_moe_ref(x, fc, gate, proj, experts, weights, 0, "silu"), dtype)
