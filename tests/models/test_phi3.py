"""Phi-3 / Phi-3.5 converted from tiny transformers models match them: fused qkv_proj and gate_up_proj in the
source, longrope scaling (short and long factors), a sliding window, partial rotary."""

from __future__ import annotations

import math

import pytest
import transformers as tf

from family_checks import (Family, check_convert_checkpoint, check_from_hugging_face, check_runtime,
                           check_tensor_parallel, report_max_diffs)
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

report = pytest.fixture(scope="module", autouse=True)(report_max_diffs)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return Family(tmp_path_factory, CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_from_hugging_face_matches_transformers(family, case):
    check_from_hugging_face(family, case, Phi3ForCausalLM)


@pytest.mark.parametrize("case", list(CASES))
def test_convert_checkpoint_matches_transformers(family, case, tmp_path):
    check_convert_checkpoint(family, case, tmp_path, Phi3ForCausalLM)


@pytest.mark.parametrize("case", RUNTIME_CASES)
def test_llm_greedy_tokens_equal_transformers(family, case, kiln_cache):
    check_runtime(family, case)


def test_tensor_parallel_greedy_tokens_equal_single_rank(family, tmp_path, kiln_cache):
    check_tensor_parallel(family, ["phi3_longrope_short"], tmp_path)


def test_longrope_config_carries_the_attention_factor(family):
    hf_dir, _ = family.hf("phi3_longrope_short")
    scaling = Phi3ForCausalLM.from_hugging_face(hf_dir).config.rotary_scaling
    assert scaling["type"] == "longrope" and scaling["original_max_position_embeddings"] == 64
    # transformers' default: sqrt(1 + log(factor) / log(original)), factor = 256 / 64
    assert scaling["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(64)))
