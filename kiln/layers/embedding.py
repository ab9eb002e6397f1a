"""Vocab-parallel embedding and lm_head: each tensor-parallel rank holds a slice of the (padded) vocab.

LMHead is a Linear (column-parallel over the padded vocab), so it holds its weight through a LinearMethod like
every other linear: full precision by default, quantized when the QuantConfig does not exclude "lm_head"
(kiln.quantization.methods.LM_HEAD_METHODS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.layers.linear import Linear
from kiln.mapping import Mapping, padded_vocab_size, shard_vocab
from kiln.runtime.distributed import all_gather_last_dim, all_reduce


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, mapping: Mapping):
        super().__init__()
        self.mapping = mapping
        self.rows = padded_vocab_size(vocab_size, mapping.tp_size) // mapping.tp_size
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)
        self.shard_rules = {"weight": shard_vocab}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.mapping.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        start = self.mapping.tp_rank * self.rows
        local = input_ids - start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return all_reduce(out, self.mapping)


class PositionEmbedding(nn.Module):
    """Learned absolute positions (GPT-2), replicated on every rank."""

    def __init__(self, max_positions: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, hidden_size), requires_grad=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions, self.weight)


class LMHead(Linear):
    """Logits over the vocab; with tensor parallelism each rank computes its slice and they are gathered.

    Rows are the vocab padded to a multiple of tp_size (`shard_vocab` zero-fills the padding rows of every
    leaf, so a padded row's logit is 0, whatever the method) and sliced away after the gather."""

    def __init__(self, vocab_size: int, hidden_size: int, mapping: Mapping):
        rows = padded_vocab_size(vocab_size, mapping.tp_size) // mapping.tp_size
        super().__init__(hidden_size, rows, False, shard_vocab, shard_vocab)
        self.mapping = mapping
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.matmul(hidden)  # unquantized: cuBLAS, or a GEMV at batch 1 where it measured faster
        if self.mapping.tp_size > 1:
            logits = all_gather_last_dim(logits, self.mapping)
        return logits[..., : self.vocab_size]
