"""Runs one step of the model over a batch of sequences: one flat token stream, each sequence's last
logits sampled. Every sequence owns a dense KV cache sized for its own max_len (reference path)."""

from __future__ import annotations

import torch

from kiln.layers.attention import AttentionBatch
from kiln.mapping import kv_heads_per_rank
from kiln.runtime.kv_cache import DenseKVCache
from kiln.runtime.sampler import sample_token
from kiln.runtime.sequence import Sequence


class Executor:
    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        config = model.config
        self.cache_shape = dict(layers=config.mapping.pp_layers(config.num_hidden_layers),
                                num_kv_heads=kv_heads_per_rank(config.num_key_value_heads, config.mapping.tp_size),
                                head_size=config.head_size, dtype=config.torch_dtype, device=device)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> list[int]:
        """Feed each sequence its pending tokens; return the token sampled for each."""
        ids, positions, query_lens = [], [], []
        for seq in seqs:
            if seq.kv_cache is None:
                seq.kv_cache = DenseKVCache(max_len=seq.max_len, **self.cache_shape)
            pending = seq.pending_ids()
            ids += pending
            positions += range(seq.num_cached, seq.num_cached + len(pending))
            query_lens.append(len(pending))
        batch = AttentionBatch(query_lens, [s.num_cached for s in seqs], [s.kv_cache for s in seqs])
        logits = self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                            batch, last_token_only=True)
        tokens = []
        for seq, n, row in zip(seqs, query_lens, logits):
            seq.num_cached += n
            tokens.append(sample_token(row, seq.params, seq.all_ids, seq.generator))
        return tokens
