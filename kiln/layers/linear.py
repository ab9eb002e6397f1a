"""Tensor-parallel linear layers. Each knows which slice of the full weight it owns (`shard_rules`),
so model files only declare structure and never compute offsets."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from kiln.mapping import Mapping, kv_heads_per_rank, replicate, shard_column, shard_qkv, shard_row
from kiln.runtime.distributed import all_reduce


class Linear(nn.Module):
    """y = x W^T + b over this rank's shard; `shard_rules` maps each parameter to its shard function."""

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_rule, bias_rule):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.shard_rules = {"weight": weight_rule, "bias": bias_rule}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnLinear(Linear):
    """Output features split across tensor-parallel ranks; each rank returns its slice of y."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mapping: Mapping):
        super().__init__(in_features, out_features // mapping.tp_size, bias, shard_column, shard_column)


class RowLinear(Linear):
    """Input features split across ranks; the partial sums are all-reduced, then the whole bias is added."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mapping: Mapping):
        super().__init__(in_features // mapping.tp_size, out_features, bias, shard_row, replicate)
        self.mapping = mapping

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(F.linear(x, self.weight), self.mapping)
        return y if self.bias is None else y + self.bias


class QKVLinear(Linear):
    """The fused [q; k; v] projection, split by heads; KV heads are replicated when tp_size exceeds them."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_size: int, bias: bool,
                 mapping: Mapping):
        self.num_heads = num_heads // mapping.tp_size
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, mapping.tp_size)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_size
        rule = functools.partial(shard_qkv, num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size)
        super().__init__(hidden_size, out, bias, rule, rule)
        self.head_size = head_size

    def split_heads(self, qkv: torch.Tensor):
        """[tokens, (h + 2 kv) * d] -> q [tokens, h, d], k and v [tokens, kv, d]."""
        d = self.head_size
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        return q.unflatten(-1, (-1, d)), k.unflatten(-1, (-1, d)), v.unflatten(-1, (-1, d))
