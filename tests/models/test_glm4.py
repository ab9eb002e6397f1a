"""Zhipu's GLM-4 dense models (Glm4ForCausalLM) converted from tiny transformers models match them. This file
declares the cases; test_family_parity.py runs the shared checks over them."""

from __future__ import annotations

import transformers as tf

from family_checks import shared_family
from kiln.models.glm4.model import Glm4ForCausalLM

# initializer_range 0.2: with transformers' 0.02 these tiny models repeat one token, a weak greedy check
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.2, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)

CASES = {
    "glm4": (tf.Glm4Config, tf.Glm4ForCausalLM, dict(TINY)),  # half of each head rotates, in interleaved pairs
    "glm4_full_rotary": (tf.Glm4Config, tf.Glm4ForCausalLM, dict(TINY, partial_rotary_factor=1.0,
                                                                  tie_word_embeddings=True)),
}


def test_fields_follow_the_source(tmp_path_factory):
    family = shared_family(tmp_path_factory, CASES)
    config = Glm4ForCausalLM.from_hugging_face(family.hf("glm4")[0]).config
    assert config.sandwich_norm and config.qkv_bias and not config.attention_bias and config.rotary_dim == 16
