"""Tensor and pipeline parallelism on CPU over gloo, with real processes: every layout must give the
logits of the single-process engine (within 1e-5) and the same greedy tokens."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_hf_model
from kiln.builder import Engine, build_checkpoint
from kiln.checkpoint.convert import convert_checkpoint
from kiln.llmapi.llm import LLM
from kiln.llmapi.sampling_params import SamplingParams
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.workers import WorkerError

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from dist_logits_main import PROMPTS, steps  # noqa: E402

LAYOUTS = [(2, 1), (1, 2), (2, 2)]
GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """Four layers (so two pipeline stages hold two each), GQA, untied embeddings, an odd vocab (padding)."""
    path = tmp_path_factory.mktemp("dist") / "hf"
    make_hf_model(path, num_hidden_layers=4, vocab_size=127)
    return path


@pytest.fixture(scope="module")
def engines(hf_dir, tmp_path_factory):
    """Engine dirs for TP=1 and each parallel layout, built through kiln convert + build."""
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for tp, pp in [(1, 1), *LAYOUTS]:
        ckpt = convert_checkpoint(hf_dir, root / f"ckpt-tp{tp}-pp{pp}", dtype="float32", tp_size=tp, pp_size=pp)
        out[tp, pp] = build_checkpoint(ckpt, root / f"engine-tp{tp}-pp{pp}")
    return out


@pytest.fixture(scope="module")
def reference_tokens(engines):
    with LLM(engines[1, 1]) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def reference_logits(engine_dir):
    engine = Engine.from_dir(engine_dir)
    runner = ModelRunner(engine.runtime_model("cpu"), "cpu", engine.build_config)
    return [runner.execute(step) for step in steps()]


def _torchrun(nproc: int, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           "--standalone", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_llm_parallel_greedy_tokens_equal_single_process(engines, reference_tokens, tp, pp):
    with LLM(engines[tp, pp], tensor_parallel_size=tp, pipeline_parallel_size=pp, device="cpu") as llm:
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert tokens == reference_tokens


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_speculative_steps_across_ranks_give_the_single_process_tokens(engines, reference_tokens, tp, pp):
    """Every token's logits come back from the last stage (pipeline micro-batches keep them all)."""
    from kiln.config import BuildConfig

    with LLM(engines[tp, pp], tensor_parallel_size=tp, pipeline_parallel_size=pp, device="cpu",
             build_config=BuildConfig(max_draft_len=4)) as llm:
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
        assert llm.generator.executor.accepted_draft_tokens > 0
    assert tokens == reference_tokens


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_prompt_logprobs_across_ranks_equal_the_single_process_ones(engines, tp, pp):
    """Every prompt token's logits come back from the rank that makes them (the last stage's micro-batches)."""
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2)
    with LLM(engines[1, 1]) as llm:
        want = [o.prompt_logprobs for o in llm.generate(PROMPTS, params)]
    with LLM(engines[tp, pp], tensor_parallel_size=tp, pipeline_parallel_size=pp, device="cpu") as llm:
        got = [o.prompt_logprobs for o in llm.generate(PROMPTS, params)]
    assert [len(g) for g in got] == [len(w) for w in want] == [len(p) for p in PROMPTS]
    assert all(run[0] is None for run in got)  # (the first token has none, as in vLLM)
    flat = lambda runs: torch.tensor([[lp, *(v for _, v in top)] for run in runs for lp, top in run[1:]])  # noqa
    torch.testing.assert_close(flat(got), flat(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_torchrun_parallel_logits_match_single_process(engines, tmp_path, tp, pp):
    out = tmp_path / "logits.pt"
    result = _torchrun(tp * pp, str(HERE / "dist_logits_main.py"), str(engines[tp, pp]), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    for got, want in zip(torch.load(out), reference_logits(engines[1, 1])):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_torchrun_kiln_run_gives_single_process_tokens(engines, reference_tokens):
    prompt = ",".join(map(str, PROMPTS[0]))
    result = _torchrun(4, "-m", "kiln", "run", "--engine-dir", str(engines[2, 2]), "--prompt-ids", prompt,
                       "--max-tokens", "32", "--ignore-eos")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2].split() == [str(t) for t in reference_tokens[0]]


def test_engine_of_another_world_size_is_refused(engines):
    with pytest.raises(Exception, match="tp_size=2"):
        LLM(engines[2, 1], tensor_parallel_size=1)


def test_killed_worker_fails_the_caller_fast_and_leaves_no_process(engines):
    llm = LLM(engines[2, 2], tensor_parallel_size=2, pipeline_parallel_size=2, device="cpu")
    processes = list(llm.runner.processes)
    stream = llm.generate_stream(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    for _ in range(3):
        next(stream)
    processes[3].kill()
    start = time.monotonic()
    with pytest.raises(WorkerError, match="exited"):
        for _ in stream:
            pass
    assert time.monotonic() - start < 5
    for p in processes:
        p.join(timeout=5)
    assert not any(p.is_alive() for p in processes)


def test_split_step_keeps_every_token_in_order_in_whole_sequences():
    from kiln.runtime.model_runner import split_step

    step = next(steps())
    for parts in (1, 2, 3, 5):
        micro = split_step(step, parts)
        assert 1 <= len(micro) <= min(parts, len(step.query_lens))
        assert [t for m in micro for t in m.token_ids] == step.token_ids
        assert [q for m in micro for q in m.query_lens] == step.query_lens
        assert [s for m in micro for s in m.slot_mapping] == step.slot_mapping
        assert [b for m in micro for b in m.block_tables] == step.block_tables
        for m in micro:
            assert sum(m.query_lens) == len(m.token_ids) == len(m.positions)
