"""The front end of a step: turn the scheduled (sequence, tokens) pairs into StepInputs with their cache
slots, run them on a runner (in-process or a group of worker processes), and sample the next token of
every sequence whose prompt is now fully computed.

Greedy decode steps run in bursts of `decode_steps_per_sync`, the host reading a burst's tokens once. While no
waiting request could join the batch, the next burst is queued before the host reads the last (run ahead): on the
GPU the host's work between bursts (appending tokens, stop checks, scheduling, the caller's detokenizing) then
overlaps the kernels instead of leaving the GPU idle. Sequences that end leave dead rows in it; a request that
joins drops it, and run-ahead pauses while drops are frequent. On by default on a GPU; `KILN_DECODE_RUN_AHEAD=0|1`
turns it off or on.

Every other step (prompts joining running sequences, sampled requests' decode steps) can be queued ahead too
(step run-ahead; on by default on a GPU since its A/B there, `KILN_STEP_RUN_AHEAD=0|1`): its sampled tokens stay on
the GPU, where the next step's inputs read them, and the host reads them while that next step runs.

With `max_draft_len` set, a step of decoding whose sequences find drafts in their own tokens checks them
instead (kiln.runtime.speculative): the sequences' next tokens and drafts in one step, up to 1 + max_draft_len
tokens each. Decode bursts are then not queued ahead: the step after a burst may be a speculative one."""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass

import torch

from kiln.runtime.block_manager import BlockManager
from kiln.runtime.model_runner import BurstTokens, StepInputs
from kiln.runtime.sampler import greedy_tokens, sample_batch, sampling_probs, token_logprobs
from kiln.runtime.sequence import Sequence
from kiln.runtime.speculative import NgramIndex, accept_greedy, accept_sampled


