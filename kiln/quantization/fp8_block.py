"""FP8_BLOCK_SCALES: e4m3 weights and activations with a scale per group of `group_size` inputs (DeepSeek-V3's
fine-grained FP8, TensorRT-LLM's name), no calibration.

- Activations: one scale per token and group of group_size inputs, computed at run time (max |x| / 448).
- Weights: one scale per output row and group of group_size inputs. kiln's quantizer gives each row its own
  (finer than DeepSeek's 128 x 128 blocks), searched for the least squared error (fp8.search_scales); a
  checkpoint with
  128 x 128 blocks (`weight_block_size` [128, 128], kiln.quantization.fp8_import) is imported without
  re-quantizing, each block's scale repeated on its 128 rows.

A scale per group moves the largest values of each group onto e4m3's exact top (448), where one per tensor or
per token leaves most groups' largest values short of it: on SmolLM2 this mode's mean KL is about 40% below
static FP8's (docs/quantization.md, scripts/fp8_scale_granularity.py).

Checkpoint tensors of a quantized linear `<linear>`:

- `weight` float8_e4m3fn [out, in]; `weights_scaling_factor` [out, ceil(in / group_size)] (model dtype); input
  column c of row r is weight[r, c] * weights_scaling_factor[r, c // group_size] (the last group may be short).
  Both are [out, ...] on dim 0 and group-aligned on dim 1, so the column, QKV and row shard rules apply to them
  as to a plain weight; a row-parallel layer split across ranks needs whole groups on every rank.

The GEMM sums each group's e4m3 products in float32, then applies the two scales (kiln.kernels.fp8_group_gemm):
the Triton kernel on CUDA (compute capability 8.9 or newer), the same math in float32 elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.kernels import triton_available
from kiln.kernels.fp8_group_gemm import dequantize_groups, fp8_group_gemm, fp8_group_gemm_ref
from kiln.kernels.fp8_quant import Fp8Rows, from_groups, to_groups
from kiln.kernels.input_quant import FP8_GROUPS, InputQuant
from kiln.kernels.moe import ExpertCodes
from kiln.layers.linear import Linear, LinearMethod
from kiln.quantization.fp8 import FP8, fp8_backend, search_scales
from kiln.quantization.weight_only import _param, check_expert_groups, check_whole_groups_per_rank


def quantize_fp8_groups_weight(weight: torch.Tensor, group: int, dtype: torch.dtype):
    """[out, in] -> (q e4m3 [out, in], scale [out, ceil(in / group)] in `dtype`), one searched scale per row and
    group (kiln.quantization.fp8.search_scales; the last group may be short)."""
    q, scale = search_scales(to_groups(weight, group), dtype)
    return from_groups(q, weight.shape[1]), scale


def dequantize_fp8_groups(q: torch.Tensor, scale: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_groups(q, scale, group).to(dtype)


def fp8_groups_matmul(x: Fp8Rows, wq: torch.Tensor, w_scale: torch.Tensor, group: int,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """x (codes [M, K] with scales [M, G]) @ the weight's dequantization^T -> [M, N]."""
    if fp8_backend(x.q.device) != "emulated" and triton_available():  # (refuses GPUs without FP8)
        return fp8_group_gemm(x.q, x.scale, wq, w_scale, group, out_dtype)
    return fp8_group_gemm_ref(x.q, x.scale, wq, w_scale, group, out_dtype)


class Fp8BlockMethod(LinearMethod):
    name = "FP8_BLOCK_SCALES"

    def __init__(self, group_size: int):
        self.group_size = group_size

    def create_weights(self, layer: Linear) -> None:
        g, inp = self.group_size, layer.in_features
        check_whole_groups_per_rank(layer, g)
        layer.weight = _param(layer.out_features, inp, dtype=FP8)
        layer.weights_scaling_factor = _param(layer.out_features, -(-inp // g))
        layer.shard_rules.update(weight=layer.weight_rule, weights_scaling_factor=layer.weight_rule)

    def prepare(self, layer: Linear) -> None:
        # The same [out, groups] scales stored column-major: the GEMM reads a group's scales of a tile's columns
        # as one contiguous vector a step (kiln.kernels.fp8_group_gemm._CONFIGS says what that saves).
        scales = layer.weights_scaling_factor.data
        layer.weights_scaling_factor = nn.Parameter(scales.t().contiguous().t(), requires_grad=False)

    def dequantize(self, layer: Linear, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8_groups(layer.weight, layer.weights_scaling_factor, self.group_size, dtype)

    def input_quant(self, layer: Linear) -> InputQuant:
        """e4m3 codes with a scale per token and group."""
        return InputQuant(FP8_GROUPS, group=self.group_size)

    def apply(self, layer: Linear, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        if isinstance(x, Fp8Rows):  # quantized by the kernel before (input_quant): codes and group scales
            return fp8_groups_matmul(x, layer.weight, layer.weights_scaling_factor, self.group_size,
                                     layer.weights_scaling_factor.dtype)
        fp8_backend(x.device)  # refuses GPUs without FP8 before anything runs
        x2 = x.reshape(-1, x.shape[-1])
        y = fp8_groups_matmul(self.input_quant(layer).quantize(x2), layer.weight,
                              layer.weights_scaling_factor, self.group_size, x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def quantize(self, weight, dtype, input_scale=None, act_absmax=None):
        q, s = quantize_fp8_groups_weight(weight, self.group_size, dtype)
        return {"weight": q, "weights_scaling_factor": s}


class Fp8GroupExpertMethod:
    """FP8_BLOCK_SCALES for a mixture of experts' stacked weights: e4m3 codes [experts, out, in] with a searched
    scale per expert, output row and group of group_size inputs, `weights_scaling_factor` [experts, out,
    in / group] (a block-scaled checkpoint's blocks come in as their rows' groups, kiln.quantization.fp8_import).
    Weight-only as FP8's experts (kiln.quantization.fp8.Fp8ExpertMethod): the grouped GEMM converts each tile of
    codes with its group's scales and multiplies 16-bit inputs. Sharded and joined into fc_gate as W4A16's experts
    are (a row-parallel expert splits its groups, whole ones on every rank)."""

    name = "FP8_BLOCK_SCALES"

    def __init__(self, group_size: int):
        self.group_size = group_size

    def create_weights(self, layer) -> None:
        check_expert_groups(layer, self.group_size, self.name)
        layer.weight = _param(layer.num_experts, layer.out_features, layer.in_features, dtype=FP8)
        layer.weights_scaling_factor = _param(layer.num_experts, layer.out_features,
                                              layer.in_features // self.group_size)
        layer.shard_rules.update(weight=layer.weight_rule, weights_scaling_factor=layer.weight_rule)

    def quantize(self, weight, dtype, input_scale=None):
        experts, out, inp = weight.shape
        q, s = quantize_fp8_groups_weight(weight.reshape(experts * out, inp), self.group_size, dtype)
        return {"weight": q.view(experts, out, inp), "weights_scaling_factor": s.view(experts, out, -1)}

    def codes(self, layer) -> ExpertCodes:
        return ExpertCodes(layer.weight, layer.weights_scaling_factor, None, self.group_size)
