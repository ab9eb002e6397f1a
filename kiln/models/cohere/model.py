"""Cohere's Command R (CohereForCausalLM) and Command R7B / Command A (Cohere2ForCausalLM): attention and the MLP
in parallel on one LayerNorm's output (no bias; kiln's parallel residual, both norms read from the one weight),
interleaved rotary pairs (the q and k rows are reordered to the rotate-half layout at conversion, as Meta's
checkpoints are), tied embeddings and logits multiplied by `logit_scale`. Command R7B and A slide a window in three
layers of four and use no rotary in the fourth, global one.

Command R+'s q/k norms (`use_qk_norm`): a bias-free LayerNorm over each head with its own weight, applied before
rotary; their weights are reordered as the heads' rows are.
"""

from __future__ import annotations

from kiln.checkpoint.name_map import NameMap, Src
from kiln.models import hf_config
from kiln.models.base import DecoderModelForCausalLM
from kiln.layers.rotary import interleaved_to_half
from kiln.models.llama.convert import L, _k_rows, _q_rows, hf_table, qkv_table

HF = "model.layers.{i}."


def cohere_structure(hf: dict) -> dict:
    qk_norm = bool(hf.get("use_qk_norm"))  # (Command R+)
    fields = dict(norm_type="layernorm", norm_bias=False, norm_epsilon=hf.get("layer_norm_eps", 1e-5),
                  parallel_residual=True, logits_scaling=1 / hf.get("logit_scale", 1.0), qk_norm=qk_norm,
                  qk_norm_per_head_weight=qk_norm, **hf_config.sliding_fields(hf))
    if fields["layer_types"]:  # Command R7B / A: the global layers have no rotary
        fields["nope_layers"] = hf_config.global_layers(fields["layer_types"])
    return fields


class CohereForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("CohereForCausalLM", "Cohere2ForCausalLM")
    HF_STRUCTURE = staticmethod(cohere_structure)

    @classmethod
    def hf_name_map(cls, config):
        attn = HF + "self_attn."
        return NameMap({
            **hf_table(config.tie_word_embeddings),
            L + "post_layernorm.weight": HF + "input_layernorm.weight",  # (the MLP reads the same norm)
            **qkv_table(_q_rows, _k_rows),
            L + "attention.q_norm.weight": Src(attn + "q_norm.weight", _per_head_halves),
            L + "attention.k_norm.weight": Src(attn + "k_norm.weight", _per_head_halves),
        })


def _per_head_halves(weight, config):
    """A per-head norm weight [heads, head_size] in the rotate-half order the q and k rows take."""
    return interleaved_to_half(weight.reshape(-1), weight.shape[0]).view_as(weight)
