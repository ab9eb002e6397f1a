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

from conftest import TINY_SLIDING_WINDOW, hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(autouse=True, params=["0", "1"], ids=["steps-in-turn", "step-run-ahead"])
def step_run_ahead(request, monkeypatch):
    """Every test twice: each step read before the next is scheduled, and (KILN_STEP_RUN_AHEAD=1) every step but a
    decode burst queued before the host reads the step before: the tokens must not change."""
    monkeypatch.setenv("KILN_STEP_RUN_AHEAD", request.param)
    return request.param == "1"


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
    build_config = BuildConfig(**{**bc.to_dict(), **limits})
    return GenerationEngine(ModelRunner(model, torch.device("cpu"), build_config), build_config, eos)


def _tables(engine: GenerationEngine) -> dict:
    """seq_id -> block table of the sequences that hold KV-cache blocks."""
    return engine.blocks.tables


def _referenced(engine: GenerationEngine) -> int:
    """Blocks some live sequence holds (cached-but-unreferenced prefix blocks are free to take)."""
    blocks = engine.blocks
    return sum(1 for r in blocks.refs if r > 0)


def _assert_all_released(engine: GenerationEngine) -> None:
    blocks = engine.blocks
    assert _tables(engine) == {}
    assert _referenced(engine) == 0 and blocks.num_available() == blocks.num_blocks


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
    assert set(_tables(engine)) == {s.seq_id for s in seqs}
    held, victims_blocks = _referenced(engine), len(_tables(engine)[victim.seq_id])
    engine.abort(victim)
    assert victim.seq_id not in _tables(engine)  # freed at once, not at the next step
    assert _referenced(engine) == held - victims_blocks  # no prefix is shared: all its blocks went back
    assert victim.finish_reason == "abort"
    tokens_at_abort = list(victim.output_ids)
    _drain(engine)
    assert victim.output_ids == tokens_at_abort  # it left the batch
    assert seqs[0].output_ids == reference[0] and seqs[2].output_ids == reference[2]
    _assert_all_released(engine)  # finished sequences free theirs too


def test_abort_of_a_waiting_request_never_runs_it(built, reference):
    engine = _engine(built, max_batch_size=1)
    running, waiting = engine.add_request(PROMPTS[0], GREEDY), engine.add_request(PROMPTS[1], GREEDY)
    engine.step()
    engine.abort(waiting)
    _drain(engine)
    assert waiting.output_ids == [] and waiting.finish_reason == "abort"
    assert running.output_ids == reference[0]
    _assert_all_released(engine)


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


def test_token_ids_outside_the_vocabulary_are_refused_by_name(built, reference):
    model, bc, _ = built
    vocab = model.config.vocab_size
    engine = GenerationEngine(ModelRunner(model, torch.device("cpu"), bc), bc, vocab_size=vocab)
    for bad in (-1, vocab):
        with pytest.raises(ConfigError, match=rf"token id {bad} is outside the model's vocabulary \[0, {vocab}\)"):
            engine.add_request([1, bad, 2], GREEDY)
    for bad, kind in ((2.5, "float"), (True, "bool"), ("7", "str")):
        with pytest.raises(ConfigError, match=rf"token ids must be integers, got {bad!r} \({kind}\)"):
            engine.add_request([1, bad, 2], GREEDY)
    ok = engine.add_request(PROMPTS[0], GREEDY)
    _drain(engine)
    assert ok.output_ids == reference[0]


# ---- the paged KV cache: prefix reuse, chunked prefill and preemption leave the tokens unchanged ----------

SHARED = [(7 * i + 3) % 120 + 1 for i in range(24)]  # three 8-token blocks every prompt below starts with


def _drain_recording(engine: GenerationEngine) -> list[list[tuple[int, int, int]]]:
    """Drain the engine; per step, (seq_id, tokens cached before, tokens computed) of each scheduled sequence."""
    steps, schedule = [], engine.scheduler.schedule

    def recording():
        step = schedule()
        steps.append([(s.seq_id, s.num_cached, n) for s, n in step])
        return step

    engine.scheduler.schedule = recording
    _drain(engine)
    return steps


