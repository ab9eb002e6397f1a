"""GPT-2 converted from tiny transformers models matches them: learned absolute positions, Conv1D (transposed)
weights, LayerNorm with bias, GELU-tanh MLP without a gate, tied lm_head."""

from __future__ import annotations

import pytest
import transformers as tf

from family_checks import (Family, check_convert_checkpoint, check_from_hugging_face, check_runtime,
                           check_tensor_parallel, report_max_diffs)
from kiln.models.gpt2.model import GPT2ForCausalLM

# initializer_range 0.2: with transformers' 0.02 these tiny models repeat one token, a weak greedy check
TINY = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0,
            initializer_range=0.2)

CASES = {
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, TINY),
    "gpt2_n_inner_relu": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(TINY, n_inner=96, activation_function="relu")),
}

report = pytest.fixture(scope="module", autouse=True)(report_max_diffs)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return Family(tmp_path_factory, CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_from_hugging_face_matches_transformers(family, case):
    check_from_hugging_face(family, case, GPT2ForCausalLM)


@pytest.mark.parametrize("case", list(CASES))
def test_convert_checkpoint_matches_transformers(family, case, tmp_path):
    check_convert_checkpoint(family, case, tmp_path, GPT2ForCausalLM)


@pytest.mark.parametrize("case", list(CASES))
def test_llm_greedy_tokens_equal_transformers(family, case, kiln_cache):
    check_runtime(family, case)


def test_tensor_parallel_greedy_tokens_equal_single_rank(family, tmp_path, kiln_cache):
    check_tensor_parallel(family, ["gpt2"], tmp_path)
