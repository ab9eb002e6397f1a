"""Cohere's Command R (CohereForCausalLM) and Command R7B / A (Cohere2ForCausalLM) converted from tiny transformers
models match them. This file declares the cases; test_family_parity.py runs the shared checks over them."""

from __future__ import annotations

import pytest
import transformers as tf

from family_checks import shared_family
from kiln.models.cohere.model import CohereForCausalLM

# initializer_range 0.2: with transformers' 0.02 these tiny models repeat one token, a weak greedy check
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, logit_scale=0.25)

CASES = {
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, dict(TINY)),
    # Command R+: q/k LayerNorms over each head, a weight per head (before the interleaved rotary); one KV head,
    # which two tensor-parallel ranks both hold
    "cohere_plus": (tf.CohereConfig, tf.CohereForCausalLM, dict(TINY, use_qk_norm=True, num_key_value_heads=1)),
    # Command R7B's layout: a window (8 tokens here, 4,096 there) in three layers of four, no rotary in the fourth
    "cohere2": (tf.Cohere2Config, tf.Cohere2ForCausalLM,
                dict(TINY, sliding_window=8, layer_types=["sliding_attention"] * 3 + ["full_attention"])),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return shared_family(tmp_path_factory, CASES)


def test_fields_follow_the_source(family):
    config = CohereForCausalLM.from_hugging_face(family.hf("cohere")[0]).config
    assert (config.norm_type, config.norm_bias, config.parallel_residual) == ("layernorm", False, True)
    assert config.logits_scaling == 4.0 and config.tie_word_embeddings and config.nope_layers == ()
    r7b = CohereForCausalLM.from_hugging_face(family.hf("cohere2")[0]).config
    assert r7b.sliding_window == 8 and r7b.nope_layers == (3,)
    plus = CohereForCausalLM.from_hugging_face(family.hf("cohere_plus")[0]).config
    assert plus.qk_norm and plus.qk_norm_per_head_weight and not config.qk_norm