def test_shared_prefixes_are_reused_and_tokens_equal_transformers(built):
    hf = built[2]
    first = SHARED + [90, 91, 92, 93, 94]
    engine = _engine(built, tokens_per_block=8, max_input_len=64)
    a = engine.add_request(first, GREEDY)
    engine.step()  # a's 29-token prompt is computed: its 3 full blocks become findable
    b = engine.add_request(SHARED + [5, 6], GREEDY)  # hits a's 3 blocks while a still holds them
    c = engine.add_request(SHARED + [60] * 9, GREEDY)
    _drain(engine)
    assert engine.blocks.prefix_hit_tokens == 24 + 24
    # After a finished its blocks are unreferenced but still cached, its generated tokens' blocks too.
    d = engine.add_request(first + a.output_ids[:10], GREEDY)  # 39 tokens: 4 full blocks before the last
    _drain(engine)
    assert engine.blocks.prefix_hit_tokens == 24 + 24 + 32
    assert engine.blocks.hit_rate() == pytest.approx(80 / (29 + 26 + 33 + 39))
    for seq in (a, b, c, d):
        assert seq.output_ids == hf_greedy(hf, seq.prompt_ids, 32), seq.seq_id
    _assert_all_released(engine)


def test_prompts_prefilled_in_chunks_equal_transformers(built, reference):
    engine = _engine(built, max_num_tokens=4, tokens_per_block=4)
    seqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    steps = _drain_recording(engine)
    assert all(sum(n for _, _, n in step) <= 4 for step in steps)
    chunks = [(seq_id, n) for step in steps for seq_id, cached, n in step if cached + n < len(PROMPTS[seq_id])]
    assert chunks, "no prompt was split across steps"
    assert [s.output_ids for s in seqs] == reference
    _assert_all_released(engine)


@pytest.mark.parametrize("tokens_per_block,max_num_tokens", [(4, 16), (8, 16), (4, 3)])  # the last also chunks
def test_a_tiny_kv_cache_preempts_and_recomputes_without_changing_tokens(built, reference, tokens_per_block,
                                                                         max_num_tokens):
    # Room for one 48-token sequence; four of up to 11 + 32 tokens must take turns.
    engine = _engine(built, max_seq_len=48, max_input_len=16, kv_cache_max_tokens=48,
                     tokens_per_block=tokens_per_block, max_num_tokens=max_num_tokens)
    assert engine.blocks.num_blocks == 48 // tokens_per_block
    seqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    _drain(engine)
    assert engine.scheduler.num_preemptions > 0
    assert [s.output_ids for s in seqs] == reference
    _assert_all_released(engine)


def _hf_prompt_logprobs(hf, prompt: list[int], k: int) -> list:
    """(logprob of each prompt token after the first, its k most likely) by transformers, in float32."""
    with torch.no_grad():
        logprobs = hf(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)
    top = logprobs.topk(k)
    return [(logprobs[j, t].item(), list(zip(top.indices[j].tolist(), top.values[j].tolist())))
            for j, t in enumerate(prompt[1:])]


@pytest.mark.parametrize("tokens_per_block,max_num_tokens,kv_cache_max_tokens", [(4, 3, 48), (4, 16, None)],
                         ids=["chunked-and-preempted", "prefix-cached-by-another"])
