"""Zhipu's GLM-4 dense models (Glm4ForCausalLM: GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1): Llama attention with q/k/v
biases and a partial rotary (half of each head by default) in interleaved pairs, Gemma 2's sandwich norms (each
sub-block's output normed too: `post_self_attn_layernorm`, `post_mlp_layernorm`), and a fused [gate; up] MLP
projection. The rotated part of each q and k head is reordered to the rotate-half layout at conversion, as Meta's
rows are; the rest of the head stays.
"""

from __future__ import annotations

from kiln.checkpoint.name_map import NameMap, Src
from kiln.layers.rotary import interleaved_to_half
from kiln.models.base import DecoderModelForCausalLM
from kiln.models.llama.convert import L, hf_table, qkv_table
from kiln.models.phi3.model import gate_half, up_half

HF = "model.layers.{i}."


def glm4_structure(hf: dict) -> dict:
    return dict(sandwich_norm=True, qkv_bias=hf.get("attention_bias", True), attention_bias=False)


def _rotated_half_layout(heads_of):
    """q (k) rows or biases with each head's first rotary_dim rows reordered from interleaved pairs."""
    def transform(w, config):
        heads, rotary = heads_of(config), config.rotary_dim or config.head_size
        per_head = w.reshape(heads, config.head_size, *w.shape[1:]).clone()
        rotated = interleaved_to_half(per_head[:, :rotary].reshape(heads * rotary, *w.shape[1:]), heads)
        per_head[:, :rotary] = rotated.view(heads, rotary, *w.shape[1:])
        return per_head.reshape(w.shape)
    return transform


_q_rows = _rotated_half_layout(lambda c: c.num_attention_heads)
_k_rows = _rotated_half_layout(lambda c: c.num_key_value_heads)


class Glm4ForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("Glm4ForCausalLM",)
    HF_STRUCTURE = staticmethod(glm4_structure)

    @classmethod
    def hf_name_map(cls, config):
        return NameMap({
            **hf_table(config.tie_word_embeddings),
            **qkv_table(_q_rows, _k_rows),
            L + "attention_out_layernorm.weight": HF + "post_self_attn_layernorm.weight",
            L + "mlp_out_layernorm.weight": HF + "post_mlp_layernorm.weight",
            L + "mlp.fc.weight": Src(HF + "mlp.gate_up_proj.weight", gate_half),
            L + "mlp.gate.weight": Src(HF + "mlp.gate_up_proj.weight", up_half),
        })
