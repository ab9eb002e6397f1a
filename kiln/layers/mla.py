"""Multi-head latent attention (DeepSeek-V2/V3, Kimi K2): keys and values come from one small latent a token.

x -> kv_a: a latent c of kv_lora_rank (normed) and one rotary key k_pe that all heads share; kv_b expands c into
each head's k_nope and v. q comes from x directly (q_proj) or through a low-rank bottleneck (q_a, norm, q_b), each
head's [q_nope | q_pe]. A head's key is [k_nope | rotated k_pe], its query [q_nope | rotated q_pe].

This first form caches what it expands: each head's key (head_size = nope + rope wide) and its value, padded with
zeros to the key's width, so the paged cache and its kernels serve it as any multi-head attention. It holds
2 x heads x head_size values a token where the latent form would hold kv_lora_rank + rope; caching the latent and
folding kv_b into the query and output ("absorbed" MLA) is the next step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.layers.attention import Attention
from kiln.layers.linear import ColumnLinear, Linear, RowLinear
from kiln.layers.normalization import RMSNorm
from kiln.layers.rotary import apply_rope, attention_factor, rope_cos_sin
from kiln.mapping import Mapping, replicate


class MLAttention(nn.Module):
    def __init__(self, config, layer_idx: int, mapping: Mapping):
        super().__init__()
        self.layer_idx = layer_idx
        heads = config.num_attention_heads // mapping.tp_size
        self.heads, self.head_size = heads, config.head_size
        self.rope_dim, self.v_dim = config.mla_rope_head_dim, config.mla_v_head_dim
        self.nope_dim = config.head_size - self.rope_dim
        h, lora = config.hidden_size, config.mla_kv_lora_rank
        if config.mla_q_lora_rank:
            self.q_a = Linear(h, config.mla_q_lora_rank, config.attention_bias, replicate, replicate)
            self.q_a_norm = RMSNorm(config.mla_q_lora_rank, config.norm_epsilon)
            self.q_b = ColumnLinear(config.mla_q_lora_rank, config.num_attention_heads * config.head_size, False,
                                    mapping)
        else:
            self.q = ColumnLinear(h, config.num_attention_heads * config.head_size, False, mapping)
        self.kv_a = Linear(h, lora + self.rope_dim, config.attention_bias, replicate, replicate)
        self.kv_a_norm = RMSNorm(lora, config.norm_epsilon)
        self.kv_b = ColumnLinear(lora, config.num_attention_heads * (self.nope_dim + self.v_dim), False, mapping)
        self.dense = RowLinear(config.num_attention_heads * self.v_dim, h, config.attention_bias, mapping)
        self.interleaved = config.mla_rope_interleave
        # what the paged batch reads of an attention layer (kiln.runtime.paged_batch)
        self.scale = (config.query_pre_attn_scalar or config.head_size) ** -0.5
        self.sliding_window = self.softcap = self.out_quant = None
        self.kv_cache_dtype = self.kv_cache_scaling_factor = None
        self.rope = (config.rotary_base, self.rope_dim, config.rotary_scaling, config.max_position_embeddings)
        self.rope_factor = attention_factor(config.rotary_scaling)
        self._freqs = None
        self.kv_lora = lora

    # Attention's own, over the attributes above: scale, sliding_window and softcap; rope and _freqs
    attend_dense = Attention.attend_dense
    _inv_freq = Attention._inv_freq

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_b(self.q_a_norm(self.q_a(x))) if hasattr(self, "q_a") else self.q(x)
        q_nope, q_pe = q.view(tokens, self.heads, self.head_size).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a(x).split([self.kv_lora, self.rope_dim], dim=-1)
        k_nope, v = self.kv_b(self.kv_a_norm(latent)).view(tokens, self.heads, -1).split(
            [self.nope_dim, self.v_dim], dim=-1)
        cos, sin = rope_cos_sin(positions, self._inv_freq(batch.max_seq_len, positions.device), x.dtype,
                                self.rope_factor)
        q_pe, k_pe = (apply_rope(self._half_layout(t), cos, sin) for t in (q_pe, k_pe[:, None, :]))
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(tokens, self.heads, self.rope_dim)], dim=-1)
        v = F.pad(v, (0, self.head_size - self.v_dim))  # (the cache holds keys' widths)
        out = batch.attend(self, q, k, v)[..., :self.v_dim]
        return self.dense(out.reshape(tokens, self.heads * self.v_dim))

    def _half_layout(self, x: torch.Tensor) -> torch.Tensor:
        """DeepSeek's rotary pairs are interleaved, (x0, x1), (x2, x3), ...: as the rotate-half layout apply_rope
        rotates (the dot products of q and k do not change when both are reordered alike)."""
        if not self.interleaved:
            return x
        return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
