"""LG's EXAONE 4.0 (Exaone4ForCausalLM) converted from tiny transformers models matches it. This file declares the
cases; test_family_parity.py runs the shared checks over them."""

from __future__ import annotations

import pytest
import transformers as tf

from family_checks import shared_family
from kiln.models.exaone.model import Exaone4ForCausalLM

# initializer_range 0.2: with transformers' 0.02 these tiny models repeat one token, a weak greedy check
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, pad_token_id=None,
            bos_token_id=1, eos_token_id=2)

CASES = {
    # EXAONE-4.0-1.2B's: every layer global (layer_types given: transformers' default divides by a zero pattern)
    "exaone4": (tf.Exaone4Config, tf.Exaone4ForCausalLM,
                dict(TINY, sliding_window=None, layer_types=["full_attention"] * 4)),
    # EXAONE-4.0-32B's hybrid: a window in three layers of four (8 tokens here, 4,096 there), no rotary in the fourth
    "exaone4_hybrid": (tf.Exaone4Config, tf.Exaone4ForCausalLM,
                       dict(TINY, sliding_window=8, sliding_window_pattern=4, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return shared_family(tmp_path_factory, CASES)


def test_fields_follow_the_source(family):
    config = Exaone4ForCausalLM.from_hugging_face(family.hf("exaone4")[0]).config
    assert not config.pre_norm and config.sandwich_norm and config.qk_norm and not config.qk_norm_full_width
    assert config.sliding_window is None and config.nope_layers == ()
    hybrid = Exaone4ForCausalLM.from_hugging_face(family.hf("exaone4_hybrid")[0]).config
    assert hybrid.sliding_window == 8 and hybrid.nope_layers == (3,)
