"""Mixture-of-experts FFN with tokens grouped by expert: sort, then two grouped GEMMs (fused-MoE style).

The (token, slot) pairs the router picked are sorted by expert and each expert's run is padded to a
multiple of the GEMM's row block, so every row block belongs to one expert (`moe_align`). A grouped
GEMM then launches one program per (row block, column tile); each program reads its expert from the
block map and gathers its rows, so all experts run in one launch with no per-expert host work:
1. fc and gate of the expert in one pass (two accumulators), act(fc) * gate written per pair;
2. proj of that, times the pair's routing weight, written per pair; the top-k rows of a token are then
   summed (a weighted scatter-add that is deterministic, no atomics).
Nothing reads a device value on the host (no `.item()`, `.tolist()`, `nonzero`), so the GPU path can be
captured in a CUDA graph; the sizes depend only on the token count and the expert count. Pairs routed
to experts this rank does not hold (expert parallelism) are sorted past the last block and dropped.
The layout follows vLLM's fused_moe (moe_align_block_size + fused_moe_kernel); the code is our own.

Decode's few pairs skip the sort (`_fused_moe_by_pair`): one GEMV program per (pair, output tile) reads its
expert from the routing. At batch 1 the grouped GEMMs had a row block per expert, so fc_gate's 2048-long rows ran
in few programs, behind the sort's dozen small kernels: a 16-layer Qwen3-30B-A3B decoded at 37% of its roofline
in bf16 and W4A16 at 20% on an H100 (docs/performance.md, thirty-sixth session). int4 and int8 experts held as the
engine holds them go by words of codes (`_pair_words_kernel`, the dense GEMVs' sums of kiln.kernels.words): the
tile kernel's unpacking left W4A16 no faster than bf16, the words 1.46x (fortieth session).

`fused_moe_ref` is the reference: one matmul per expert present, exact against transformers on CPU.

Quantized experts (the expert methods of kiln.quantization) come as `ExpertCodes`: W8A16's int8 codes, the FP8
formats' e4m3 ones or the int4 formats' packed ones, with their scales (a row's, or a row's group's) and zeros.
Both paths use the weight the format defines, rounded to the activations' dtype: the reference dequantizes each
expert present, the kernel each tile as it loads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kiln.kernels.pdl import pdl_args
from kiln.layers.mlp import ACTIVATIONS

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference below still works
    triton = None

if triton is not None:
    from kiln.kernels.pdl import allow_dependents, wait_for_inputs
    from kiln.kernels.gemv import fp8_word_row_sums
    from kiln.kernels.words import gemv_program, w4_row_sums, w8_row_sums

ACT_CODE = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "quick_gelu": 4, "relu2": 5}  # the kernel's constexpr


@dataclass(frozen=True)
class ExpertCodes:
    """One projection of the local experts as quantized codes: int8 or e4m3 [local, out, in] (W8A16, FP8,
    FP8_BLOCK_SCALES) or int4 packed two a byte along the input dim [local, out, in / 2] (W4A16, as its dense layers
    pack them); `scale` [local, out, groups] of `group` inputs each (0: one group, the whole row; int4 and
    FP8_BLOCK_SCALES' e4m3 have groups); `zero` int4's zero points shaped like scale, or None (the symmetric 8)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    group: int = 0  # inputs per scale (0: the whole row)

    @property
    def int4(self) -> bool:
        return self.codes.dtype == torch.uint8

    @property
    def shape(self) -> tuple[int, int, int]:
        """(local experts, outputs, inputs), as a float weight's shape."""
        local, out, width = self.codes.shape
        return local, out, width * 2 if self.int4 else width

    def dequantize(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """Local expert i's weight [out, in] in dtype, as its dense format dequantizes."""
        from kiln.quantization.weight_only import dequantize_int4  # (it imports the layers)

        if self.int4:
            return dequantize_int4(self.codes[i], self.scale[i], None if self.zero is None else self.zero[i],
                                   self.group, dtype)
        scale = self.scale[i].float()  # int8 or e4m3 codes: a scale a row, or a row's group
        scale = scale.repeat_interleave(self.group, dim=-1) if self.group else scale
        return (self.codes[i].float() * scale).to(dtype)

    def halves(self) -> tuple["ExpertCodes", "ExpertCodes"]:
        """fc's and gate's codes, as views of the engine's fused fc_gate (its outputs are [fc | gate])."""
        parts = [t.chunk(2, dim=1) if t is not None else (None, None) for t in (self.codes, self.scale, self.zero)]
        return tuple(ExpertCodes(c, s, z, self.group) for c, s, z in zip(*parts))


def expert_halves(weight):
    """fc and gate of the engine's fused fc_gate experts: a float weight's or ExpertCodes' two output halves."""
    return weight.chunk(2, dim=1) if isinstance(weight, torch.Tensor) else weight.halves()


@dataclass(frozen=True)
class ExpertBiases:
    """gpt-oss's expert biases, [local experts, out] each, added to each projection's output before what follows
    it (the GLU, the routing weight); `limit` its clamped GLU's (config.moe_swiglu_limit), or None."""

    fc: torch.Tensor
    gate: torch.Tensor
    proj: torch.Tensor
    limit: float | None = None


def glu(act: str, fc_out: torch.Tensor, gate_out: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """act(fc) * gate; with a limit (gpt-oss), act(min(fc, limit)) * (clamp(gate, -limit, limit) + 1)."""
    if limit is not None:
        fc_out, gate_out = fc_out.clamp(max=limit), gate_out.clamp(-limit, limit) + 1
    return ACTIVATIONS[act](fc_out) * gate_out


def fused_moe_ref(x: torch.Tensor, fc, gate, proj, experts: torch.Tensor, weights: torch.Tensor,
                  first_expert: int, act: str, biases: ExpertBiases | None = None) -> torch.Tensor:
    """sum over the top-k slots of weight * proj_e(glu(fc_e x, gate_e x)), for the experts held here.

    x [tokens, hidden]; fc, gate [local, inter, hidden]; proj [local, hidden, inter]; experts (global ids)
    and weights [tokens, top_k]; local expert i is global expert first_expert + i. Other experts' pairs
    contribute nothing (they are another rank's partial sum). Each of fc, gate and proj may be ExpertCodes,
    dequantized per expert present. biases: added to each projection's output (gpt-oss)."""
    out = torch.zeros_like(x)
    stop = first_expert + fc.shape[0]
    for e in experts.unique().tolist():
        if not first_expert <= e < stop:
            continue
        token, slot = (experts == e).nonzero(as_tuple=True)
        h, i = x[token], e - first_expert
        w_fc, w_gate, w_proj = (w[i] if isinstance(w, torch.Tensor) else w.dequantize(i, x.dtype)
                                for w in (fc, gate, proj))
        b_fc, b_gate, b_proj = (None, None, None) if biases is None else (biases.fc[i], biases.gate[i],
                                                                          biases.proj[i])
        limit = None if biases is None else biases.limit
        y = F.linear(glu(act, F.linear(h, w_fc, b_fc), F.linear(h, w_gate, b_gate), limit), w_proj, b_proj)
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


@dataclass(frozen=True)
class Router:
    """How a mixture of experts chooses its top_k experts from the router's logits [tokens, experts]:
    - softmax (Mixtral, Qwen-MoE): the top_k softmax probabilities, renormed to sum to 1 when `normalize`;
    - sigmoid (DeepSeek-V3, GLM-4.5): sigmoid scores; the experts chosen by score + `bias` (a learned balance that
      only chooses) among the `topk_groups` of `groups` equal runs of experts whose two best score + bias sum
      highest; weighted by their scores, renormed when `normalize` (over the sum plus 1e-20, as transformers).
    With groups, a softmax router (DeepSeek-V2's group_limited_greedy) chooses among the groups whose best
    probability is highest. The weights are then times `scaling` (DeepSeek's and GLM-4.5's routed_scaling_factor;
    1 for the others)."""

    top_k: int
    normalize: bool
    sigmoid: bool = False
    bias: torch.Tensor | None = None
    groups: int = 1
    topk_groups: int = 1
    scaling: float = 1.0


def route_ref(logits: torch.Tensor, router: Router, dtype: torch.dtype):
    """The router's choice in float32, as transformers routes: (weights [tokens, top_k] in dtype, experts
    [tokens, top_k] int64)."""
    if router.sigmoid:
        scores = logits.float().sigmoid()
        choice = scores + router.bias.float()
    else:
        scores = choice = F.softmax(logits.float(), dim=-1)
    if router.groups > 1:
        tokens, experts = choice.shape
        by_group = choice.view(tokens, router.groups, -1)
        worth = by_group.topk(2, dim=-1)[0].sum(-1) if router.sigmoid else by_group.amax(-1)
        kept = torch.zeros_like(worth, dtype=torch.bool).scatter_(1, worth.topk(router.topk_groups, dim=-1)[1], True)
        choice = choice.masked_fill(~kept.repeat_interleave(experts // router.groups, dim=1), float("-inf"))
    experts = choice.topk(router.top_k, dim=-1)[1]
    weights = scores.gather(1, experts)
    if router.normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if router.sigmoid else 0.0))
    return (weights * router.scaling).to(dtype), experts


def route(logits: torch.Tensor, router: Router, dtype: torch.dtype):
    """Triton version of `route_ref`, same arguments and results, in one launch where the reference takes seven
    (softmax) to seventeen (sigmoid with groups): at batch-1 decode each is a launch on the critical path. CUDA
    tensors (or the interpreter); the weights match up to float32 rounding (exp's and the sums'), the experts
    exactly unless two choices tie (the lower index wins; torch.topk leaves ties unspecified)."""
    tokens, num_experts = logits.shape
    top_k = router.top_k
    weights = torch.empty(tokens, top_k, dtype=dtype, device=logits.device)
    experts = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    block_e = triton.next_power_of_2(num_experts)
    _route_kernel[(tokens,)](logits, router.bias if router.sigmoid else logits, weights, experts, num_experts,
                             logits.stride(0), float(router.scaling), num_experts // router.groups, TOP_K=top_k,
                             NORMALIZE=router.normalize, SIGMOID=router.sigmoid, GROUPS=router.groups,
                             TOPK_GROUPS=router.topk_groups, BLOCK_E=block_e,
                             BLOCK_G=triton.next_power_of_2(router.groups), BLOCK_K=triton.next_power_of_2(top_k),
                             num_warps=min(max(block_e // 256, 1), 8), **pdl_args(logits.device))
    return weights, experts


def moe_align(experts: torch.Tensor, first_expert: int, num_local: int, block_m: int):
    """Sort the flattened (token, slot) pairs by local expert, each expert's run padded to block_m rows.

    Returns sorted_pairs [padded] (pair index token * top_k + slot; pad rows hold tokens * top_k) and
    block_expert [padded // block_m] (the local expert of each row block, -1 for blocks past the last).
    padded is the worst case, tokens * top_k + num_local * (block_m - 1) rounded up: a shape fixed by the
    token count, so nothing waits on the routing."""
    pairs = experts.numel()
    local = experts.reshape(-1) - first_expert
    held = (local >= 0) & (local < num_local)
    key = torch.where(held, local, num_local)  # not held: one bucket past the last, dropped below
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=experts.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    runs = (counts[:num_local] + block_m - 1) // block_m * block_m
    run_end = runs.cumsum(0)
    run_start = run_end - runs
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    rank_in_run = torch.arange(pairs, device=experts.device) - (counts.cumsum(0) - counts)[sorted_key]
    padded = -(-(pairs + num_local * (block_m - 1)) // block_m) * block_m
    dest = torch.where(sorted_key < num_local,
                       torch.cat([run_start, run_start.new_full((1,), padded)])[sorted_key] + rank_in_run,
                       padded)  # dropped pairs land in one spare slot, cut off below
    sorted_pairs = torch.full((padded + 1,), pairs, dtype=torch.int64, device=experts.device)
    sorted_pairs.scatter_(0, dest, order)
    block_start = torch.arange(0, padded, block_m, device=experts.device)
    block_expert = torch.searchsorted(run_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_local, block_expert, -1)
    return sorted_pairs[:padded], block_expert.to(torch.int32)


def _by_pair(tokens: int, pairs: int, num_local: int) -> bool:
    """Decode's few pairs go one GEMV each: a token's top-k experts are distinct, so one token reads each expert
    once either way, and a few tokens over many experts rarely share one (sharing, the grouped GEMMs read it once
    for all its rows). KILN_MOE_BY_PAIR=0 or 1 forces the choice (for A/B runs)."""
    forced = os.environ.get("KILN_MOE_BY_PAIR")
    if forced is not None:
        return forced != "0"
    return tokens == 1 or 4 * pairs <= num_local


def _fused_moe_by_pair(x, fc, gate, proj, experts, weights, first_expert: int, act: str,
                       biases: ExpertBiases | None = None) -> torch.Tensor:
    """fused_moe for a few pairs: fc and gate, then proj, each one GEMV program per (pair, column tile) that reads
    its expert from the routing; no sort, no padding, and a program for every output column tile of every pair
    (the grouped GEMM at batch 1 has one row block an expert, so fc_gate's hidden-long rows run in few programs)."""
    tokens, top_k = experts.shape
    pairs, inter, hidden = tokens * top_k, fc.shape[1], fc.shape[2]
    flat = experts.reshape(-1)
    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    gated, plain = _bias_pairs(biases)
    limit = None if biases is None else biases.limit
    _pair_gemv(x, fc, gate, h, None, flat, first_expert, top_k, ACT_CODE[act], bias=gated, limit=limit)
    y = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)  # (a pair not held here: zeros)
    _pair_gemv(h, proj, None, y, weights.reshape(-1), flat, first_expert, 1, -1, bias=plain)
    return y.view(tokens, top_k, hidden).sum(1)


def _bias_pairs(biases: ExpertBiases | None) -> tuple[tuple, tuple]:
    """The kernels' bias arguments: (fc's, gate's) for the gated pass, (proj's, None) for the weighted one."""
    if biases is None:
        return (None, None), (None, None)
    return (biases.fc, biases.gate), (biases.proj, None)


def fused_moe(x: torch.Tensor, fc, gate, proj, experts: torch.Tensor, weights: torch.Tensor, first_expert: int,
              act: str, by_pair: bool | None = None, biases: ExpertBiases | None = None) -> torch.Tensor:
    """Triton version of `fused_moe_ref`, same arguments and result; CUDA tensors (or the interpreter).
    fc and gate may be the two halves (views) of the runtime's fused fc_gate (expert_halves). by_pair: one GEMV
    a (token, slot) pair, with no sort (_fused_moe_by_pair), or the grouped GEMMs; None chooses (_by_pair)."""
    tokens, top_k = experts.shape
    num_local, inter, hidden = fc.shape
    pairs = tokens * top_k
    if by_pair if by_pair is not None else _by_pair(tokens, pairs, num_local):
        return _fused_moe_by_pair(x, fc, gate, proj, experts, weights, first_expert, act, biases)
    cfg = _config(pairs, num_local)
    sorted_pairs, block_expert = moe_align(experts, first_expert, num_local, cfg["BLOCK_M"])
    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)  # act(fc) * gate, one row per pair
    gated, plain = _bias_pairs(biases)
    _grouped_gemm(x, fc, gate, h, None, sorted_pairs, block_expert, top_k, ACT_CODE[act], cfg, gated,
                  None if biases is None else biases.limit)
    y = torch.zeros(pairs, hidden, dtype=x.dtype, device=x.device)  # zeros: pairs not held here add 0
    _grouped_gemm(h, proj, None, y, weights.reshape(-1), sorted_pairs, block_expert, 1, -1, cfg, plain)
    return y.view(tokens, top_k, hidden).sum(1)


def _config(pairs: int, num_local: int) -> dict:
    """Tile sizes: 16-row blocks when experts see a few rows each (decode: the GEMMs stream weights),
    64-row blocks when they see many (prefill: the GEMMs are compute-bound)."""
    if pairs <= 4 * num_local * 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


# the kernel's CODES: float weights; int8 or e4m3 codes with a scale a row (or a row's group); packed int4
_CODES = {None: 0, torch.int8: 1, torch.float8_e4m3fn: 1, torch.uint8: 2}


@dataclass(frozen=True)
class _WeightArgs:
    """What both MoE kernels take of a projection's weight (b, with the gate's bg when fused into one pass): the
    pointers b_ptr, bg_ptr, sb_ptr, sg_ptr, zb_ptr, zg_ptr, their strides, and the constexprs K, GATED, CODES,
    GROUP, HAS_ZERO; `step_limit` caps BLOCK_K where scales come by group (a step stays within one)."""

    pointers: tuple
    strides: tuple
    constexprs: dict
    n: int
    step_limit: int | None

    @staticmethod
    def of(a: torch.Tensor, b, b_gate) -> "_WeightArgs":
        """b and b_gate (None: no gate) are float weights or ExpertCodes, both alike; `a` stands in for pointers a
        float weight does not have (never read)."""
        bg = b if b_gate is None else b_gate
        coded = isinstance(b, ExpertCodes)
        assert coded == isinstance(bg, ExpertCodes), "fc and gate must be quantized alike"
        n, k = b.shape[1], b.shape[2]
        w, wg = (b.codes, bg.codes) if coded else (b, bg)
        scale, zero = (b.scale, b.zero) if coded else (a, None)
        if coded:  # fc's and gate's scales and zeros: views of one fused tensor, or tensors alike
            assert bg.scale.stride() == scale.stride() and (zero is None or zero.stride() == scale.stride())
        stand_in = scale if zero is None else zero
        pointers = (w, wg, scale, bg.scale if coded else a, stand_in, bg.zero if coded and bg.zero is not None
                    else stand_in)
        strides = (*w.stride(), *wg.stride(), *(scale.stride() if coded else (0, 0, 0)))
        group = (b.group or k) if coded else k  # inputs a scale
        constexprs = dict(K=k, GATED=b_gate is not None, CODES=_CODES[w.dtype if coded else None], GROUP=group,
                          HAS_ZERO=zero is not None)
        return _WeightArgs(pointers, strides, constexprs, n, group if coded and b.group else None)

    def block_k(self, block_k: int) -> int:
        return block_k if self.step_limit is None else min(block_k, self.step_limit)


def _grouped_gemm(a, b, b_gate, out, weights, sorted_pairs, block_expert, a_rows_per_token, act, cfg,
                  bias: tuple = (None, None), limit: float | None = None):
    """out[pair] = a[pair // a_rows_per_token] @ b[e].T (gated by b_gate[e] when given, scaled by
    weights[pair] when given) for every pair of every row block of local expert e. b and b_gate are float
    weights or ExpertCodes, both alike. bias: (b's, b_gate's) [local, out] or None each; limit: the clamped GLU's."""
    op = _WeightArgs.of(a, b, b_gate)
    cfg = dict(cfg, BLOCK_K=op.block_k(cfg["BLOCK_K"]))
    grid = (block_expert.shape[0], triton.cdiv(op.n, cfg["BLOCK_N"]))
    _grouped_gemm_kernel[grid](
        a, *op.pointers, out, weights if weights is not None else a,
        sorted_pairs, block_expert, *_bias_args(bias, a), op.n, a_rows_per_token * a.shape[0],
        a.stride(0), a.stride(1), *op.strides, out.stride(0), _bias_stride(bias), limit or 0.0,
        A_ROWS_PER_TOKEN=a_rows_per_token, ACT=act, WEIGHTED=weights is not None, FP32=a.dtype == torch.float32,
        HAS_BIAS=bias[0] is not None, CLAMP=limit is not None, **op.constexprs, **cfg)


def _bias_args(bias: tuple, like: torch.Tensor) -> tuple:
    """The kernels' two bias pointers: b's and b_gate's (a plain projection's second is its first), or `like`'s."""
    first = bias[0] if bias[0] is not None else like
    return first, bias[1] if bias[1] is not None else first


def _bias_stride(bias: tuple) -> int:
    """Elements from one expert's bias to the next (both of a fused pair's halves share it; columns contiguous)."""
    if bias[0] is None:
        return 0
    assert all(b is None or b.stride(-1) == 1 and b.stride(0) == bias[0].stride(0) for b in bias)
    return bias[0].stride(0)


# the GEMV's tiles, (outputs a program, inputs a step, warps), by pass (the gated fc: two weights a program; the
# plain proj) and weight format. A step may span several of a grouped format's groups: the kernel reads them one
# after the other within the step, so one step keeps as many bytes in flight as a float step of the same width.
# Each the fastest of twenty on Qwen3-30B-A3B's experts on an H100, the same in two runs (fortieth session,
# scripts/bench_moe_pair_gemv.py, after the thirty-ninth session's one sum across threads): bf16 fc_gate 18.3-18.8
# us (the thirty-eighth session's (8, 128, 4): 21.7-21.8), proj 9.4-9.5 (10.7-10.8); int8 codes 17.2 (26.6) and
# 8.8 (10.7); int4 17.2 (28.0) and 9.0 (9.5). e4m3 codes take int8's tiles (the same loads, another conversion).
# int4 and int8 experts in the engine's layout take the words kernel instead (PAIR_WORD_TILE).
PAIR_TILE = {("gated", "float"): (16, 256, 8), ("plain", "float"): (8, 128, 8),
             ("gated", "byte"): (4, 512, 4), ("plain", "byte"): (8, 256, 4),
             ("gated", "int4"): (8, 1024, 8), ("plain", "int4"): (8, 128, 8)}
_FORMAT_OF_CODES = {0: "float", 1: "byte", 2: "int4"}  # _CODES's values -> PAIR_TILE's formats


def pair_tile(gated: bool, codes: int) -> tuple[int, int, int]:
    """PAIR_TILE's tile for a pass (gated or plain) over weights of _CODES's kind `codes`."""
    return PAIR_TILE["gated" if gated else "plain", _FORMAT_OF_CODES[codes]]


# int4 and int8 experts' GEMV a pair on words of codes (_pair_words_kernel), by pass and format: (outputs a program,
# int64 words a step, warps), as kiln.kernels.quant_gemm's GEMV tiles. int4's are the fastest of twelve on
# Qwen3-30B-A3B's experts on an H100 (fortieth session, scripts/bench_moe_pair_gemv.py): fc_gate 7.2 us (1.79 TB/s;
# the tile kernel 28.0), proj 5.0 (the tile kernel 9.5); the whole MoE by pair 15.8 us against bf16's 33.8. int8's
# likewise (same session, 8 codes a word): fc_gate 11.2 us (the tile kernel 26.7), proj 6.7 (10.7).
# e4m3's (weight-only FP8 experts: the FP8 GEMV's word sums, kiln.kernels.gemv.fp8_word_row_sums) are int8's: on the
# H100 (forty-first session) fc_gate 11.0 us against the tile kernel's 12.8, proj 6.3 against 7.2, the best of ten
# tiles within 0.3 us of them; Qwen3-30B-A3B's 16 layers in FP8_PER_CHANNEL_PER_TOKEN decode at 921.3 tokens/s
# against 897.6 by tiles (bf16 772.0 and 782.3 in the same runs).
PAIR_WORD_TILE = {("gated", "int4"): (4, 64, 2), ("plain", "int4"): (16, 64, 4),
                  ("gated", "int8"): (4, 128, 4), ("plain", "int8"): (8, 128, 4),
                  ("gated", "e4m3"): (4, 128, 4), ("plain", "e4m3"): (8, 128, 4)}
# The formats whose experts go by words where their layout allows (_pair_words_args), the others by the tile kernel:
# KILN_MOE_WORDS, comma-separated ("0": none, the A/B).
PAIR_WORDS = frozenset(os.environ.get("KILN_MOE_WORDS", "int4,int8,e4m3").split(","))
# codes' dtype -> (format, codes a word, the words kernel's CODES)
_WORD_FORMATS = {torch.uint8: ("int4", 16, 2), torch.int8: ("int8", 8, 1), torch.float8_e4m3fn: ("e4m3", 8, 3)}
# e4m3 codes made floats by bit operations (True: Triton's interpreter cannot convert them in the words kernel) or by
# the hardware's conversion (the GPU's way)
E4M3_BY_BITS = os.environ.get("TRITON_INTERPRET") == "1"


def _pair_gemv(a, b, b_gate, out, weights, experts, first_expert: int, a_rows_per_token: int, act: int,
               tile: tuple[int, int, int] | None = None, bias: tuple = (None, None), limit: float | None = None):
    """out[pair] = a[pair // a_rows_per_token] @ b[e].T (gated, weighted) for e = experts[pair] - first_expert,
    as _grouped_gemm computes it for a held pair (bias and limit too); a pair whose expert is not held here gets
    zeros. tile: pair_tile's unless given. Experts of PAIR_WORDS' formats go by words where they can (_pair_words)."""
    words = _pair_words_args(a, b, b_gate) if tile is None else None
    if words is not None:
        _pair_words(a, out, weights, experts, first_expert, a_rows_per_token, act, bias, limit, *words)
        return
    op = _WeightArgs.of(a, b, b_gate)
    block_n, block_k, warps = tile or pair_tile(b_gate is not None, op.constexprs["CODES"])
    sub_k = op.block_k(block_k)  # inputs read at once: the step, or one group of it
    assert block_k % sub_k == 0, f"a step of {block_k} inputs must hold whole groups of {sub_k}"
    _pair_gemv_kernel[(experts.numel(), triton.cdiv(op.n, block_n))](
        a, *op.pointers, out, weights if weights is not None else a,
        experts, *_bias_args(bias, a), first_expert, b.shape[0], op.n,
        a.stride(0), a.stride(1), *op.strides, out.stride(0), _bias_stride(bias), limit or 0.0,
        A_ROWS_PER_TOKEN=a_rows_per_token, ACT=act, WEIGHTED=weights is not None, HAS_BIAS=bias[0] is not None,
        CLAMP=limit is not None, BLOCK_N=block_n, BLOCK_K=block_k, SUB_K=sub_k, num_warps=warps, **op.constexprs,
        **pdl_args(a.device))


def _pair_words_args(a: torch.Tensor, b, b_gate) -> tuple | None:
    """(codes as int64 words, scale, zero, group, rows from b's to b_gate's, tile, CODES) where experts' GEMV can
    read words (kiln.kernels.words' row sums, or the FP8 GEMV's): a format of PAIR_WORDS, 16-bit activations in
    contiguous rows, codes that read as words, and b_gate's tensors each the same rows further on in b's (the
    engine's fused fc_gate); else None."""
    sixteen_bit = a.dtype in (torch.float16, torch.bfloat16)
    if not (isinstance(b, ExpertCodes) and b.codes.dtype in _WORD_FORMATS and sixteen_bit and a.stride(1) == 1):
        return None
    fmt, per_word, codes = _WORD_FORMATS[b.codes.dtype]
    if fmt not in PAIR_WORDS:
        return None
    group, tile = b.group or b.shape[2], PAIR_WORD_TILE["plain" if b_gate is None else "gated", fmt]
    gap = 0 if b_gate is None else _rows_apart(b, b_gate)
    if not _reads_as_words(b, per_word, group, tile[1]) or gap is None or (b_gate is not None and gap < b.shape[1]):
        return None
    return b.codes.view(torch.int64), b.scale, b.zero, group, gap, tile, codes


def _reads_as_words(b: ExpertCodes, per_word: int, group: int, block_kw: int) -> bool:
    """Whether experts' codes read as aligned int64 words of per_word codes, with scales and zeros [local, out,
    groups] in contiguous rows: int4's a step of block_kw words holding whole groups, int8's and e4m3's one scale
    a row."""
    k, groups = b.shape[2], b.scale.shape[2]
    row_bytes = k // 2 if b.int4 else k
    grouped = group % per_word == 0 and block_kw % (group // per_word) == 0 if b.int4 else groups == 1
    return (k % per_word == 0 and grouped and groups == -(-k // group) and b.scale.shape[1] == b.shape[1]
            and b.codes.data_ptr() % 8 == 0 and b.codes.stride(0) % 8 == 0 and b.codes.stride()[1:] == (row_bytes, 1)
            and b.scale.stride()[1:] == (groups, 1) and (b.zero is None or b.zero.stride() == b.scale.stride()))


def _rows_apart(b: ExpertCodes, b_gate: ExpertCodes) -> int | None:
    """How many rows past b's own the gate's codes, scales and zeros each start, in the same tensors (the engine's
    fused fc_gate), or None where they do not."""
    gap = (b_gate.codes.data_ptr() - b.codes.data_ptr()) // b.codes.stride(1)
    pairs = [(t, g) for t, g in zip((b.codes, b.scale, b.zero), (b_gate.codes, b_gate.scale, b_gate.zero))
             if t is not None or g is not None]
    same = all(t is not None and g is not None and g.stride() == t.stride()
               and g.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
               and g.data_ptr() - t.data_ptr() == gap * t.stride(1) * t.element_size() for t, g in pairs)
    return gap if same else None


def _pair_words(a, out, weights, experts, first_expert: int, a_rows_per_token: int, act: int, bias: tuple,
                limit: float | None, words, scale, zero, group: int, gap: int, tile: tuple[int, int, int],
                codes: int) -> None:
    """_pair_gemv for int4, int8 or e4m3 experts on words of codes (_pair_words_kernel); gap: rows from fc's to
    the gate's (0: no gate)."""
    local, n = words.shape[0], words.shape[1]
    block_n, block_kw, warps = tile
    _pair_words_kernel[(experts.numel(), triton.cdiv(n, block_n), 1)](
        a, words, scale, zero if zero is not None else scale, out, weights if weights is not None else a, experts,
        *_bias_args(bias, a), first_expert, local, n, gap, a.stride(0), words.stride(0), scale.stride(0),
        out.stride(0), _bias_stride(bias), limit or 0.0,
        K=words.shape[2] * (16 if codes == 2 else 8), A_ROWS_PER_TOKEN=a_rows_per_token, GATED=gap > 0, ACT=act,
        WEIGHTED=weights is not None, CODES=codes, GROUP=group, HAS_ZERO=zero is not None,
        HAS_BIAS=bias[0] is not None, CLAMP=limit is not None, EVEN_N=n % block_n == 0, BLOCK_N=block_n,
        BLOCK_KW=block_kw, BY_BITS=E4M3_BY_BITS, num_warps=warps,
        **pdl_args(a.device))


if triton is not None:

    @triton.jit
    def _route_kernel(logits_ptr, bias_ptr, weights_ptr, experts_ptr, E, stride, scaling, group_size,
                      TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, SIGMOID: tl.constexpr, GROUPS: tl.constexpr,
                      TOPK_GROUPS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr,
                      BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
        # Program t routes token t: its scores p (softmax, or sigmoid) and what chooses (p, or p + bias within the
        # best groups), then TOP_K rounds of argmax, each taking the winner out of the running. (tl.exp is
        # ex2.approx on float32 where torch's is expf: a few ulps apart at the logits' range.)
        allow_dependents(USE_PDL)
        e = tl.arange(0, BLOCK_E)
        real = e < E
        if SIGMOID:
            bias = tl.load(bias_ptr + e, mask=real, other=0.0).to(tl.float32)  # a weight: read before the wait
        wait_for_inputs(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        x = tl.load(logits_ptr + t * stride + e, mask=real, other=float("-inf")).to(tl.float32)
        if SIGMOID:
            p = tl.sigmoid(x)  # (masked experts: 0)
            choice = tl.where(real, p + bias, float("-inf"))
        else:
            p = tl.exp(x - tl.max(x, axis=0))
            p = tl.math.div_rn(p, tl.sum(p, axis=0))  # (masked experts: exp(-inf) = 0)
            choice = tl.where(real, p, float("-inf"))
        if GROUPS > 1:  # a group's worth: its two best choices' sum (sigmoid), or its best (softmax)
            choice = _best_groups(choice, e, group_size, GROUPS, TOPK_GROUPS, SIGMOID, BLOCK_G)
        slots = tl.arange(0, BLOCK_K)
        top = tl.zeros((BLOCK_K,), dtype=tl.float32)
        picked = tl.zeros((BLOCK_K,), dtype=tl.int64)
        for k in tl.static_range(TOP_K):
            best = tl.argmax(choice, axis=0, tie_break_left=True)
            top = tl.where(slots == k, tl.sum(tl.where(e == best, p, 0.0), axis=0), top)
            picked = tl.where(slots == k, best.to(tl.int64), picked)
            choice = tl.where(e == best, float("-inf"), choice)
        if NORMALIZE:  # (slots past TOP_K hold 0)
            total = tl.sum(top, axis=0)
            if SIGMOID:
                total += 1e-20
            top = tl.math.div_rn(top, total)
        top = top * scaling
        ok = slots < TOP_K
        tl.store(weights_ptr + t * TOP_K + slots, top.to(weights_ptr.dtype.element_ty), mask=ok)
        tl.store(experts_ptr + t * TOP_K + slots, picked, mask=ok)

    @triton.jit
    def _best_groups(choice, e, group_size, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, TOP2: tl.constexpr,
                     BLOCK_G: tl.constexpr):
        """choice [BLOCK_E] with every expert outside the TOPK_GROUPS best of GROUPS groups (group_size experts
        each, in order) set to -inf; a group's worth is the sum of its two best choices (TOP2), or its best."""
        g = tl.arange(0, BLOCK_G)
        member = (e[None, :] // group_size) == g[:, None]  # [BLOCK_G, BLOCK_E]
        by_group = tl.where(member, choice[None, :], float("-inf"))
        worth = tl.max(by_group, axis=1)
        if TOP2:
            first_at = tl.argmax(by_group, axis=1, tie_break_left=True)
            worth += tl.max(tl.where(e[None, :] == first_at[:, None], float("-inf"), by_group), axis=1)
        worth = tl.where(g < GROUPS, worth, float("-inf"))
        kept = tl.zeros((BLOCK_G,), dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUPS):
            best = tl.argmax(worth, axis=0, tie_break_left=True)
            kept = tl.where(g == best, 1, kept)
            worth = tl.where(g == best, float("-inf"), worth)
        keep = tl.max(tl.where(member & (kept[:, None] == 1), 1, 0), axis=0)
        return tl.where(keep == 1, choice, float("-inf"))

    @triton.jit
    def _activation(x, ACT: tl.constexpr):
        """x float32; the same formulas as torch's, in float32."""
        if ACT == 0:
            return x / (1.0 + tl.exp(-x))
        elif ACT == 1:
            return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        elif ACT == 2:
            inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            return 0.5 * x * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))  # tanh(u) = 2 sigmoid(2u) - 1
        elif ACT == 4:
            return x / (1.0 + tl.exp(-1.702 * x))
        elif ACT == 5:
            return tl.maximum(x, 0.0) * tl.maximum(x, 0.0)
        else:
            return tl.maximum(x, 0.0)

    @triton.jit
    def _expert_tile(ptrs, mask, s_ptrs, z_ptrs, col_ok, a_dtype: tl.constexpr, CODES: tl.constexpr,
                     HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """A [BLOCK_K, BLOCK_N] tile of an expert's weight in the activations' dtype: as stored (CODES 0); int8 or
        e4m3 codes times their column's scale (of the step's group, where rows have groups) (1); or int4 codes, two
        a byte along K (low nibble first), minus their zero (8 without zero points) times their group's scale (2):
        dequantize_int8's and dequantize_int4's float32 math, rounded once."""
        if CODES == 0:
            b = tl.load(ptrs, mask=mask, other=0.0)
        else:
            s = tl.load(s_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if CODES == 1:  # (other=0.0: e4m3 codes refuse an integer one, int8 codes take either)
                c = tl.load(ptrs, mask=mask, other=0.0)
                b = (c.to(tl.float32) * s).to(a_dtype)
            else:  # bytes [BLOCK_K / 2, BLOCK_N] -> codes [BLOCK_K, BLOCK_N], input 2j from byte j's low nibble
                c = tl.load(ptrs, mask=mask, other=0)
                u = tl.reshape(tl.permute(tl.join(c & 15, c >> 4), (0, 2, 1)), (BLOCK_K, BLOCK_N)).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(z_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                else:
                    z = 8.0
                b = ((u - z) * s).to(a_dtype)
        return b

    @triton.jit
    def _weight_tile_mask(k_ok, kb, k_left, col_ok, CODES: tl.constexpr):
        """Which elements of a step's weight tile [B_ROWS, BLOCK_N] exist: inputs left (int4: bytes, two inputs
        each) of the columns in range."""
        if CODES == 2:
            rows_ok = kb < k_left // 2
        else:
            rows_ok = k_ok
        return rows_ok[:, None] & col_ok[None, :]

    @triton.jit
    def _grouped_gemm_kernel(a_ptr, b_ptr, bg_ptr, sb_ptr, sg_ptr, zb_ptr, zg_ptr, out_ptr, w_ptr, pairs_ptr,
                             block_expert_ptr, bias_ptr, bias_g_ptr, N, num_pairs,
                             a_s0, a_s1, b_se, b_sn, b_sk, bg_se, bg_sn, bg_sk, s_se, s_sn, s_sg, out_s0, bias_se,
                             limit,
                             K: tl.constexpr, A_ROWS_PER_TOKEN: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
                             WEIGHTED: tl.constexpr, FP32: tl.constexpr, CODES: tl.constexpr, GROUP: tl.constexpr,
                             HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # CODES (_expert_tile): float weights, int8 codes with a scale per output, or int4 codes with a scale (and
        # zero) per output and GROUP inputs, two codes a byte: b's rows are then BLOCK_K / 2 bytes a step.
        B_ROWS: tl.constexpr = BLOCK_K // 2 if CODES == 2 else BLOCK_K
        pid_m = tl.program_id(0)
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        if expert < 0:
            return  # a block past the last expert's run: nothing to do
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(pairs_ptr + rows)
        row_ok = pair < num_pairs  # pad rows hold num_pairs
        a_row = tl.where(row_ok, pair // A_ROWS_PER_TOKEN, 0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        kb = tl.arange(0, B_ROWS)
        a_ptrs = a_ptr + a_row[:, None] * a_s0 + ks[None, :] * a_s1
        b_ptrs = b_ptr + expert * b_se + cols[None, :] * b_sn + kb[:, None] * b_sk
        bg_ptrs = bg_ptr + expert * bg_se + cols[None, :] * bg_sn + kb[:, None] * bg_sk
        col_scales = expert * s_se + cols * s_sn  # (offsets of the columns' scales and zeros, with codes)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = ks < K - k0
            b_ok = _weight_tile_mask(k_ok, kb, K - k0, col_ok, CODES)
            group = col_scales + (k0 // GROUP) * s_sg
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = _expert_tile(b_ptrs, b_ok, sb_ptr + group, zb_ptr + group, col_ok, a.dtype, CODES, HAS_ZERO,
                             BLOCK_K, BLOCK_N)
            if FP32:  # float32 models compare with the reference at 1e-4: no TF32
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
            if GATED:
                bg = _expert_tile(bg_ptrs, b_ok, sg_ptr + group, zg_ptr + group, col_ok, a.dtype, CODES, HAS_ZERO,
                                  BLOCK_K, BLOCK_N)
                if FP32:
                    acc_g += tl.dot(a, bg, input_precision="ieee")
                else:
                    acc_g += tl.dot(a, bg)
            a_ptrs += BLOCK_K * a_s1
            b_ptrs += B_ROWS * b_sk
            bg_ptrs += B_ROWS * bg_sk
        w = tl.load(w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None] if WEIGHTED else 1.0
        if HAS_BIAS:
            acc += _bias_row(bias_ptr, expert, bias_se, cols, col_ok)[None, :]
            acc_g += _bias_row(bias_g_ptr, expert, bias_se, cols, col_ok)[None, :]
        y = _epilogue(acc, acc_g, w, limit, out_ptr.dtype.element_ty, GATED, ACT, WEIGHTED, CLAMP)
        out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * out_s0 + cols[None, :]
        tl.store(out_ptrs, y, mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _bias_row(bias_ptr, expert, bias_se, cols, col_ok):
        """An expert's bias over the tile's output columns, float32 (gpt-oss)."""
        return tl.load(bias_ptr + expert * bias_se + cols, mask=col_ok, other=0.0).to(tl.float32)

    @triton.jit
    def _epilogue(acc, acc_g, w, limit, dtype: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
                  WEIGHTED: tl.constexpr, CLAMP: tl.constexpr):
        """The float32 sums (biases added) -> the output in dtype: glu(fc, gate), or the routing weight w times
        proj. Rounds where the reference rounds (each matmul's output, the clamped gate plus one, the activation,
        each product), so the paths differ only by the order of the float32 sums inside the matmuls. CLAMP
        (gpt-oss): act(min(fc, limit)) * (clamp(gate, -limit, limit) + 1)."""
        y = acc.to(dtype).to(tl.float32)
        if GATED:
            g = acc_g.to(dtype).to(tl.float32)
            if CLAMP:
                y = tl.minimum(y, limit)
                g = (tl.minimum(tl.maximum(g, -limit), limit) + 1.0).to(dtype).to(tl.float32)
            y = _activation(y, ACT).to(dtype).to(tl.float32)
            y = y * g
        if WEIGHTED:
            y = y.to(dtype).to(tl.float32) * w
        return y.to(dtype)

    @triton.jit
    def _pair_gemv_kernel(a_ptr, b_ptr, bg_ptr, sb_ptr, sg_ptr, zb_ptr, zg_ptr, out_ptr, w_ptr, experts_ptr,
                          bias_ptr, bias_g_ptr, first_expert, num_local, N,
                          a_s0, a_s1, b_se, b_sn, b_sk, bg_se, bg_sn, bg_sk, s_se, s_sn, s_sg, out_s0, bias_se, limit,
                          K: tl.constexpr, A_ROWS_PER_TOKEN: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
                          WEIGHTED: tl.constexpr, CODES: tl.constexpr, GROUP: tl.constexpr,
                          HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr,
                          USE_PDL: tl.constexpr):
        # Program (pair, j): outputs [j BLOCK_N, (j + 1) BLOCK_N) of the pair, on CUDA cores (one row: no MMA),
        # the weight tiles as the grouped kernel reads them (_expert_tile), float32 products summed over K. A step
        # of BLOCK_K inputs reads SUB_K at a time (a scale group's at most), its reads independent of each other's
        # sums, so they are all in flight at once. With PDL it is scheduled while the kernel before it ends, but
        # reads nothing before its wait: which expert's weights to read comes from the routing.
        allow_dependents(USE_PDL)
        wait_for_inputs(USE_PDL)
        SUB_ROWS: tl.constexpr = SUB_K // 2 if CODES == 2 else SUB_K  # weight rows a read (int4: bytes)
        pair = tl.program_id(0)
        expert = (tl.load(experts_ptr + pair) - first_expert).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        out_ptrs = out_ptr + pair.to(tl.int64) * out_s0 + cols
        if (expert < 0) | (expert >= num_local):  # another rank's expert: this rank adds nothing
            tl.store(out_ptrs, tl.zeros((BLOCK_N,), dtype=out_ptr.dtype.element_ty), mask=col_ok)
            return
        ks = tl.arange(0, SUB_K)
        kb = tl.arange(0, SUB_ROWS)
        a_ptrs = a_ptr + (pair // A_ROWS_PER_TOKEN).to(tl.int64) * a_s0 + ks * a_s1
        b_ptrs = b_ptr + expert * b_se + cols[None, :] * b_sn + kb[:, None] * b_sk
        bg_ptrs = bg_ptr + expert * bg_se + cols[None, :] * bg_sn + kb[:, None] * bg_sk
        col_scales = expert * s_se + cols * s_sn
        # Products summed per input row across the reads, the rows summed once at the end: a sum across the
        # threads every step cost 41 warp shuffles and as many adds a step of the int4 kernel's 329 instructions
        # (sm_90 code, scripts/kernel_sass.py "moe pair gemv"), as kiln.kernels.gemv's GEMVs avoid.
        acc = tl.zeros((SUB_K, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((SUB_K, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            for j in tl.static_range(BLOCK_K // SUB_K):
                k_left = K - k0 - j * SUB_K
                k_ok = ks < k_left
                b_ok = _weight_tile_mask(k_ok, kb, k_left, col_ok, CODES)
                # a read past the row's end (a last step longer than what is left) reads no scale either: past
                # the row's groups lie the next row's, or nothing, and 0 * a NaN there is NaN
                group_ok = col_ok & (k_left > 0)
                group = col_scales + ((k0 + j * SUB_K) // GROUP) * s_sg
                a = tl.load(a_ptrs + j * SUB_K * a_s1, mask=k_ok, other=0.0)
                b = _expert_tile(b_ptrs + j * SUB_ROWS * b_sk, b_ok, sb_ptr + group, zb_ptr + group, group_ok,
                                 a.dtype, CODES, HAS_ZERO, SUB_K, BLOCK_N)
                acc += a.to(tl.float32)[:, None] * b.to(tl.float32)
                if GATED:
                    bg = _expert_tile(bg_ptrs + j * SUB_ROWS * bg_sk, b_ok, sg_ptr + group, zg_ptr + group,
                                      group_ok, a.dtype, CODES, HAS_ZERO, SUB_K, BLOCK_N)
                    acc_g += a.to(tl.float32)[:, None] * bg.to(tl.float32)
            a_ptrs += BLOCK_K * a_s1
            b_ptrs += BLOCK_K // SUB_K * SUB_ROWS * b_sk
            bg_ptrs += BLOCK_K // SUB_K * SUB_ROWS * bg_sk
        _store_pair(tl.sum(acc, axis=0), tl.sum(acc_g, axis=0), pair, expert, cols, col_ok, out_ptrs, w_ptr, bias_ptr,
                    bias_g_ptr, bias_se, limit, GATED, ACT, WEIGHTED, HAS_BIAS, CLAMP)

    @triton.jit
    def _store_pair(acc, acc_g, pair, expert, cols, col_ok, out_ptrs, w_ptr, bias_ptr, bias_g_ptr, bias_se, limit,
                    GATED: tl.constexpr, ACT: tl.constexpr, WEIGHTED: tl.constexpr, HAS_BIAS: tl.constexpr,
                    CLAMP: tl.constexpr):
        """A pair GEMV's output columns from its float32 sums [BLOCK_N] (acc_g the gate's): the expert's biases,
        then _epilogue (the routing weight of the pair at w_ptr), stored."""
        w = tl.load(w_ptr + pair).to(tl.float32) if WEIGHTED else 1.0
        if HAS_BIAS:
            acc += _bias_row(bias_ptr, expert, bias_se, cols, col_ok)
            acc_g += _bias_row(bias_g_ptr, expert, bias_se, cols, col_ok)
        y = _epilogue(acc, acc_g, w, limit, out_ptrs.dtype.element_ty, GATED, ACT, WEIGHTED, CLAMP)
        tl.store(out_ptrs, y, mask=col_ok)

    @triton.jit
    def _pair_words_kernel(a_ptr, w_ptr, s_ptr, z_ptr, out_ptr, wt_ptr, experts_ptr, bias_ptr, bias_g_ptr,
                           first_expert, num_local, N, gap, a_s0, w_se, s_se, out_s0, bias_se, limit,
                           K: tl.constexpr, A_ROWS_PER_TOKEN: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
                           WEIGHTED: tl.constexpr, CODES: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                           HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_KW: tl.constexpr, BY_BITS: tl.constexpr, USE_PDL: tl.constexpr):
        # _pair_gemv_kernel for int4 (CODES 2), int8 (1) or e4m3 (3) experts, their codes read as int64 words by
        # the dense GEMVs' row sums (kiln.kernels.words: dp2a for int4, an AND and an FMA a weight for int8, the
        # scale once a word or a row; e4m3's, kiln.kernels.gemv.fp8_word_row_sums, on 16-bit x: each code made a
        # float, BY_BITS or not), on the rows of the pair's expert; the gate's rows are `gap` rows on. The tile
        # kernel's unpacking cost 16 instructions a weight for int4 (sm_90 code, 261 a step of 16 weights a
        # thread) and streamed the fc GEMV at 0.56 TB/s on an H100 (thirty-eighth session). Program (pair, j, 0)
        # as gemv_program numbers them.
        allow_dependents(USE_PDL)
        wait_for_inputs(USE_PDL)  # which expert's weights to read comes from the routing
        G: tl.constexpr = (K + GROUP - 1) // GROUP
        pair, n0, outs = gemv_program(N, BLOCK_N, EVEN_N)
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        out_ptrs = out_ptr + pair * out_s0 + cols
        expert = (tl.load(experts_ptr + pair) - first_expert).to(tl.int64)
        if (expert < 0) | (expert >= num_local):  # another rank's expert: this rank adds nothing
            tl.store(out_ptrs, tl.zeros((BLOCK_N,), dtype=out_ptr.dtype.element_ty), mask=col_ok)
            return
        x_row = a_ptr + (pair // A_ROWS_PER_TOKEN) * a_s0
        rows = expert * s_se + n0 * G  # (scales and zeros alike)
        if CODES == 2:
            acc, acc_g = w4_row_sums(x_row, w_ptr + expert * w_se + n0 * (K // 16), s_ptr + rows, z_ptr + rows,
                                     outs, gap, GATED, K, GROUP, HAS_ZERO, (K // 16) % BLOCK_KW == 0, BLOCK_N,
                                     BLOCK_KW, USE_PDL)
        elif CODES == 1:
            acc, acc_g = w8_row_sums(x_row, w_ptr + expert * w_se + n0 * (K // 8), s_ptr + rows, outs, gap, GATED,
                                     K, (K // 8) % BLOCK_KW == 0, BLOCK_N, BLOCK_KW, USE_PDL)
        else:
            acc, acc_g = fp8_word_row_sums(x_row, None, w_ptr + expert * w_se + n0 * (K // 8), s_ptr + rows, outs,
                                           gap, GATED, K, BLOCK_KW, BY_BITS, USE_PDL)
        _store_pair(acc, acc_g, pair, expert, cols, col_ok, out_ptrs, wt_ptr, bias_ptr, bias_g_ptr, bias_se, limit,
                    GATED, ACT, WEIGHTED, HAS_BIAS, CLAMP)
