"""DeepSeek-V3 / R1 and Kimi K2 (DeepseekV3ForCausalLM), and DeepSeek-V2-Lite (DeepseekV2ForCausalLM): multi-head
latent attention (kiln.layers.mla) and DeepSeek's mixture of experts, which GLM-4.5 shares: the first
`first_k_dense_replace` layers dense, the others routed by sigmoid scores with a balance bias that only chooses,
within the best groups, weights renormed and scaled (V3), or by the top-k of the softmax, scaled, from all
experts or the groups of the best probabilities (V2's `greedy` and `group_limited_greedy`);
plus ungated shared experts. DeepSeek-V2 rotates its interleaved pairs as complex numbers, the same rotation.

Source names: `self_attn.q_a_proj`, `q_a_layernorm`, `q_b_proj` (or `q_proj` without a q bottleneck),
`kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj`; the MoE's as GLM-4.5's. A checkpoint's multi-token
prediction layers (`num_nextn_predict_layers`, stored past the last decoder layer) are not read. YaRN (DeepSeek-V3's
long context) also scales the softmax by mscale(factor, mscale_all_dim)^2, as transformers does; kiln folds that
into query_pre_attn_scalar.
"""

from __future__ import annotations

import math

from kiln.checkpoint.name_map import NameMap
from kiln.errors import ConfigError
from kiln.models import hf_config
from kiln.models.base import DecoderModelForCausalLM
from kiln.models.llama.convert import L, hf_table
from kiln.models.qwen.convert import HF, moe_table, shared_expert_table


def deepseek_moe_fields(hf: dict) -> dict:
    """DeepSeek-V3's mixture of experts (GLM-4.5's too) from its config.json fields."""
    return dict(
        moe_num_experts=hf.get("n_routed_experts") or hf["num_local_experts"], moe_top_k=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"], moe_normalize_topk=hf.get("norm_topk_prob", True),
        moe_shared_expert_intermediate_size=hf["moe_intermediate_size"] * hf.get("n_shared_experts", 1),
        moe_shared_expert_gated=False,
        moe_dense_layers=tuple(range(min(hf.get("first_k_dense_replace", 1), hf["num_hidden_layers"]))),
        moe_router="sigmoid", moe_num_groups=hf.get("n_group") or 1, moe_topk_groups=hf.get("topk_group") or 1,
        moe_routed_scaling=float(hf.get("routed_scaling_factor", 1.0)))


def _softmax_mscale(hf: dict) -> float:
    """transformers' yarn_apply_mscale: the factor a non-default rope with mscale_all_dim puts on the softmax
    scale (squared there), 1 otherwise."""
    params, _ = hf_config.rope_parameters(hf)
    all_dim = params.get("mscale_all_dim") or 0
    if params.get("rope_type", params.get("type", "default")) == "default" or not all_dim:
        return 1.0
    factor = params["factor"]
    return 1.0 if factor <= 1 else 0.1 * all_dim * math.log(factor) + 1.0


def mla_fields(hf: dict) -> dict:
    """Multi-head latent attention's fields (kiln.layers.mla) from a DeepSeek config.json."""
    head_size = hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]
    return dict(
        head_size=head_size, rotary_dim=None, num_key_value_heads=hf["num_attention_heads"],
        query_pre_attn_scalar=head_size / _softmax_mscale(hf) ** 4,
        mla_kv_lora_rank=hf["kv_lora_rank"], mla_q_lora_rank=hf.get("q_lora_rank") or 0,
        mla_rope_head_dim=hf["qk_rope_head_dim"], mla_v_head_dim=hf["v_head_dim"],
        mla_rope_interleave=hf.get("rope_interleave", True))


# topk_method -> (the router, whether it keeps groups): DeepSeek-V3's; DeepSeek-V2's top-k of the softmax, from all
# experts (V2-Lite) or from the groups of the best probabilities (V2, V2.5)
TOPK_METHODS = {"noaux_tc": ("sigmoid", True), "greedy": ("softmax", False), "group_limited_greedy": ("softmax", True)}


def deepseek_structure(hf: dict) -> dict:
    method = hf.get("topk_method", "noaux_tc")
    if method not in TOPK_METHODS:
        raise ConfigError(f"topk_method {method!r} is not supported; supported: {', '.join(TOPK_METHODS)}")
    router, grouped = TOPK_METHODS[method]
    moe = deepseek_moe_fields(hf)
    if router == "softmax":  # DeepSeek-V2: its weights scaled, never renormed, no balance bias
        moe.update(moe_router="softmax", moe_normalize_topk=False)
    if not grouped:
        moe.update(moe_num_groups=1, moe_topk_groups=1)
    return dict(**mla_fields(hf), **moe)


class DeepseekV3ForCausalLM(DecoderModelForCausalLM):
    """DeepSeek-V3's architecture, and DeepSeek-V2's (its greedy routing: V2-Lite), which differs in the router."""

    HF_ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")
    HF_STRUCTURE = staticmethod(deepseek_structure)

    @classmethod
    def hf_name_map(cls, config):
        a = L + "attention."
        attn = HF + "self_attn."
        return NameMap({
            **{k: v for k, v in hf_table(config.tie_word_embeddings).items() if not k.startswith(a)},
            a + "q.weight": attn + "q_proj.weight",
            a + "q_a.weight": attn + "q_a_proj.weight",
            a + "q_a.bias": attn + "q_a_proj.bias",
            a + "q_a_norm.weight": attn + "q_a_layernorm.weight",
            a + "q_b.weight": attn + "q_b_proj.weight",
            a + "kv_a.weight": attn + "kv_a_proj_with_mqa.weight",
            a + "kv_a.bias": attn + "kv_a_proj_with_mqa.bias",
            a + "kv_a_norm.weight": attn + "kv_a_layernorm.weight",
            a + "kv_b.weight": attn + "kv_b_proj.weight",
            a + "dense.weight": attn + "o_proj.weight",
            a + "dense.bias": attn + "o_proj.bias",
            **moe_table("mlp", "gate_proj", "up_proj", "down_proj"),
            L + "mlp.choice_bias": HF + "mlp.gate.e_score_correction_bias",
            **shared_expert_table("mlp.shared_experts"),
        })
