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

`fused_moe_ref` is the reference: one matmul per expert present, exact against transformers on CPU.

W8A16 experts (kiln.quantization.weight_only.Int8ExpertMethod) pass int8 codes for fc, gate and proj and
`scales`, one per output row of each expert ([local, out, 1]): both paths use the weight w = (q s) rounded to the
activations' dtype, the reference per expert present, the kernel per tile as it loads the codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.layers.mlp import ACTIVATIONS

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference below still works
    triton = None

ACT_CODE = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}  # the kernel's constexpr for each name


def fused_moe_ref(x: torch.Tensor, fc: torch.Tensor, gate: torch.Tensor, proj: torch.Tensor,
                  experts: torch.Tensor, weights: torch.Tensor, first_expert: int, act: str,
                  scales: tuple | None = None) -> torch.Tensor:
    """sum over the top-k slots of weight * proj_e(act(fc_e x) * gate_e x), for the experts held here.

    x [tokens, hidden]; fc, gate [local, inter, hidden]; proj [local, hidden, inter]; experts (global ids)
    and weights [tokens, top_k]; local expert i is global expert first_expert + i. Other experts' pairs
    contribute nothing (they are another rank's partial sum). `scales` (fc's, gate's, proj's, each
    [local, out, 1] or None) make the weights they scale int8 codes, dequantized per expert present."""
    out = torch.zeros_like(x)
    stop = first_expert + fc.shape[0]
    for e in experts.unique().tolist():
        if not first_expert <= e < stop:
            continue
        token, slot = (experts == e).nonzero(as_tuple=True)
        h, i = x[token], e - first_expert
        w_fc, w_gate, w_proj = (w[i] if s is None else dequantize_expert(w[i], s[i], x.dtype)
                                for w, s in zip((fc, gate, proj), scales or (None,) * 3))
        y = F.linear(ACTIVATIONS[act](F.linear(h, w_fc)) * F.linear(h, w_gate), w_proj)
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


def dequantize_expert(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An expert's int8 codes [..., out, in] times their per-output scales [..., out, 1], rounded to dtype."""
    return (q.float() * scale.float()).to(dtype)


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


def fused_moe(x: torch.Tensor, fc: torch.Tensor, gate: torch.Tensor, proj: torch.Tensor,
              experts: torch.Tensor, weights: torch.Tensor, first_expert: int, act: str,
              scales: tuple | None = None) -> torch.Tensor:
    """Triton version of `fused_moe_ref`, same arguments and result; CUDA tensors (or the interpreter).
    fc and gate (and their scales) may be the two halves (views) of the runtime's fused fc_gate tensors."""
    tokens, top_k = experts.shape
    num_local, inter, hidden = fc.shape
    pairs = tokens * top_k
    cfg = _config(pairs, num_local)
    sorted_pairs, block_expert = moe_align(experts, first_expert, num_local, cfg["BLOCK_M"])
    fc_scale, gate_scale, proj_scale = scales or (None,) * 3
    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)  # act(fc) * gate, one row per pair
    _grouped_gemm(x, (fc, fc_scale), (gate, gate_scale), h, None, sorted_pairs, block_expert, top_k,
                  ACT_CODE[act], cfg)
    y = torch.zeros(pairs, hidden, dtype=x.dtype, device=x.device)  # zeros: pairs not held here add 0
    _grouped_gemm(h, (proj, proj_scale), None, y, weights.reshape(-1), sorted_pairs, block_expert, 1, -1, cfg)
    return y.view(tokens, top_k, hidden).sum(1)


