"""Hugging Face's SmolLM3 (SmolLM3ForCausalLM): the Llama structure with no rotary in some layers ("NoPE": every
fourth layer in SmolLM3-3B), whose attention sees no positions at all. `no_rope_layers` lists a flag per layer, 1
where the layer rotates; configs without it mean every `no_rope_layer_interval`-th layer goes without.
"""

from __future__ import annotations

from kiln.models import hf_config
from kiln.models.base import DecoderModelForCausalLM
from kiln.models.llama import convert


def nope_layers(hf: dict) -> tuple[int, ...]:
    layers = hf["num_hidden_layers"]
    flags = hf.get("no_rope_layers") or [int((i + 1) % hf.get("no_rope_layer_interval", 4) != 0)
                                         for i in range(layers)]
    return tuple(i for i, rotates in enumerate(flags) if not rotates)


def smollm3_structure(hf: dict) -> dict:
    return dict(nope_layers=nope_layers(hf), **hf_config.sliding_fields(hf))


class SmolLM3ForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("SmolLM3ForCausalLM",)
    HF_STRUCTURE = staticmethod(smollm3_structure)

    @classmethod
    def hf_name_map(cls, config):
        return convert.hf_name_map(config.tie_word_embeddings)
