"""GenerationEngine: requests joining and leaving a running batch, stop conditions, limits and aborts.

The reference for every token is transformers' greedy decoding (an argmax over the full sequence's logits).
"""

from __future__ import annotations

import pytest
import torch

from kiln.builder import build
from kiln.config import BuildConfig
from kiln.errors import ConfigError
from kiln.llmapi.sampling_params import SamplingParams
from kiln.models.llama.model import LLaMAForCausalLM
from kiln.runtime.engine import GenerationEngine
from kiln.runtime.model_runner import ModelRunner

from conftest import hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
PROMPTS = [[5, 9, 17], list(range(20, 31)), [100, 3, 64, 12, 7, 7, 1], [42]]


@pytest.fixture(scope="module")
def built(tiny_llama_session):
    hf_dir, hf = tiny_llama_session
    engine = build(LLaMAForCausalLM.from_hugging_face(hf_dir), BuildConfig(max_seq_len=128, max_input_len=16))
    return engine.runtime_model(), engine.build_config, hf


@pytest.fixture(scope="module")
def reference(built):
    hf = built[2]
    return [hf_greedy(hf, p, 32) for p in PROMPTS]


def _engine(built, eos=(), **limits) -> GenerationEngine:
    model, bc, _ = built
    runner = ModelRunner(model, torch.device("cpu"))
    return GenerationEngine(runner, BuildConfig(**{**bc.to_dict(), **limits}), eos)


def _caches(engine: GenerationEngine) -> dict:
    """seq_id -> KV cache of the sequences whose caches are held."""
    return engine.executor.runner.caches


def _drain(engine: GenerationEngine, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return
        engine.step()
    raise AssertionError("the engine did not finish")


def test_request_added_while_others_run_matches_transformers(built, reference):
    engine = _engine(built)
    first = [engine.add_request(PROMPTS[0], GREEDY), engine.add_request(PROMPTS[1], GREEDY)]
    for _ in range(3):
        engine.step()
    late = engine.add_request(PROMPTS[2], GREEDY)
    for _ in range(5):
        engine.step()
    later = engine.add_request(PROMPTS[3], GREEDY)
    _drain(engine)
    for seq, expected in zip(first + [late, later], reference):
        assert seq.output_ids == expected
        assert seq.finish_reason == "length"


def test_small_batch_and_token_budget_queue_requests_without_changing_tokens(built, reference):
    engine = _engine(built, max_batch_size=2, max_num_tokens=12)
    seqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    largest = 0
    while engine.has_unfinished():
        largest = max(largest, len(engine.step()))
    assert largest == 2
    assert [s.output_ids for s in seqs] == reference


def test_abort_frees_the_cache_and_the_others_continue(built, reference):
    engine = _engine(built)
    seqs = [engine.add_request(p, GREEDY) for p in PROMPTS[:3]]
    for _ in range(4):
        engine.step()
    victim = seqs[1]
    assert set(_caches(engine)) == {s.seq_id for s in seqs}
    engine.abort(victim)
    assert victim.seq_id not in _caches(engine)  # freed at once, not at the next step
    assert victim.finish_reason == "abort"
    tokens_at_abort = list(victim.output_ids)
    _drain(engine)
    assert victim.output_ids == tokens_at_abort  # it left the batch
    assert seqs[0].output_ids == reference[0] and seqs[2].output_ids == reference[2]
    assert _caches(engine) == {}  # finished sequences free theirs too


def test_abort_of_a_waiting_request_never_runs_it(built, reference):
    engine = _engine(built, max_batch_size=1)
    running, waiting = engine.add_request(PROMPTS[0], GREEDY), engine.add_request(PROMPTS[1], GREEDY)
    engine.step()
    engine.abort(waiting)
    _drain(engine)
    assert waiting.output_ids == [] and waiting.finish_reason == "abort"
    assert running.output_ids == reference[0]
    assert _caches(engine) == {}


def test_length_at_max_tokens(built, reference):
    engine = _engine(built)
    seq = engine.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    _drain(engine)
    assert seq.output_ids == reference[1][:5]
    assert seq.finish_reason == "length"


def test_length_at_the_engines_max_seq_len(built, reference):
    engine = _engine(built, max_seq_len=20, max_input_len=16)
    seq = engine.add_request(PROMPTS[1], GREEDY)  # 11 prompt tokens: room for 9 of the 32 asked
    _drain(engine)
    assert seq.output_ids == reference[1][:20 - len(PROMPTS[1])]
    assert seq.finish_reason == "length"


def test_stop_token_ids_stop_with_that_token(built, reference):
    expected = reference[1]
    stop = expected[6]
    cut = expected.index(stop)  # its first occurrence
    engine = _engine(built)
    seq = engine.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=32, stop_token_ids=[stop]))
    _drain(engine)
    assert seq.output_ids == expected[:cut + 1]
    assert (seq.finish_reason, seq.stop_reason) == ("stop", stop)


def test_eos_stops_unless_ignore_eos(built, reference):
    expected = reference[2]
    eos = expected[4]
    cut = expected.index(eos)
    engine = _engine(built, eos=(eos,))
    stopped = engine.add_request(PROMPTS[2], SamplingParams(temperature=0, max_tokens=32))
    ignored = engine.add_request(PROMPTS[2], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    _drain(engine)
    assert stopped.output_ids == expected[:cut + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", eos)
    assert ignored.output_ids == expected and ignored.finish_reason == "length"


def test_prompt_longer_than_max_input_len_is_refused_alone(built, reference):
    engine = _engine(built)
    ok = engine.add_request(PROMPTS[0], GREEDY)
    with pytest.raises(ConfigError, match="max_input_len"):
        engine.add_request(list(range(17)), GREEDY)  # max_input_len is 16
    with pytest.raises(ConfigError):
        engine.add_request([], GREEDY)
    _drain(engine)
    assert ok.output_ids == reference[0]
