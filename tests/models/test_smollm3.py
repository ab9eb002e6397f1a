"""Hugging Face's SmolLM3 (SmolLM3ForCausalLM) converted from tiny transformers models matches it. This file
declares the cases; test_family_parity.py runs the shared checks over them."""

from __future__ import annotations

import pytest
import transformers as tf

from family_checks import shared_family
from kiln.models.smollm3.model import SmolLM3ForCausalLM

# initializer_range 0.2: with transformers' 0.02 these tiny models repeat one token, a weak greedy check
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, pad_token_id=None,
            bos_token_id=1, eos_token_id=2)

CASES = {
    "smollm3": (tf.SmolLM3Config, tf.SmolLM3ForCausalLM, dict(TINY)),  # every 4th layer without rotary
    "smollm3_listed": (tf.SmolLM3Config, tf.SmolLM3ForCausalLM,
                       dict(TINY, no_rope_layers=[0, 1, 0, 1], tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return shared_family(tmp_path_factory, CASES)


def test_fields_follow_the_source(family):
    assert SmolLM3ForCausalLM.from_hugging_face(family.hf("smollm3")[0]).config.nope_layers == (3,)
    listed = SmolLM3ForCausalLM.from_hugging_face(family.hf("smollm3_listed")[0])
    assert listed.config.nope_layers == (0, 2)
    assert [layer.attention.rope is None for layer in listed.transformer.layers.values()] == [True, False, True, False]
