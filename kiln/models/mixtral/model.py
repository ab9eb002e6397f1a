"""Mixtral: Mistral attention with a sparse MoE block (softmax router, top-k renormalised to sum to 1).

Source names: `block_sparse_moe.gate` (the router) and `block_sparse_moe.experts.{e}.w1/w3/w2`
(kiln's fc/gate/proj, stacked over experts).
"""

from __future__ import annotations

from kiln.checkpoint.name_map import NameMap
from kiln.models.base import DecoderModelForCausalLM
from kiln.models.llama.convert import hf_table
from kiln.models.qwen.convert import moe_table


def mixtral_structure(hf: dict) -> dict:
    return dict(sliding_window=hf.get("sliding_window") or None, moe_num_experts=hf["num_local_experts"],
                moe_top_k=hf["num_experts_per_tok"], moe_intermediate_size=hf["intermediate_size"],
                moe_normalize_topk=True)


class MixtralForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("MixtralForCausalLM",)
    HF_STRUCTURE = staticmethod(mixtral_structure)

    @classmethod
    def hf_name_map(cls, config):
        return NameMap({**hf_table(config.tie_word_embeddings),
                        **moe_table("block_sparse_moe", "w1", "w3", "w2")})
