"""AI2's OLMo 2 and OLMo 3 (Olmo2ForCausalLM, Olmo3ForCausalLM) converted from tiny transformers models match
them. This file declares the cases; test_family_parity.py runs the shared checks over them."""

from __future__ import annotations

import pytest
import transformers as tf

from family_checks import shared_family
from kiln.models.olmo.model import OlmoForCausalLM

# initializer_range 0.2: with transformers' 0.02 these tiny models repeat one token, a weak greedy check
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)

CASES = {
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, dict(TINY)),
    # OLMo 3: three sliding layers (a window of 8 tokens here, 4,096 in OLMo-3-7B) to each full one; one KV head,
    # which two tensor-parallel ranks both hold (k_norm's mean square over both copies)
    "olmo3": (tf.Olmo3Config, tf.Olmo3ForCausalLM,
              dict(TINY, num_hidden_layers=4, num_key_value_heads=1, sliding_window=8,
                   layer_types=["sliding_attention"] * 3 + ["full_attention"])),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return shared_family(tmp_path_factory, CASES)


def test_fields_follow_the_source(family):
    config = OlmoForCausalLM.from_hugging_face(family.hf("olmo2")[0]).config
    assert not config.pre_norm and config.sandwich_norm and config.qk_norm and config.qk_norm_full_width
    assert config.sliding_window is None
    olmo3 = OlmoForCausalLM.from_hugging_face(family.hf("olmo3")[0]).config
    assert olmo3.sliding_window == 8 and olmo3.layer_types.count("full_attention") == 1
