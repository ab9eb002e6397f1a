"""The front end of a step: turn the scheduled (sequence, tokens) pairs into StepInputs with their cache
slots, run them on a runner (in-process or a group of worker processes), and sample the next token of
every sequence whose prompt is now fully computed."""

from __future__ import annotations

import torch

from kiln.runtime.block_manager import BlockManager
from kiln.runtime.model_runner import StepInputs
from kiln.runtime.sampler import sample_token, token_logprobs
from kiln.runtime.sequence import Sequence


def step_inputs(step: list[tuple[Sequence, int]], blocks: BlockManager) -> StepInputs:
    inp = StepInputs([], [], [], [], [], [])
    for seq, n in step:
        start = seq.num_cached
        inp.token_ids += seq.all_ids[start:start + n]
        inp.positions += range(start, start + n)
        inp.query_lens.append(n)
        inp.context_lens.append(start)
        inp.slot_mapping += [blocks.slot(seq.seq_id, p) for p in range(start, start + n)]
        inp.block_tables.append(blocks.tables[seq.seq_id])
    return inp


def _all_greedy(seqs) -> bool:
    return all(s.params.greedy and s.params.repetition_penalty == 1.0 and not s.params.presence_penalty
               and not s.params.frequency_penalty and s.params.logprobs is None for s in seqs)


class Executor:
    def __init__(self, runner, blocks: BlockManager):
        self.runner = runner  # ModelRunner, DriverRunner (torchrun) or WorkerGroup
        self.blocks = blocks

    def step(self, step: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Run one step; returns (sequence, sampled token) for the sequences that produced one."""
        logits = self.runner.execute(step_inputs(step, self.blocks))
        ready = []
        for (seq, n), row in zip(step, logits):
            seq.num_cached += n
            self.blocks.register_full_blocks(seq.seq_id, seq.all_ids, seq.num_cached)
            if seq.num_cached == len(seq.all_ids):  # not a chunk in the middle of a prompt
                ready.append((seq, row))
        if not ready:
            return []
        if _all_greedy(s for s, _ in ready):  # one argmax and one host transfer for the whole batch
            tokens = torch.stack([row for _, row in ready]).argmax(-1).tolist()
            return [(seq, token) for (seq, _), token in zip(ready, tokens)]
        out = []
        for seq, row in ready:
            token = sample_token(row, seq.params, seq.all_ids, seq.generator, seq.output_ids)
            if seq.params.logprobs is not None:
                seq.logprobs.append(token_logprobs(row, token, seq.params.logprobs))
            out.append((seq, token))
        return out
