"""GPTQ: weights rounded one input column at a time, each column's rounding error pushed onto the columns not
yet rounded, weighted by the inverse Hessian of the layer's output error (Frantar et al. 2022, arXiv:2210.17323).
It makes W4A16_GPTQ's int4 weights (`kiln quantize` makes them as well as imports them) and, with
`--weight-rounding gptq`, the e4m3 weights of FP8, FP8_PER_CHANNEL_PER_TOKEN and FP8_BLOCK_SCALES, and the int4
weights of W4A16_AWQ and W4A8_AWQ, on the scales the format's own round to nearest gives (AWQ's: smoothed and
clipped), in plain checkpoints of those formats: act order is only the order of rounding, and the codes go back
to input order.

For a linear y = x W^T and calibration inputs X, the output error of a weight change D is tr(D H D^T) with
H = X^T X. Rounding column c to q leaves an error e = (w_c - q_c) / Hinv[c, c] (Hinv: the upper Cholesky factor of
H^-1, over the columns not yet rounded), which the remaining columns absorb: W[:, c+1:] -= e Hinv[c, c+1:] (the
paper's algorithm 1, in blocks of columns with lazy updates). H is damped by 1% of its mean diagonal, and inputs
that never fire (a zero diagonal) get weight 0.

Act order ("desc_act"): the columns are rounded in the order of decreasing H diagonal (the inputs with the most
energy first, while the most columns are left to absorb their error), and each group of `group_size` consecutive
columns *in that order* shares a scale. That is kiln's act-order W4A16 format as it is
(kiln/quantization/weight_only.py): the codes are stored in the rounding order and `input_permutation[j]` names
the input channel of column j, which the layer gathers from x. A row-parallel layer sorts within each
tensor-parallel rank's slice of inputs, so every rank's inputs stay on it. Each group's scale (and zero point) is
the round-to-nearest rule of W4A16 (`quantize_int4_groups`) on the group's columns as they stand when it starts.

Calibration streams layer by layer as AWQ's does: one decoder layer's weights, its inputs' Hessians (in x in
floats per input; fc and gate read the same one) and the calibration batch's hidden states, which come from the
float layers before it. The quantized tensors are kept (half a byte a weight) until the checkpoint is written.
"""

from __future__ import annotations

import logging

import torch

from kiln.config import QuantAlgo, QuantConfig
from kiln.quantization import streaming
from kiln.quantization.awq import NORM_BEFORE
from kiln.quantization.fp8 import quantize_fp8_weight, to_fp8
from kiln.quantization.fp8_block import quantize_fp8_groups_weight
from kiln.quantization.weight_only import INT4_LEVELS, INT4_SYMMETRIC_ZERO, pack_int4, quantize_int4_groups

log = logging.getLogger("kiln")

DAMP = 0.01  # of the mean Hessian diagonal, added to it: H stays invertible when inputs are fewer than columns
BLOCK = 128  # columns updated together (lazy batch updates); a multiple of every group size


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, zero_point: bool, dtype: torch.dtype,
              chunks: int = 1) -> dict[str, torch.Tensor]:
    """weight [out, in] and the Hessian of its input [in, in] -> kiln's act-order W4A16 tensors: `weight` (packed
    codes, columns in rounding order), `weights_scaling_factor` [out, groups], `zero_point` (with zero_point) and
    `input_permutation` [in] int32. chunks > 1 keeps the order within each of that many equal slices of the
    inputs (a row-parallel layer's tensor-parallel ranks)."""
    codes = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
    scales, zeros = [], []
    group: dict[str, torch.Tensor] = {}

    def round_column(c: int, pending: torch.Tensor) -> torch.Tensor:
        if c % group_size == 0:  # a group starts: its scale from its columns as they stand now
            _, s, z = quantize_int4_groups(pending[:, :group_size], group_size, zero_point, dtype)
            scales.append(s)
            zeros.append(z)
            group["scale"] = s.float()[:, 0]
            group["zero"] = z.float()[:, 0] if zero_point else torch.full_like(group["scale"], INT4_SYMMETRIC_ZERO)
        u = (torch.round(pending[:, 0] / group["scale"]) + group["zero"]).clamp(0, INT4_LEVELS)
        codes[:, c] = u.to(torch.uint8)
        return (u - group["zero"]) * group["scale"]

    perm = gptq_round(weight, hessian, round_column, chunks)
    tensors = {"weight": pack_int4(codes), "weights_scaling_factor": torch.cat(scales, dim=1),
               "input_permutation": perm.to(torch.int32)}
    if zero_point:
        tensors["zero_point"] = torch.cat(zeros, dim=1)
    return tensors


