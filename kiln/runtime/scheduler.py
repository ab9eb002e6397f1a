"""In-flight batching: requests join the running batch at any step and leave it as soon as they finish.

Plain Python, no tensors: each step it admits waiting sequences (oldest first) while the batch has
room (max_batch_size) and the step's token budget (max_num_tokens) holds their prompts; running
sequences each add one decode token. A prompt longer than the whole budget runs alone.
"""

from __future__ import annotations

from collections import deque

from kiln.runtime.sequence import Sequence, Status


class Scheduler:
    def __init__(self, max_batch_size: int, max_num_tokens: int):
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return any(not s.finished for s in self.waiting) or any(not s.finished for s in self.running)

    def schedule(self) -> list[Sequence]:
        """The sequences of the next step: running ones first (one token each), then newly admitted ones."""
        self.running = [s for s in self.running if not s.finished]
        self.waiting = deque(s for s in self.waiting if not s.finished)
        budget = self.max_num_tokens - len(self.running)
        while self.waiting and len(self.running) < self.max_batch_size:
            need = len(self.waiting[0].pending_ids())
            if need > budget and self.running:
                break
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            budget -= need
        return list(self.running)
