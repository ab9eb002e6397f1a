"""IBM Granite 3.x (GraniteForCausalLM, GraniteMoeForCausalLM) converted from tiny transformers models match them.
This file declares the cases; test_family_parity.py runs the shared checks over them."""

from __future__ import annotations

import pytest
import transformers as tf

from family_checks import shared_family
from kiln.models.granite.model import GraniteForCausalLM

# Granite 3's own scalars (granite-3.1-8b-instruct: embeddings x 12, residual x 0.22, logits / 16, scores x 1/128),
# here on 32-wide heads; initializer_range 0.2: with transformers' 0.02 these tiny models repeat one token
SCALARS = dict(embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0, attention_multiplier=1 / 32)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, **SCALARS)

CASES = {
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, dict(TINY, tie_word_embeddings=True)),
    # granite-3.x-*-a*m: 8 experts a layer, top 2
    "granite_moe": (tf.GraniteMoeConfig, tf.GraniteMoeForCausalLM,
                    dict(TINY, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                         tie_word_embeddings=False)),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return shared_family(tmp_path_factory, CASES)


def test_fields_follow_the_source(family):
    config = GraniteForCausalLM.from_hugging_face(family.hf("granite")[0]).config
    assert (config.embedding_multiplier, config.residual_multiplier, config.logits_scaling) == (12.0, 0.22, 8.0)
    assert config.query_pre_attn_scalar == 32 ** 2 and config.tie_word_embeddings
    moe = GraniteForCausalLM.from_hugging_face(family.hf("granite_moe")[0]).config
    assert (moe.moe_num_experts, moe.moe_top_k, moe.moe_intermediate_size) == (8, 2, 32) and moe.moe_normalize_topk
