"""Every family's tiny transformers models, converted, match transformers: logits (float32, <= 1e-4) and 32
greedy tokens through from_hugging_face and through convert + from_checkpoint, greedy tokens through kiln.LLM
(KV cache, scheduler), and through two tensor-parallel worker processes. One table row per family; each
family's cases (the structural variants it must cover) live in its own test_<family>.py."""

from __future__ import annotations

import pytest
import test_cohere
import test_deepseek_v3
import test_exaone
import test_gemma
import test_glm4
import test_glm4_moe
import test_gpt2
import test_gpt_neox
import test_gpt_oss
import test_granite
import test_minimax
import test_llama_like
import test_mixtral
import test_olmo
import test_phi3
import test_qwen
import test_smollm3
from family_checks import (check_convert_checkpoint, check_from_hugging_face, check_runtime, check_tensor_parallel,
                           report_max_diffs, shared_family)

from kiln.models.cohere.model import CohereForCausalLM
from kiln.models.deepseek.model import DeepseekV3ForCausalLM
from kiln.models.exaone.model import Exaone4ForCausalLM
from kiln.models.gemma.model import GemmaForCausalLM
from kiln.models.glm4.model import Glm4ForCausalLM
from kiln.models.glm4_moe.model import Glm4MoeForCausalLM
from kiln.models.gpt2.model import GPT2ForCausalLM
from kiln.models.gpt_neox.model import GPTNeoXForCausalLM
from kiln.models.gpt_oss.model import GptOssForCausalLM
from kiln.models.granite.model import GraniteForCausalLM
from kiln.models.llama_like.model import (ArceeForCausalLM, Ernie45ForCausalLM, OlmoeForCausalLM, SeedOssForCausalLM,
                                          Starcoder2ForCausalLM)
from kiln.models.minimax.model import MiniMaxM2ForCausalLM
from kiln.models.mixtral.model import MixtralForCausalLM
from kiln.models.olmo.model import OlmoForCausalLM
from kiln.models.phi3.model import Phi3ForCausalLM
from kiln.models.qwen.model import QWenForCausalLM
from kiln.models.smollm3.model import SmolLM3ForCausalLM

# family: (its CASES, the kiln class, cases kiln.LLM runs, cases run at TP=2 against TP=1)
FAMILIES = {
    "cohere": (test_cohere.CASES, CohereForCausalLM, list(test_cohere.CASES), ["cohere2", "cohere_plus"]),
    "deepseek": (test_deepseek_v3.CASES, DeepseekV3ForCausalLM, list(test_deepseek_v3.CASES), ["deepseek_v3"]),
    "exaone": (test_exaone.CASES, Exaone4ForCausalLM, list(test_exaone.CASES), ["exaone4_hybrid"]),
    "gemma": (test_gemma.CASES, GemmaForCausalLM, list(test_gemma.CASES), ["gemma2", "gemma3"]),
    "glm4": (test_glm4.CASES, Glm4ForCausalLM, list(test_glm4.CASES), ["glm4"]),
    "glm4_moe": (test_glm4_moe.CASES, Glm4MoeForCausalLM, list(test_glm4_moe.CASES), ["glm4_moe"]),
    "gpt2": (test_gpt2.CASES, GPT2ForCausalLM, list(test_gpt2.CASES), ["gpt2"]),
    "gpt_neox": (test_gpt_neox.CASES, GPTNeoXForCausalLM, list(test_gpt_neox.CASES), ["neox_parallel"]),
    "gpt_oss": (test_gpt_oss.CASES, GptOssForCausalLM, list(test_gpt_oss.CASES), ["gpt_oss"]),
    "granite": (test_granite.CASES, GraniteForCausalLM, list(test_granite.CASES), ["granite_moe"]),
    "arcee": (test_llama_like.ARCEE, ArceeForCausalLM, ["arcee"], ["arcee"]),
    "ernie45": (test_llama_like.ERNIE45, Ernie45ForCausalLM, ["ernie45"], ["ernie45"]),
    "olmoe": (test_llama_like.OLMOE, OlmoeForCausalLM, ["olmoe"], ["olmoe"]),
    "seed_oss": (test_llama_like.SEED_OSS, SeedOssForCausalLM, ["seed_oss"], ["seed_oss"]),
    "starcoder2": (test_llama_like.STARCODER2, Starcoder2ForCausalLM, ["starcoder2"], ["starcoder2"]),
    "minimax": (test_minimax.CASES, MiniMaxM2ForCausalLM, list(test_minimax.CASES), ["minimax_m2"]),
    "mixtral": (test_mixtral.CASES, MixtralForCausalLM, list(test_mixtral.CASES), ["mixtral"]),
    "olmo": (test_olmo.CASES, OlmoForCausalLM, list(test_olmo.CASES), ["olmo2", "olmo3"]),
    # phi3_longrope_long compares without a KV cache only (see test_phi3)
    "phi3": (test_phi3.CASES, Phi3ForCausalLM, test_phi3.RUNTIME_CASES, ["phi3_longrope_short"]),
    "qwen": (test_qwen.CASES, QWenForCausalLM, list(test_qwen.CASES), ["qwen2_tied", "qwen3_moe", "qwen2_moe"]),
    "smollm3": (test_smollm3.CASES, SmolLM3ForCausalLM, list(test_smollm3.CASES), ["smollm3"]),
}
ALL_CASES = [(f, case) for f, (cases, *_) in FAMILIES.items() for case in cases]
RUNTIME_CASES = [(f, case) for f, (_, _, runtime, _) in FAMILIES.items() for case in runtime]

report = pytest.fixture(scope="module", autouse=True)(report_max_diffs)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return lambda name: shared_family(tmp_path_factory, FAMILIES[name][0])


@pytest.mark.parametrize("name,case", ALL_CASES)
def test_from_hugging_face_matches_transformers(families, name, case):
    check_from_hugging_face(families(name), case, FAMILIES[name][1])


@pytest.mark.parametrize("name,case", ALL_CASES)
def test_convert_checkpoint_matches_transformers(families, name, case, tmp_path):
    check_convert_checkpoint(families(name), case, tmp_path, FAMILIES[name][1])


@pytest.mark.parametrize("name,case", RUNTIME_CASES)
def test_llm_greedy_tokens_equal_transformers(families, name, case, kiln_cache):
    check_runtime(families(name), case)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tensor_parallel_greedy_tokens_equal_single_rank(families, name, tmp_path, kiln_cache):
    check_tensor_parallel(families(name), FAMILIES[name][3], tmp_path)
