"""Weight-only quantization: W8A16 (per-channel symmetric int8) and W4A16 (group-wise int4, round to nearest,
symmetric or with a zero point). Activations stay in the model's dtype; the reference path dequantizes the
weight and runs a plain matmul, which is correct on any device; on CUDA with Triton, `apply` runs the fused
dequantize-matmul kernels of kiln.kernels.quant_gemm on this same packed layout.

Checkpoint tensors of a quantized linear `<linear>` (all [out, ...] on dim 0, so column, QKV and row shard
rules apply to them as to a plain weight):

- W8A16: `weight` int8 [out, in] (q in [-127, 127]); `weights_scaling_factor` [out]; w = q * s.
- W4A16: `weight` uint8 [out, in / 2], two 4-bit codes u in [0, 15] per byte along the input dim: byte j of a
  row holds input column 2j in its low nibble and 2j + 1 in its high nibble (so a row-parallel split of the
  input dim is a split of the bytes); `weights_scaling_factor` [out, ceil(in / group)]; with a zero point,
  `zero_point` [out, ceil(in / group)] (integers in [0, 15], stored in the model dtype) and w = (u - z) * s;
  symmetric, the zero is 8 and w = (u - 8) * s. Input column c belongs to group c // group_size; the last
  group of a row may be short (SmolLM2's 576 inputs are 4.5 groups of 128), except that a row-parallel
  layer split across ranks needs whole groups on every rank.
- AWQ adds `prequant_scaling_factor` [in] where its scale could not be folded into a norm: the layer computes
  (x * prequant_scaling_factor) W^T.
- A mixture of experts' stacked weights [experts, out, in] (Int8ExpertMethod, Int4ExpertMethod): each expert as
  above, stacked on a first dim, W8A16's scales as [experts, out, 1].
- W4A16_GPTQ (imported act-order GPTQ, kiln.quantization.hf_import) adds `input_permutation` int32 [in]: the
  columns are the source's input channels sorted by group, column j being channel input_permutation[j], so
  the layer computes x[..., input_permutation] W^T. A row-parallel layer's permutation must keep every rank's
  inputs on that rank.

Scales are rounded to the model dtype *before* the codes are computed, so dequantizing a checkpoint gives the
quantizer's own reconstruction exactly.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import ConfigError
from kiln.kernels import divide_exactly, triton_available
from kiln.kernels.gemv import epilogues_enabled
from kiln.kernels.moe import ExpertCodes
from kiln.kernels.words import INT4_SYMMETRIC_ZERO
from kiln.layers.linear import Linear, LinearMethod
from kiln.layers.normalization import PendingNorm
from kiln.mapping import replicate, shard_experts

INT8_MAX = 127
INT4_LEVELS = 15  # codes 0..15


# ---- the math: pure functions of (tensor, format) ------------------------------------------------------

def quantize_int8_per_channel(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (q int8 [out, in], scale [out] in `dtype`), symmetric, one scale per output row."""
    w = weight.float()
    scale = divide_exactly(w.abs().amax(dim=1), INT8_MAX).clamp(min=1e-8).to(dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15] of shape [..., n] (n even) -> [..., n / 2] bytes, low nibble first."""
    if codes.shape[-1] % 2:
        raise ConfigError(f"int4 packing needs an even number of input features, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., n / 2] bytes -> [..., n] uint8 codes in [0, 15] (the inverse of pack_int4)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def quantize_int4_groups(weight: torch.Tensor, group_size: int, zero_point: bool, dtype: torch.dtype):
    """[out, in] -> (packed uint8 [out, in / 2], scale [out, in / g], zero [out, in / g] or None).

    Round to nearest. Symmetric: s = max|w| / 7 over the group, codes u = clamp(round(w / s) + 8, 0, 15).
    With a zero point (asymmetric, as AWQ's GEMM format): s = (max - min) / 15, z = clamp(round(-min / s),
    0, 15), u = clamp(round(w / s) + z, 0, 15).
    """
    out, inp = weight.shape
    groups = -(-inp // group_size)
    # A short last group is padded with zeros, which change neither its max |w| nor its range (both include 0).
    w = F.pad(weight.float(), (0, groups * group_size - inp)).reshape(out, groups, group_size)
    if zero_point:
        hi, lo = w.amax(-1).clamp(min=0), w.amin(-1).clamp(max=0)
        scale = divide_exactly(hi - lo, INT4_LEVELS).clamp(min=1e-8).to(dtype)  # (the same bits on any device)
        zero = torch.round(-lo / scale.float()).clamp(0, INT4_LEVELS)
    else:
        scale = divide_exactly(w.abs().amax(-1), INT4_LEVELS // 2).clamp(min=1e-8).to(dtype)
        zero = torch.full_like(scale, INT4_SYMMETRIC_ZERO, dtype=torch.float32)
    codes = torch.round(w / scale.float()[..., None]) + zero[..., None]
    codes = codes.clamp(0, INT4_LEVELS).to(torch.uint8).reshape(out, groups * group_size)[:, :inp]
    return pack_int4(codes), scale, (zero.to(dtype) if zero_point else None)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    codes = unpack_int4(packed).float()
    inp = codes.shape[1]
    z = zero.float() if zero is not None else torch.full_like(scale, INT4_SYMMETRIC_ZERO, dtype=torch.float32)
    expand = lambda t: t.repeat_interleave(group_size, dim=1)[:, :inp]  # noqa: E731 (group -> its columns)
    return ((codes - expand(z)) * expand(scale.float())).to(dtype)


def shard_input_vector(tensor: torch.Tensor, mapping) -> torch.Tensor:
    """A per-input-channel vector of a row-parallel layer: split like the input dim."""
    from kiln.mapping import _split

    return _split(tensor, 0, mapping.tp_size, mapping.tp_rank, "a row-parallel input vector")


def shard_input_permutation(tensor: torch.Tensor, mapping) -> torch.Tensor:
    """A row-parallel layer's input permutation: this rank's slice, renumbered into this rank's inputs."""
    local = shard_input_vector(tensor, mapping)
    start = mapping.tp_rank * local.numel()
    if not bool(((local >= start) & (local < start + local.numel())).all()):
        raise ConfigError("an act-order (GPTQ desc_act) row-parallel layer's input permutation moves inputs across "
                          "tensor-parallel ranks, which its matmul cannot follow; convert it with tp_size 1")
    return local - start


