"""A sequence's lifecycle: waiting -> running -> finished (stopped, cut at the length limit, or aborted)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from functools import cached_property

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
    seed: int  # of this sequence's sampling noise (kiln.runtime.sampler)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached: int = 0  # tokens whose keys and values are in the cache
    num_in_flight: int = 0  # tokens sampled by a step queued ahead, still on the GPU (kiln.runtime.executor)
    logprobs: list = field(default_factory=list)  # per output token, when params.logprobs is set
    prompt_logprobs: list = field(default_factory=list)  # per prompt token after the first (params.prompt_logprobs)
    arrival_time: float = field(default_factory=time.monotonic)
    token_times: list[float] = field(default_factory=list)  # when each output token was ready (monotonic)
    stop_ids: frozenset[int] = frozenset()  # tokens that end it: its stop_token_ids, and EOS unless ignore_eos
    ngrams: object = None  # its tokens' n-grams, for speculative drafts (kiln.runtime.speculative.NgramIndex)
    json: object = None  # its place in the JSON params.json_object or json_schema asks for (kiln.runtime.json_mode)
    # prompt + output, kept as one list (the scheduler reads it every step; concatenating each time is O(len))
    all_ids: list[int] = field(init=False)

    def __post_init__(self):
        self.all_ids = self.prompt_ids + self.output_ids

    _generators: dict = field(default_factory=dict, repr=False)

    def generator(self, device: torch.device) -> torch.Generator:
        """This sequence's random stream on `device` (made at its first sampled token there)."""
        if device not in self._generators:
            from kiln.runtime.sampler import make_generator

            self._generators[device] = make_generator(self.seed, device)
        return self._generators[device]

    def append_tokens(self, tokens: list[int], when: float) -> None:
        """New output tokens, all ready at `when` (one step, or a burst of decode steps read at once)."""
        self.output_ids += tokens
        self.all_ids += tokens
        if self.json is not None:
            self.json.advance(tokens)
        self.token_times += [when] * len(tokens)

    @cached_property  # the params never change: checked once, not at every step
    def queueable(self) -> bool:
        """Nothing read from the logits but the sampled token, and no penalty, bias, min_tokens or JSON mask (applied
        on the host's side of sampling, kiln.runtime.sampler): a step can be queued before the host has read this
        sequence's token from the step before."""
        p = self.params
        return (p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
                and p.logprobs is None and p.prompt_logprobs is None and not p.logit_bias and not p.min_tokens
                and p.json_grammar is None)

    @cached_property
    def scores_prompt(self) -> bool:
        """It wants its prompt tokens' logprobs (params.prompt_logprobs): its prompt chunks keep every row's logits."""
        return self.params.prompt_logprobs is not None

    @cached_property
    def burstable(self) -> bool:
        """Queueable, greedy, and no stop string (matched on text by the caller, after the fact): its decode steps
        can run in a burst, the host reading the tokens once."""
        p = self.params
        return self.queueable and p.greedy and not p.stop

    @property
    def num_pending(self) -> int:
        """Tokens to compute: known ones past the cache, and the one in flight (its step's input comes from the
        GPU). Zero once the last token the length limit allows is in flight: it ends the sequence, uncomputed."""
        known = len(self.all_ids) + self.num_in_flight
        if self.num_in_flight and known >= self.max_len:
            return 0
        return known - self.num_cached

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status, self.finish_reason, self.stop_reason = Status.FINISHED, reason, stop_reason
