"""DeepSeek-V3 and V2 (multi-head latent attention, DeepSeek's experts) converted from tiny transformers models
match them. This file declares the cases; test_family_parity.py runs the shared checks."""

from __future__ import annotations

import pytest
import transformers as tf

from family_checks import shared_family
from kiln.models.deepseek.model import DeepseekV3ForCausalLM

# initializer_range 0.2: with transformers' 0.02 these tiny models repeat one token, a weak greedy check
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
            num_experts_per_tok=2, kv_lora_rank=32, qk_rope_head_dim=16, v_head_dim=24, qk_nope_head_dim=32,
            first_k_dense_replace=1, max_position_embeddings=256, initializer_range=0.2)

CASES = {
    # DeepSeek-V3's switches: a q bottleneck, rotary pairs interleaved, 4 expert groups of which 2 kept, scaled
    "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM,
                    dict(TINY, q_lora_rank=48, rope_interleave=True, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5)),
    # no q bottleneck (DeepSeek-V2-Lite's q_proj), rotate-half pairs, YaRN past a short original context with
    # mscale_all_dim (the softmax scale times mscale^2), one group
    "deepseek_v3_yarn": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM,
                         dict(TINY, q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1,
                              rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                   original_max_position_embeddings=16, mscale=0.707,
                                                   mscale_all_dim=0.707, beta_fast=32, beta_slow=1))),
    # DeepSeek-V2-Lite's: its greedy softmax routing (no renorm, weights scaled), two shared experts
    "deepseek_v2": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM,
                    dict(TINY, q_lora_rank=None, topk_method="greedy", n_shared_experts=2,
                         routed_scaling_factor=1.5)),
    # DeepSeek-V2's and V2.5's: the softmax's top-k from the groups whose best probability is highest (one of four
    # here, so the second expert is its group's other, not the second-best anywhere)
    "deepseek_v2_groups": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM,
                           dict(TINY, q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=1,
                                routed_scaling_factor=16.0)),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return shared_family(tmp_path_factory, CASES)


def test_fields_follow_the_source(family):
    c = DeepseekV3ForCausalLM.from_hugging_face(family.hf("deepseek_v3")[0]).config
    assert (c.head_size, c.mla_rope_head_dim, c.mla_v_head_dim, c.mla_kv_lora_rank, c.mla_q_lora_rank) == \
        (48, 16, 24, 32, 48)
    assert c.num_key_value_heads == 4 and c.mla_rope_interleave and c.query_pre_attn_scalar == 48
    assert (c.moe_router, c.moe_num_groups, c.moe_topk_groups, c.moe_dense_layers) == ("sigmoid", 4, 2, (0,))
    yarn = DeepseekV3ForCausalLM.from_hugging_face(family.hf("deepseek_v3_yarn")[0]).config
    assert yarn.mla_q_lora_rank == 0 and yarn.query_pre_attn_scalar < 48  # mscale^2 > 1 on the softmax


def test_deepseek_v2_routes_by_the_softmax(family):
    c = DeepseekV3ForCausalLM.from_hugging_face(family.hf("deepseek_v2")[0]).config
    assert (c.moe_router, c.moe_normalize_topk, c.moe_routed_scaling, c.moe_num_groups) == ("softmax", False, 1.5, 1)
    assert c.mla_rope_interleave and c.moe_shared_expert_intermediate_size == 64
    grouped = DeepseekV3ForCausalLM.from_hugging_face(family.hf("deepseek_v2_groups")[0]).config
    assert (grouped.moe_router, grouped.moe_num_groups, grouped.moe_topk_groups) == ("softmax", 4, 1)
