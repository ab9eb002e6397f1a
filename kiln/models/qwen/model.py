"""Qwen2 / Qwen2.5 (bias on q, k, v only), Qwen3 (q/k RMSNorm), Qwen2-MoE (experts plus a sigmoid-gated
shared expert) and Qwen3-MoE: the generic decoder with these config switches. The dense ones also convert from
GGUF (gguf.py)."""

from __future__ import annotations

from pathlib import Path

from kiln.config import QuantConfig
from kiln.mapping import Mapping
from kiln.models.base import DecoderModelForCausalLM, refuse_quantization
from kiln.models.llama.gguf import from_gguf_as_hf
from kiln.models.qwen import convert
from kiln.models.qwen import gguf as qwen_gguf


def moe_fields(hf: dict) -> dict:
    """MoE fields of Qwen-MoE configs; a layer is sparse unless listed in mlp_only_layers or off the
    decoder_sparse_step grid (transformers' Qwen2MoeDecoderLayer)."""
    experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
    if not experts:
        return {}
    step = hf.get("decoder_sparse_step", 1)
    only = set(hf.get("mlp_only_layers") or ())
    return dict(moe_num_experts=experts, moe_top_k=hf["num_experts_per_tok"],
                moe_intermediate_size=hf["moe_intermediate_size"],
                moe_normalize_topk=hf.get("norm_topk_prob", False),
                moe_shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
                moe_dense_layers=tuple(i for i in range(hf["num_hidden_layers"])
                                       if i in only or (i + 1) % step))


def qwen_structure(hf: dict) -> dict:
    qwen3 = hf["architectures"][0].startswith("Qwen3")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    types = hf.get("layer_types")
    if window and not types:  # 4.x configs: sliding from max_window_layers on
        first = hf.get("max_window_layers", 0)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(hf["num_hidden_layers"])]
    return dict(qk_norm=qwen3, qkv_bias=False if qwen3 else hf.get("qkv_bias", True),
                sliding_window=window or None, layer_types=tuple(types) if window else None, **moe_fields(hf))


class QWenForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
    HF_STRUCTURE = staticmethod(qwen_structure)

    @classmethod
    def hf_name_map(cls, config):
        return convert.hf_name_map(config.tie_word_embeddings)

    @classmethod
    def from_gguf(cls, path: str | Path, dtype: str = "auto", mapping: Mapping | None = None,
                  quant_config: QuantConfig | None = None, keep_quantization: bool = False) -> "QWenForCausalLM":
        """Qwen2 / Qwen2.5 / Qwen3 (and MoE) from llama.cpp's GGUF: quantized tensors dequantized to float32 on read,
        or with keep_quantization the 4-bit linears kept as W4A16 (kiln.quantization.gguf_import)."""
        refuse_quantization(quant_config)
        return from_gguf_as_hf(cls, path, dtype, mapping, keep_quantization, qwen_gguf.QWEN_GGUF_ARCHITECTURES,
                               qwen_gguf.hf_config_from_gguf, qwen_gguf.gguf_name_map)
