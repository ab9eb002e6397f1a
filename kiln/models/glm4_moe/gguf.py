"""GLM-4.5 / GLM-4.5-Air from a GGUF file (llama.cpp's `glm4moe` architecture): the metadata read as the Hugging
Face config it came from, and the GGUF tensor names -> kiln names.

llama.cpp runs GLM-4.5 with NeoX rotary over the first `rope.dimension_count` dims of each head, so its converter
leaves q/k rows as Hugging Face has them. Its `block_count` counts the multi-token-prediction layers
(`nextn_predict_layers`, stored last), which kiln does not run. The router's balance bias is `exp_probs_b.bias`, the
post-attention norm `post_attention_norm`; the experts are stacked (`ffn_gate_exps` [experts, ff, hidden], ...), as
kiln stacks them, and a layer is dense where it has no expert tensors (`leading_dense_block_count`).
"""

from __future__ import annotations

from kiln.checkpoint.gguf_source import GGUFFile
from kiln.checkpoint.name_map import NameMap
from kiln.errors import CheckpointError
from kiln.models.llama.convert import L, gguf_moe_table, gguf_table
from kiln.models.llama.gguf import hf_shape_from_gguf

GLM4_MOE_GGUF_ARCHITECTURES = ("glm4moe",)
SIGMOID_GATING = 2  # llama.cpp's expert_gating_func for sigmoid (1: softmax)


def hf_config_from_gguf(gguf: GGUFFile, dtype: str) -> dict:
    """The config.json (transformers 5 form) that the file's `glm4moe.*` metadata encodes."""
    arch = gguf.require("general.architecture")
    k = lambda key: gguf.require(f"{arch}.{key}")  # noqa: E731
    field = lambda key, default=None: gguf.field(f"{arch}.{key}", default)  # noqa: E731
    gating = field("expert_gating_func", SIGMOID_GATING)
    if gating != SIGMOID_GATING:
        raise CheckpointError(f"{gguf.path}: {arch}.expert_gating_func is {gating}; GLM-4.5 routes by sigmoid "
                              f"({SIGMOID_GATING}), the only gating kiln reads for {arch}")
    config = hf_shape_from_gguf(gguf, dtype)
    head_dim = config["head_dim"]
    return {
        **config,
        "num_hidden_layers": config["num_hidden_layers"] - field("nextn_predict_layers", 0),
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": float(field("rope.freq_base", 10000.0)),
                            "partial_rotary_factor": field("rope.dimension_count", head_dim) / head_dim},
        "attention_bias": "blk.0.attn_q.bias" in gguf,
        "use_qk_norm": "blk.0.attn_q_norm.weight" in gguf,
        "n_routed_experts": k("expert_count"),
        "num_experts_per_tok": k("expert_used_count"),
        "moe_intermediate_size": k("expert_feed_forward_length"),
        "n_shared_experts": field("expert_shared_count", 1),
        "first_k_dense_replace": field("leading_dense_block_count", 0),
        "routed_scaling_factor": float(field("expert_weights_scale", 1.0)),
        "norm_topk_prob": bool(field("expert_weights_norm", True)),
        "n_group": field("expert_group_count", 1) or 1,
        "topk_group": field("expert_group_used_count", 1) or 1,
    }


def gguf_name_map(tied: bool) -> NameMap:
    b = "blk.{i}."
    return NameMap({
        **gguf_table(tied, rotary_rows=False),
        L + "post_layernorm.weight": b + "post_attention_norm.weight",
        L + "attention.qkv.bias": (b + "attn_q.bias", b + "attn_k.bias", b + "attn_v.bias"),
        L + "attention.q_norm.weight": b + "attn_q_norm.weight",
        L + "attention.k_norm.weight": b + "attn_k_norm.weight",
        **gguf_moe_table(),
        L + "mlp.choice_bias": b + "exp_probs_b.bias",
    })
