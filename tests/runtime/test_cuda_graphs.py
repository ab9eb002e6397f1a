"""What the CUDA graphs replay, run eagerly (on the CPU with the reference kernels): a prefill step padded up to a
captured size, fresh or after a cached prefix, gives the logits of the step itself; decode bursts, and the burst
run ahead after them, give the tokens of eager steps. The GPU test replays the graphs themselves
(test_gpu_runtime.py)."""

from __future__ import annotations

import torch

from conftest import make_hf_model
from kiln.builder import Engine
from kiln.config import BuildConfig, KVCacheLayout
from kiln.llmapi.llm import open_engine_dir
from kiln.runtime.block_manager import BlockManager
from kiln.runtime.cuda_graphs import DecodeGraphs, PrefillGraphs, cuda_graph_batch_sizes, prefill_graph_token_counts
from kiln.runtime.kv_cache import PagedKVCache
from kiln.runtime.model_runner import ModelRunner, StepInputs
from kiln.runtime.sampler import greedy_tokens


def _step(blocks: BlockManager, tokens: list[int], start: int) -> StepInputs:
    """tokens at positions start.. of sequence 0, after `start` cached ones."""
    positions = list(range(start, start + len(tokens)))
    return StepInputs(tokens, positions, [len(tokens)], [start], [blocks.slot(0, p) for p in positions],
                      [blocks.tables[0]])


def _runner_and_graphs(tmp_path, monkeypatch):
    """A float32 CPU runner of a sliding-window model, a block manager that leaves its last block as the
    graphs' scratch, and graphs of 4 and 16 tokens (run eagerly: `forward` is what each graph holds)."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    make_hf_model(tmp_path / "hf", arch="mistral", sliding_window=24)
    bc = BuildConfig(max_batch_size=2, max_seq_len=128, tokens_per_block=16, kv_cache_max_tokens=256)
    engine = Engine.from_dir(open_engine_dir(tmp_path / "hf", "float32", bc))
    runner = ModelRunner(engine.runtime_model("cpu"), "cpu", engine.build_config)
    scratch = runner.num_blocks - 1  # no sequence below owns the last block
    graphs = PrefillGraphs(runner.model, runner.kv, torch.device("cpu"), [4, 16], max_blocks_per_seq=8,
                           scratch_block=scratch)
    return runner, BlockManager(num_blocks=scratch, block_size=16), graphs


def test_padded_continuing_prefill_gives_the_logits_of_the_step(tmp_path, monkeypatch):
    runner, blocks, graphs = _runner_and_graphs(tmp_path, monkeypatch)
    prefix, suffix = list(range(3, 43)), [5, 9, 11, 2, 7, 60, 1]
    blocks.allocate(0, prefix + suffix)
    runner.execute(_step(blocks, prefix, 0))
    step = _step(blocks, suffix, len(prefix))
    assert graphs.can_run(step)
    padded = graphs.forward(graphs.load(step))  # 7 tokens padded to 16: first fills the cache, then compared
    torch.testing.assert_close(padded, runner.execute(step), rtol=1e-5, atol=1e-5)


def test_padded_fresh_prompt_gives_the_logits_of_its_eager_prefill(tmp_path, monkeypatch):
    """A prompt with nothing cached, padded from 11 to 16 tokens: the graph's forward attends over the keys it
    has just written to the cache, the eager step over the step's own keys (the varlen prefill path)."""
    runner, blocks, graphs = _runner_and_graphs(tmp_path, monkeypatch)
    prompt = [17, 4, 99, 23, 8, 61, 5, 42, 77, 12, 30]
    blocks.allocate(0, prompt)
    step = _step(blocks, prompt, 0)
    assert graphs.can_run(step)
    padded = graphs.forward(graphs.load(step))
    torch.testing.assert_close(padded, runner.execute(step), rtol=1e-5, atol=1e-5)


def test_which_steps_a_prefill_graph_takes():
    kv = PagedKVCache(range(1), num_blocks=10, block_size=16, layout=KVCacheLayout(1, 8), dtype=torch.float32,
                      device=torch.device("cpu"))
    graphs = PrefillGraphs(None, kv, torch.device("cpu"), [16, 32], max_blocks_per_seq=4, scratch_block=9)

    def step(query_lens, context_lens):
        return StepInputs([], [], query_lens, context_lens, [], [[0]] * len(query_lens))

    assert graphs.can_run(step([5], [10])) and graphs.can_run(step([32], [32]))  # 32 + 32 fills the 64 slots
    assert not graphs.can_run(step([1], [10]))  # a decode step
    assert graphs.can_run(step([5], [0])) and graphs.can_run(step([32], [0]))  # fresh prompts
    assert not graphs.can_run(step([33], [10]))  # past the largest size
    assert not graphs.can_run(step([17], [33]))  # padded to 32 after 33 cached: past the 64-slot table
    assert not graphs.can_run(step([5, 5], [10, 10]))  # two sequences
    assert prefill_graph_token_counts(BuildConfig(max_seq_len=100, max_num_tokens=8192)) == [16, 32, 64]
    assert prefill_graph_token_counts(BuildConfig(max_seq_len=4096, max_num_tokens=48)) == [16, 32]