def gptq_fp8(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight [out, in], the Hessian of its input, and each weight's scale (broadcast to [out, in]: a tensor's, a
    row's or a group's, fixed before the rounding) -> e4m3 codes [out, in], rounded by GPTQ in act order and put
    back in input order, so the checkpoint is one of the plain FP8 formats."""
    s = scale.float().expand(weight.shape)

    def quantize_column(values: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        codes = to_fp8(values / s[:, j])
        return codes, codes.float() * s[:, j]

    return gptq_on_fixed_scales(weight, hessian, quantize_column, torch.float8_e4m3fn)


def gptq_int4_on_scales(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                        group_size: int) -> torch.Tensor:
    """weight [out, in], the Hessian of its input, and W4A16's group scales and zero points [out, groups] fixed before
    the rounding (round to nearest's, as the checkpoint stores them; zero None: symmetric) -> int4 codes [out, in]
    uint8, rounded by GPTQ in act order and put back in input order: a plain W4A16 layout with GPTQ's rounding
    (kiln's AWQ formats with --weight-rounding gptq)."""
    def per_input(t: torch.Tensor) -> torch.Tensor:
        return t.float().repeat_interleave(group_size, dim=1)[:, :weight.shape[1]].to(weight.device)
    s = per_input(scale)
    z = per_input(zero) if zero is not None else torch.full_like(s, INT4_SYMMETRIC_ZERO)

    def quantize_column(values: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        u = (torch.round(values / s[:, j]) + z[:, j]).clamp(0, INT4_LEVELS)
        return u.to(torch.uint8), (u - z[:, j]) * s[:, j]

    return gptq_on_fixed_scales(weight, hessian, quantize_column, torch.uint8)


def gptq_experts_int4(weight: torch.Tensor, hessians: torch.Tensor, group_size: int, zero_point: bool,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Stacked experts' weight [experts, out, in] and each expert's input Hessian [experts, in, in] -> W4A16's
    expert tensors (kiln.quantization.weight_only.Int4ExpertMethod): round to nearest's group scales and zero
    points, GPTQ's codes (gptq_stacked)."""
    experts, out, inp = weight.shape
    _, scale, zero = quantize_int4_groups(weight.reshape(experts * out, inp), group_size, zero_point, dtype)
    s = scale.float().view(experts, out, -1)
    z = zero.float().view(experts, out, -1) if zero_point else torch.full_like(s, INT4_SYMMETRIC_ZERO)
    codes = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)

    def round_column(c: int, pending: torch.Tensor) -> torch.Tensor:
        g = c // group_size
        u = (torch.round(pending[..., 0] / s[..., g]) + z[..., g]).clamp(0, INT4_LEVELS)
        codes[..., c] = u.to(torch.uint8)
        return (u - z[..., g]) * s[..., g]

    gptq_stacked(weight, hessians, round_column)
    tensors = {"weight": pack_int4(codes.view(experts * out, inp)), "weights_scaling_factor": scale,
               "zero_point": zero}
    return {leaf: t.view(experts, out, -1) for leaf, t in tensors.items() if t is not None}


def gptq_experts_fp8(weight: torch.Tensor, hessians: torch.Tensor, method, dtype: torch.dtype) -> dict:
    """Stacked experts' weight and Hessians -> the e4m3 expert tensors of `method` (FP8's scale a row,
    FP8_BLOCK_SCALES' a row's group): round to nearest's scales, GPTQ's codes (gptq_stacked)."""
    tensors = method.quantize(weight, dtype)
    s = tensors["weights_scaling_factor"].float()  # [experts, out, groups]; one group: the whole row
    columns = weight.shape[-1] // s.shape[-1]
    codes = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)

    def round_column(c: int, pending: torch.Tensor) -> torch.Tensor:
        scale = s[..., c // columns]
        codes[..., c] = to_fp8(pending[..., 0] / scale)
        return codes[..., c].float() * scale

    gptq_stacked(weight, hessians, round_column)
    return {**tensors, "weight": codes}


def gptq_stacked(weight: torch.Tensor, hessians: torch.Tensor, round_column) -> None:
    """GPTQ over stacked experts [experts, out, in] with each expert's Hessian [experts, in, in]: every expert
    rounded at once in input order (the grouped GEMM reads codes in input order, and one order for all keeps the
    experts in one batch). An input that none of an expert's calibration tokens fired keeps its weight (rounded to
    nearest, unlike a dense layer's, which GPTQ zeroes): other tokens reach that expert at run time. An expert no
    token reached is rounded to nearest."""
    h = hessians.float().clone()
    diagonal = h.diagonal(dim1=-2, dim2=-1)
    mean = diagonal.mean(-1, keepdim=True)
    diagonal.copy_(torch.where(diagonal == 0, torch.where(mean > 0, mean, 1.0), diagonal))  # (all 0: H = I, RTN)
    _round_columns(weight.float().clone(), _inverse_factor(h), round_column)


def gptq_on_fixed_scales(weight: torch.Tensor, hessian: torch.Tensor, quantize_column, codes_dtype: torch.dtype):
    """GPTQ's loop in act order on a grid fixed before it: quantize_column(values [out], j) rounds the values of input
    column j onto j's grid -> (codes [out], their values). -> codes [out, in] in input order."""
    order = rounding_order(hessian).tolist()  # (a host list: no device sync a column)
    codes = torch.empty(weight.shape, dtype=codes_dtype, device=weight.device)

    def round_column(c: int, pending: torch.Tensor) -> torch.Tensor:
        codes[:, c], values = quantize_column(pending[:, 0], order[c])
        return values

    perm = gptq_round(weight, hessian, round_column)
    ordered = torch.empty_like(codes)
    ordered[:, perm] = codes
    return ordered


def smoothed_hessian(hessian: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Hessian of x / s (AWQ's smoothed input, which meets the weight W * s) from that of x."""
    inv = 1.0 / s.float().to(hessian.device)
    return hessian * inv[:, None] * inv[None, :]


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, round_column, chunks: int = 1) -> torch.Tensor:
    """GPTQ's loop over the columns of weight [out, in] in act order (see act_order) -> that order [in].
    round_column(c, pending) rounds column c of the order, given pending [out, >= 1]: the columns from c to the end
    of its block as they stand (c first), and returns the rounded column's value; the loop pushes the rounding
    error onto the columns not yet rounded."""
    w = weight.float().clone()
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = rounding_order(hessian, chunks)
    _round_columns(w[:, perm], _inverse_factor(h[perm][:, perm]), round_column)
    return perm


def _inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of the damped Hessian's inverse; h [..., in, in] (a batch of them too)."""
    diagonal = h.diagonal(dim1=-2, dim2=-1)
    diagonal.add_(DAMP * diagonal.mean(-1, keepdim=True))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def _round_columns(w: torch.Tensor, hinv: torch.Tensor, round_column) -> None:
    """GPTQ's loop (in blocks of columns, lazy updates) over the columns of w [..., out, in] in their order, hinv
    [..., in, in] the inverse factor: every matrix of a batch (stacked experts) steps through its columns at once.
    round_column(c, pending [..., out, >= 1]) -> column c's rounded values [..., out]."""
    inp = w.shape[-1]
    for b0 in range(0, inp, BLOCK):
        b1 = min(b0 + BLOCK, inp)
        block, hinv_block = w[..., b0:b1].clone(), hinv[..., b0:b1, b0:b1]
        errors = torch.zeros_like(block)
        for j in range(b1 - b0):
            err = (block[..., j] - round_column(b0 + j, block[..., j:])) / hinv_block[..., j, j, None]
            block[..., j:] -= err[..., None] * hinv_block[..., None, j, j:]
            errors[..., j] = err
        w[..., b1:] -= errors @ hinv[..., b0:b1, b1:]


def rounding_order(hessian: torch.Tensor, chunks: int = 1) -> torch.Tensor:
    """The order gptq_round rounds the columns in: act order of the Hessian's diagonal, an input that never fires
    (diagonal 0) counted as 1, the diagonal it is given for the inversion."""
    diagonal = hessian.diagonal().float()
    return act_order(torch.where(diagonal == 0, torch.ones_like(diagonal), diagonal), chunks)


def act_order(diagonal: torch.Tensor, chunks: int = 1) -> torch.Tensor:
    """Input channels by decreasing Hessian diagonal, within each of `chunks` equal slices of them."""
    size = diagonal.numel() // chunks
    return torch.cat([torch.argsort(part, descending=True, stable=True) + i * size
                      for i, part in enumerate(diagonal.split(size))])


def calibrate(model, tokens: torch.Tensor, qc: QuantConfig, tp_size: int = 1, device="cpu",
              rounder=None) -> dict[str, dict]:
    """{linear name: its checkpoint tensors, on the CPU} for every linear of a TP=1 source model (lazy weights) that
    `qc` quantizes, layer by layer; tokens [n, t]. Row-parallel layers keep each of tp_size ranks' inputs on it.
    rounder(name, weight, Hessian, TP chunks) -> tensors; by default the format's own (ROUNDERS), and then a
    mixture of experts' stacked weights too (_round_experts: W4A16_GPTQ's int4 experts and the FP8 formats')."""
    dtype = model.config.torch_dtype
    default_rounder = rounder is None
    rounder = rounder or (lambda name, w, h, chunks: ROUNDERS[qc.quant_algo](w, h, qc, dtype, chunks))
    quantized: dict[str, dict] = {}
    for prefix, layer, run in streaming.walk_layers(model, tokens, device):
        linears = streaming.quantized_linears(layer, prefix, qc)
        # one Hessian per input: fc and gate read the same norm output (awq.NORM_BEFORE), so one hook sums it
        inputs = {name: NORM_BEFORE.get(name, name) for name in linears}
        first = {}  # input -> the first linear reading it, whose hook sums it
        for name, key in inputs.items():
            first.setdefault(key, name)
        experts = streaming.quantized_experts(layer, prefix, qc) if default_rounder else {}
        hessians: dict[str, torch.Tensor] = {}
        run({**{linears[name]: _accumulate(hessians, key) for key, name in first.items()},
             **{m: _accumulate_experts(hessians, name) for name, m in experts.items()}})
        for name, m in linears.items():
            chunks = tp_size if m.input_sharded else 1
            tensors = rounder(prefix + name, m.weight.detach(), hessians[inputs[name]], chunks)
            quantized[prefix + name] = {leaf: v.cpu() for leaf, v in tensors.items()}
        for name, m in experts.items():
            for proj, hessian in (("fc", name + ".in"), ("gate", name + ".in"), ("proj", name + ".mid")):
                linear = getattr(m, proj)
                tensors = _round_experts(linear.weight.detach(), hessians[hessian], qc, dtype)
                quantized[f"{prefix}{name}.{proj}"] = {leaf: v.cpu() for leaf, v in tensors.items()}
        log.debug("GPTQ %s: %d linears, %d sets of experts", prefix, len(linears), len(experts))
        del hessians
    return quantized


def _round_int4(weight, hessian, qc: QuantConfig, dtype, chunks: int) -> dict[str, torch.Tensor]:
    return gptq_int4(weight, hessian, qc.group_size, qc.has_zero_point, dtype, chunks)


def _round_fp8(weight, hessian, qc: QuantConfig, dtype, chunks: int) -> dict[str, torch.Tensor]:
    """An FP8 format's tensors with round-to-nearest's scales and GPTQ's codes (in input order: any TP split)."""
    scale = FP8_WEIGHT_SCALES[qc.quant_algo](weight, qc, dtype)
    per_input = scale.float()[:, None] if scale.dim() == 1 else \
        scale.float().repeat_interleave(qc.group_size, dim=1)[:, :weight.shape[1]]
    return {"weight": gptq_fp8(weight, hessian, per_input), "weights_scaling_factor": scale}


# FP8 format -> (weight, QuantConfig, dtype) -> its round-to-nearest weight scales: [out], or [out, groups]
FP8_WEIGHT_SCALES = {
    QuantAlgo.FP8: lambda w, qc, dtype: quantize_fp8_weight(w, dtype, per_channel=False)[1],
    QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN: lambda w, qc, dtype: quantize_fp8_weight(w, dtype, per_channel=True)[1],
    QuantAlgo.FP8_BLOCK_SCALES: lambda w, qc, dtype: quantize_fp8_groups_weight(w, qc.group_size, dtype)[1],
}
# quant_algo -> (weight, Hessian, QuantConfig, dtype, TP chunks) -> the linear's GPTQ-rounded checkpoint tensors
ROUNDERS = {QuantAlgo.W4A16_GPTQ: _round_int4, **{algo: _round_fp8 for algo in FP8_WEIGHT_SCALES}}


def _round_experts(weight, hessians, qc: QuantConfig, dtype) -> dict[str, torch.Tensor]:
    """A mixture of experts' stacked weight rounded by GPTQ in the format's expert tensors."""
    from kiln.quantization.methods import EXPERT_METHODS

    if qc.quant_algo == QuantAlgo.W4A16_GPTQ:
        return gptq_experts_int4(weight, hessians, qc.group_size, qc.has_zero_point, dtype)
    return gptq_experts_fp8(weight, hessians, EXPERT_METHODS[qc.quant_algo](qc), dtype)


def _accumulate_experts(hessians: dict, name: str):
    """A forward pre-hook on a TP=1 source model's Experts (x, experts, weights): each expert's Hessians over the
    tokens routed to it, of its input (`name`.in, fc's and gate's) and of proj's input act(fc x) * gate x
    (`name`.mid, from the float weights), [experts, in, in] each."""
    from kiln.layers.mlp import ACTIVATIONS

    def hook(module, args):
        x, experts = args[0].detach(), args[1]
        rows = x.reshape(-1, x.shape[-1]).float()
        fc, gate = module.fc.weight.float(), module.gate.weight.float()
        if name + ".in" not in hessians:
            hessians[name + ".in"] = rows.new_zeros(fc.shape[0], fc.shape[2], fc.shape[2])
            hessians[name + ".mid"] = rows.new_zeros(fc.shape[0], fc.shape[1], fc.shape[1])
        for e in experts.unique().tolist():
            h = rows[(experts == e).nonzero(as_tuple=True)[0]]  # (top-k ids are distinct: a token once)
            mid = ACTIVATIONS[module.act](h @ fc[e].T) * (h @ gate[e].T)
            hessians[name + ".in"][e] += h.T @ h
            hessians[name + ".mid"][e] += mid.T @ mid
    return hook


def _accumulate(hessians: dict, key: str):
    """A forward pre-hook adding x^T x of the linear's input to the Hessian of `key` (the input goes on unchanged)."""
    def hook(module, args):
        x = args[0].detach()
        rows = x.reshape(-1, x.shape[-1]).float()
        hessians[key] = hessians.get(key, 0) + rows.T @ rows
    return hook
