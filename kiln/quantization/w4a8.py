"""W4A8_AWQ: group-wise int4 AWQ weights (W4A16_AWQ's format and scale search) with FP8 activations, quantized with
one static scale per layer from calibration.

Checkpoint tensors: those of W4A16 (kiln/quantization/weight_only.py), AWQ's `prequant_scaling_factor` on
row-parallel layers, and `activation_scaling_factor` [1] as in FP8 (kiln/quantization/fp8.py): max |x / s| over
the calibration tokens / 448, where x / s is the input after AWQ's smoothing. Replicated on every rank.

The matmul runs on the e4m3 activation codes against the int4 weight, then scales each row: y = (x_q @ w^T) * a.
On a GPU with e4m3 MMAs (Ada, Hopper), prompt-sized batches (from W4A16's DEQUANT_MIN_ROWS rows) run on the FP8
tensor cores: the int4 codes less their zero point are e4m3 exactly, and FP8_BLOCK_SCALES' group GEMM sums each
group of codes there and scales it by the group's int4 scale (kiln.kernels.quant_gemm.w4a8_matmul). Fewer rows,
bound by streaming the weights, and other GPUs take W4A16's kernels on the codes in the model dtype (exact): the
int4 GEMV at 1-2 rows, the int4 GEMM above; elsewhere the dequantized weight. The int4 GEMV's epilogues
(SiLU-and-mul, rotary) do not apply: the row scale must come before the activation and the rotation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.errors import ConfigError
from kiln.kernels.fp8_quant import Fp8Rows
from kiln.kernels.gemv import has_fp8_mma
from kiln.kernels.input_quant import FP8_STATIC, InputQuant
from kiln.layers.linear import Linear, LinearMethod
from kiln.mapping import replicate
from kiln.quantization.fp8 import static_activation_scale
from kiln.quantization.weight_only import Int4GroupMethod, _kernels_for, _param


def on_fp8_tensor_cores(xq: torch.Tensor, quant_gemm) -> bool:
    """Prompt-sized batches (W4A16's DEQUANT_MIN_ROWS: the weights' codes are written out once a call) on a GPU with
    e4m3 MMAs (Ada, Hopper) run quant_gemm.w4a8_matmul; fewer rows stream the packed weights through W4A16's
    GEMV and GEMM, which their memory traffic bounds."""
    return xq.shape[0] >= quant_gemm.DEQUANT_MIN_ROWS and has_fp8_mma(xq.device.index)


class W4A8AwqMethod(Int4GroupMethod):
    name = "W4A8_AWQ"

    def create_weights(self, layer: Linear) -> None:
        super().create_weights(layer)
        layer.activation_scaling_factor = _param(1)
        layer.shard_rules["activation_scaling_factor"] = replicate

    def input_quant(self, layer: Linear) -> InputQuant:
        """e4m3 codes over the calibrated scale, the input times AWQ's prequant scale first where the layer has one."""
        return InputQuant(FP8_STATIC, scale=layer.activation_scaling_factor,
                          prequant=layer.prequant_scaling_factor if self.prequant else None)

    def apply(self, layer: Linear, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        # quantized by the kernel before (input_quant), or here
        rows = x if isinstance(x, Fp8Rows) else self.input_quant(layer).quantize(x.reshape(-1, x.shape[-1]))
        lead = rows.q.shape[:-1] if isinstance(x, Fp8Rows) else x.shape[:-1]
        dtype = layer.activation_scaling_factor.dtype  # the model's (x's, where x is not codes)
        quant_gemm = _kernels_for(rows.q, dtype)
        if quant_gemm is not None and on_fp8_tensor_cores(rows.q, quant_gemm):
            y = quant_gemm.w4a8_matmul(rows.q, layer.activation_scaling_factor, *self._packed(layer), dtype)
            return y.reshape(*lead, y.shape[-1])
        codes = rows.q.to(dtype)  # (exact)
        if quant_gemm is not None:
            y = self.fused_matmul(quant_gemm, layer, codes)
        else:
            y = F.linear(codes, self.dequantize(layer, dtype))
        return (y.float() * rows.scale).to(dtype).reshape(*lead, y.shape[-1])

    # The row scale comes before the activation and the rotation, so the int4 GEMV's epilogues do not apply, and
    # the input is quantized after the norm, so no GEMV carries one (PendingNorm): the layers take their plain paths
    # (LinearMethod's defaults).
    silu_and_mul_matmul = LinearMethod.silu_and_mul_matmul
    rotary_qkv_matmul = LinearMethod.rotary_qkv_matmul
    add_norm_matmul = LinearMethod.add_norm_matmul
    carries_norms = LinearMethod.carries_norms

    def quantize(self, weight, dtype, input_scale=None, act_absmax=None):
        if act_absmax is None:
            raise ConfigError("W4A8_AWQ needs the calibrated max |x| of each quantized layer's input "
                              "(kiln.quantization.act_stats); quantize through quantize_checkpoint")
        s = input_scale.float() if input_scale is not None else torch.ones_like(act_absmax, dtype=torch.float32)
        out = super().quantize(weight, dtype, input_scale)
        return {**out, "activation_scaling_factor": static_activation_scale(act_absmax.float() / s, dtype)}
