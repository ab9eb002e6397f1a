"""The gated MLP of Llama-family models: proj(act(fc(x)) * gate(x)).

Names follow TensorRT-LLM: `fc` is the source's gate_proj, `gate` its up_proj. Engines fuse fc and
gate into one column-parallel `fc_gate` matmul (the runtime layout); checkpoints keep them apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.layers.linear import ColumnLinear, RowLinear
from kiln.mapping import Mapping

ACTIVATIONS = {"silu": F.silu}


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            fc, gate = self.fc_gate(x).chunk(2, dim=-1)
        else:
            fc, gate = self.fc(x), self.gate(x)
        return self.proj(self.act(fc) * gate)
