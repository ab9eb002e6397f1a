"""Mixtral converted from tiny transformers models matches them: several experts, top-2 renormalised routing,
GQA, a sliding window.
This file declares the cases; test_family_parity.py runs the shared checks over them."""

from __future__ import annotations

import pytest
import transformers as tf

from family_checks import shared_family
from kiln.models.mixtral.model import MixtralForCausalLM

TINY = dict(vocab_size=127, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=2)

CASES = {
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, TINY),
    "mixtral_sliding_top3": (tf.MixtralConfig, tf.MixtralForCausalLM,
                             dict(TINY, sliding_window=5, num_local_experts=6, num_experts_per_tok=3)),
}

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return shared_family(tmp_path_factory, CASES)


def test_experts_are_stacked_and_fused_in_the_engine(family):
    from kiln.builder import build

    hf_dir, _ = family.hf("mixtral")
    model = MixtralForCausalLM.from_hugging_face(hf_dir, dtype="float32")
    specs = model.weight_specs()
    assert specs["transformer.layers.0.mlp.experts.fc.weight"][1] == (4, 48, 64)
    assert specs["transformer.layers.0.mlp.experts.proj.weight"][1] == (4, 64, 48)
    assert specs["transformer.layers.0.mlp.router.weight"][1] == (4, 64)
    engine = dict(build(model).weights())
    assert engine["transformer.layers.0.mlp.experts.fc_gate.weight"].shape == (4, 96, 64)
    assert not any(".mlp.experts.gate." in n or ".mlp.experts.fc." in n for n in engine)
