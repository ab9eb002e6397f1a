"""Multi-head latent attention (DeepSeek-V2/V3, Kimi K2): keys and values come from one small latent a token.

x -> kv_a: a latent c of kv_lora_rank (normed) and one rotary key k_pe that all heads share; kv_b expands c into
each head's k_nope = K_h c and v = V_h c. q comes from x directly (q_proj) or through a low-rank bottleneck (q_a,
norm, q_b), each head's [q_nope | q_pe]. A head's key is [k_nope | rotated k_pe], its query [q_nope | rotated q_pe].

The cache holds the latent form alone, [c | rotated k_pe] a token (kv_lora_rank + rope wide, one row for all heads),
with kv_b folded into the query and the output ("absorbed"): q_nope . K_h c = (K_h^T q_nope) . c, so each head's
query becomes [K_h^T q_nope | q_pe] against the one cached row, multi-query attention; and the head's output, a
softmax-weighted sum of c, goes through V_h after attention. The values are the cached rows' first kv_lora_rank
dims: keys and values share one tensor (kiln.config.KVCacheLayout), the rope dims of the attended sum dropped.
DeepSeek-V3's 128 heads of 192-wide keys and 128-wide values would cache 40,960 values a token; this caches 576.
Prompts attend in the same form (more FLOPs than the expanded one, one way for every step).
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.layers.attention import Attention, add_kv_cache_scales
from kiln.layers.linear import ColumnLinear, Linear, RowLinear
from kiln.layers.normalization import RMSNorm
from kiln.layers.rotary import apply_rope, attention_factor, rope_cos_sin
from kiln.mapping import Mapping, replicate, shard_column


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
        # kv_b runs folded into the query and output (_up_projections), never as a matmul of its own: a plain Linear,
        # which quantization leaves in the model dtype as it does q_a and kv_a
        self.kv_b = Linear(lora, heads * (self.nope_dim + self.v_dim), False, shard_column, shard_column)
        self.dense = RowLinear(config.num_attention_heads * self.v_dim, h, config.attention_bias, mapping)
        self.interleaved = config.mla_rope_interleave
        # what the paged batch reads of an attention layer (kiln.runtime.paged_batch)
        self.scale = (config.query_pre_attn_scalar or config.head_size) ** -0.5
        self.sliding_window = self.softcap = self.out_quant = self.sinks = None
        # a quantized cache: the row is the key and the value, so calibration gives it one scale twice
        add_kv_cache_scales(self, config)
        self.rope = (config.rotary_base, self.rope_dim, config.rotary_scaling, config.max_position_embeddings)
        self.rope_factor = attention_factor(config.rotary_scaling)
        self._freqs = None
        self.kv_lora = lora
        self._up = (None, None)  # (kv_b's tensors' identity, the per-head blocks of its weight): _up_projections

    # Attention's own, over the attributes above: scale, sliding_window and softcap; rope and _freqs
    attend_dense = Attention.attend_dense
    _inv_freq = Attention._inv_freq

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_b(self.q_a_norm(self.q_a(x))) if hasattr(self, "q_a") else self.q(x)
        q_nope, q_pe = q.view(tokens, self.heads, self.head_size).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a(x).split([self.kv_lora, self.rope_dim], dim=-1)
        cos, sin = rope_cos_sin(positions, self._inv_freq(batch.max_seq_len, positions.device), x.dtype,
                                self.rope_factor)
        q_pe, k_pe = (apply_rope(self._half_layout(t), cos, sin) for t in (q_pe, k_pe[:, None, :]))
        key_up, value_up = self._up_projections(x.dtype)
        query = torch.cat([torch.einsum("thn,hnl->thl", q_nope, key_up), q_pe], dim=-1)
        row = torch.cat([self.kv_a_norm(latent)[:, None, :], k_pe], dim=-1)  # [tokens, 1, kv_lora + rope]
        attended = batch.attend(self, query, row, row)[..., :self.kv_lora]  # values: the rows' latent dims
        out = torch.einsum("thl,hvl->thv", attended, value_up)
        return self.dense(out.reshape(tokens, self.heads * self.v_dim))

    def _up_projections(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b's weight as each head's key block K_h [heads, nope, kv_lora] and value block V_h [heads, v,
        kv_lora], made once and again only when kv_b's tensors change (a load writes them in place)."""
        identity = tuple((t.data_ptr(), t._version) for t in self.kv_b.parameters()) + (dtype,)
        if self._up[0] != identity:
            blocks = self.kv_b.dense_weight(dtype).view(self.heads, self.nope_dim + self.v_dim, self.kv_lora)
            key_up, value_up = blocks.split([self.nope_dim, self.v_dim], dim=1)
            self._up = (identity, (key_up.contiguous(), value_up.contiguous()))
        return self._up[1]

    def _half_layout(self, x: torch.Tensor) -> torch.Tensor:
        """DeepSeek's rotary pairs are interleaved, (x0, x1), (x2, x3), ...: as the rotate-half layout apply_rope
        rotates (the dot products of q and k do not change when both are reordered alike)."""
        if not self.interleaved:
            return x
        return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