def step_inputs(step: list[tuple[Sequence, int]], blocks: BlockManager) -> StepInputs:
    """Flat lists of the step, appended per sequence (at batch 512 this runs every step: no per-token calls)."""
    inp = StepInputs([], [], [], [], [], [])
    bs = blocks.block_size
    every_row = []  # the chunks that keep every row's logits (prompt logprobs; a 1-token chunk's row is its last)
    for i, (seq, n) in enumerate(step):
        start = seq.num_cached
        table = blocks.tables[seq.seq_id]
        inp.query_lens.append(n)
        inp.context_lens.append(start)
        inp.block_tables.append(table)
        if n == 1:  # decoding: the common case; a token still in flight is filled in on the GPU (IN_FLIGHT)
            inp.token_ids.append(seq.all_ids[start] if start < len(seq.all_ids) else IN_FLIGHT)
            inp.positions.append(start)
            inp.slot_mapping.append(table[start // bs] * bs + start % bs)
            continue
        end = start + n
        if seq.scores_prompt and start < len(seq.prompt_ids):
            every_row.append(i)
        inp.token_ids += seq.all_ids[start:end]
        inp.positions += range(start, end)
        for b in range(start // bs, (end - 1) // bs + 1):  # each block's run of slots at once
            base = table[b] * bs - b * bs
            inp.slot_mapping += range(base + max(start, b * bs), base + min(end, (b + 1) * bs))
    if every_row:
        inp.all_logits = [False] * len(step)
        for i in every_row:
            inp.all_logits[i] = True
    return inp


def _add_prompt_logprobs(seq: Sequence, logits: torch.Tensor) -> None:
    """The logprobs of the prompt tokens that a chunk's logits predict (row j: the token after the chunk's j-th),
    in one pass over the chunk; each prompt position once (a sequence preempted and recomputed adds none again)."""
    first = len(seq.prompt_logprobs) + 1  # the next prompt position without one
    lo, hi = first - seq.num_cached - 1, min(logits.shape[0], len(seq.prompt_ids) - seq.num_cached - 1)
    assert lo >= 0, "a prompt with prompt_logprobs is computed whole (no cached prefix)"
    if hi <= lo:
        return
    logprobs = logits[lo:hi].float().log_softmax(-1)
    targets = torch.tensor(seq.prompt_ids[first:first + hi - lo], device=logprobs.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    k = seq.params.prompt_logprobs
    top = logprobs.topk(k) if k else None
    alternatives = ([list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())] if top is not None
                    else [[] for _ in chosen])
    seq.prompt_logprobs += list(zip(chosen, alternatives))


IN_FLIGHT = -1  # a step input's token id that the GPU fills from the step before (never a real id: fails loudly)


def draft_rows(step: list[tuple[Sequence, int]], drafts: list[list[int]], blocks: BlockManager) -> StepInputs:
    """A speculative step as a decode step: each sequence's next token and draft tokens are rows of their own, on
    the sequence's block table, row j after the j tokens before it in the step (whose keys the step writes before
    any row attends). One decode step of all the rows gives every position's logits, in the decode CUDA graphs
    where the row count has one."""
    inp = StepInputs([], [], [], [], [], [])
    bs = blocks.block_size
    for (seq, _), draft in zip(step, drafts):
        start, table = seq.num_cached, blocks.tables[seq.seq_id]
        for position, token in enumerate([seq.all_ids[start], *draft], start):
            inp.token_ids.append(token)
            inp.positions.append(position)
            inp.query_lens.append(1)
            inp.context_lens.append(position)
            inp.slot_mapping.append(table[position // bs] * bs + position % bs)
            inp.block_tables.append(table)
    return inp


def _run_ahead_setting(runner, name: str = "KILN_DECODE_RUN_AHEAD", default_on_gpu: bool = True) -> bool:
    """`name`=1 or 0; unset, on where the queued work runs while the host works (a GPU) and `default_on_gpu`.
    On the CPU the runner computes it at once, which would only hold back the tokens of the step before it."""
    setting = os.environ.get(name)
    if setting is None:
        return default_on_gpu and runner.device.type == "cuda"
    return setting != "0"


def step_run_ahead_setting(runner) -> bool:
    """Whether steps other than decode bursts are queued ahead, on one rank's runner in this process: on a GPU
    unless KILN_STEP_RUN_AHEAD=0 (it measured 1.6-3.4% faster on prefill-heavy work there), on the CPU only with
    KILN_STEP_RUN_AHEAD=1."""
    return (hasattr(runner, "execute_ahead") and runner.mapping.world_size == 1
            and _run_ahead_setting(runner, "KILN_STEP_RUN_AHEAD"))


@dataclass
class InFlight:
    """A step queued before the host read the tokens of the step before it (step run-ahead): the sequences it
    samples, in row order, and their tokens, on the GPU (the next step's inputs read them there) and on their way
    to the host."""

    seqs: list[Sequence]
    on_device: object  # torch.Tensor [len(seqs)]
    tokens: BurstTokens


@dataclass
class RunAhead:
    """A decode burst queued right after another, before the host read that one's tokens: the same rows' next
    steps. The next step takes its tokens if it is the decode of those rows' sequences that are still running
    (a sequence that ended or was aborted leaves its row dead: its keys go to the scratch block from then on);
    else they are dropped (the keys it wrote sit past every sequence's cached tokens, where the next real step
    writes its own)."""

    seqs: list[Sequence | None]  # per row of the burst; None: a sequence that left the batch
    starts: list[int]  # each row's num_cached where the burst begins
    steps: int
    tokens: BurstTokens | None  # None: not queued (run-ahead paused), only watched for whether it would be kept

    def rows_of(self, step: list[tuple[Sequence, int]]) -> list[int] | None:
        """The row of each of the step's sequences, if the step is the decode of some of this burst's sequences
        at the burst's start; else None."""
        row_of = {id(seq): i for i, seq in enumerate(self.seqs) if seq is not None}
        rows = [row_of.get(id(seq)) for seq, _ in step]
        if any(i is None or n != 1 or seq.num_cached != self.starts[i] for i, (seq, n) in zip(rows, step)):
            return None
        return rows


# A dropped run-ahead wastes a burst of GPU time (4 steps: 11-16 ms for an 8B model at batch 1), a kept one saves
# the host's time between bursts (about 0.7 ms there): it pays while fewer than 1 in 20 are dropped. Run-ahead pauses
# while more than one of the last 32 that could have run would have been dropped (requests joining often, as when
# serving many users), and resumes when the batch holds steady again.
RUN_AHEAD_WINDOW = 32
RUN_AHEAD_MAX_DROPS = 1


class Executor:
    def __init__(self, runner, blocks: BlockManager, max_seq_len: int, decode_steps_per_sync: int = 1,
                 max_draft_len: int = 0, max_num_tokens: int | None = None):
        self.runner = runner  # ModelRunner, DriverRunner (torchrun) or WorkerGroup
        self.blocks = blocks
        self.max_seq_len = max_seq_len
        self.decode_steps_per_sync = decode_steps_per_sync
        self.max_draft_len = max_draft_len
        self.max_num_tokens = max_num_tokens or max_seq_len  # a step's token budget, drafts included
        self.run_ahead = hasattr(runner, "continue_burst") and _run_ahead_setting(runner) and not max_draft_len
        self.step_run_ahead = step_run_ahead_setting(runner)
        self.in_flight: InFlight | None = None
        self.steps_queued_ahead = 0  # (the decode bursts' own run-ahead counts in bursts_run_ahead)
        self.ahead: RunAhead | None = None
        self.ahead_kept: deque[bool] = deque(maxlen=RUN_AHEAD_WINDOW)  # whether the next step continued each one
        self.bursts = self.bursts_run_ahead = 0  # decode bursts run, and those whose tokens came from a run-ahead
        self.speculative_steps = self.draft_tokens = self.accepted_draft_tokens = 0

    def step(self, step: list[tuple[Sequence, int]], may_run_ahead: bool = False) -> list[tuple[Sequence, list[int]]]:
        """Run one step; returns (sequence, new tokens) for the sequences that produced any: one token
        each, or several from a burst of greedy decode steps (the caller drops those past a stop).

        may_run_ahead: no waiting request could join the batch at the next step (none waits, or the batch is
        full), so after a burst the next one is queued before this one's tokens are read (the GPU then runs it
        while the host handles these tokens and schedules again).

        A step that is not a burst may be queued ahead instead (`can_queue_ahead`): then the tokens returned are
        those of the step queued before it."""
        ahead, self.ahead = self.ahead, None
        rows = None if ahead is None else ahead.rows_of(step)
        if ahead is not None:
            self.ahead_kept.append(rows is not None)
        drafts = self._drafts(step)
        if drafts is not None:
            return self._speculative_step(step, drafts)
        if self.can_queue_ahead(step):  # (not a burst: a burst queued ahead is dropped, as rows_of said)
            return self._queue_ahead(step)
        assert self.in_flight is None, "the engine reads a step in flight before one that needs its tokens"
        if rows is not None and ahead.tokens is not None:
            steps, tokens = ahead.steps, ahead.tokens
            running = {id(seq) for seq, _ in step}
            layout = [seq if seq is not None and id(seq) in running else None for seq in ahead.seqs]
            self.bursts_run_ahead += 1
        else:
            steps = self._burst_steps(step)
            if steps == 1:
                return self._single_step(step)
            tokens = self.runner.decode_burst(step_inputs(step, self.blocks), steps)
            layout, rows = [seq for seq, _ in step], range(len(step))
        self.bursts += 1
        if may_run_ahead and self.run_ahead:
            self.ahead = self._queue_next_burst(layout, steps)
        per_row = tokens.per_sequence()
        for seq, _ in step:
            seq.num_cached += steps
        return [(seq, per_row[i]) for (seq, _), i in zip(step, rows)]

    def can_queue_ahead(self, step: list[tuple[Sequence, int]]) -> bool:
        """Whether `step` runs queued ahead (step run-ahead): every sequence in it is `queueable` (its token can
        stay on the GPU until the next step is queued), and it is not a greedy decode step that a burst takes."""
        if not self.step_run_ahead or not all(seq.queueable for seq, _ in step) or self._speculable(step):
            return False
        return not (self.decode_steps_per_sync > 1 and hasattr(self.runner, "decode_burst")
                    and all(seq.num_pending == 1 and seq.burstable for seq, _ in step))

    def collect(self) -> list[tuple[Sequence, list[int]]]:
        """The tokens of the step in flight (waits for them), as (sequence, [token]); none in flight: []."""
        done, self.in_flight = self.in_flight, None
        if done is None:
            return []
        for seq in done.seqs:
            seq.num_in_flight -= 1
        return [(seq, tokens) for seq, tokens in zip(done.seqs, done.tokens.per_sequence())]

    def _queue_ahead(self, step: list[tuple[Sequence, int]]) -> list[tuple[Sequence, list[int]]]:
        """Queue `step` with its sampled tokens left on the GPU, then read the step queued before it: on a GPU the
        host's work between two steps (appending tokens, stop checks, scheduling, the next step's inputs) then
        overlaps the kernels instead of leaving the GPU idle. A sequence whose token is still in flight takes its
        input from the step before, on the GPU. Returns the tokens of the step before (none for the first)."""
        before = self.in_flight
        self.steps_queued_ahead += 1
        inp = step_inputs(step, self.blocks)
        fill_rows, fill_from = [], []  # rows of this step's tokens that are the step before's samples
        if before is not None:
            row_of = {id(seq): i for i, seq in enumerate(before.seqs)}
            start = 0
            for seq, n in step:
                if seq.num_in_flight and seq.num_cached == len(seq.all_ids):  # its next input is in flight
                    fill_rows.append(start)
                    fill_from.append(row_of[id(seq)])
                start += n
        sampling = [i for i, (seq, n) in enumerate(step)
                    if seq.num_cached + n == len(seq.all_ids) + seq.num_in_flight]
        fill = (fill_rows, fill_from, before.on_device) if fill_rows else None
        seqs = [step[i][0] for i in sampling]
        on_device = self.runner.execute_ahead(inp, sampling, seqs, fill)
        for seq, n in step:
            seq.num_cached += n
            if n > 1:  # a prompt's chunk: its full blocks are findable now (a decoding row's, once its token is read)
                self.blocks.register_full_blocks(seq.seq_id, seq.all_ids, min(seq.num_cached, len(seq.all_ids)))
        queued = InFlight(seqs, on_device, BurstTokens(on_device[None])) if seqs else None  # (copy started)
        for seq in seqs:
            seq.num_in_flight += 1
        produced = self.collect()  # the step before: its tokens are ready while this one runs
        self.in_flight = queued
        return produced

    def _single_step(self, step: list[tuple[Sequence, int]]) -> list[tuple[Sequence, list[int]]]:
        inp = step_inputs(step, self.blocks)
        logits = self.runner.execute(inp)
        last = inp.last_rows()  # each sequence's row of logits (its last token's)
        ready, seqs = [], []  # the rows and sequences that sample: not a chunk in the middle of a prompt
        for i, (seq, n) in enumerate(step):
            if seq.scores_prompt and seq.num_cached < len(seq.prompt_ids):  # (its chunk's rows end at last[i])
                _add_prompt_logprobs(seq, logits[last[i] - n + 1:last[i] + 1])
            seq.num_cached += n
            self.blocks.register_full_blocks(seq.seq_id, seq.all_ids, seq.num_cached)
            if seq.num_cached == len(seq.all_ids):
                ready.append(last[i])
                seqs.append(seq)
        if not ready:
            return []
        if len(ready) < logits.shape[0]:
            logits = logits[ready]
        tokens = sample_batch(logits, seqs)
        for i, seq in enumerate(seqs):
            if seq.params.logprobs is not None:
                seq.logprobs.append(token_logprobs(logits[i], tokens[i], seq.params.logprobs))
        return [(seq, [token]) for seq, token in zip(seqs, tokens)]

    def _speculable(self, step: list[tuple[Sequence, int]]) -> bool:
        """Whether the step may check drafts: speculation is on, and the step decodes sequences with no penalty,
        logprobs, JSON mask or stop string (a stop string is matched on text, by the caller, a token at a time).
        Such a step is never queued ahead: its drafts need the host to have its tokens."""
        return bool(self.max_draft_len) and all(seq.num_pending == 1 and seq.queueable and not seq.params.stop
                                                for seq, _ in step)

    def _drafts(self, step: list[tuple[Sequence, int]]) -> list[list[int]] | None:
        """Each sequence's draft (kiln.runtime.speculative), its blocks reserved, when the step is `_speculable`
        and some sequence finds one; else None. Drafts stay within each sequence's length limit and the step's
        token budget, and a sequence whose draft's blocks are not free goes without."""
        if self.in_flight is not None or not self._speculable(step):
            return None
        budget = self.max_num_tokens - len(step)
        drafts = []
        for seq, _ in step:
            if seq.ngrams is None:
                seq.ngrams = NgramIndex()
            room = min(self.max_draft_len, seq.max_len - len(seq.all_ids) - 1, budget)
            draft = seq.ngrams.draft(seq.all_ids, room)
            if draft and not self.blocks.append_slots(seq.seq_id, seq.num_cached + 1 + len(draft)):
                draft = []
            budget -= len(draft)
            drafts.append(draft)
        return drafts if any(drafts) else None

    def _speculative_step(self, step: list[tuple[Sequence, int]], drafts: list[list[int]]):
        """Run each sequence's next token and draft, keeping every position's logits; each sequence takes its
        draft up to the first token it refuses (kiln.runtime.speculative), then a token of its own."""
        logits = self.runner.execute(draft_rows(step, drafts, self.blocks)).float()
        targets = greedy_tokens(logits).tolist()
        produced, start = [], 0
        for (seq, _), draft in zip(step, drafts):
            rows = slice(start, start + 1 + len(draft))
            start = rows.stop
            if seq.params.greedy:
                tokens = accept_greedy(draft, targets[rows])
            else:
                probs = sampling_probs(logits[rows], [seq.params] * (1 + len(draft)))
                tokens = accept_sampled(draft, probs, seq.generator(logits.device))
            seq.num_cached += len(tokens)  # the input token and the accepted drafts (the last token is new)
            self.blocks.register_full_blocks(seq.seq_id, seq.all_ids, min(seq.num_cached, len(seq.all_ids)))
            produced.append((seq, tokens))
            self.accepted_draft_tokens += len(tokens) - 1
        self.speculative_steps += 1
        self.draft_tokens += sum(map(len, drafts))
        return produced

    def _burst_steps(self, step) -> int:
        """How many greedy decode steps this step can run before the host looks (1: an ordinary step).

        Only decode steps of greedy requests without stop strings (a stop string is matched on text, by
        the caller, after the fact), and only as far as every sequence's blocks reach: blocks are
        reserved here for the whole burst, up to each sequence's own end."""
        steps = self.decode_steps_per_sync
        if steps == 1 or not hasattr(self.runner, "decode_burst"):
            return 1
        # n == 1 alone is not decoding: a prompt chunk cut to one token by the budget has more to come
        seqs = [seq for seq, _ in step]
        if not all(seq.num_pending == 1 and seq.burstable for seq in seqs):
            return 1
        steps = min(steps, self.max_seq_len - max(seq.num_cached for seq in seqs))
        for seq in seqs:
            if not self.blocks.append_slots(seq.seq_id, min(seq.num_cached + steps, seq.max_len)):
                return 1
        return steps

    def _queue_next_burst(self, layout: list[Sequence | None], steps: int) -> RunAhead | None:
        """The burst after this one, over the same rows (`layout`: the sequence of each, None where one left),
        when every sequence has room for all of it within its length limit (so none leaves the batch by length in
        this burst) and at least half the rows are alive (else a fresh burst packs the batch into a smaller
        graph): queued now, its blocks reserved here, unless run-ahead is paused or blocks are short; then only
        watched."""
        live = [seq for seq in layout if seq is not None]
        if 2 * len(live) < len(layout) or any(seq.num_cached + 2 * steps >= seq.max_len for seq in live):
            return None
        starts = [seq.num_cached + steps if seq is not None else -1 for seq in layout]
        ahead = RunAhead(layout, starts, steps, None)
        if self.ahead_kept.count(False) > RUN_AHEAD_MAX_DROPS:
            return ahead
        for seq in live:
            if not self.blocks.append_slots(seq.seq_id, seq.num_cached + 2 * steps):
                return ahead
        tables = [None if seq is None else self.blocks.tables[seq.seq_id] for seq in layout]
        ahead.tokens = self.runner.continue_burst(tables, steps)
        return ahead