# ---- the methods a linear layer holds ------------------------------------------------------------------

def _kernels_for(x: torch.Tensor, dtype: torch.dtype | None = None):
    """kiln.kernels.quant_gemm where its kernels run on x (activations in `dtype`, where x holds their codes), else
    None (the reference: dequantize, then matmul)."""
    if not (x.is_cuda and triton_available()):
        return None
    from kiln.kernels import quant_gemm  # imported here: its torch references import this module

    return quant_gemm if quant_gemm.kernel_supports(x.device, dtype or x.dtype) else None


def _param(*shape, dtype=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class _WeightOnlyMethod(LinearMethod):
    """Shared by both formats: the optional AWQ prequant scale, and apply = dequantize then matmul."""

    def __init__(self, prequant: bool = False):
        self.prequant = prequant

    def _create_prequant(self, layer: Linear) -> None:
        if self.prequant:
            layer.prequant_scaling_factor = _param(layer.in_features)
            layer.shard_rules["prequant_scaling_factor"] = shard_input_vector if layer.input_sharded else replicate

    def dequantize(self, layer: Linear, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        x = self._prequant_scaled(layer, x)
        quant_gemm = _kernels_for(x)
        if quant_gemm is not None:
            return self.fused_matmul(quant_gemm, layer, x)
        return F.linear(x, self.dequantize(layer, x.dtype))

    def _prequant_scaled(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """x times AWQ's prequant scale, where the layer has one."""
        return x * layer.prequant_scaling_factor if self.prequant else x

    def fused_matmul(self, quant_gemm, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """x W^T by this format's Triton kernel (kiln.kernels.quant_gemm), the weights read packed."""
        raise NotImplementedError

    def _gemv_input(self, layer, x) -> tuple:
        """(kiln.kernels.quant_gemm, x as the format's GEMV on words takes it: AWQ-scaled, act-order permuted) where
        that GEMV runs on x (CUDA, 1-2 rows) and the epilogue variants are on (kiln.kernels.gemv.epilogues_enabled),
        else (None, x): the epilogue variants are the GEMV's."""
        quant_gemm = _kernels_for(x)
        if quant_gemm is None or not quant_gemm.gemv_takes(x, layer.weight) or not epilogues_enabled():
            return None, x
        return quant_gemm, self._act_ordered(layer, self._prequant_scaled(layer, x))

    def _act_ordered(self, layer, x) -> torch.Tensor:
        """x's columns in the codes' order: as they are, but for GPTQ's act-order (Int4GroupMethod)."""
        return x

    def _prequant_tensor(self, input_scale, weight, dtype) -> dict:
        if not self.prequant:
            return {}
        s = input_scale if input_scale is not None else weight.new_ones(weight.shape[1])
        return {"prequant_scaling_factor": (1.0 / s.float()).to(dtype)}


class Int8WeightOnlyMethod(_WeightOnlyMethod):
    name = "W8A16"

    def create_weights(self, layer: Linear) -> None:
        layer.weight = _param(layer.out_features, layer.in_features, dtype=torch.int8)
        layer.weights_scaling_factor = _param(layer.out_features)
        layer.shard_rules.update(weight=layer.weight_rule, weights_scaling_factor=layer.weight_rule)
        self._create_prequant(layer)

    def dequantize(self, layer, dtype):
        return dequantize_int8(layer.weight, layer.weights_scaling_factor, dtype)

    def fused_matmul(self, quant_gemm, layer, x):
        return quant_gemm.w8a16_matmul(x, layer.weight, layer.weights_scaling_factor)

    def silu_and_mul_matmul(self, layer, x, out_quant=None):
        quant_gemm, x = self._gemv_input(layer, x)
        if quant_gemm is None or out_quant is not None:  # (the int8 GEMV's epilogue writes the 16-bit product)
            return None
        return quant_gemm.w8a16_silu_and_mul_matmul(x, layer.weight, layer.weights_scaling_factor)

    def rotary_qkv_matmul(self, layer, x, positions, inv_freq, cache):
        quant_gemm, x = self._gemv_input(layer, x)
        if quant_gemm is None:
            return None
        return quant_gemm.w8a16_qkv_rotary_matmul(x, layer.weight, layer.weights_scaling_factor, layer.num_heads,
                                                  layer.num_kv_heads, layer.head_size, positions, inv_freq, *cache)

    def quantize(self, weight, dtype, input_scale=None):
        w = weight.float() if input_scale is None else weight.float() * input_scale.float()[None, :]
        q, s = quantize_int8_per_channel(w, dtype)
        return {"weight": q, "weights_scaling_factor": s, **self._prequant_tensor(input_scale, weight, dtype)}


def quantize_int8_experts(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked expert weights [experts, out, in] -> (q int8, scale [experts, out, 1] in `dtype`): each expert's
    rows as quantize_int8_per_channel rounds them."""
    experts, out, inp = weight.shape
    q, scale = quantize_int8_per_channel(weight.reshape(experts * out, inp), dtype)
    return q.view(experts, out, inp), scale.view(experts, out, 1)


class RowScaledExpertMethod:
    """Stacked expert weights (kiln.layers.moe.ExpertLinear) as 1-byte codes [experts, out, in] of `code_dtype`
    with a scale per expert and output row, `weights_scaling_factor` [experts, out, 1], w = q * s. The scales'
    last dim of 1 lets them follow the codes: sharded by the same rule (a row-parallel expert's keep every
    output), joined with them into the engine's fc_gate on dim -2, and broadcast against them. kiln.kernels.moe
    runs them: the grouped GEMM dequantizes each tile of codes as it loads it. Subclasses round the weights."""

    code_dtype: torch.dtype

    def create_weights(self, layer) -> None:
        layer.weight = _param(layer.num_experts, layer.out_features, layer.in_features, dtype=self.code_dtype)
        layer.weights_scaling_factor = _param(layer.num_experts, layer.out_features, 1)
        layer.shard_rules.update(weight=layer.weight_rule,
                                 weights_scaling_factor=shard_experts if layer.input_sharded else layer.weight_rule)

    def codes(self, layer) -> ExpertCodes:
        return ExpertCodes(layer.weight, layer.weights_scaling_factor)


class Int8ExpertMethod(RowScaledExpertMethod):
    """W8A16 for stacked expert weights: int8 codes, each expert's rows as quantize_int8_per_channel rounds them."""

    name = "W8A16"
    code_dtype = torch.int8

    def quantize(self, weight, dtype, input_scale=None):
        q, s = quantize_int8_experts(weight, dtype)
        return {"weight": q, "weights_scaling_factor": s}


class Int4ExpertMethod:
    """W4A16 (round to nearest) for stacked expert weights: each expert's [out, in] packed and scaled as a dense
    W4A16 layer's (`weight` uint8 [experts, out, in / 2], `weights_scaling_factor` and, with zero points,
    `zero_point` [experts, out, groups]), sharded like the codes (a row-parallel expert splits its groups, whole
    ones on every rank) and joined into fc_gate on dim -2 with them."""

    name = "W4A16"

    def __init__(self, group_size: int, zero_point: bool):
        self.group_size, self.zero_point = group_size, zero_point

    def create_weights(self, layer) -> None:
        g, inp = self.group_size, layer.in_features
        check_expert_groups(layer, g, self.name)
        layer.weight = _param(layer.num_experts, layer.out_features, inp // 2, dtype=torch.uint8)
        layer.weights_scaling_factor = _param(layer.num_experts, layer.out_features, inp // g)
        leaves = ["weight", "weights_scaling_factor"]
        if self.zero_point:
            layer.zero_point = _param(layer.num_experts, layer.out_features, inp // g)
            leaves.append("zero_point")
        layer.shard_rules.update({leaf: layer.weight_rule for leaf in leaves})

    def quantize(self, weight, dtype, input_scale=None):
        experts, out, inp = weight.shape
        packed, s, z = quantize_int4_groups(weight.reshape(experts * out, inp), self.group_size, self.zero_point,
                                            dtype)
        tensors = {"weight": packed, "weights_scaling_factor": s, "zero_point": z}
        return {leaf: t.view(experts, out, -1) for leaf, t in tensors.items() if t is not None}

    def codes(self, layer) -> ExpertCodes:
        return ExpertCodes(layer.weight, layer.weights_scaling_factor,
                           layer.zero_point if self.zero_point else None, self.group_size)


def check_expert_groups(layer, group: int, algo: str) -> None:
    """Refuse stacked experts whose inputs on a rank are not whole groups: the grouped GEMM's steps stay within a
    group (no short last group, none across ranks)."""
    if layer.in_features % group:
        raise ConfigError(f"QuantConfig.group_size ({group}) must divide the experts' input features on a rank "
                          f"({layer.in_features}) to quantize them as {algo}; choose one of 32, 64, 128 that divides "
                          f"it, a smaller moe_tp_size, or keep the experts in full precision with exclude_modules "
                          f"'experts.*'")


def check_whole_groups_per_rank(layer: Linear, group: int) -> bool:
    """Refuse a row-parallel split whose ranks' inputs are not whole groups (the group-wise formats); True when the
    layer's input dim is split across ranks."""
    split = layer.input_sharded and layer.mapping.tp_size > 1
    if split and layer.in_features % group:
        raise ConfigError(f"QuantConfig.group_size ({group}) must divide a row-parallel layer's input features "
                          f"per rank ({layer.in_features}): a group may not straddle ranks; choose one of 32, 64, "
                          f"128 that divides it, a smaller tp_size, or exclude the layer with exclude_modules")
    return split


def _integer_zeros(layer) -> bool:
    """Whether the layer's zero points are whole numbers, as kiln's quantizer and AWQ/GPTQ's make them; GGUF's Q4_1
    and Q4_K kept as they are (kiln.quantization.gguf_import) have fractional ones, which the fused int4 GEMM
    cannot take (kiln.kernels.quant_gemm.w4a16_matmul). Found once, when the engine prepares the layer (a host
    sync), and kept on it."""
    if not hasattr(layer, "integer_zeros"):
        zero = getattr(layer, "zero_point", None)
        layer.integer_zeros = zero is None or bool(torch.equal(zero, zero.round()))
    return layer.integer_zeros


class Int4GroupMethod(_WeightOnlyMethod):
    name = "W4A16"

    def __init__(self, group_size: int, zero_point: bool, prequant: bool = False, act_order: bool = False):
        super().__init__(prequant)
        self.group_size, self.zero_point, self.act_order = group_size, zero_point, act_order

    def create_weights(self, layer: Linear) -> None:
        g, inp = self.group_size, layer.in_features
        split = check_whole_groups_per_rank(layer, g)
        if inp % 2:
            raise ConfigError(f"W4A16 packs two inputs per byte: a quantized layer's input features ({inp}"
                              f"{' per rank' if split else ''}) must be even; exclude the layer with exclude_modules")
        groups = -(-inp // g)
        layer.weight = _param(layer.out_features, inp // 2, dtype=torch.uint8)
        layer.weights_scaling_factor = _param(layer.out_features, groups)
        rules = {"weight": layer.weight_rule, "weights_scaling_factor": layer.weight_rule}
        if self.zero_point:
            layer.zero_point = _param(layer.out_features, groups)
            rules["zero_point"] = layer.weight_rule
        if self.act_order:
            layer.input_permutation = _param(inp, dtype=torch.int32)
            rules["input_permutation"] = shard_input_permutation if layer.input_sharded else replicate
        layer.shard_rules.update(rules)
        self._create_prequant(layer)

    def dequantize(self, layer, dtype):
        zero = layer.zero_point if self.zero_point else None
        w = dequantize_int4(layer.weight, layer.weights_scaling_factor, zero, self.group_size, dtype)
        if self.act_order:  # back to the input order: column j is input channel input_permutation[j]
            w = torch.empty_like(w).index_copy_(1, layer.input_permutation.long(), w)
        return w

    def prepare(self, layer) -> None:
        _integer_zeros(layer)

    def fused_matmul(self, quant_gemm, layer, x):
        return quant_gemm.w4a16_matmul(self._act_ordered(layer, x), *self._packed(layer),
                                       integer_zeros=_integer_zeros(layer))

    def silu_and_mul_matmul(self, layer, x, out_quant=None):
        x, norm_in = self._pending_input(layer, x)
        quant_gemm, x = self._gemv_input(layer, x)
        if quant_gemm is None or out_quant is not None:  # (the int4 GEMV's epilogue writes the 16-bit product)
            return None
        return quant_gemm.w4a16_silu_and_mul_matmul(x, *self._packed(layer), norm_in=norm_in)

    def rotary_qkv_matmul(self, layer, x, positions, inv_freq, cache):
        x, norm_in = self._pending_input(layer, x)
        quant_gemm, x = self._gemv_input(layer, x)
        if quant_gemm is None:
            return None
        return quant_gemm.w4a16_qkv_rotary_matmul(x, *self._packed(layer), layer.num_heads, layer.num_kv_heads,
                                                  layer.head_size, positions, inv_freq, *cache, norm_in=norm_in)

    def add_norm_matmul(self, layer, x, residual, norm):
        quant_gemm, x = self._gemv_input(layer, x)
        out = None if quant_gemm is None else quant_gemm.w4a16_add_norm_matmul(x, *self._packed(layer), residual,
                                                                                norm.weight)
        return None if out is None else PendingNorm(*out, norm.eps)

    def carries_norms(self, layer) -> bool:
        return not self.prequant and not self.act_order

    def _pending_input(self, layer, x) -> tuple:
        """(x, None), or for a PendingNorm x (its weighted input, (its squares, eps)): the GEMV's `norm_in`. An input
        scale or permutation cannot apply to the weighted input (carries_norms): the norm is finished first."""
        if not isinstance(x, PendingNorm):
            return x, None
        if not self.carries_norms(layer):
            return x.normed(), None
        return x.weighted, (x.squares, x.eps)

    def _act_ordered(self, layer, x) -> torch.Tensor:
        """x's columns in the codes' order (GPTQ act-order: column j is input channel input_permutation[j])."""
        return x.index_select(-1, layer.input_permutation) if self.act_order else x

    def _packed(self, layer) -> tuple:
        """(codes, scales, zeros or None, group size): the int4 kernels' weight arguments."""
        return (layer.weight, layer.weights_scaling_factor, layer.zero_point if self.zero_point else None,
                self.group_size)

    def quantize(self, weight, dtype, input_scale=None):
        """Round to nearest. The act-order format (W4A16_GPTQ) gets the identity order: GPTQ's own rounding, with
        its order, comes from its calibration (kiln.quantization.gptq); this is the rest, such as lm_head."""
        w = weight.float() if input_scale is None else weight.float() * input_scale.float()[None, :]
        packed, s, z = quantize_int4_groups(w, self.group_size, self.zero_point, dtype)
        out = {"weight": packed, "weights_scaling_factor": s}
        if z is not None:
            out["zero_point"] = z
        if self.act_order:
            out["input_permutation"] = torch.arange(weight.shape[1], dtype=torch.int32, device=weight.device)
        return {**out, **self._prequant_tensor(input_scale, weight, dtype)}
