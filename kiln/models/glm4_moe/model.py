"""GLM-4.5 and GLM-4.5-Air (Glm4MoeForCausalLM): Llama attention with q/k/v biases, a partial rotary (half of each
head by default) and optional q/k norms over each head; the first `first_k_dense_replace` layers dense, the others
a mixture of experts routed as DeepSeek-V3 routes (sigmoid scores, a balance bias that only chooses, the best
groups, weights renormed and scaled), plus an ungated shared expert.

Source names beyond Llama's: `mlp.gate.weight` (the router), `mlp.gate.e_score_correction_bias` (kiln's
`mlp.choice_bias`), `mlp.experts.{e}.gate_proj/up_proj/down_proj` and `mlp.shared_experts.*`. A checkpoint's
multi-token-prediction layers (`num_nextn_predict_layers`, stored past the last decoder layer) are not read. Also
from llama.cpp's GGUF (gguf.py).
"""

from __future__ import annotations

from pathlib import Path

from kiln.checkpoint.name_map import NameMap
from kiln.config import QuantConfig
from kiln.mapping import Mapping
from kiln.models.base import DecoderModelForCausalLM, refuse_quantization
from kiln.models.deepseek.model import deepseek_moe_fields
from kiln.models.glm4_moe import gguf as glm_gguf
from kiln.models.llama.gguf import from_gguf_as_hf
from kiln.models.llama.convert import L, hf_table
from kiln.models.qwen.convert import HF, QK_NORMS, moe_table, shared_expert_table


def glm4_moe_structure(hf: dict) -> dict:
    return dict(qkv_bias=hf.get("attention_bias", False), attention_bias=False,  # (o_proj has none)
                qk_norm=hf.get("use_qk_norm", False), **deepseek_moe_fields(hf))


class Glm4MoeForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("Glm4MoeForCausalLM",)
    HF_STRUCTURE = staticmethod(glm4_moe_structure)

    @classmethod
    def from_gguf(cls, path: str | Path, dtype: str = "auto", mapping: Mapping | None = None,
                  quant_config: QuantConfig | None = None, keep_quantization: bool = False) -> "Glm4MoeForCausalLM":
        """GLM-4.5 from llama.cpp's GGUF (`glm4moe`): quantized tensors dequantized to float32 on read, or with
        keep_quantization the 4-bit linears and experts kept as W4A16 (kiln.quantization.gguf_import)."""
        refuse_quantization(quant_config)
        return from_gguf_as_hf(cls, path, dtype, mapping, keep_quantization, glm_gguf.GLM4_MOE_GGUF_ARCHITECTURES,
                               glm_gguf.hf_config_from_gguf, glm_gguf.gguf_name_map)

    @classmethod
    def hf_name_map(cls, config):
        return NameMap({
            **hf_table(config.tie_word_embeddings),
            **QK_NORMS,
            **moe_table("mlp", "gate_proj", "up_proj", "down_proj"),
            L + "mlp.choice_bias": HF + "mlp.gate.e_score_correction_bias",
            **shared_expert_table("mlp.shared_experts"),
        })
