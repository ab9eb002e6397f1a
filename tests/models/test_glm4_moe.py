"""GLM-4.5 / GLM-4.5-Air (Glm4MoeForCausalLM) converted from tiny transformers models match them. This file
declares the cases; test_family_parity.py runs the shared checks over them."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from family_checks import shared_family
from kiln.kernels.moe import Router, route_ref
from kiln.models.glm4_moe.model import Glm4MoeForCausalLM

# initializer_range 0.2: with transformers' 0.02 these tiny models repeat one token, a weak greedy check
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.2,
            moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, attention_bias=True)

CASES = {
    # GLM-4.5's switches: q/k norms, experts in 4 groups of which a token keeps the best 2, weights scaled by 2.5
    "glm4_moe": (tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM,
                 dict(TINY, use_qk_norm=True, n_group=4, topk_group=2, routed_scaling_factor=2.5)),
    # GLM-4.5-Air's: no q/k norms, one group, two shared experts' width, unnormalised weights, two dense layers
    "glm4_moe_air": (tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM,
                     dict(TINY, use_qk_norm=False, n_group=1, topk_group=1, n_shared_experts=2,
                          norm_topk_prob=False, first_k_dense_replace=2, num_hidden_layers=4)),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return shared_family(tmp_path_factory, CASES)


def test_fields_follow_the_source(family):
    config = Glm4MoeForCausalLM.from_hugging_face(family.hf("glm4_moe")[0]).config
    assert (config.moe_router, config.moe_num_groups, config.moe_topk_groups, config.moe_routed_scaling) == \
        ("sigmoid", 4, 2, 2.5)
    assert config.moe_dense_layers == (0,) and config.rotary_dim == 16  # half of each 32-wide head rotates
    assert config.qkv_bias and not config.attention_bias and config.qk_norm
    assert not config.moe_shared_expert_gated and config.moe_shared_expert_intermediate_size == 32
    air = Glm4MoeForCausalLM.from_hugging_face(family.hf("glm4_moe_air")[0]).config
    assert air.moe_dense_layers == (0, 1) and air.moe_shared_expert_intermediate_size == 64 and not air.qk_norm


def test_sigmoid_router_chooses_within_the_best_groups_by_biased_scores():
    """Written out for one token: the bias moves the choice but not the weights; a group outside the best is
    never chosen, whatever its scores."""
    logits = torch.tensor([[2.0, 1.9, -3.0, -3.0, 0.5, 0.4, 3.0, -9.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.2, -2.0, 0.0])
    weights, experts = route_ref(logits, Router(2, True, True, bias, 4, 2, 2.0), torch.float32)
    s = logits[0].sigmoid()
    # groups' two best (score + bias): {0,1} 1.75, {2,3} 0.09, {4,5} 1.42, {6,7} -1.05 -> groups 0 and 2 kept
    assert sorted(experts[0].tolist()) == [0, 1]  # expert 6 (the highest score) sits in a dropped group
    torch.testing.assert_close(weights[0].sort().values, (2 * s[[0, 1]] / s[[0, 1]].sum()).sort().values)
    weights, experts = route_ref(logits, Router(3, False, True, bias, 4, 2), torch.float32)
    assert sorted(experts[0].tolist()) == [0, 1, 5]  # 5 by its bias (0.60 + 0.2 > 0.62 of expert 4)
    torch.testing.assert_close(weights[0].sort().values, s[[0, 1, 5]].sort().values)  # unbiased scores weigh
