"""LG's EXAONE 4.0 (Exaone4ForCausalLM): normed after each sub-block as OLMo 2 is (`post_attention_layernorm`,
`post_feedforward_layernorm`; no pre-norms), q/k RMSNorms over each head (Qwen3's), and in the hybrid models a
sliding window in three layers of four whose fourth, global layer uses no rotary (Cohere's Command R7B layout).
"""

from __future__ import annotations

from kiln.models import hf_config
from kiln.models.base import DecoderModelForCausalLM
from kiln.models.olmo.model import post_norm_name_map


def exaone4_structure(hf: dict) -> dict:
    fields = dict(pre_norm=False, sandwich_norm=True, qk_norm=True, **hf_config.sliding_fields(hf))
    if fields["sliding_window"] and fields["layer_types"]:  # the hybrid models: global layers without rotary
        fields["nope_layers"] = hf_config.global_layers(fields["layer_types"])
    return fields


class Exaone4ForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("Exaone4ForCausalLM",)
    HF_STRUCTURE = staticmethod(exaone4_structure)

    @classmethod
    def hf_name_map(cls, config):
        return post_norm_name_map(config.tie_word_embeddings)
