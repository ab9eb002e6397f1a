"""IBM Granite 3.x (GraniteForCausalLM) and its mixtures of experts (GraniteMoeForCausalLM): the Llama structure
with four scalars. The embeddings are multiplied by `embedding_multiplier`, each sub-block's output by
`residual_multiplier` before it joins the residual, the logits divided by `logits_scaling`, and attention scores
scaled by `attention_multiplier` instead of 1/sqrt(head_dim).

The MoE's source names: `block_sparse_moe.router.layer.weight` (the router: softmax over its top-k logits, which
is the top-k of the softmax renormalised), `block_sparse_moe.input_linear.weight` [experts, 2 x inter, hidden],
[gate; up] (kiln's fc and gate), and `block_sparse_moe.output_linear.weight` [experts, hidden, inter] (proj),
stacked already.
"""

from __future__ import annotations

from kiln.checkpoint.name_map import NameMap, Src
from kiln.models.base import DecoderModelForCausalLM
from kiln.models.llama.convert import L, hf_table

HF = "model.layers.{i}.block_sparse_moe."


def granite_structure(hf: dict) -> dict:
    fields = dict(embedding_multiplier=hf.get("embedding_multiplier", 1.0),
                  residual_multiplier=hf.get("residual_multiplier", 1.0), logits_scaling=hf.get("logits_scaling", 1.0),
                  query_pre_attn_scalar=hf["attention_multiplier"] ** -2)  # (kiln's scale is its -1/2 power)
    if hf.get("num_local_experts"):
        fields.update(moe_num_experts=hf["num_local_experts"], moe_top_k=hf["num_experts_per_tok"],
                      moe_intermediate_size=hf["intermediate_size"], moe_normalize_topk=True)
    return fields


def gate_half(tensor, config):
    """[experts, gate; up, hidden] -> the gate projections (kiln's fc)."""
    return tensor.chunk(2, dim=1)[0]


def up_half(tensor, config):
    """[experts, gate; up, hidden] -> the up projections (kiln's gate)."""
    return tensor.chunk(2, dim=1)[1]


class GraniteForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("GraniteForCausalLM", "GraniteMoeForCausalLM")
    HF_STRUCTURE = staticmethod(granite_structure)

    @classmethod
    def hf_name_map(cls, config):
        return NameMap({
            **hf_table(config.tie_word_embeddings),
            L + "mlp.router.weight": HF + "router.layer.weight",
            L + "mlp.experts.fc.weight": Src(HF + "input_linear.weight", gate_half),
            L + "mlp.experts.gate.weight": Src(HF + "input_linear.weight", up_half),
            L + "mlp.experts.proj.weight": HF + "output_linear.weight",
        })