class EagerReplay:
    """A graph whose replay calls what it holds (on the CPU, where nothing is captured)."""

    def __init__(self, forward):
        self.replay = forward


def _decode_graphs_after_two_prompts(tmp_path, monkeypatch):
    """The runner, its blocks, decode graphs of 1 and 2 rows whose replays run eagerly, and the decode step after
    two prompts (12 tokens: the 5th decode step of the first starts its block 1; 5 tokens)."""
    runner, blocks, _ = _runner_and_graphs(tmp_path, monkeypatch)
    graphs = DecodeGraphs(runner.model, runner.kv, torch.device("cpu"), cuda_graph_batch_sizes(2),
                          max_blocks_per_seq=8, scratch_block=runner.num_blocks - 1)
    for size in graphs.sizes:
        graphs.graphs[size] = EagerReplay(lambda size=size: graphs.forward(size))
    prompts = [list(range(40, 52)), [3, 1, 4, 1, 5]]
    for i, prompt in enumerate(prompts):
        blocks.allocate(i, prompt)
    slots = [blocks.slot(i, p) for i, prompt in enumerate(prompts) for p in range(len(prompt))]
    prefill = StepInputs(prompts[0] + prompts[1], [*range(12), *range(5)], [12, 5], [0, 0], slots,
                         [blocks.tables[0], blocks.tables[1]])
    first = greedy_tokens(runner.execute(prefill)).tolist()
    decode = StepInputs(first, [12, 5], [1, 1], [12, 5], [blocks.slot(0, 12), blocks.slot(1, 5)],
                        [list(blocks.tables[0]), list(blocks.tables[1])])
    return runner, blocks, graphs, decode


def test_a_burst_run_ahead_from_the_decode_graph_buffers_gives_the_eager_tokens(tmp_path, monkeypatch):
    """A burst of 4 decode steps from the graph buffers, then 4 more run ahead from where its last advance left
    them, after one sequence's table grew by the block its next token starts: the tokens and keys of 8 eager
    steps. The run-ahead must load the grown table and read that token's slot off it again (the advance found no
    block there)."""
    runner, blocks, graphs, decode = _decode_graphs_after_two_prompts(tmp_path, monkeypatch)
    tokens = graphs.run_burst(decode, 4)
    assert blocks.append_slots(0, 12 + 8) and blocks.append_slots(1, 5 + 8)
    assert [len(t) for t in blocks.tables.values()] == [2, 1]
    tokens = torch.cat([tokens, graphs.continue_burst([blocks.tables[0], blocks.tables[1]], 4)])
    grown = blocks.tables[0][1]
    keys = {i: k[grown, :4].clone() for i, k in runner.kv.k.items()}  # positions 16-19, in the grown block
    decode.block_tables = [blocks.tables[0], blocks.tables[1]]
    assert tokens.T.tolist() == runner.decode_burst(decode, 8).per_sequence()  # rewrites the keys, then reads
    for i, k in runner.kv.k.items():
        torch.testing.assert_close(keys[i], k[grown, :4], rtol=0, atol=0)


def test_a_row_whose_sequence_left_runs_ahead_as_padding(tmp_path, monkeypatch):
    """The second sequence leaves after the first burst: the run-ahead's row for it goes back to position 0 over
    the scratch block, so its freed block is left as it was, and the first sequence's tokens are those of its 8
    eager steps alone."""
    runner, blocks, graphs, decode = _decode_graphs_after_two_prompts(tmp_path, monkeypatch)
    tokens = graphs.run_burst(decode, 4)
    freed = blocks.tables[1][0]
    blocks.free(1)
    keys = {i: k[freed].clone() for i, k in runner.kv.k.items()}
    assert blocks.append_slots(0, 12 + 8)
    tokens = torch.cat([tokens, graphs.continue_burst([blocks.tables[0], None], 4)])
    assert graphs.positions[1] == 4  # back to 0, then 4 steps
    for i, k in runner.kv.k.items():
        torch.testing.assert_close(keys[i], k[freed], rtol=0, atol=0)
    alone = StepInputs(decode.token_ids[:1], [12], [1], [12], decode.slot_mapping[:1], [blocks.tables[0]])
    assert tokens[:, 0].tolist() == runner.decode_burst(alone, 8).per_sequence()[0]
