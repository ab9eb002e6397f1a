"""The runtime on a CUDA GPU (Triton kernels in the model and in paged attention) against transformers on
the same GPU: float32 tiny models, so greedy tokens must be identical."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hf_model
from kiln.config import BuildConfig
from kiln.kernels import triton_available
from kiln.llmapi.llm import LLM
from kiln.llmapi.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs an NVIDIA GPU with Triton: the fast "
                                "path only exists there")

PROMPTS = [[1, 5, 9, 20, 3], [7, 8, 9], list(range(10, 80))]


def hf_greedy_cuda(hf, prompt, n):
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, hf(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("mistral", {"sliding_window": 16})])
def test_gpu_greedy_tokens_equal_transformers(tmp_path, monkeypatch, arch, extra):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    hf = make_hf_model(tmp_path / "hf", arch=arch, **extra).to("cuda")
    with LLM(tmp_path / "hf", device="cuda") as llm:
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
        again = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
        assert llm.generator.blocks.hit_rate() > 0  # the long prompt's full blocks were reused
        assert llm.runner.graphs is not None and llm.runner.graphs.replays > 0  # decode ran as CUDA graphs
    for prompt, out, out2 in zip(PROMPTS, outputs, again):
        expected = hf_greedy_cuda(hf, prompt, 32)
        assert out.outputs[0].token_ids == expected
        assert out2.outputs[0].token_ids == expected


def test_cuda_graphs_leave_room_for_one_max_seq_len_sequence(tmp_path, monkeypatch):
    # A cache of exactly one max_seq_len sequence: the graphs' scratch block must not come out of it, or a
    # sequence that grows to max_seq_len preempts itself and never fits again.
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    hf = make_hf_model(tmp_path / "hf").to("cuda")
    bc = BuildConfig(max_seq_len=64, max_input_len=16, tokens_per_block=16, kv_cache_max_tokens=64)
    with LLM(tmp_path / "hf", device="cuda", build_config=bc) as llm:
        assert llm.runner.graphs is not None and llm.generator.blocks.num_blocks == 4
        out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy_cuda(hf, PROMPTS[0], 64 - len(PROMPTS[0]))