def test_prompt_logprobs_equal_transformers_through_chunks_preemption_and_a_cached_prefix(
        built, reference, tokens_per_block, max_num_tokens, kv_cache_max_tokens):
    """SamplingParams.prompt_logprobs: every prompt token's logprob and top 3 as transformers gives them (float32,
    <= 1e-4), each position once, whether the prompt runs in 3-token chunks, is preempted and recomputed, or
    shares a prefix another request left in the cache (computed anew: its logits are needed); the generated
    tokens stay those of plain greedy decoding."""
    hf = built[2]
    engine = _engine(built, max_seq_len=48, max_input_len=16, kv_cache_max_tokens=kv_cache_max_tokens,
                     tokens_per_block=tokens_per_block, max_num_tokens=max_num_tokens)
    prompts = PROMPTS if kv_cache_max_tokens else [PROMPTS[1], PROMPTS[1]]
    if not kv_cache_max_tokens:  # the first, without prompt logprobs, leaves the prompt's blocks in the cache
        engine.add_request(prompts[0], GREEDY)
        _drain(engine)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, prompt_logprobs=3)
    seqs = [engine.add_request(p, params) for p in prompts[-(4 if kv_cache_max_tokens else 1):]]
    _drain(engine)
    if kv_cache_max_tokens:
        assert engine.scheduler.num_preemptions > 0
        assert [s.output_ids for s in seqs] == reference
    for seq in seqs:
        want = _hf_prompt_logprobs(hf, seq.prompt_ids, 3)
        assert len(seq.prompt_logprobs) == len(want) == len(seq.prompt_ids) - 1
        for (lp, top), (want_lp, want_top) in zip(seq.prompt_logprobs, want):
            assert lp == pytest.approx(want_lp, abs=1e-4)
            assert [t for t, _ in top] == [t for t, _ in want_top]
            assert [v for _, v in top] == pytest.approx([v for _, v in want_top], abs=1e-4)
    _assert_all_released(engine)


@pytest.mark.parametrize("tokens_per_block,max_num_tokens", [(4, 16), (8, 3)])
def test_guaranteed_no_evict_runs_the_tiny_cache_in_turns_without_preempting(built, reference, tokens_per_block,
                                                                             max_num_tokens):
    """The cache above (room for one sequence of 48 tokens) under capacity_scheduler_policy guaranteed_no_evict:
    each request waits until the cache can hold its whole output, so none is preempted, and the tokens are
    transformers' all the same."""
    engine = _engine(built, max_seq_len=48, max_input_len=16, kv_cache_max_tokens=48,
                     tokens_per_block=tokens_per_block, max_num_tokens=max_num_tokens,
                     capacity_scheduler_policy="guaranteed_no_evict")
    seqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    most_running = 0
    for _ in range(1000):
        if not engine.has_unfinished():
            break
        engine.step()
        most_running = max(most_running, len(engine.scheduler.running))
    assert engine.scheduler.num_preemptions == 0 and most_running == 1
    assert [s.output_ids for s in seqs] == reference
    _assert_all_released(engine)


def test_an_unknown_capacity_scheduler_policy_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="capacity_scheduler_policy.*'max_utilization' or 'guaranteed_no_evict'"):
        BuildConfig(capacity_scheduler_policy="fcfs")


@pytest.fixture(scope="module")
def built_mistral(tiny_mistral_session):
    hf_dir, hf = tiny_mistral_session
    engine = build(LLaMAForCausalLM.from_hugging_face(hf_dir), BuildConfig(max_seq_len=128, max_input_len=32))
    return engine.runtime_model(), engine.build_config, hf


def test_sliding_window_mistral_through_the_paged_cache_equals_transformers(built_mistral):
    hf = built_mistral[2]
    prompts = [list(range(30, 50)), list(range(30, 44)) + [9, 9], [77, 1, 5]]
    assert all(len(p) + 32 > 2 * TINY_SLIDING_WINDOW for p in prompts)  # the window cuts the context
    # Chunks continue a cached context, decode reads paged blocks, prefixes are shared, the cache is small.
    engine = _engine(built_mistral, tokens_per_block=4, max_num_tokens=6, kv_cache_max_tokens=64, max_seq_len=64)
    first = engine.add_request(prompts[0], GREEDY)
    for _ in range(5):
        engine.step()
    others = [engine.add_request(p, GREEDY) for p in prompts[1:]]
    _drain(engine)
    assert engine.blocks.hit_rate() > 0
    for seq in [first] + others:
        assert seq.output_ids == hf_greedy(hf, seq.prompt_ids, 32), seq.seq_id
    _assert_all_released(engine)


