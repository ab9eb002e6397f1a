"""AI2's OLMo 2 (Olmo2ForCausalLM) and OLMo 3 (Olmo3ForCausalLM): the Llama structure normed after each sub-block
instead of before (`post_attention_layernorm` and `post_feedforward_layernorm` norm the attention's and the MLP's
outputs before they join the residual; kiln's sandwich norms without pre-norms), and q_norm / k_norm over all of a
token's query (key) heads at once, before rotary (`qk_norm_full_width`: under tensor parallelism each rank's sum
of squares is all-reduced). OLMo 3 adds sliding-window layers (`layer_types`).

kiln's RMSNorm rounds the normed row before the weight multiplies it, as Llama's does; OLMo's multiply in float32
first. The two agree exactly in float32 and within a 16-bit rounding in bfloat16.
"""

from __future__ import annotations

from kiln.checkpoint.name_map import NameMap
from kiln.models import hf_config
from kiln.models.base import DecoderModelForCausalLM
from kiln.models.llama.convert import L, hf_table
from kiln.models.qwen.convert import HF, QK_NORMS


def olmo_structure(hf: dict) -> dict:
    return dict(pre_norm=False, sandwich_norm=True, qk_norm=True, qk_norm_full_width=True,
                **hf_config.sliding_fields(hf))


class OlmoForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("Olmo2ForCausalLM", "Olmo3ForCausalLM")
    HF_STRUCTURE = staticmethod(olmo_structure)

    @classmethod
    def hf_name_map(cls, config):
        return post_norm_name_map(config.tie_word_embeddings)


def post_norm_name_map(tied: bool) -> NameMap:
    """Llama's names for a model normed after each sub-block (no pre-norms), with q/k norms (OLMo 2, EXAONE 4)."""
    table = {k: v for k, v in hf_table(tied).items()
             if not k.endswith(("input_layernorm.weight", "post_layernorm.weight"))}
    return NameMap({
        **table,
        **QK_NORMS,
        L + "attention_out_layernorm.weight": HF + "post_attention_layernorm.weight",
        L + "mlp_out_layernorm.weight": HF + "post_feedforward_layernorm.weight",
    })
