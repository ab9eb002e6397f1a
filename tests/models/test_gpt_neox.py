"""GPT-NeoX / Pythia converted from tiny transformers models match them: LayerNorm with bias, partial rotary,
parallel and sequential residuals, plain GELU MLP, per-head interleaved fused QKV in the source.
This file declares the cases; test_family_parity.py runs the shared checks over them."""

from __future__ import annotations

import pytest
import transformers as tf

from family_checks import shared_family
from kiln.models.gpt_neox.model import GPTNeoXForCausalLM

# initializer_range 0.2: with transformers' 0.02 these tiny models repeat one token, a weak greedy check
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256,
            initializer_range=0.2)

CASES = {
    "neox_parallel": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, TINY),  # Pythia: rotary on 1/4 of each head
    "neox_sequential_full_rotary": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(
        TINY, use_parallel_residual=False, hidden_act="gelu_new",
        rope_parameters=dict(rope_type="default", rope_theta=1000.0, partial_rotary_factor=1.0))),
}

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return shared_family(tmp_path_factory, CASES)


def test_plain_mlp_keeps_fc_in_the_engine(family):
    from kiln.builder import build

    hf_dir, _ = family.hf("neox_parallel")
    model = GPTNeoXForCausalLM.from_hugging_face(hf_dir, dtype="float32")
    assert model.config.rotary_dim == 4 and model.config.norm_type == "layernorm"
    names = dict(build(model).weights())
    assert "transformer.layers.0.mlp.fc.weight" in names and "transformer.layers.0.mlp.fc.bias" in names
    assert not any("fc_gate" in n for n in names)