def _config(pairs: int, num_local: int) -> dict:
    """Tile sizes: 16-row blocks when experts see a few rows each (decode: the GEMMs stream weights),
    64-row blocks when they see many (prefill: the GEMMs are compute-bound)."""
    if pairs <= 4 * num_local * 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _grouped_gemm(a, b, b_gate, out, weights, sorted_pairs, block_expert, a_rows_per_token, act, cfg):
    """out[pair] = a[pair // a_rows_per_token] @ b[e].T (gated by b_gate[e] when given, scaled by
    weights[pair] when given) for every pair of every row block of local expert e. b and b_gate are (weight,
    its per-output scales or None)."""
    (b, b_scale), gated = b, b_gate is not None
    bg, bg_scale = b_gate if gated else (b, b_scale)
    n, k = b.shape[1], b.shape[2]
    scaled = b_scale is not None
    sb, sg = (b_scale, bg_scale) if scaled else (a, a)  # (unread stand-ins without scales)
    grid = (block_expert.shape[0], triton.cdiv(n, cfg["BLOCK_N"]))
    _grouped_gemm_kernel[grid](
        a, b, bg, sb, sg, out, weights if weights is not None else a, sorted_pairs, block_expert,
        n, a_rows_per_token * a.shape[0],
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        bg.stride(0), bg.stride(1), bg.stride(2), sb.stride(0) if scaled else 0, sb.stride(1) if scaled else 0,
        sg.stride(0) if scaled else 0, sg.stride(1) if scaled else 0, out.stride(0),
        K=k, A_ROWS_PER_TOKEN=a_rows_per_token, GATED=gated, ACT=act, WEIGHTED=weights is not None,
        FP32=a.dtype == torch.float32, SCALED=scaled, **cfg)


if triton is not None:

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
        else:
            return tl.maximum(x, 0.0)

    @triton.jit
    def _expert_tile(ptrs, mask, scale, a_dtype: tl.constexpr, SCALED: tl.constexpr):
        """A [BLOCK_K, BLOCK_N] tile of an expert's weight: as stored, or int8 codes times their column's scale
        rounded to the activations' dtype (dequantize_expert's math)."""
        b = tl.load(ptrs, mask=mask, other=0)
        if SCALED:
            b = (b.to(tl.float32) * scale[None, :]).to(a_dtype)
        return b

    @triton.jit
    def _grouped_gemm_kernel(a_ptr, b_ptr, bg_ptr, sb_ptr, sg_ptr, out_ptr, w_ptr, pairs_ptr, block_expert_ptr,
                             N, num_pairs,
                             a_s0, a_s1, b_se, b_sn, b_sk, bg_se, bg_sn, bg_sk, sb_se, sb_sn, sg_se, sg_sn, out_s0,
                             K: tl.constexpr, A_ROWS_PER_TOKEN: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
                             WEIGHTED: tl.constexpr, FP32: tl.constexpr, SCALED: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
        a_ptrs = a_ptr + a_row[:, None] * a_s0 + ks[None, :] * a_s1
        b_ptrs = b_ptr + expert * b_se + cols[None, :] * b_sn + ks[:, None] * b_sk
        bg_ptrs = bg_ptr + expert * bg_se + cols[None, :] * bg_sn + ks[:, None] * bg_sk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s_b, s_g = 1.0, 1.0
        if SCALED:  # the columns' scales, read once
            s_b = tl.load(sb_ptr + expert * sb_se + cols * sb_sn, mask=col_ok, other=0.0).to(tl.float32)
            s_g = tl.load(sg_ptr + expert * sg_se + cols * sg_sn, mask=col_ok, other=0.0).to(tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = ks < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = _expert_tile(b_ptrs, k_ok[:, None] & col_ok[None, :], s_b, a.dtype, SCALED)
            if FP32:  # float32 models compare with the reference at 1e-4: no TF32
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
            if GATED:
                bg = _expert_tile(bg_ptrs, k_ok[:, None] & col_ok[None, :], s_g, a.dtype, SCALED)
                if FP32:
                    acc_g += tl.dot(a, bg, input_precision="ieee")
                else:
                    acc_g += tl.dot(a, bg)
            a_ptrs += BLOCK_K * a_s1
            b_ptrs += BLOCK_K * b_sk
            bg_ptrs += BLOCK_K * bg_sk
        dtype = out_ptr.dtype.element_ty
        # Round where the reference rounds (each matmul's output, the activation, each product), so the
        # two paths differ only by the order of the float32 sums inside the matmuls.
        y = acc.to(dtype).to(tl.float32)
        if GATED:
            y = _activation(y, ACT).to(dtype).to(tl.float32)
            y = y * acc_g.to(dtype).to(tl.float32)
        if WEIGHTED:
            w = tl.load(w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
            y = (y.to(dtype).to(tl.float32) * w[:, None])
        out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * out_s0 + cols[None, :]
        tl.store(out_ptrs, y.to(dtype), mask=row_ok[:, None] & col_ok[None, :])
