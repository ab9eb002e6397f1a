"""step_inputs: the flat lists of a step, built per sequence (not per token), equal the per-token definition."""

import random

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
        seq = Sequence(seq_id, ids, params=None, max_len=64, seed=0)
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
