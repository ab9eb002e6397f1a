"""step_inputs: the flat lists of a step, built per sequence (not per token), equal the per-token definition."""

import random

from kiln.llmapi.sampling_params import SamplingParams
from kiln.runtime.block_manager import BlockManager
from kiln.runtime.executor import step_inputs
from kiln.runtime.sequence import Sequence


def test_step_inputs_equal_the_per_token_definition():
    """Random prompts chunked at random points (chunks that start and end inside blocks, cross several, or
    hold one token) next to decoding sequences."""
    rng = random.Random(0)
    blocks = BlockManager(num_blocks=400, block_size=4, prefix_caching=False)
    step = []
    for seq_id in range(40):
        ids = [rng.randrange(1000) for _ in range(rng.randint(1, 30))]
        seq = Sequence(seq_id, ids, params=SamplingParams(), max_len=64, seed=0)
        blocks.allocate(seq_id, ids)
        seq.num_cached = rng.randrange(len(ids))  # what earlier chunks computed
        n = 1 if rng.random() < 0.3 else rng.randint(1, len(ids) - seq.num_cached)
        step.append((seq, n))
    inp = step_inputs(step, blocks)
    spans = [(seq, range(seq.num_cached, seq.num_cached + n)) for seq, n in step]
    assert inp.token_ids == [seq.all_ids[p] for seq, span in spans for p in span]
    assert inp.positions == [p for _, span in spans for p in span]
    assert inp.slot_mapping == [blocks.slot(seq.seq_id, p) for seq, span in spans for p in span]
    assert inp.query_lens == [n for _, n in step]
    assert inp.context_lens == [seq.num_cached for seq, _ in step]
    assert inp.block_tables == [blocks.tables[seq.seq_id] for seq, _ in step]
    assert inp.all_logits is None and inp.logit_rows() is None


def test_a_step_keeps_every_prompt_row_of_the_sequences_that_want_prompt_logprobs():
    """all_logits: per sequence; logit_rows: each wanting sequence's every row, the others' last."""
    blocks = BlockManager(num_blocks=40, block_size=4, prefix_caching=False)
    wants, plain = SamplingParams(prompt_logprobs=1), SamplingParams()
    step = []
    for seq_id, (params, prompt, cached, n) in enumerate([(plain, 5, 0, 5), (wants, 6, 2, 3), (wants, 4, 4, 1),
                                                          (plain, 3, 1, 2)]):
        seq = Sequence(seq_id, list(range(prompt)), params=params, max_len=16, seed=0)
        blocks.allocate(seq_id, list(range(prompt + 1)))  # (room for a decoding one's next token)
        seq.num_cached = cached
        step.append((seq, n))
    inp = step_inputs(step, blocks)
    assert inp.all_logits == [False, True, False, False]  # (the third's prompt is all cached: it decodes)
    assert inp.logit_rows() == [4, 5, 6, 7, 8, 10]
