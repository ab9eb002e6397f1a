"""MiniMax-M2 (MiniMaxM2ForCausalLM): Llama attention with q/k RMSNorms over all of a token's heads at once (OLMo
2's, `qk_norm_type` "per_layer"), a partial rotary (the released checkpoints' `rotary_dim`, half of each 128-wide
head), and in every layer a mixture of experts routed as DeepSeek-V3 routes without groups: sigmoid scores, a
balance bias that only chooses (`e_score_correction_bias`), the top-k weights renormalised.

Source names: `block_sparse_moe.gate` (the router), `block_sparse_moe.e_score_correction_bias` (kiln's
`mlp.choice_bias`) and `block_sparse_moe.experts.{e}.w1/w3/w2` (kiln's fc/gate/proj), as Mixtral's.
"""

from __future__ import annotations

from kiln.checkpoint.name_map import NameMap
from kiln.errors import ConfigError
from kiln.models.base import DecoderModelForCausalLM
from kiln.models.llama.convert import L, hf_table
from kiln.models.qwen.convert import HF, QK_NORMS, moe_table


def minimax_m2_structure(hf: dict) -> dict:
    if hf.get("qk_norm_type", "per_layer") != "per_layer" or not hf.get("use_qk_norm", True):
        raise ConfigError(f"qk_norm_type {hf.get('qk_norm_type')!r} with use_qk_norm {hf.get('use_qk_norm')!r} is "
                          "not supported; supported: 'per_layer' with use_qk_norm true (MiniMax-M2's)")
    fields = dict(qk_norm=True, qk_norm_full_width=True, moe_num_experts=hf["num_local_experts"],
                  moe_top_k=hf["num_experts_per_tok"], moe_intermediate_size=hf["intermediate_size"],
                  moe_normalize_topk=True, moe_router="sigmoid")
    if hf.get("rotary_dim"):  # (the released config.json; transformers' reads it as partial_rotary_factor)
        fields["rotary_dim"] = hf["rotary_dim"]
    return fields


class MiniMaxM2ForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("MiniMaxM2ForCausalLM",)
    HF_STRUCTURE = staticmethod(minimax_m2_structure)

    @classmethod
    def hf_name_map(cls, config):
        return NameMap({
            **hf_table(config.tie_word_embeddings),
            **QK_NORMS,
            **moe_table("block_sparse_moe", "w1", "w3", "w2"),
            L + "mlp.choice_bias": HF + "block_sparse_moe.e_score_correction_bias",
        })
