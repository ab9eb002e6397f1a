"""ModelRunner: one rank's model shard and KV caches; runs the forward of one scheduled step.

The step's inputs are plain data (`StepInputs`), so the same step runs in-process, or is broadcast
from rank 0 to every rank of a tensor/pipeline-parallel group. With pipeline parallelism each stage
receives the previous stage's hidden states and sends its own on; the last stage's first
tensor-parallel rank hands the logits to rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from kiln.layers.attention import AttentionBatch
from kiln.mapping import kv_heads_per_rank
from kiln.runtime.kv_cache import DenseKVCache


@dataclass
class StepInputs:
    """One step of the batch: each sequence's new tokens, flattened."""

    seq_ids: list[int]
    token_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    context_lens: list[int]
    cache_lens: list[int]  # the KV cache size of each sequence, allocated when first seen
    free_ids: list[int] = field(default_factory=list)  # sequences whose caches to drop first


class ModelRunner:
    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = torch.device(device)
        config = model.config
        self.mapping = config.mapping
        self.hidden_size = config.hidden_size
        self.dtype = config.torch_dtype
        self.caches: dict[int, DenseKVCache] = {}
        self.cache_shape = dict(layers=self.mapping.pp_layers(config.num_hidden_layers),
                                num_kv_heads=kv_heads_per_rank(config.num_key_value_heads, self.mapping.tp_size),
                                head_size=config.head_size, dtype=self.dtype, device=self.device)

    def free(self, seq_ids) -> None:
        for seq_id in seq_ids:
            self.caches.pop(seq_id, None)

    def num_cached_sequences(self) -> int:
        return len(self.caches)

    @torch.inference_mode()
    def execute(self, inp: StepInputs) -> torch.Tensor | None:
        """Run this rank's part of the step. Returns the last-token logits [batch, vocab] on the rank
        that produced them (the last stage), None elsewhere."""
        self.free(inp.free_ids)
        for seq_id, size in zip(inp.seq_ids, inp.cache_lens):
            if seq_id not in self.caches:
                self.caches[seq_id] = DenseKVCache(max_len=size, **self.cache_shape)
        batch = AttentionBatch(inp.query_lens, inp.context_lens, [self.caches[i] for i in inp.seq_ids])
        tokens = torch.tensor(inp.token_ids, device=self.device)
        positions = torch.tensor(inp.positions, device=self.device)
        hidden = None
        m = self.mapping
        if not m.is_first_pp_rank:
            hidden = torch.empty(len(inp.token_ids), self.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(hidden, src=m.rank - m.tp_size)
        out = self.model(None if hidden is not None else tokens, positions, batch, hidden_states=hidden,
                         last_token_only=True)
        if not m.is_last_pp_rank:
            dist.send(out.contiguous(), dst=m.rank + m.tp_size)
            return None
        return out