@pytest.mark.parametrize("steps", [2, 4, 7])
def test_decode_bursts_give_the_tokens_of_single_steps(built, reference, steps):
    """Bursts of greedy steps (here run eagerly, as on the CPU) stop each sequence where single steps would:
    at its EOS mid-burst, at its own max_tokens, at max_seq_len; and keep the block accounting exact."""
    # A token the third prompt produces mid-way and the others never do: it stops there, they go on.
    others = set(reference[0][:5] + reference[1][:13] + reference[3])
    eos = next(t for t in reference[2][2:29] if t not in others)
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (5, 13, 32, 60)]  # the last meets max_seq_len
    outputs = {}
    for k in (1, steps):
        engine = _engine(built, eos=[eos], decode_steps_per_sync=k, max_seq_len=40)
        seqs = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
        _drain(engine)
        outputs[k] = [(s.output_ids, s.finish_reason) for s in seqs]
        _assert_all_released(engine)
    assert outputs[steps] == outputs[1]
    ids, reason = outputs[steps][2]
    assert reason == "stop" and ids[-1] == eos and len(ids) < 32
    assert [len(ids) for ids, _ in outputs[steps]][0:2] == [5, 13]
    last, reason = outputs[steps][3]
    assert reason == "length" and len(last) == 40 - 1 and last[:32] == reference[3]


@pytest.mark.parametrize("kv_cache_max_tokens", [None, 80])  # 80: blocks run out, run-aheads and sequences wait
def test_bursts_run_ahead_give_the_tokens_of_single_steps(built, reference, kv_cache_max_tokens, monkeypatch):
    """The burst queued before the last one's tokens are read (on by default on a GPU only) is kept while the
    batch goes on unchanged and dropped when it changes: a sequence stops at its EOS mid-burst, one reaches its
    max_tokens, a request joins (sharing a cached prefix), another is aborted. Tokens and block accounting equal
    those of single steps."""
    monkeypatch.delenv("KILN_DECODE_RUN_AHEAD", raising=False)
    assert not _engine(built).executor.run_ahead  # on the CPU, by default
    monkeypatch.setenv("KILN_DECODE_RUN_AHEAD", "1")
    others = set(reference[0][:5] + reference[1][:13] + reference[3])
    eos = next(t for t in reference[2][2:29] if t not in others)  # stops the third prompt mid-way
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (5, 13, 32, 60, 30)]
    prompts = PROMPTS + [PROMPTS[1] + [8]]  # the last joins later and finds the second's blocks cached
    outputs, aborted = {}, {}
    for k in (1, 4):
        engine = _engine(built, eos=[eos], decode_steps_per_sync=k, max_seq_len=40, tokens_per_block=4,
                         kv_cache_max_tokens=kv_cache_max_tokens)
        queued = []  # the run-aheads planned: None (no room for one), queued, or only watched (paused)
        queue = engine.executor._queue_next_burst
        engine.executor._queue_next_burst = lambda *a: queued.append(queue(*a)) or queued[-1]
        seqs = [engine.add_request(p, sp) for p, sp in zip(prompts[:4], params)]
        for _ in range(6):
            engine.step()
        victim = engine.add_request(PROMPTS[3], params[1])
        engine.step()
        engine.abort(victim)
        aborted[k] = victim.finish_reason
        seqs.append(engine.add_request(prompts[4], params[4]))
        _drain(engine)
        outputs[k] = [(s.output_ids, s.finish_reason) for s in seqs]
        _assert_all_released(engine)
        if k > 1:
            used, queued = engine.executor.bursts_run_ahead, [a for a in queued if a and a.tokens is not None]
            assert 0 < used < len(queued)  # some kept, some dropped
    assert outputs[4] == outputs[1] and aborted == {1: "abort", 4: "abort"}
    assert outputs[4][2][1] == "stop" and outputs[4][3][1] == "length"
    assert engine.blocks.hit_rate() > 0


