"""W4A8_AWQ: group-wise int4 AWQ weights (W4A16_AWQ's format and scale search) with FP8 activations, quantized with
one static scale per layer from calibration.

Checkpoint tensors: those of W4A16 (kiln/quantization/weight_only.py), AWQ's `prequant_scaling_factor` on
row-parallel layers, and `activation_scaling_factor` [1] as in FP8 (kiln/quantization/fp8.py): max |x / s| over
the calibration tokens / 448, where x / s is the input after AWQ's smoothing. Replicated on every rank.

The matmul runs on the e4m3 activation codes, which the model dtype holds exactly, against the int4 weight, then
scales each row: y = (x_q @ w^T) * a. On a CUDA GPU the codes go through W4A16's kernels (kiln.kernels.quant_gemm:
the int4 GEMV at 1-2 rows, the int4 GEMM above), elsewhere through the dequantized weight. kiln has no int4 x fp8
tensor-core kernel, so W4A8_AWQ runs at about W4A16's speed plus one quantizing pass per linear, and measures the
FP8 activations' quality cost. The int4 GEMV's epilogues (SiLU-and-mul, rotary) do not apply: the row scale must
come before the activation and the rotation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.errors import ConfigError
from kiln.layers.linear import Linear, LinearMethod
from kiln.mapping import replicate
from kiln.quantization.fp8 import quantize_fp8_static, static_activation_scale
from kiln.quantization.weight_only import Int4GroupMethod, _kernels_for, _param


class W4A8AwqMethod(Int4GroupMethod):
    name = "W4A8_AWQ"

    def create_weights(self, layer: Linear) -> None:
        super().create_weights(layer)
        layer.activation_scaling_factor = _param(1)
        layer.shard_rules["activation_scaling_factor"] = replicate

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.prequant:
            x = x * layer.prequant_scaling_factor
        xq, scale = quantize_fp8_static(x.reshape(-1, x.shape[-1]), layer.activation_scaling_factor)
        codes = xq.to(x.dtype)  # (exact)
        quant_gemm = _kernels_for(codes)
        if quant_gemm is not None:
            y = self.fused_matmul(quant_gemm, layer, codes)
        else:
            y = F.linear(codes, self.dequantize(layer, x.dtype))
        return (y.float() * scale).to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])

    # The row scale comes before the activation and the rotation, so the int4 GEMV's epilogues do not apply: the
    # layers take their plain paths (LinearMethod's defaults).
    silu_and_mul_matmul = LinearMethod.silu_and_mul_matmul
    rotary_qkv_matmul = LinearMethod.rotary_qkv_matmul

    def quantize(self, weight, dtype, input_scale=None, act_absmax=None):
        if act_absmax is None:
            raise ConfigError("W4A8_AWQ needs the calibrated max |x| of each quantized layer's input "
                              "(kiln.quantization.act_stats); quantize through quantize_checkpoint")
        s = input_scale.float() if input_scale is not None else torch.ones_like(act_absmax, dtype=torch.float32)
        out = super().quantize(weight, dtype, input_scale)
        return {**out, "activation_scaling_factor": static_activation_scale(act_absmax.float() / s, dtype)}
