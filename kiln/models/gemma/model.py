"""Gemma, Gemma 2 and Gemma 3 (text): the generic decoder with Gemma's switches.

All: embeddings scaled by sqrt(hidden_size), RMSNorm scaling by (1 + w), GELU-tanh gated MLP, tied lm_head.
Gemma 2 adds norms on the attention and MLP outputs (sandwich), query_pre_attn_scalar, attention and final
logit soft-capping, and alternating sliding-window / global layers; Gemma 3 drops the soft-capping, adds q/k
norms and gives the sliding layers their own rotary base. All three also convert from GGUF (gguf.py).
"""

from __future__ import annotations

from pathlib import Path

from kiln.checkpoint.name_map import NameMap
from kiln.config import QuantConfig
from kiln.mapping import Mapping
from kiln.models import hf_config
from kiln.models.base import DecoderModelForCausalLM, refuse_quantization
from kiln.models.gemma import gguf as gemma_gguf
from kiln.models.llama.convert import L, hf_table
from kiln.models.llama.gguf import from_gguf_as_hf

HF = "model.layers.{i}."


def _layer_types(hf: dict, gemma3: bool) -> tuple[str, ...]:
    """transformers 5 writes layer_types; 4.x configs imply them (Gemma 2: even layers slide; Gemma 3:
    every sliding_window_pattern-th layer is global)."""
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    pattern = hf.get("sliding_window_pattern", 6) if gemma3 else 2
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(hf["num_hidden_layers"]))


def gemma_structure(hf: dict) -> dict:
    arch = hf["architectures"][0]
    gemma2, gemma3 = arch == "Gemma2ForCausalLM", arch == "Gemma3ForCausalLM"
    fields = dict(norm_unit_offset=True, embedding_multiplier=hf["hidden_size"] ** 0.5,
                  hidden_act=hf_config.activation(hf.get("hidden_activation") or "gelu_pytorch_tanh", "config"),
                  tie_word_embeddings=hf.get("tie_word_embeddings", True))
    if gemma2 or gemma3:
        _, local = hf_config.rope_parameters(hf)
        fields.update(sandwich_norm=True, query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
                      attn_logit_softcapping=hf.get("attn_logit_softcapping"),
                      final_logit_softcapping=hf.get("final_logit_softcapping"),
                      sliding_window=hf.get("sliding_window"), layer_types=_layer_types(hf, gemma3),
                      qk_norm=gemma3, rotary_base_local=local["rope_theta"] if gemma3 and local else None)
    return fields


class GemmaForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
    HF_STRUCTURE = staticmethod(gemma_structure)

    @classmethod
    def hf_name_map(cls, config):
        table = {**hf_table(config.tie_word_embeddings),
                 L + "attention.q_norm.weight": HF + "self_attn.q_norm.weight",
                 L + "attention.k_norm.weight": HF + "self_attn.k_norm.weight"}
        if config.sandwich_norm:  # HF's post_attention_layernorm is on the attention output here
            table.update({L + "post_layernorm.weight": HF + "pre_feedforward_layernorm.weight",
                          L + "attention_out_layernorm.weight": HF + "post_attention_layernorm.weight",
                          L + "mlp_out_layernorm.weight": HF + "post_feedforward_layernorm.weight"})
        return NameMap(table)

    @classmethod
    def from_gguf(cls, path: str | Path, dtype: str = "auto", mapping: Mapping | None = None,
                  quant_config: QuantConfig | None = None, keep_quantization: bool = False) -> "GemmaForCausalLM":
        """Gemma, Gemma 2 and Gemma 3 from llama.cpp's GGUF: quantized tensors dequantized to float32 on read, or with
        keep_quantization the 4-bit linears kept as W4A16 (kiln.quantization.gguf_import)."""
        refuse_quantization(quant_config)
        return from_gguf_as_hf(cls, path, dtype, mapping, keep_quantization, gemma_gguf.GEMMA_GGUF_ARCHITECTURES,
                               gemma_gguf.hf_config_from_gguf, gemma_gguf.gguf_name_map, gemma_gguf.CHAT_TEMPLATE)
