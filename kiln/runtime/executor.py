"""The front end of a step: turn scheduled sequences into StepInputs, run them on a runner (in-process
or a group of worker processes), and sample each sequence's next token from the returned logits."""

from __future__ import annotations

from kiln.runtime.model_runner import StepInputs
from kiln.runtime.sampler import sample_token, token_logprobs
from kiln.runtime.sequence import Sequence


def step_inputs(seqs: list[Sequence]) -> StepInputs:
    inp = StepInputs([], [], [], [], [], [])
    for seq in seqs:
        pending = seq.pending_ids()
        inp.seq_ids.append(seq.seq_id)
        inp.token_ids += pending
        inp.positions += range(seq.num_cached, seq.num_cached + len(pending))
        inp.query_lens.append(len(pending))
        inp.context_lens.append(seq.num_cached)
        inp.cache_lens.append(seq.max_len)
    return inp


class Executor:
    def __init__(self, runner):
        self.runner = runner  # ModelRunner, or a WorkerGroup of ranks
        self.live: set[int] = set()  # sequences holding KV cache on the runner(s)

    def step(self, seqs: list[Sequence]) -> list[int]:
        """Feed each sequence its pending tokens; return the token sampled for each."""
        logits = self.runner.execute(step_inputs(seqs))
        tokens = []
        for seq, row in zip(seqs, logits):
            seq.num_cached += len(seq.pending_ids())
            token = sample_token(row, seq.params, seq.all_ids, seq.generator, seq.output_ids)
            if seq.params.logprobs is not None:
                seq.logprobs.append(token_logprobs(row, token, seq.params.logprobs))
            tokens.append(token)
            self.live.add(seq.seq_id)
        return tokens

    def free(self, seq: Sequence) -> None:
        self.runner.free([seq.seq_id])
        self.live.discard(seq.seq_id)
