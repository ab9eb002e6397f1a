"""Qwen2 / Qwen2.5, Qwen3, Qwen2-MoE and Qwen3-MoE converted from tiny transformers models match them.
This file declares the cases; test_family_parity.py runs the shared checks over them."""

from __future__ import annotations

import pytest
import transformers as tf

from family_checks import shared_family
from kiln.models.qwen.model import QWenForCausalLM

# initializer_range 0.2: with transformers' 0.02 these tiny models repeat one token, a weak greedy check
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.2)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

CASES = {
    # QKV bias (no o_proj bias), tied embeddings as in Qwen2.5-0.5B
    "qwen2_tied": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(TINY, tie_word_embeddings=True)),
    # sliding window on layers >= max_window_layers, shorter than the test sequences
    "qwen2_sliding": (tf.Qwen2Config, tf.Qwen2ForCausalLM,
                      dict(TINY, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(TINY, head_dim=32)),  # q/k norm, head_dim != h / n
    "qwen3_bias_tied": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(TINY, attention_bias=True, tie_word_embeddings=True)),
    # experts + sigmoid-gated shared expert, un-normalised top-2, one dense layer (mlp_only_layers)
    "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                  dict(TINY, **MOE, shared_expert_intermediate_size=48, num_hidden_layers=3, mlp_only_layers=[1])),
    "qwen2_moe_step": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                       dict(TINY, **MOE, shared_expert_intermediate_size=48, decoder_sparse_step=2,
                            norm_topk_prob=True)),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, dict(TINY, **MOE, norm_topk_prob=True)),
    # YaRN past an original context shorter than the test sequences (Qwen2.5 / Qwen3's long-context setting):
    # frequencies kept, ramped and interpolated, cos/sin scaled by 0.1 ln(4) + 1
    "qwen2_yarn": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(TINY, rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=16))),
    # DeepSeek-style: no factor (max_position_embeddings / original), the attention factor from mscale and
    # mscale_all_dim, beta bounds of its own, no truncation
    "qwen3_yarn_mscale": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(TINY, head_dim=32, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=None, original_max_position_embeddings=32, mscale=0.707,
        mscale_all_dim=1.0, beta_fast=16, beta_slow=2, truncate=False))),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return shared_family(tmp_path_factory, CASES)


def test_dense_layers_and_moe_fields_follow_the_source(family):
    hf_dir, _ = family.hf("qwen2_moe_step")
    config = QWenForCausalLM.from_hugging_face(hf_dir).config
    assert (config.moe_num_experts, config.moe_top_k, config.moe_normalize_topk) == (4, 2, True)
    assert config.moe_dense_layers == (0,)  # decoder_sparse_step=2: layer 1 is sparse
    assert config.qkv_bias and not config.attention_bias