def _count_continued(engine) -> list:
    """The runner's continue_burst calls (the run-aheads queued), recorded as they happen."""
    continued, continue_burst = [], engine.executor.runner.continue_burst
    engine.executor.runner.continue_burst = lambda *a: continued.append(a) or continue_burst(*a)
    return continued


def test_run_ahead_goes_on_while_sequences_leave_the_batch(built, monkeypatch):
    """A sequence that leaves (here aborted at every step) leaves its row dead: the others keep the burst run
    ahead for them, until fewer than half the rows live and a fresh burst packs the batch."""
    monkeypatch.setenv("KILN_DECODE_RUN_AHEAD", "1")
    engine = _engine(built)
    continued = _count_continued(engine)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    seqs = [engine.add_request([5 + i, 9, 17], params) for i in range(5)]
    engine.step()  # the prompts
    for victim in seqs[1:]:
        engine.step()
        engine.abort(victim)
    _drain(engine)
    assert [None in tables for tables, _ in continued[:3]] == [False, True, True]  # then 3 of 5 rows dead: packed
    assert all(engine.executor.ahead_kept) and engine.executor.bursts_run_ahead == len(continued)
    assert seqs[0].output_ids == hf_greedy(built[2], [5, 9, 17], 60)
    _assert_all_released(engine)


def test_run_ahead_pauses_while_requests_keep_joining(built, monkeypatch):
    """A run-ahead dropped costs a burst of GPU time: after two drops (a request joins after every burst) no burst
    is queued ahead, only watched, and every sequence still gets transformers' tokens. (The script of steps below
    assumes each step is read before the next: queued ahead, a joining prompt's step is read by the call after.)"""
    monkeypatch.setenv("KILN_DECODE_RUN_AHEAD", "1")
    monkeypatch.setenv("KILN_STEP_RUN_AHEAD", "0")
    engine = _engine(built)
    continued = _count_continued(engine)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    prompts = [[5 + i, 9, 17] for i in range(5)]
    seqs = [engine.add_request(prompts[0], params)]
    engine.step()  # the prompt
    for prompt in prompts[1:]:
        engine.step()  # a burst, its run-ahead queued or watched
        seqs.append(engine.add_request(prompt, params))
        engine.step()  # the new prompt joins: the run-ahead is dropped
    _drain(engine)
    assert len(continued) == 2 and engine.executor.bursts_run_ahead == 0
    assert list(engine.executor.ahead_kept)[:4] == [False] * 4 and all(list(engine.executor.ahead_kept)[4:])
    assert [s.output_ids for s in seqs] == [hf_greedy(built[2], p, 60) for p in prompts]
    _assert_all_released(engine)


def test_a_full_batch_runs_ahead_while_requests_wait_for_a_seat(built, reference, monkeypatch):
    """Two seats, four requests: the waiting ones cannot join until a running one ends, so bursts run ahead
    with requests waiting, and every sequence still gets transformers' tokens."""
    monkeypatch.setenv("KILN_DECODE_RUN_AHEAD", "1")
    engine = _engine(built, max_batch_size=2)
    waiting_when_queued = []
    queue = engine.executor._queue_next_burst

    def queue_and_note(*args):
        ahead = queue(*args)
        if ahead is not None:
            waiting_when_queued.append(len(engine.scheduler.waiting))
        return ahead

    engine.executor._queue_next_burst = queue_and_note
    seqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    _drain(engine)
    assert [s.output_ids for s in seqs] == reference
    assert any(n > 0 for n in waiting_when_queued) and engine.executor.bursts_run_ahead > 0
    _assert_all_released(engine)


