"""In-flight batching: requests join the running batch at any step and leave it as soon as they finish.

Plain Python, no tensors. Each step gives every running sequence its next tokens (one when decoding,
a chunk of its prompt while prefilling) within the step's token budget (max_num_tokens), then admits
waiting sequences (by SamplingParams.priority, lowest first, then oldest first) while the batch has room
(max_batch_size), the budget holds, and the KV cache has blocks for their prompts. A long prompt is prefilled
in chunks across steps. When a running sequence needs a block and none is left, the running sequence of the
highest priority value, the newest among equals, is preempted: its blocks are freed and it waits to be
recomputed (prompt and output so far), so no request fails for memory. Priorities order the queue and choose
the victims; a waiting request does not preempt a running one to get in.

With no_evict (BuildConfig's capacity_scheduler_policy "guaranteed_no_evict") a waiting sequence is admitted
only when the free blocks cover its whole length (prompt and max_tokens) on top of what the running ones may
still grow to: no sequence is ever preempted, and none recomputes a prompt it has already computed.
"""

from __future__ import annotations

import bisect
from collections import deque

from kiln.runtime.block_manager import BlockManager
from kiln.runtime.sequence import Sequence, Status


class Scheduler:
    def __init__(self, max_batch_size: int, max_num_tokens: int, blocks: BlockManager, no_evict: bool = False):
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.blocks = blocks
        self.no_evict = no_evict
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        """seq into the waiting queue at its place by (priority, age): at an end when it belongs there (all of
        equal priority: the common case, no search), else by bisection."""
        key = _order(seq)
        if not self.waiting or key >= _order(self.waiting[-1]):
            self.waiting.append(seq)
        elif key <= _order(self.waiting[0]):
            self.waiting.appendleft(seq)
        else:
            self.waiting.insert(bisect.bisect_right(self.waiting, key, key=_order), seq)

    def has_unfinished(self) -> bool:
        return any(not s.finished for s in self.waiting) or any(not s.finished for s in self.running)

    def can_admit(self) -> bool:
        """Whether a waiting sequence could join the batch without another leaving it first."""
        return bool(self.waiting) and len(self.running) < self.max_batch_size

    def free(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks at once."""
        self.blocks.free(seq.seq_id)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step: (sequence, number of its pending tokens to compute now), running ones first."""
        self.running = [s for s in self.running if not s.finished]
        budget = self.max_num_tokens
        step: list[tuple[Sequence, int]] = []
        preempted_before = self.num_preemptions
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:  # preempted below to make room for an older one
                continue
            n = min(seq.num_pending, budget)
            if n == 0:
                continue
            if not self._reserve(seq, seq.num_cached + n):
                continue  # seq itself was preempted
            step.append((seq, n))
            budget -= n
        if self.num_preemptions != preempted_before:
            step = [(s, n) for s, n in step if s.status is Status.RUNNING]
        reserved = self._growth_of_running() if self.no_evict else 0  # blocks the running ones may still take
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            seq = self.waiting[0]
            if seq.finished:  # aborted while waiting: dropped when it comes up (no scan of the queue every step)
                self.waiting.popleft()
                continue
            tokens = seq.all_ids
            if not self.blocks.can_allocate(seq.max_len if self.no_evict else len(tokens), reserved):
                break
            self.waiting.popleft()
            seq.num_cached = self.blocks.allocate(seq.seq_id, tokens, reuse=seq.params.prompt_logprobs is None)
            if self.no_evict:
                reserved += self.blocks.blocks_for(seq.max_len) - len(self.blocks.tables[seq.seq_id])
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(len(tokens) - seq.num_cached, budget)
            step.append((seq, n))
            budget -= n
        return step

    def _growth_of_running(self) -> int:
        """Blocks the running sequences may still add before each reaches its max_len."""
        tables = self.blocks.tables
        return sum(max(self.blocks.blocks_for(s.max_len) - len(tables[s.seq_id]), 0) for s in self.running
                   if s.status is Status.RUNNING)

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for num_tokens of seq, preempting the newest other sequences as needed; False if seq
        itself had to go."""
        while not self.blocks.append_slots(seq.seq_id, num_tokens):
            victim = max(self.running, key=_order)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id)
        self.running.remove(seq)
        seq.num_cached = 0
        seq.status = Status.WAITING
        self._enqueue(seq)
        self.num_preemptions += 1


def _order(seq: Sequence) -> tuple[int, int]:
    """A sequence's place in the queue and, reversed, as a preemption victim: its priority, then its age."""
    return seq.params.priority, seq.seq_id
