"""Attention over the paged KV cache for one step of the batch.

Each layer first writes the step's new keys and values into their cache slots, for every sequence,
and only then attends: so a sequence that reuses a prefix block another sequence fills in this same
step reads it after it is written. A step of decode tokens only runs one paged-decode call over the
whole batch; new prompts run one varlen causal prefill; anything else (a prefill that continues a
cached prefix, soft-capped scores) gathers each sequence's keys and attends per sequence. On CUDA the
Triton kernels run, elsewhere their torch references.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.kernels import triton_available
from kiln.kernels.paged_attention import (paged_decode_attention, paged_decode_attention_ref,
                                          varlen_prefill_attention, varlen_prefill_attention_ref)
from kiln.runtime.kv_cache import PagedKVCache


@dataclass
class PagedAttentionBatch:
    query_lens: list[int]
    context_lens: list[int]  # tokens of each sequence already in the cache before this step
    kv: PagedKVCache
    slot_mapping: torch.Tensor  # [tokens] flat cache slot of each new token
    block_tables: torch.Tensor  # [batch, max_blocks] int32
    seq_lens: torch.Tensor  # [batch] int32: context + new tokens
    cu_seqlens: torch.Tensor  # [batch + 1] int32: where each sequence's new tokens start

    @property
    def max_seq_len(self) -> int:
        return max(c + q for c, q in zip(self.context_lens, self.query_lens))

    @property
    def decode_only(self) -> bool:
        return max(self.query_lens) == 1

    @property
    def fresh_prefill(self) -> bool:
        return max(self.context_lens) == 0

    def attend(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.kv.k[layer.layer_idx], self.kv.v[layer.layer_idx]
        k_flat, v_flat = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
        k_flat.index_copy_(0, self.slot_mapping, k)
        v_flat.index_copy_(0, self.slot_mapping, v)
        fast = q.is_cuda and triton_available()
        if layer.softcap is None and self.decode_only:
            decode = paged_decode_attention if fast else paged_decode_attention_ref
            return decode(q, k_cache, v_cache, self.block_tables, self.seq_lens, layer.scale, layer.sliding_window)
        if layer.softcap is None and self.fresh_prefill:
            prefill = varlen_prefill_attention if fast else varlen_prefill_attention_ref
            return prefill(q, k, v, self.cu_seqlens, max(self.query_lens), layer.scale, layer.sliding_window)
        return self._attend_each(layer, q, k_flat, v_flat)

    def _attend_each(self, layer, q, k_flat, v_flat) -> torch.Tensor:
        out = torch.empty_like(q)
        block_size = self.kv.block_size
        offsets = torch.arange(block_size, device=q.device)
        start = 0
        for i, (n, ctx) in enumerate(zip(self.query_lens, self.context_lens)):
            blocks = self.block_tables[i, : -(-(ctx + n) // block_size)].long()
            slots = (blocks[:, None] * block_size + offsets).flatten()[: ctx + n]
            out[start:start + n] = layer.attend_dense(q[start:start + n], k_flat[slots], v_flat[slots], ctx)
            start += n
        return out