def test_steps_queued_ahead_stop_abort_and_release_as_steps_in_turn(built, reference, step_run_ahead):
    """Requests joining running ones in small chunks make many mixed steps. Queued ahead (step-run-ahead), a
    sequence's next input is its token still in flight; one stops on a token, one is aborted while its token is in
    flight, one ends at its length: the tokens and the freed blocks are those of steps taken in turn."""
    stop = reference[1][6]
    engine = _engine(built, max_num_tokens=6, tokens_per_block=4)
    victim = engine.add_request(PROMPTS[0], GREEDY)  # decoding while the prompts below join
    seqs = [engine.add_request(PROMPTS[0], GREEDY),
            engine.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=32, stop_token_ids=[stop])),
            engine.add_request(PROMPTS[2], GREEDY),
            engine.add_request(PROMPTS[3], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))]
    for _ in range(100):  # until its first token is sampled
        if victim.output_ids or victim.num_in_flight:
            break
        engine.step()
    assert victim.num_in_flight == int(step_run_ahead)  # queued ahead: that token is still in flight
    engine.abort(victim)
    aborted_with = list(victim.output_ids)
    _drain(engine)
    assert seqs[0].output_ids == reference[0] and seqs[2].output_ids == reference[2]
    assert seqs[1].output_ids == reference[1][:reference[1].index(stop) + 1] and seqs[1].finish_reason == "stop"
    assert seqs[3].output_ids == reference[3][:9] and seqs[3].finish_reason == "length"
    assert victim.output_ids == aborted_with == reference[0][:len(aborted_with)]
    assert victim.finish_reason == "abort"
    assert (engine.executor.steps_queued_ahead > 0) == step_run_ahead
    assert engine.executor.in_flight is None and all(s.num_in_flight == 0 for s in seqs)
    _assert_all_released(engine)


def test_step_run_ahead_is_off_by_default_on_the_cpu_and_never_takes_penalized_requests_or_bursts(built, monkeypatch):
    monkeypatch.delenv("KILN_STEP_RUN_AHEAD")
    assert not _engine(built).executor.step_run_ahead  # the CPU runs each step at once: nothing to overlap
    monkeypatch.setenv("KILN_STEP_RUN_AHEAD", "1")
    engine = _engine(built)
    greedy = engine.add_request(PROMPTS[1], GREEDY)
    sampled = engine.add_request(PROMPTS[2], SamplingParams(temperature=0.8, max_tokens=4, seed=1))
    penalized = engine.add_request(PROMPTS[0], SamplingParams(temperature=0, repetition_penalty=1.3))
    with_logprobs = engine.add_request(PROMPTS[0], SamplingParams(temperature=0, logprobs=2))
    assert engine.executor.can_queue_ahead([(greedy, 11), (sampled, 7)])
    for seq in (penalized, with_logprobs):  # penalties read the tokens so far on the host; logprobs the logits
        assert not engine.executor.can_queue_ahead([(greedy, 11), (seq, 3)])
    greedy.num_cached = 11
    greedy.output_ids.append(7)
    greedy.all_ids.append(7)
    assert not engine.executor.can_queue_ahead([(greedy, 1)])  # a greedy decode step: a burst takes it


@pytest.mark.parametrize("decode_steps_per_sync", [1, 4])
def test_seeded_sampling_gives_the_same_tokens_queued_ahead(built, monkeypatch, decode_steps_per_sync):
    """Sampled requests (temperature, top-k, top-p, seeded) beside greedy ones, joining while others decode: queued
    ahead, every step included (one decode step per sync) or all but the greedy bursts, they draw the tokens they
    draw with each step read in turn."""
    params = [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_tokens=12, seed=3, ignore_eos=True),
              GREEDY, SamplingParams(temperature=1.3, max_tokens=9, seed=8, ignore_eos=True),
              SamplingParams(temperature=0.7, top_p=0.5, max_tokens=15, seed=5, ignore_eos=True)]
    outputs, queued = {}, {}
    for setting in ("0", "1"):
        monkeypatch.setenv("KILN_STEP_RUN_AHEAD", setting)
        engine = _engine(built, decode_steps_per_sync=decode_steps_per_sync, max_num_tokens=8, tokens_per_block=4)
        seqs = [engine.add_request(p, sp) for p, sp in zip(PROMPTS[:2], params[:2])]
        for _ in range(3):
            engine.step()
        seqs += [engine.add_request(p, sp) for p, sp in zip(PROMPTS[2:], params[2:])]
        _drain(engine)
        outputs[setting], queued[setting] = [s.output_ids for s in seqs], engine.executor.steps_queued_ahead
        _assert_all_released(engine)
    assert outputs["1"] == outputs["0"] and [len(o) for o in outputs["1"]] == [12, 32, 9, 15]
    assert queued["0"] == 0 and queued["1"] > 0


