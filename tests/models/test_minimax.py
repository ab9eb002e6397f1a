"""MiniMax-M2 (MiniMaxM2ForCausalLM) converted from tiny transformers models matches it. This file declares the
cases; test_family_parity.py runs the shared checks over them."""

from __future__ import annotations

import pytest
import transformers as tf

from family_checks import shared_family
from kiln.models.minimax.model import MiniMaxM2ForCausalLM

# initializer_range 0.2: with transformers' 0.02 these tiny models repeat one token, a weak greedy check
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.2,
            num_local_experts=8, num_experts_per_tok=2, pad_token_id=None, bos_token_id=1, eos_token_id=2)

CASES = {
    # the release's layout: half of each head rotates (rotary_dim 16 of 32 here, 64 of 128 there)
    "minimax_m2": (tf.MiniMaxM2Config, tf.MiniMaxM2ForCausalLM, dict(TINY, rotary_dim=16)),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return shared_family(tmp_path_factory, CASES)


def test_fields_follow_the_source(family):
    config = MiniMaxM2ForCausalLM.from_hugging_face(family.hf("minimax_m2")[0]).config
    assert config.qk_norm_full_width and config.moe_router == "sigmoid" and config.moe_num_groups == 1
    assert config.rotary_dim == 16 and config.is_moe_layer(0)
