"""A sequence's lifecycle: waiting -> running -> finished (stopped, cut at the length limit, or aborted)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# eq=False: sequences are compared and hashed by identity (value equality would compare every token)
@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: object  # SamplingParams
    max_len: int  # prompt + generated tokens never exceed this (max_tokens and the engine's max_seq_len)
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached: int = 0  # tokens whose keys and values are in the cache
    logprobs: list = field(default_factory=list)  # per output token, when params.logprobs is set
    arrival_time: float = field(default_factory=time.monotonic)
    token_times: list[float] = field(default_factory=list)  # when each output token was ready (monotonic)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def pending_ids(self) -> list[int]:
        """Tokens the next forward must feed: the whole prompt first, then one token at a time."""
        return self.all_ids[self.num_cached:]

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status, self.finish_reason, self.stop_reason = Status.FINISHED, reason, stop_reason
