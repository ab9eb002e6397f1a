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
from kiln.kernels.input_quant import InputQuant
from kiln.layers.linear import ColumnLinear, RowLinear
from kiln.mapping import Mapping

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # HF's gelu_new / gelu_pytorch_tanh
    "relu": F.relu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # gpt-oss's experts
    "relu2": lambda x: F.relu(x).square(),  # Arcee's (a plain MLP)
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
        # proj's quantized input (kiln.kernels.input_quant), set at engine load
        # (kiln.models.base.DecoderLayer.fuse_input_quantization): the activation then writes it directly.
        self.act_quant: InputQuant | None = None

    def forward(self, x, add_norm: tuple | None = None):
        """The MLP's output; with add_norm (residual, norm), that output added to the residual with the norm begun
        where proj's kernel can (RowLinear.matmul_then_norm). x: the input, a PendingNorm where the norm before it
        was begun so."""
        if self.fused:
            if self.act is F.silu and self.fc_gate.bias is None:
                h = self.fc_gate.quant_method.silu_and_mul_matmul(self.fc_gate, x, self.act_quant)
                if h is not None:  # the matmul with the activation as its epilogue (the int4 and e4m3 GEMVs)
                    return self._project(h, add_norm)
            fc_gate = self.fc_gate(x)  # (x may be fc_gate's FP8 input, Fp8Rows: no tensor checks on it)
            if self.act is F.silu and fc_gate.is_cuda and triton_available():
                # one Triton launch for act(fc) * gate (and its quantization for an FP8 proj)
                return self._project(silu_and_mul(fc_gate, self.act_quant), add_norm)
            fc, gate = fc_gate.chunk(2, dim=-1)
        else:
            fc, gate = self.fc(x), self.gate(x)
        h = self.act(fc) * gate
        return self._project(h if self.act_quant is None else self.act_quant.quantize(h.reshape(-1, h.shape[-1])),
                             add_norm)

    def _project(self, h, add_norm: tuple | None):
        """proj(h), or with add_norm (residual, norm) RowLinear.matmul_then_norm's."""
        return self.proj(h) if add_norm is None else self.proj.matmul_then_norm(h, *add_norm)


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
