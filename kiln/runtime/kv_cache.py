"""A dense per-sequence KV cache for the reference path (the GPU runtime pages it in blocks)."""

from __future__ import annotations

import torch


class DenseKVCache:
    """Keys and values of one sequence for the layers this rank runs, each [max_len, kv_heads, head_size]."""

    def __init__(self, layers, max_len: int, num_kv_heads: int, head_size: int, dtype, device):
        shape = (max_len, num_kv_heads, head_size)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.max_len = max_len

    def append(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v at positions start.. and return all keys and values up to the new end."""
        end = start + k.shape[0]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} tokens cannot hold position {end - 1}")
        self.k[layer][start:end] = k
        self.v[layer][start:end] = v
        return self.k[layer][:end], self.v[layer][:end]