# ---- speculative decoding by n-gram lookup: drafts checked in one step never change a greedy token ---------

@pytest.mark.parametrize("max_draft_len,limits", [
    (3, {}),
    (8, {"max_num_tokens": 6}),  # the step's budget cuts the drafts
    (4, {"max_seq_len": 48, "kv_cache_max_tokens": 48, "tokens_per_block": 4}),  # blocks run out: preemption
])
def test_ngram_drafts_give_the_greedy_tokens(built, reference, max_draft_len, limits):
    engine = _engine(built, max_draft_len=max_draft_len, **limits)
    seqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    _drain(engine)
    assert [s.output_ids for s in seqs] == reference
    ex = engine.executor
    assert ex.speculative_steps > 0 and 0 < ex.accepted_draft_tokens < ex.draft_tokens  # both outcomes were met
    _assert_all_released(engine)


@pytest.mark.parametrize("right", [True, False])
def test_drafts_are_taken_up_to_the_first_wrong_token(built, reference, right, monkeypatch):
    """Drafts of the true continuation are all taken (a step makes 1 + max_draft_len tokens); drafts that are all
    wrong are all refused (one token a step); the tokens are greedy decoding's either way."""
    import kiln.runtime.speculative as speculative

    truth = {tuple(p): p + r for p, r in zip(PROMPTS, reference)}

    def draft(self, ids, max_len):
        full = next(t for p, t in truth.items() if tuple(ids[:len(p)]) == p)
        continuation = full[len(ids):len(ids) + max_len]
        return continuation if right else [(t + 1) % 128 for t in continuation]

    monkeypatch.setattr(speculative.NgramIndex, "draft", draft)
    engine = _engine(built, max_draft_len=3)
    seqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    _drain(engine)
    assert [s.output_ids for s in seqs] == reference
    ex = engine.executor
    assert ex.accepted_draft_tokens == (ex.draft_tokens if right else 0)
    # The first token comes from the prompt's step; the last, with no room left for a draft, from a plain step.
    assert ex.speculative_steps == (-(-31 // 4) if right else 30)
    _assert_all_released(engine)


def test_sampled_requests_check_drafts_and_stop_string_ones_do_not(built, reference):
    engine = _engine(built, max_draft_len=4)
    stop = engine.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=["x"]))
    _drain(engine)
    assert engine.executor.speculative_steps == 0 and stop.output_ids == reference[1]
    # So cold that sampling is greedy decoding: the drafts' rows and the accepted tokens line up with the reference.
    cold = SamplingParams(temperature=1e-4, max_tokens=32, ignore_eos=True, seed=3)
    seqs = [engine.add_request(p, cold) for p in PROMPTS]
    _drain(engine)
    assert [s.output_ids for s in seqs] == reference
    assert engine.executor.accepted_draft_tokens > 0
    # Warm: a seed gives the same tokens again (drafts and their draws come from the sequence's own stream).
    warm = SamplingParams(temperature=0.9, max_tokens=32, ignore_eos=True, seed=5)
    runs = []
    for _ in range(2):
        seqs = [engine.add_request(p, warm) for p in PROMPTS]
        _drain(engine)
        runs.append([s.output_ids for s in seqs])
    assert runs[0] == runs[1] and all(len(ids) == 32 for ids in runs[0])
    _assert_all_released(engine)


@pytest.mark.parametrize("value", [-1, 17, 2.0, True])
def test_max_draft_len_out_of_range_is_refused_by_name(value):
    with pytest.raises(ConfigError, match=r"BuildConfig.max_draft_len must be an integer in \[0, 16\]"):
        BuildConfig(max_draft_len=value)
