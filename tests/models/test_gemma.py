"""Gemma, Gemma 2 and Gemma 3 (text) converted from tiny transformers models match them: sqrt(hidden)
embedding scale, (1 + w) norms, GELU-tanh gated MLP, sandwich norms, soft-capping, alternating sliding
windows, q/k norms, per-layer rotary bases, query_pre_attn_scalar.
This file declares the cases; test_family_parity.py runs the shared checks over them."""

from __future__ import annotations

import pytest
import transformers as tf

from family_checks import shared_family
from kiln.models.gemma.model import GemmaForCausalLM

# initializer_range 0.2: with transformers' 0.02 these tiny models repeat one token, a weak greedy check
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
            initializer_range=0.2)
SLIDING = dict(sliding_window=5, query_pre_attn_scalar=24)  # window < test sequences; scale != head_dim

CASES = {
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, TINY),
    # soft-capping low enough to bite on these logits
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
               dict(TINY, **SLIDING, num_hidden_layers=3, attn_logit_softcapping=0.5, final_logit_softcapping=2.0)),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
               dict(TINY, **SLIDING, num_hidden_layers=3, layer_types=["sliding_attention", "full_attention",
                                                                      "sliding_attention"],
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                     "full_attention": {"rope_type": "linear", "rope_theta": 10000.0,
                                                        "factor": 4.0}})),
}

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return shared_family(tmp_path_factory, CASES)


def test_gemma3_config_reads_the_per_layer_structure(family):
    hf_dir, _ = family.hf("gemma3")
    c = GemmaForCausalLM.from_hugging_face(hf_dir).config
    assert c.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (c.rotary_base, c.rotary_base_local, c.rotary_scaling["type"]) == (10000.0, 100.0, "linear")
    assert c.qk_norm and c.sandwich_norm and c.norm_unit_offset and c.tie_word_embeddings
    assert c.embedding_multiplier == 8.0 and c.hidden_act == "gelu_tanh"
