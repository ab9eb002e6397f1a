"""The generation loop: requests in, one scheduled model step at a time, tokens out.

`GenerationEngine` knows token ids only; text (detokenization, stop strings) is the LLM API's business.
It checks every request against the build limits when it arrives, so a bad one fails alone.
"""

from __future__ import annotations

import itertools
import numbers
import time
from collections.abc import Callable

import torch

from kiln.config import BuildConfig
from kiln.errors import ConfigError
from kiln.runtime.block_manager import BlockManager
from kiln.runtime.executor import Executor
from kiln.runtime.json_mode import JsonConstraint, JsonVocab
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.sequence import Sequence


class GenerationEngine:
    def __init__(self, runner, build_config: BuildConfig, eos_token_ids=(), vocab_size: int | None = None,
                 token_bytes: Callable[[], list] | None = None):
        """runner: a ModelRunner (one process), DriverRunner (torchrun) or WorkerGroup (worker processes);
        it says how many KV-cache blocks every rank holds. token_bytes: each token id's bytes
        (kiln.llmapi.tokenizer.token_bytes of the tokenizer), asked for at the first JSON-mode request."""
        self.build_config = build_config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.vocab_size = vocab_size
        self._token_bytes = token_bytes
        self._json_vocab: JsonVocab | None = None
        self.blocks = BlockManager(runner.num_blocks, build_config.tokens_per_block)
        self.executor = Executor(runner, self.blocks, build_config.max_seq_len, build_config.decode_steps_per_sync,
                                 build_config.max_draft_len, build_config.max_num_tokens)
        self.scheduler = Scheduler(build_config.max_batch_size, build_config.max_num_tokens, self.blocks,
                                   no_evict=build_config.capacity_scheduler_policy == "guaranteed_no_evict")
        self._ids = itertools.count()

    def add_request(self, prompt_ids: list[int], params, seed_offset: int = 0) -> Sequence:
        bc = self.build_config
        if not prompt_ids:
            raise ConfigError("the prompt is empty: give at least one token")
        not_ids = [t for t in prompt_ids if not isinstance(t, numbers.Integral) or isinstance(t, bool)]
        if not_ids:
            raise ConfigError(f"token ids must be integers, got {not_ids[0]!r} ({type(not_ids[0]).__name__})")
        if self.vocab_size is not None and not 0 <= min(prompt_ids) <= max(prompt_ids) < self.vocab_size:
            bad = next(t for t in prompt_ids if not 0 <= t < self.vocab_size)
            raise ConfigError(f"token id {bad} is outside the model's vocabulary [0, {self.vocab_size})")
        if self.vocab_size is not None and params.logit_bias and max(params.logit_bias) >= self.vocab_size:
            raise ConfigError(f"SamplingParams.logit_bias names token id {max(params.logit_bias)}, outside the model's "
                              f"vocabulary [0, {self.vocab_size})")
        if len(prompt_ids) > bc.max_input_len:
            raise ConfigError(f"the prompt has {len(prompt_ids)} tokens, more than the engine's max_input_len "
                              f"({bc.max_input_len}); shorten it or rebuild with a larger --max-input-len")
        if len(prompt_ids) >= bc.max_seq_len:
            raise ConfigError(f"the prompt has {len(prompt_ids)} tokens, leaving no room to generate within "
                              f"max_seq_len ({bc.max_seq_len})")
        # unseeded requests draw a seed here, so a request's stream never depends on its neighbours
        seed = int(torch.randint(0, 2**62, (1,))) if params.seed is None else params.seed + seed_offset
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        seq = Sequence(next(self._ids), list(prompt_ids), params,
                       max_len=min(len(prompt_ids) + params.max_tokens, bc.max_seq_len),
                       seed=seed, stop_ids=stop_ids)
        grammar = params.json_grammar
        if grammar is not None:
            seq.json = JsonConstraint(self.json_vocab(stop_ids), grammar)
        self.scheduler.add(seq)
        return seq

    def json_vocab(self, stop_ids) -> JsonVocab:
        """The vocabulary's JSON masks, made at the first JSON-mode request."""
        if self._token_bytes is None or self.vocab_size is None:
            raise ConfigError("SamplingParams.json_object and json_schema need the tokenizer's token bytes, which "
                              "this engine was not given: run it through kiln.LLM (or kiln serve)")
        if not stop_ids:
            raise ConfigError("SamplingParams.json_object and json_schema need a token to end the output once the "
                              "JSON closes: the model's config names no EOS; give stop_token_ids")
        if self._json_vocab is None:
            self._json_vocab = JsonVocab(self._token_bytes(), self.vocab_size)
        return self._json_vocab

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Sequence]:
        """Run one step; returns the sequences that got a token (finished ones say why).

        With a step queued ahead (Executor.can_queue_ahead) the tokens returned are those of the step before,
        read while this one runs. When the next step cannot be queued ahead (it needs those tokens on the host),
        this call only reads them and returns: they reach the caller now, not after that step; the next call
        schedules again (the same step, or more)."""
        step = self.scheduler.schedule()
        if self.executor.in_flight is not None and not (step and self.executor.can_queue_ahead(step)):
            return self._append_all(self.executor.collect())
        if not step:
            return []
        # a full batch only changes when a sequence ends: requests waiting for a seat do not stop a run-ahead
        return self._append_all(self.executor.step(step, may_run_ahead=not self.scheduler.can_admit()))

    def _append_all(self, produced: list[tuple[Sequence, list[int]]]) -> list[Sequence]:
        now = time.monotonic()
        got = []
        for seq, tokens in produced:
            if seq.finished:  # ended (a stop token, an abort) while a step after it was queued: its token goes
                continue
            self._append(seq, tokens, now)
            got.append(seq)
            # the cache already holds tokens that were not known until now (a burst's, or one in flight): their
            # full blocks become findable now
            if not seq.finished and seq.num_cached > len(seq.all_ids) - len(tokens):
                self.blocks.register_full_blocks(seq.seq_id, seq.all_ids, min(seq.num_cached, len(seq.all_ids)))
        return got

    def _append(self, seq: Sequence, tokens: list[int], now: float) -> None:
        """Append the step's tokens (several after a burst of decode steps) up to the first stop token or the
        length limit, and finish the sequence there: the tokens past it are dropped."""
        tokens = tokens[:max(1, seq.max_len - len(seq.all_ids))]
        stopped = not seq.stop_ids.isdisjoint(tokens)
        if stopped:
            tokens = tokens[:next(i for i, token in enumerate(tokens) if token in seq.stop_ids) + 1]
        seq.append_tokens(tokens, now)
        if stopped:
            self.finish(seq, "stop", tokens[-1])
        elif len(seq.all_ids) >= seq.max_len:
            self.finish(seq, "length")

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (for any reason: EOS, length, a stop string seen by the caller, abort): its KV
        blocks are released at once and it leaves the batch at the next step."""
        if not seq.finished:
            seq.finish(reason, stop_reason)
            self.scheduler.free(seq)

    def abort(self, seq: Sequence) -> None:
        """Cancel a request."""
        self.finish(seq, "abort")
