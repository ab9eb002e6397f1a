"""Phi-3 / Phi-3.5 converted from tiny transformers models match them: fused qkv_proj and gate_up_proj in the
source, longrope scaling (short and long factors), a sliding window, partial rotary.
This file declares the cases; test_family_parity.py runs the shared checks over them."""

from __future__ import annotations

import math

import pytest
import transformers as tf

from family_checks import shared_family
from kiln.models.phi3.model import Phi3ForCausalLM

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=2)


def longrope(original: int) -> dict:
    return dict(original_max_position_embeddings=original, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=original,
        short_factor=[1.0 + 0.1 * i for i in range(8)], long_factor=[1.0 + 0.7 * i for i in range(8)]))


CASES = {
    "phi3_sliding": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(TINY, sliding_window=5)),
    "phi3_partial_rotary": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(TINY, rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))),
    # original context above every test length: short factors, with the attention factor of 256 / 64
    "phi3_longrope_short": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(TINY, **longrope(64))),
    # original context below the test lengths: long factors (no-cache comparisons only: with a KV cache the
    # keys of a prompt shorter than 16 keep their short-factor rotation, in transformers as in kiln)
    "phi3_longrope_long": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(TINY, **longrope(16))),
}
RUNTIME_CASES = [c for c in CASES if c != "phi3_longrope_long"]

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return shared_family(tmp_path_factory, CASES)


def test_longrope_config_carries_the_attention_factor(family):
    hf_dir, _ = family.hf("phi3_longrope_short")
    scaling = Phi3ForCausalLM.from_hugging_face(hf_dir).config.rotary_scaling
    assert scaling["type"] == "longrope" and scaling["original_max_position_embeddings"] == 64
    # transformers' default: sqrt(1 + log(factor) / log(original)), factor = 256 / 64
    assert scaling["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(64)))
