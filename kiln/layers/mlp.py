"""MLPs: the gated one of Llama-family models, proj(act(fc(x)) * gate(x)), and the plain proj(act(fc(x)))
of GPT-2 and GPT-NeoX.

Names follow TensorRT-LLM: `fc` is the source's gate_proj, `gate` its up_proj. Engines fuse fc and
gate into one column-parallel `fc_gate` matmul (the runtime layout); checkpoints keep them apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.kernels import triton_available
from kiln.kernels.activation import silu_and_mul
from kiln.kernels.fp8_quant import quantize_activation, quantize_activation_groups
from kiln.kernels.int8_gemm import Int8Rows, quantize_int8_activation
from kiln.layers.linear import ColumnLinear, RowLinear
from kiln.mapping import Mapping

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # HF's gelu_new / gelu_pytorch_tanh
    "relu": F.relu,
}


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool, mapping: Mapping,
                 fused: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[hidden_act]
        self.fused = fused
        if fused:
            self.fc_gate = ColumnLinear(hidden_size, 2 * intermediate_size, bias, mapping)
        else:
            self.fc = ColumnLinear(hidden_size, intermediate_size, bias, mapping)
            self.gate = ColumnLinear(hidden_size, intermediate_size, bias, mapping)
        self.proj = RowLinear(intermediate_size, hidden_size, bias, mapping)
        # proj's static FP8 input scale, set at engine load (kiln.models.base.DecoderLayer.fuse_input_quantization):
        # the activation then writes proj's e4m3 input directly.
        self.fp8_act_scale: torch.Tensor | None = None
        # ... or proj's SmoothQuant prequant scale: the activation then writes proj's int8 input (Int8Rows)
        self.int8_prequant: torch.Tensor | None = None
        # ... or proj's FP8_BLOCK_SCALES group size: the activation writes its e4m3 input with a scale per group
        self.fp8_act_group = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            if self.act is F.silu and self.fc_gate.bias is None and self.fp8_act_scale is None and \
                    self.int8_prequant is None and not self.fp8_act_group:
                h = self.fc_gate.quant_method.silu_and_mul_matmul(self.fc_gate, x)
                if h is not None:  # the matmul with the activation as its epilogue (the int4 GEMV), one launch
                    return self.proj(h)
            fc_gate = self.fc_gate(x)  # (x may be fc_gate's FP8 input, Fp8Rows: no tensor checks on it)
            if self.act is F.silu and fc_gate.is_cuda and triton_available():
                # one Triton launch for act(fc) * gate (and its quantization for an FP8 proj)
                return self.proj(silu_and_mul(fc_gate, self.fp8_act_scale, self.int8_prequant, self.fp8_act_group))
            fc, gate = fc_gate.chunk(2, dim=-1)
        else:
            fc, gate = self.fc(x), self.gate(x)
        h = self.act(fc) * gate
        if self.fp8_act_scale is not None:
            h = quantize_activation(h.reshape(-1, h.shape[-1]), self.fp8_act_scale)
        elif self.int8_prequant is not None:
            h = Int8Rows(*quantize_int8_activation(h.reshape(-1, h.shape[-1]), self.int8_prequant))
        elif self.fp8_act_group:
            h = quantize_activation_groups(h.reshape(-1, h.shape[-1]), self.fp8_act_group)
        return self.proj(h)


class MLP(nn.Module):
    """The plain MLP: no gate, so engines keep fc as it is."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool, mapping: Mapping):
        super().__init__()
        self.act = ACTIVATIONS[hidden_act]
        self.fc = ColumnLinear(hidden_size, intermediate_size, bias, mapping)
        self.proj = RowLinear(intermediate_size, hidden_size, bias, mapping)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


def make_mlp(config, fused: bool) -> nn.Module:
    if config.gated_mlp:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias,
                        config.mapping, fused)
    return MLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias, config.mapping)
