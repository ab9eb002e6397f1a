"""W8A8_SQ_PER_CHANNEL: int8 weights with one scale per output channel, int8 activations with one scale per
token computed at run time, after SmoothQuant's smoothing (kiln.quantization.smoothquant computes the scales).

Checkpoint tensors of a quantized linear `<linear>`:

- `weight` int8 [out, in] (q in [-127, 127]) and `weights_scaling_factor` [out] (model dtype), as W8A16: the
  smoothed weight W * s is quantized, w_eff = q * scale.
- `prequant_scaling_factor` [in] on a row-parallel layer (attention output, mlp.proj), which follows no norm
  that 1/s could fold into: the layer multiplies its input by it first (split like the input dim).

The GEMM is y = (x_q @ q^T) * x_scale_row * w_scale_col with an exact int32 accumulator: torch._int_mm on CUDA
(it needs more than 16 rows, so a decode batch is padded), and on other devices the same integer products
summed in float32, which is exact while the partial sums stay below 2^24 and otherwise differs by float32
rounding only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.layers.linear import Linear, LinearMethod
from kiln.mapping import replicate
from kiln.quantization.weight_only import INT8_MAX, dequantize_int8, quantize_int8_per_channel, shard_input_vector

MIN_SCALE = 1e-12
INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA needs M > 16: smaller batches are padded to 24 rows
INT_MM_PAD_ROWS = 24
INT_MM_ALIGN = 8  # ... and K, N multiples of 8


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (x_q int8 [M, K], scale float32 [M, 1]) with each row's max |x| at 127."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / INT8_MAX).clamp(min=MIN_SCALE)
    return torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def int8_gemm_emulated(xq, x_scale, wq, w_scale, out_dtype) -> torch.Tensor:
    acc = xq.float() @ wq.float().T
    return (acc * x_scale * w_scale.float()[None, :]).to(out_dtype)


def int8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """(x_q [M, K] @ w_q [N, K]^T) * x_scale [M, 1] * w_scale [N] -> [M, N] in out_dtype."""
    m, k = xq.shape
    if not xq.is_cuda or k % INT_MM_ALIGN or wq.shape[0] % INT_MM_ALIGN:
        return int8_gemm_emulated(xq, x_scale, wq, w_scale, out_dtype)
    padded = F.pad(xq, (0, 0, 0, INT_MM_PAD_ROWS - m)) if m < INT_MM_MIN_ROWS else xq
    acc = torch._int_mm(padded, wq.T)[:m]
    return (acc.float() * x_scale * w_scale.float()[None, :]).to(out_dtype)


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

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.prequant:
            x = x * layer.prequant_scaling_factor
        x2 = x.reshape(-1, x.shape[-1])
        xq, x_scale = quantize_int8_per_token(x2)
        y = int8_gemm(xq, x_scale, layer.weight, layer.weights_scaling_factor, x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def quantize(self, weight, dtype, input_scale=None, act_absmax=None):
        s = input_scale.float() if input_scale is not None else weight.new_ones(weight.shape[1], dtype=torch.float32)
        q, scale = quantize_int8_per_channel(weight.float() * s[None, :], dtype)
        out = {"weight": q, "weights_scaling_factor": scale}
        if self.prequant:
            out["prequant_scaling_factor"] = (1.0 / s).to(dtype)
        return out
