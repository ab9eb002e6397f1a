"""Phi-3 / Phi-3.5: the Llama structure with fused source projections, and longrope scaling.

The source's `qkv_proj` is already kiln's [q; k; v]; its `gate_up_proj` is [gate; up], split here into
kiln's fc (gate) and gate (up) so checkpoints and shard rules stay those of every gated MLP. Also converts from
GGUF (gguf.py).
"""

from __future__ import annotations

from pathlib import Path

from kiln.checkpoint.name_map import NameMap, Src
from kiln.config import QuantConfig
from kiln.mapping import Mapping
from kiln.models.base import DecoderModelForCausalLM, refuse_quantization
from kiln.models.llama.convert import L
from kiln.models.llama.gguf import from_gguf_as_hf

HF = "model.layers.{i}."


def gate_half(tensor, config):
    """[gate; up] -> gate (kiln's fc)."""
    return tensor.chunk(2, dim=0)[0]


def up_half(tensor, config):
    """[gate; up] -> up (kiln's gate)."""
    return tensor.chunk(2, dim=0)[1]


def phi3_structure(hf: dict) -> dict:
    return dict(sliding_window=hf.get("sliding_window") or None)


class Phi3ForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("Phi3ForCausalLM",)
    HF_STRUCTURE = staticmethod(phi3_structure)

    @classmethod
    def hf_name_map(cls, config):
        return NameMap({
            "transformer.vocab_embedding.weight": "model.embed_tokens.weight",
            "transformer.ln_f.weight": "model.norm.weight",
            "lm_head.weight": "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight",
            L + "input_layernorm.weight": HF + "input_layernorm.weight",
            L + "post_layernorm.weight": HF + "post_attention_layernorm.weight",
            L + "attention.qkv.weight": HF + "self_attn.qkv_proj.weight",
            L + "attention.dense.weight": HF + "self_attn.o_proj.weight",
            L + "mlp.fc.weight": Src(HF + "mlp.gate_up_proj.weight", gate_half),
            L + "mlp.gate.weight": Src(HF + "mlp.gate_up_proj.weight", up_half),
            L + "mlp.proj.weight": HF + "mlp.down_proj.weight",
        })

    @classmethod
    def from_gguf(cls, path: str | Path, dtype: str = "auto", mapping: Mapping | None = None,
                  quant_config: QuantConfig | None = None, keep_quantization: bool = False) -> "Phi3ForCausalLM":
        """Phi-3 / Phi-3.5 from llama.cpp's GGUF: quantized tensors dequantized to float32 on read, or with
        keep_quantization the 4-bit linears kept as W4A16 (kiln.quantization.gguf_import)."""
        from kiln.models.phi3 import gguf as phi3_gguf

        refuse_quantization(quant_config)
        return from_gguf_as_hf(cls, path, dtype, mapping, keep_quantization, ("phi3",),
                               phi3_gguf.hf_config_from_gguf, phi3_gguf.gguf_name_map)
