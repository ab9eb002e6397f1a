"""The in-flight batching scheduler, pure Python, on thousands of random request streams.

The policy under test (kiln/runtime/scheduler.py): each step the running sequences, oldest first, get their
next tokens (one when decoding, a chunk of the prompt while prefilling) within the step's token budget
(max_num_tokens); then waiting ones are admitted in order while the batch has room (max_batch_size), budget
is left, and the KV cache has blocks for their whole prompt. When a running sequence needs a block and none
is left, the newest running sequences are preempted: their blocks are freed and they wait, at the head of
the queue, to be recomputed from whatever prefix the cache still holds.

A fake executor drives it: it writes each computed token into a shadow KV cache (slot -> token), so a
sequence that reads a block it does not own, or a prefix hit with the wrong contents, shows up.
"""

from __future__ import annotations

import random

import pytest

from kiln.llmapi.sampling_params import SamplingParams
from kiln.runtime.block_manager import BlockManager
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.sequence import Sequence, Status


def _seq(seq_id: int, prompt: list[int] | int, max_new: int) -> Sequence:
    prompt = [1] * prompt if isinstance(prompt, int) else prompt
    return Sequence(seq_id, prompt, params=SamplingParams(), max_len=len(prompt) + max_new, seed=0)


class Stream:
    """One random request stream, checked step by step against the policy."""

    def __init__(self, rng: random.Random, no_evict: bool = False):
        self.rng, self.no_evict = rng, no_evict
        self.bs = rng.choice([1, 2, 4, 8])
        self.max_batch, self.max_tokens = rng.randint(1, 6), rng.randint(1, 48)
        self.max_seq_len = rng.randint(2, 40)
        # From one max_seq_len sequence's worth of blocks (preemption is common) to plenty.
        num_blocks = -(-self.max_seq_len // self.bs) + rng.choice([0, 0, 1, 3, 40])
        self.sched = Scheduler(self.max_batch, self.max_tokens, BlockManager(num_blocks, self.bs), no_evict)
        self.blocks = self.sched.blocks
        self.added: list[Sequence] = []
        self.queue: list[Sequence] = []  # the model's waiting queue
        self.running: list[Sequence] = []  # the model's running batch, oldest first
        self.shadow: dict[int, int] = {}

    def add_requests(self) -> None:
        for _ in range(self.rng.choice([0, 0, 1, 1, 2, 4])):
            earlier = [s.all_ids for s in self.added]
            prompt = list(self.rng.choice(earlier)) if earlier and self.rng.random() < 0.5 else []
            prompt = prompt[:self.rng.randint(0, self.max_seq_len - 2)]
            prompt += [self.rng.randint(0, 2) for _ in range(self.rng.randint(1 if not prompt else 0, 12))]
            prompt = prompt[:self.max_seq_len - 1]
            seq = _seq(len(self.added), prompt, self.rng.randint(1, self.max_seq_len - len(prompt)))
            self.sched.add(seq)
            self.added.append(seq)
            self.queue.append(seq)

    def abort_some(self) -> None:
        for seq in self.added:
            if not seq.finished and self.rng.random() < 0.01:
                seq.finish("abort")
                self.sched.free(seq)
                self._leave(seq)

    def _leave(self, seq: Sequence) -> None:
        self.queue = [s for s in self.queue if s is not seq]
        self.running = [s for s in self.running if s is not seq]

    def check_step(self, step: list[tuple[Sequence, int]], before: dict[int, int]) -> None:
        seqs = [s for s, _ in step]
        assert len(seqs) == len({s.seq_id for s in seqs})
        assert not any(s.finished for s in seqs), "finished sequences must leave the batch"
        assert all(n >= 1 for _, n in step)
        assert sum(n for _, n in step) <= self.max_tokens
        assert len(self.sched.running) <= self.max_batch and len(step) <= self.max_batch
        for seq, n in step:
            assert n <= len(seq.all_ids) - seq.num_cached
            assert len(self.blocks.tables[seq.seq_id]) * self.bs >= seq.num_cached + n, "no blocks for the step"
            for pos in range(seq.num_cached):  # what it will attend to holds its own tokens
                assert self.shadow.get(self.blocks.slot(seq.seq_id, pos)) == seq.all_ids[pos]

        # Preemption takes the newest running sequences; the survivors keep their order and come first.
        stayed = [s for s in self.running if s in self.sched.running]
        gone = self.running[len(stayed):]
        assert self.running[:len(stayed)] == stayed, "an older sequence was preempted before a newer one"
        assert self.sched.num_preemptions - before["preemptions"] == len(gone)
        assert not (self.no_evict and gone), "guaranteed_no_evict preempted a sequence"
        for seq in gone:
            assert seq.status is Status.WAITING and seq.seq_id not in self.blocks.tables
            assert seq.num_cached == 0
        scheduled_running = [s for s in seqs if s in stayed]
        assert seqs[:len(scheduled_running)] == scheduled_running
        budget_left = self.max_tokens - sum(n for _, n in step)
        for seq in stayed:  # every survivor got tokens unless the budget ran out
            assert seq in seqs or budget_left == 0

        # Admission: the model's queue, preempted ones back at its head (oldest first), strictly in order.
        self.queue = gone + self.queue
        new = seqs[len(scheduled_running):]
        assert new == self.queue[:len(new)], "admission out of order"
        self.queue = self.queue[len(new):]
        for i, (seq, n) in enumerate(step[len(scheduled_running):]):
            cached = seq.num_cached
            assert cached % self.bs == 0 and cached < len(seq.all_ids)
            if n < len(seq.all_ids) - cached:  # a first chunk only when it spends the rest of the budget
                assert i == len(new) - 1 and budget_left == 0
        # An admitted sequence, a preempted one too, starts at its prefix hit: not at 0, nor where it was.
        assert sum(s.num_cached for s in new) == self.blocks.prefix_hit_tokens - before["hits"]
        self.running = stayed + new
        # Work conserving: the head of the queue waits only when the batch, the budget or the blocks are full
        # (with no_evict: the blocks for its whole length, beyond what the running ones may still grow to).
        if self.queue:
            head = self.queue[0]
            need = self.blocks.blocks_for(len(head.all_ids))
            if self.no_evict:
                need = self.blocks.blocks_for(head.max_len) + sum(
                    max(self.blocks.blocks_for(s.max_len) - len(self.blocks.tables[s.seq_id]), 0)
                    for s in self.running)
            assert len(self.running) == self.max_batch or budget_left == 0 or need > self.blocks.num_available()
        assert self.running == self.sched.running
        assert [s for s in self.sched.waiting if not s.finished] == self.queue

    def execute(self, step: list[tuple[Sequence, int]]) -> None:
        """The executor and the engine: compute, register full blocks, sample, stop, free."""
        for seq, n in step:
            for pos in range(seq.num_cached, seq.num_cached + n):
                self.shadow[self.blocks.slot(seq.seq_id, pos)] = seq.all_ids[pos]
            seq.num_cached += n
            self.blocks.register_full_blocks(seq.seq_id, seq.all_ids, seq.num_cached)
            if seq.num_cached == len(seq.all_ids):
                seq.append_tokens([self.rng.randint(0, 2)], 0.0)
                if len(seq.all_ids) >= seq.max_len or self.rng.random() < 0.05:
                    seq.finish("length")
                    self.sched.free(seq)
                    self._leave(seq)


def _run_case(case: int, no_evict: bool = False) -> int:
    rng = random.Random(case)
    stream = Stream(rng, no_evict)
    sched = stream.sched
    steps, adding_steps = 0, rng.randint(1, 30)
    while steps < adding_steps or sched.has_unfinished():
        steps += 1
        assert steps < 3000, "the scheduler stopped making progress"
        if steps <= adding_steps:
            stream.add_requests()
        stream.abort_some()
        before = {"preemptions": sched.num_preemptions, "hits": stream.blocks.prefix_hit_tokens}
        step = sched.schedule()
        stream.check_step(step, before)
        stream.execute(step)
    assert all(s.finished for s in stream.added)
    assert stream.blocks.tables == {} and not any(stream.blocks.refs), "a block leaked"
    assert stream.blocks.num_available() == stream.blocks.num_blocks
    return sched.num_preemptions


@pytest.mark.parametrize("chunk", range(4))
def test_random_request_streams_keep_the_scheduler_invariants(chunk):
    preemptions = [_run_case(case) for case in range(chunk * 500, (chunk + 1) * 500)]
    assert sum(p > 0 for p in preemptions) > 50  # the small caches really preempt


@pytest.mark.parametrize("chunk", range(2))
def test_guaranteed_no_evict_never_preempts_and_keeps_the_invariants(chunk):
    """The same streams (the caches that made max_utilization preempt) under guaranteed_no_evict: every request
    finishes, no block leaks, admission stays in order and waits only for what the policy needs."""
    cases = range(chunk * 500, (chunk + 1) * 500)
    assert sum(_run_case(case) > 0 for case in cases) > 50
    assert all(_run_case(case, no_evict=True) == 0 for case in cases)


def test_long_prompt_is_prefilled_in_chunks_and_others_join_when_budget_allows():
    sched = Scheduler(max_batch_size=4, max_num_tokens=10, blocks=BlockManager(16, 4))
    big, small = _seq(0, 25, 3), _seq(1, 3, 3)
    sched.add(big)
    sched.add(small)
    assert sched.schedule() == [(big, 10)]
    big.num_cached = 10
    assert sched.schedule() == [(big, 10)]
    big.num_cached = 20
    assert sched.schedule() == [(big, 5), (small, 3)]
    big.num_cached = 25
    big.append_tokens([0], 0.0)
    small.num_cached = 3
    small.append_tokens([0], 0.0)
    assert sched.schedule() == [(big, 1), (small, 1)]


def test_admission_is_in_order_even_when_a_later_prompt_would_fit():
    sched = Scheduler(max_batch_size=8, max_num_tokens=10, blocks=BlockManager(16, 4))
    first, second, third = _seq(0, 6, 5), _seq(1, 6, 5), _seq(2, 1, 5)
    for s in (first, second, third):
        sched.add(s)
    assert sched.schedule() == [(first, 6), (second, 4)]  # the budget is spent: third does not overtake
    first.num_cached = 6
    first.append_tokens([0], 0.0)
    second.num_cached = 4
    assert sched.schedule() == [(first, 1), (second, 2), (third, 1)]


def test_head_of_line_prompt_without_blocks_waits_and_blocks_later_ones():
    sched = Scheduler(max_batch_size=8, max_num_tokens=64, blocks=BlockManager(4, 4))
    running, big, tiny = _seq(0, 8, 5), _seq(1, 9, 5), _seq(2, 1, 5)
    for s in (running, big, tiny):
        sched.add(s)
    assert sched.schedule() == [(running, 8)]  # 2 blocks left: big needs 3; tiny would fit but waits
    assert list(sched.waiting) == [big, tiny]


def test_out_of_blocks_preempts_the_newest_which_returns_first_from_its_cached_prefix():
    blocks = BlockManager(4, 2)
    sched = Scheduler(max_batch_size=4, max_num_tokens=64, blocks=blocks)
    old, new, later = _seq(0, [1, 2, 3], 8), _seq(1, [4, 5, 6], 8), _seq(2, [7], 8)
    sched.add(old)
    sched.add(new)
    assert sched.schedule() == [(old, 3), (new, 3)]  # all 4 blocks taken
    for s in (old, new):
        s.num_cached = 3
        blocks.register_full_blocks(s.seq_id, s.all_ids, 3)
        s.append_tokens([9], 0.0)
    sched.add(later)
    assert sched.schedule() == [(old, 1), (new, 1)]  # no new block yet (4 tokens in 2 blocks); later waits
    for s in (old, new):
        s.num_cached = 4
        s.append_tokens([9], 0.0)
        blocks.register_full_blocks(s.seq_id, s.all_ids, 4)
    new_blocks = list(blocks.tables[new.seq_id])
    # old's 5th token needs a third block: new, the newest, is preempted. Its blocks stay cached, last one
    # first in line for eviction, and old takes that one.
    step = sched.schedule()
    assert sched.num_preemptions == 1 and new.status is Status.WAITING and new.num_cached == 0
    assert list(sched.waiting) == [new, later]
    assert step == [(old, 1)]
    assert blocks.tables[old.seq_id][2] == new_blocks[1] and list(blocks.evictable) == [new_blocks[0]]
    old.num_cached, old.output_ids = 5, [9, 9, 9]
    old.finish("length")
    sched.free(old)
    step = sched.schedule()
    assert step[0] == (new, 3) and new.num_cached == 2  # back first; its first block was a cache hit
    assert step[1] == (later, 1)


def _prioritized(seq_id: int, prompt: int, max_new: int, priority: int) -> Sequence:
    return Sequence(seq_id, [1] * prompt, params=SamplingParams(priority=priority), max_len=prompt + max_new, seed=0)


def test_a_lower_priority_value_is_admitted_first_then_age_among_equals():
    """SamplingParams.priority (lower first, vLLM's): the queue orders by priority, then by age; a running sequence
    is not displaced by a waiting one of a lower value."""
    sched = Scheduler(max_batch_size=1, max_num_tokens=64, blocks=BlockManager(16, 4))
    first, plain, later_plain, urgent, urgent_later = (_prioritized(0, 3, 2, 0), _prioritized(1, 3, 2, 0),
                                                      _prioritized(2, 3, 2, 0), _prioritized(3, 3, 2, -5),
                                                      _prioritized(4, 3, 2, -5))
    sched.add(first)
    assert sched.schedule() == [(first, 3)]
    for s in (plain, later_plain, urgent, urgent_later):
        sched.add(s)
    assert list(sched.waiting) == [urgent, urgent_later, plain, later_plain]
    first.num_cached = 3
    first.append_tokens([0], 0.0)
    assert sched.schedule() == [(first, 1)]  # the batch is full: urgent waits for a place
    first.finish("length")
    sched.free(first)
    assert sched.schedule() == [(urgent, 3)]


def test_out_of_blocks_preempts_the_highest_priority_value_before_the_newest():
    """The victim is the running sequence of the highest priority value, even when it is the oldest and the one
    that needs the block; it waits ahead of the newer ones of its own value."""
    blocks = BlockManager(4, 2)
    sched = Scheduler(max_batch_size=4, max_num_tokens=64, blocks=blocks)
    background, urgent = _prioritized(0, 3, 8, 10), _prioritized(1, 3, 8, 0)
    sched.add(background)
    assert sched.schedule() == [(background, 3)]
    background.num_cached = 3
    background.append_tokens([9], 0.0)
    sched.add(urgent)
    assert sched.schedule() == [(background, 1), (urgent, 3)]  # all 4 blocks taken
    background.num_cached, urgent.num_cached = 4, 3
    background.append_tokens([9], 0.0)
    urgent.append_tokens([9], 0.0)
    step = sched.schedule()  # background's 5th token needs a block: background itself goes, not the newer urgent
    assert step == [(urgent, 1)] and background.status is Status.WAITING and urgent.status is Status.RUNNING
    newer_background = _prioritized(2, 1, 2, 10)
    sched.add(newer_background)
    assert list(sched.waiting) == [background, newer_background]
