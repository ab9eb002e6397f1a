"""The in-flight batching scheduler, pure Python, on thousands of random request streams.

The policy under test (kiln/runtime/scheduler.py): each step the running sequences decode one token each;
waiting ones are admitted oldest first while the batch has room (max_batch_size) and the step's token budget
(max_num_tokens) holds their whole prompts; a prompt longer than the whole budget runs alone.
"""

from __future__ import annotations

import random

import pytest

from kiln.runtime.scheduler import Scheduler
from kiln.runtime.sequence import Sequence


def _seq(seq_id: int, prompt_len: int, max_new: int) -> Sequence:
    return Sequence(seq_id, [1] * prompt_len, params=None, max_len=prompt_len + max_new, generator=None)


def _run_case(rng: random.Random) -> None:
    max_batch, max_tokens = rng.randint(1, 6), rng.randint(1, 48)
    sched = Scheduler(max_batch, max_tokens)
    added: list[Sequence] = []
    admitted: list[Sequence] = []  # in the order they first ran
    finished_waiting: set[int] = set()  # aborted before they ever ran
    running_before: list[Sequence] = []
    steps, adding_steps = 0, rng.randint(1, 40)
    while steps < adding_steps or sched.has_unfinished():
        steps += 1
        assert steps < 2000, "the scheduler stopped making progress"
        if steps <= adding_steps:
            for _ in range(rng.choice([0, 0, 1, 1, 2, 4])):
                seq = _seq(len(added), rng.choice([rng.randint(1, 8), rng.randint(1, 64)]), rng.randint(1, 6))
                sched.add(seq)
                added.append(seq)
        for seq in added:  # aborts, of waiting and of running requests
            if not seq.finished and rng.random() < 0.02:
                if seq not in admitted:
                    finished_waiting.add(seq.seq_id)
                seq.finish("abort")

        batch = sched.schedule()
        ids = [s.seq_id for s in batch]
        step_tokens = sum(len(s.pending_ids()) for s in batch)
        new = [s for s in batch if s not in admitted]

        assert len(batch) <= max_batch
        assert len(set(ids)) == len(ids)
        assert not any(s.finished for s in batch), "finished sequences must leave the batch"
        if step_tokens > max_tokens:  # only a single oversized prompt, alone
            assert len(batch) == 1 and batch[0].num_cached == 0 and len(batch[0].prompt_ids) > max_tokens
        # Running sequences keep their place (no preemption) and come first; then the newly admitted.
        assert batch[:len(batch) - len(new)] == [s for s in running_before if not s.finished]
        assert all(s.num_cached == 0 for s in new)
        # FIFO: admission follows arrival, skipping only requests aborted while waiting.
        admitted += new
        queue = [s for s in added if s.seq_id not in finished_waiting]
        assert admitted == queue[:len(admitted)]
        # Work conserving: the oldest waiting request is left out only when it does not fit.
        waiting = [s for s in queue[len(admitted):] if not s.finished]
        if waiting:
            assert batch, "an idle step with requests waiting"
            assert len(batch) == max_batch or len(waiting[0].prompt_ids) > max_tokens - step_tokens

        for seq in batch:  # what the executor and the engine do with a step
            seq.num_cached += len(seq.pending_ids())
            seq.output_ids.append(0)
            if len(seq.all_ids) >= seq.max_len or rng.random() < 0.05:
                seq.finish("length")
        running_before = [s for s in batch if not s.finished]

    assert all(s.finished for s in added)
    assert not any(s.seq_id in finished_waiting for s in admitted)


@pytest.mark.parametrize("chunk", range(4))
def test_random_request_streams_keep_the_scheduler_invariants(chunk):
    for case in range(chunk * 750, (chunk + 1) * 750):
        _run_case(random.Random(case))


def test_oversized_prompt_runs_alone_then_others_join():
    sched = Scheduler(max_batch_size=4, max_num_tokens=10)
    big, small = _seq(0, 25, 3), _seq(1, 3, 3)
    sched.add(big)
    sched.add(small)
    assert sched.schedule() == [big]
    big.num_cached, big.output_ids = 25, [0]
    assert sched.schedule() == [big, small]  # 1 decode token + a 3-token prompt fit in 10


def test_head_of_line_prompt_that_does_not_fit_waits_and_blocks_later_ones():
    sched = Scheduler(max_batch_size=8, max_num_tokens=10)
    first, second, third = _seq(0, 6, 5), _seq(1, 6, 5), _seq(2, 1, 5)
    for s in (first, second, third):
        sched.add(s)
    assert sched.schedule() == [first]  # 6 + 6 > 10; the 1-token third does not overtake second
    first.num_cached, first.output_ids = 6, [0]
    assert sched.schedule() == [first, second, third]  # 1 + 6 + 1 <= 10
