"""W8A8_SQ_PER_CHANNEL: int8 weights with one scale per output channel, int8 activations with one scale per
token computed at run time, after SmoothQuant's smoothing (kiln.quantization.smoothquant computes the scales).

Checkpoint tensors of a quantized linear `<linear>`:

- `weight` int8 [out, in] (q in [-127, 127]) and `weights_scaling_factor` [out] (model dtype), as W8A16: the
  smoothed weight W * s is quantized, w_eff = q * scale.
- `prequant_scaling_factor` [in] on a row-parallel layer (attention output, mlp.proj), which follows no norm
  that 1/s could fold into: the layer multiplies its input by it first (split like the input dim).

The GEMM is y = (x_q @ q^T) * x_scale_row * w_scale_col with an exact int32 accumulator, and the activations are
quantized (the prequant scale multiplied in) by one pass: kiln.kernels.int8_gemm, which runs Triton kernels (or
torch._int_mm where it times faster) on CUDA and the same math in torch elsewhere: the integer products summed in
float32, exact while the partial sums stay below 2^24 and otherwise differing by float32 rounding only.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.kernels.input_quant import INT8_ROWS, InputQuant
from kiln.kernels.int8_gemm import Int8Rows, int8_gemm
from kiln.layers.linear import Linear, LinearMethod
from kiln.mapping import replicate
from kiln.quantization.weight_only import dequantize_int8, quantize_int8_per_channel, shard_input_vector


def _param(*shape, dtype=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Int8W8A8Method(LinearMethod):
    name = "W8A8_SQ_PER_CHANNEL"

    def __init__(self, prequant: bool = False):
        self.prequant = prequant

    def create_weights(self, layer: Linear) -> None:
        layer.weight = _param(layer.out_features, layer.in_features, dtype=torch.int8)
        layer.weights_scaling_factor = _param(layer.out_features)
        layer.shard_rules.update(weight=layer.weight_rule, weights_scaling_factor=layer.weight_rule)
        if self.prequant:
            layer.prequant_scaling_factor = _param(layer.in_features)
            layer.shard_rules["prequant_scaling_factor"] = shard_input_vector if layer.input_sharded else replicate

    def dequantize(self, layer: Linear, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int8(layer.weight, layer.weights_scaling_factor, dtype)

    def input_quant(self, layer: Linear) -> InputQuant:
        """int8 codes with a scale per token, the input times the prequant scale first where the layer has one."""
        return InputQuant(INT8_ROWS, prequant=layer.prequant_scaling_factor if self.prequant else None)

    def apply(self, layer: Linear, x: torch.Tensor | Int8Rows) -> torch.Tensor:
        if isinstance(x, Int8Rows):  # quantized by the kernel before (input_quant), prequant included
            return int8_gemm(x.q, x.scale, layer.weight, layer.weights_scaling_factor,
                             layer.weights_scaling_factor.dtype)
        rows = self.input_quant(layer).quantize(x.reshape(-1, x.shape[-1]))
        y = int8_gemm(rows.q, rows.scale, layer.weight, layer.weights_scaling_factor, x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def quantize(self, weight, dtype, input_scale=None, act_absmax=None):
        s = input_scale.float() if input_scale is not None else weight.new_ones(weight.shape[1], dtype=torch.float32)
        q, scale = quantize_int8_per_channel(weight.float() * s[None, :], dtype)
        out = {"weight": q, "weights_scaling_factor": scale}
        if self.prequant:
            out["prequant_scaling_factor"] = (1.0 / s).to(dtype)
        return out
