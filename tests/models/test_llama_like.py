"""Families that differ from Llama in a field or two (kiln.models.llama_like): Seed-OSS, ERNIE 4.5 dense, Arcee,
StarCoder2 and OLMoE,
converted from tiny transformers models, match them. This file declares the cases; test_family_parity.py runs the
shared checks over them."""

from __future__ import annotations

import transformers as tf

from family_checks import shared_family
from kiln.models.llama_like.model import (ArceeForCausalLM, Ernie45ForCausalLM, OlmoeForCausalLM, SeedOssForCausalLM,
                                          Starcoder2ForCausalLM)

# initializer_range 0.2: with transformers' 0.02 these tiny models repeat one token, a weak greedy check
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.2, pad_token_id=None,
            bos_token_id=1, eos_token_id=2)

SEED_OSS = {"seed_oss": (tf.SeedOssConfig, tf.SeedOssForCausalLM,
                         dict(TINY, attention_bias=True, attention_out_bias=False))}
# biases on every projection here (ERNIE-4.5-0.3B has none): reordered with their rows
ERNIE45 = {"ernie45": (tf.Ernie4_5Config, tf.Ernie4_5ForCausalLM, dict(TINY, use_bias=True))}
ARCEE = {"arcee": (tf.ArceeConfig, tf.ArceeForCausalLM, dict(TINY, hidden_act="relu2"))}
# StarCoder2-15B's sliding window in every layer (8 tokens here, 4,096 there)
STARCODER2 = {"starcoder2": (tf.Starcoder2Config, tf.Starcoder2ForCausalLM, dict(TINY, sliding_window=8))}
OLMOE = {"olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM,
                   dict(TINY, intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False))}


def test_fields_follow_the_source(tmp_path_factory):
    hf = lambda cases: shared_family(tmp_path_factory, cases).hf(next(iter(cases)))[0]  # noqa: E731
    seed = SeedOssForCausalLM.from_hugging_face(hf(SEED_OSS)).config
    assert seed.qkv_bias and not seed.attention_bias
    assert Ernie45ForCausalLM.from_hugging_face(hf(ERNIE45)).config.attention_bias
    arcee = ArceeForCausalLM.from_hugging_face(hf(ARCEE)).config
    assert not arcee.gated_mlp and arcee.hidden_act == "relu2"
    starcoder2 = Starcoder2ForCausalLM.from_hugging_face(hf(STARCODER2)).config
    assert (starcoder2.norm_type, starcoder2.sliding_window, starcoder2.mlp_bias) == ("layernorm", 8, True)
    olmoe = OlmoeForCausalLM.from_hugging_face(hf(OLMOE)).config
    assert olmoe.qk_norm_full_width and not olmoe.moe_normalize_topk and olmoe.moe_num_experts == 8
