"""Multi-head attention with GQA, rotary positions (maybe partial), an optional sliding window, q/k norms
and score soft-capping; each layer reads its own window and rotary base from the config.

The model sees one flat stream of tokens; an `AttentionBatch`, passed explicitly from layer to layer,
says how the stream splits into sequences and where each one's cached keys and values live. This is
the reference path (plain PyTorch, any device); fast kernels take the same inputs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln.kernels import triton_available
from kiln.kernels.fp8_quant import Fp8Rows
from kiln.kernels.input_quant import InputQuant
from kiln.kernels.paged_attention import softmax_with_sinks
from kiln.kernels.rotary import HeadNorms, apply_rotary, apply_rotary_and_write_cache
from kiln.layers.linear import QKVLinear, RowLinear
from kiln.layers.normalization import PerHeadLayerNorm, RMSNorm, ShardedRMSNorm, make_norm
from kiln.layers.rotary import apply_rope, attention_factor, inv_freq, rope_cos_sin
from kiln.mapping import Mapping, kv_heads_per_rank, shard_column, shard_kv_heads
from kiln.quantization.kv_cache import SCALE_NAME, fake_quantize, kv_format


@dataclass
class AttentionBatch:
    """Whole sequences with no cache, packed back to back (the reference forward, `model(input_ids)`).

    The runtime passes a PagedAttentionBatch (kiln.runtime.paged_batch) instead: anything with
    query_lens, `cache_slots(layer)`, `attend(layer, q, k, v, kv_written)` and `last_token_rows(device)` can
    stand here.
    """

    query_lens: list[int]

    @property
    def max_seq_len(self) -> int:
        return max(self.query_lens)

    def cache_slots(self, layer) -> None:
        """No cache to write (the paged batch returns where the new keys and values go)."""
        return None

    def last_token_rows(self, device: torch.device) -> torch.Tensor:
        """Index of each sequence's last token in the flat token stream."""
        return torch.tensor(self.query_lens, device=device).cumsum(0) - 1

    @classmethod
    def uncached(cls, batch: int, seq_len: int) -> "AttentionBatch":
        return cls([seq_len] * batch)

    def attend(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_written: bool = False):
        if layer.kv_cache_dtype is not None:  # what the runtime reads back from its quantized cache
            s = layer.kv_cache_scaling_factor
            k, v = fake_quantize(k, s[0], layer.kv_cache_dtype), fake_quantize(v, s[1], layer.kv_cache_dtype)
        out = torch.empty_like(q)
        start = 0
        for n in self.query_lens:
            out[start:start + n] = layer.attend_dense(q[start:start + n], k[start:start + n], v[start:start + n], 0)
            start += n
        return out


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int, mapping: Mapping):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_size = config.head_size
        self.qkv = QKVLinear(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                             config.head_size, config.attention_bias or config.qkv_bias, mapping)
        self.dense = RowLinear(config.num_attention_heads * config.head_size, config.hidden_size,
                               config.attention_bias, mapping)
        # dense's quantized input (kiln.kernels.input_quant), set at engine load (DecoderLayer.fuse_input_quantization):
        # decode attention may then return it (Fp8Rows) instead of its 16-bit output.
        self.out_quant: InputQuant | None = None
        if config.qk_norm_full_width:
            self.q_norm, self.k_norm = full_width_qk_norms(config, mapping)
        elif config.qk_norm_per_head_weight:
            self.q_norm, self.k_norm = per_head_qk_norms(config, mapping)
        elif config.qk_norm:
            self.q_norm, self.k_norm = make_norm(config, config.head_size), make_norm(config, config.head_size)
        self.qk_norm = config.qk_norm
        sliding = config.is_sliding_layer(layer_idx)
        self.sliding_window = config.sliding_window if sliding else None
        self.scale = (config.query_pre_attn_scalar or config.head_size) ** -0.5
        self.softcap = config.attn_logit_softcapping
        # gpt-oss: a learned logit per query head that joins each softmax's denominator (softmax_with_sinks)
        self.register_parameter("sinks", nn.Parameter(torch.empty(config.num_attention_heads // mapping.tp_size),
                                                      requires_grad=False) if config.attention_sinks else None)
        self.shard_rules = {"sinks": shard_column}
        add_kv_cache_scales(self, config)
        self.rope = None
        if config.position_embedding_type == "rope_gpt_neox" and layer_idx not in config.nope_layers:
            local = sliding and config.rotary_base_local is not None  # Gemma 3's local layers: own base, unscaled
            scaling = None if local else config.rotary_scaling
            self.rope = (config.rotary_base_local if local else config.rotary_base,
                         config.rotary_dim or config.head_size, scaling, config.max_position_embeddings)
            # yarn and longrope multiply cos and sin by an attention factor f. Where rotary covers the whole head,
            # that is q.k times f^2: the softmax scale takes it, and the rotation is the plain one, which the fused
            # GPU kernels do. A partial rotary keeps f in cos and sin (the unrotated dims are not scaled).
            self.fused_rope = self.rope[1] == config.head_size
            self.rope_factor = attention_factor(scaling)
            if self.fused_rope:
                self.scale *= self.rope_factor ** 2
                self.rope_factor = 1.0
            self._freqs = None

    def forward(self, x, positions: torch.Tensor, batch: AttentionBatch, add_norm: tuple | None = None):
        """The attention's output; with add_norm (residual, norm), that output added to the residual with the norm
        begun where dense's kernel can (RowLinear.matmul_then_norm). x: the input, a PendingNorm where the norm
        before it was begun so."""
        # (positions, not x, give the device: x may be an FP8 linear's Fp8Rows)
        fused_rope = self.rope is not None and self.fused_rope and positions.is_cuda and triton_available()
        freqs = None if self.rope is None else self._inv_freq(batch.max_seq_len, positions.device)
        cache = batch.cache_slots(self) if fused_rope else None  # (k_cache, v_cache, slots, kv_scale), or None
        if cache is not None and not self.qk_norm and self.qkv.bias is None:  # nothing between qkv and rotary
            qkv = self.qkv.quant_method.rotary_qkv_matmul(self.qkv, x, positions, freqs, cache)
            if qkv is not None:  # one kernel projected, rotated and wrote the cache (the int4 GEMV at 1-2 rows)
                q, k, v = self.qkv.split_heads(qkv)
                return self._project(_heads_joined(batch.attend(self, q, k, v, kv_written=True)), add_norm)
        q, k, v = self.qkv.split_heads(self.qkv(x))
        norms = self._head_norms() if fused_rope else None  # (the rotary launch norms the heads as it loads them)
        if self.qk_norm and norms is None:
            q, k = self.q_norm(q), self.k_norm(k)
        kv_written = cache is not None
        if fused_rope and cache is None:
            q, k = apply_rotary(q, k, positions, freqs, norms)  # one Triton launch, in place
        elif fused_rope:  # the same launch also writes k and v into the paged cache
            q, k = apply_rotary_and_write_cache(q, k, v, positions, freqs, *cache, norms=norms)
        elif self.rope is not None:
            cos, sin = rope_cos_sin(positions, freqs, q.dtype, self.rope_factor)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self._project(_heads_joined(batch.attend(self, q, k, v, kv_written)), add_norm)

    def _project(self, out: torch.Tensor, add_norm: tuple | None):
        """dense(out), or with add_norm (residual, norm) RowLinear.matmul_then_norm's."""
        return self.dense(out) if add_norm is None else self.dense.matmul_then_norm(out, *add_norm)

    def _head_norms(self) -> HeadNorms | None:
        """q_norm and k_norm as the rotary kernel applies them, where they are RMSNorms over each head."""
        if not self.qk_norm or not isinstance(self.q_norm, RMSNorm):
            return None
        return HeadNorms(self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.q_norm.unit_offset)

    def _inv_freq(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """The rotary frequencies on `device`; kept when they do not depend on the length (no host work
        and no copy per layer and step)."""
        scaling = self.rope[2]
        if scaling and scaling["type"] in ("dynamic", "longrope"):
            return inv_freq(*self.rope, seq_len=seq_len).to(device)
        if self._freqs is None or self._freqs.device != device:
            self._freqs = inv_freq(*self.rope, seq_len=seq_len).to(device)
        return self._freqs

    def attend_dense(self, q, k, v, context_len: int) -> torch.Tensor:
        """q: [n, h, d] at positions context_len..context_len+n-1; k, v: [context_len + n, kv, d]."""
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        q_pos = torch.arange(context_len, context_len + q.shape[0], device=q.device)[:, None]
        k_pos = torch.arange(k.shape[0], device=q.device)[None, :]
        mask = k_pos <= q_pos
        if self.sliding_window is not None:
            mask &= q_pos - k_pos < self.sliding_window
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if self.softcap is None and self.sinks is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale).transpose(0, 1)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap  # Gemma 2's attention soft-capping
        probs = softmax_with_sinks(scores.float().masked_fill(~mask, float("-inf")), self.sinks).to(q.dtype)
        return (probs @ v).transpose(0, 1)


def full_width_qk_norms(config, mapping: Mapping) -> tuple[ShardedRMSNorm, ShardedRMSNorm]:
    """OLMo 2's q_norm and k_norm, each over all of a token's query (key) heads, on this rank's heads."""
    d, tp, kv = config.head_size, mapping.tp_size, config.num_key_value_heads
    q = ShardedRMSNorm(config.num_attention_heads // tp, d, config.norm_epsilon, mapping, shard_column)
    k = ShardedRMSNorm(kv_heads_per_rank(kv, tp), d, config.norm_epsilon, mapping,
                       functools.partial(shard_kv_heads, num_kv_heads=kv, head_size=d))
    return q, k


def per_head_qk_norms(config, mapping: Mapping) -> tuple[PerHeadLayerNorm, PerHeadLayerNorm]:
    """Command R+'s q_norm and k_norm, a weight per head, on this rank's query (key) heads."""
    d, tp, kv = config.head_size, mapping.tp_size, config.num_key_value_heads
    q = PerHeadLayerNorm(config.num_attention_heads // tp, d, config.norm_epsilon, shard_column)
    k = PerHeadLayerNorm(kv_heads_per_rank(kv, tp), d, config.norm_epsilon,
                         functools.partial(shard_kv_heads, num_kv_heads=kv, head_size=1))  # (rows are heads)
    return q, k


def add_kv_cache_scales(attention: nn.Module, config) -> None:
    """A quantized KV cache's code dtype (`kv_cache_dtype`) and its scales [s_k, s_v] (`kv_cache_scaling_factor`,
    kiln.quantization.kv_cache) on an attention module; None for a cache in the model dtype."""
    kv_algo = config.quantization.kv_cache_quant_algo
    attention.kv_cache_dtype = None if kv_algo is None else kv_format(kv_algo).dtype
    attention.register_parameter(SCALE_NAME, None if kv_algo is None else
                                 nn.Parameter(torch.ones(2), requires_grad=False))


def _heads_joined(out: torch.Tensor | Fp8Rows) -> torch.Tensor | Fp8Rows:
    """Attention's output [tokens, heads, d] as the output projection's input [tokens, heads x d] (Fp8Rows, the
    projection's e4m3 input, come joined already)."""
    return out if isinstance(out, Fp8Rows) else out.flatten(-2)
