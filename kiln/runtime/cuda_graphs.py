"""CUDA graphs for decode steps: one graph per batch size, captured at load, replayed every decode step.

A decode step launches hundreds of small kernels; at small batch the GPU waits on the host to launch
them. A graph replays the whole forward with one launch. Inputs live in static buffers; a batch is
padded up to the next captured size, the padding rows pointing at a scratch block that no sequence owns.
Graphs are used on one GPU without pipeline stages; prefill and mixed steps run eagerly, except one:

A step that is a single sequence's few new tokens (a short prompt, a prefix-cache hit, the last chunk of a
long prompt) reads every weight once, like a decode step, and launches a few hundred kernels from Python:
eagerly, the host sets its time, not the GPU. `PrefillGraphs` replays it from a graph per token count.

Each graph also ends by advancing its own inputs for a greedy next step: the argmax becomes the next
input token, positions and lengths grow by one and the cache slots follow from the block tables. So
`run_burst` replays k greedy decode steps back to back with no host work between them; the host reads
the k tokens once, while it has long since queued the work (the caller reserved the blocks beforehand).
`continue_burst` queues the k steps after those from the buffers as the last replay left them, before the host
has read anything: the host's work between bursts then overlaps the GPU's.
"""

from __future__ import annotations

import logging
import time

import torch

from kiln.runtime.host_tensors import copy_list, fill_tokens, padded_rows
from kiln.runtime.paged_batch import PagedAttentionBatch
from kiln.runtime.sampler import greedy_tokens

log = logging.getLogger(__name__)


def cuda_graph_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to max_batch_size, and max_batch_size itself: the batch sizes decode graphs are
    captured for. A decode step reads every weight whatever its batch, so padding a batch up to the next
    size costs little, and few sizes keep the capture at load short."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return sizes + [max_batch_size]


# Token counts of the prefill graphs: a step of up to 256 new tokens, after a cached prefix or not, is
# still cheap enough on the GPU (an 8B model reads its weights in about 5 ms) that eager launches dominate it.
PREFILL_GRAPH_TOKENS = (16, 32, 64, 128, 256)


def prefill_graph_token_counts(build_config) -> list[int]:
    """The token counts prefill graphs are captured for: those a step of one sequence may hold (a prompt
    leaves room for at least one generated token)."""
    limit = min(build_config.max_num_tokens, build_config.max_seq_len - 1)
    return [n for n in PREFILL_GRAPH_TOKENS if n <= limit]


def capture_graph(device: torch.device, pool, forward):
    """(graph, its output): `forward` run once on a side stream (Triton compiles and autotunes there, outside
    the graph), then captured into a graph that allocates from `pool`."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        forward()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    return graph, out


class DecodeGraphs:
    def __init__(self, model, kv, device: torch.device, sizes: list[int], max_blocks_per_seq: int,
                 scratch_block: int):
        """sizes: the batch sizes to capture, ascending (the engine plan's cuda_graph_batch_sizes)."""
        self.model, self.kv, self.device = model, kv, device
        self.sizes = list(sizes)
        n, w = self.sizes[-1], max_blocks_per_seq
        self.tokens = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), scratch_block * kv.block_size, dtype=torch.long, device=device)
        self.tables = torch.full((n, w), scratch_block, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.scratch_slot = scratch_block * kv.block_size
        self.scratch_block = scratch_block
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays = 0

    def _batch(self, size: int) -> PagedAttentionBatch:
        return PagedAttentionBatch([1] * size, [1] * size, self.kv, self.slots[:size], self.tables[:size],
                                   self.seq_lens[:size], self.cu[:size + 1])

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        seconds = {}
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first, so the smaller ones fit in its memory pool
            began = time.perf_counter()
            self.graphs[size], self.outputs[size] = capture_graph(self.device, pool,
                                                                  lambda size=size: self.forward(size))
            torch.cuda.synchronize(self.device)
            seconds[size] = round(time.perf_counter() - began, 2)
        log.info("captured decode CUDA graphs in %.1fs (seconds per batch size: %s)", time.perf_counter() - start,
                 seconds)

    def forward(self, size: int) -> torch.Tensor:
        """What each graph holds: the decode step of the first `size` rows of the buffers, then their advance to
        the next greedy step. Returns the logits [size, vocab]."""
        logits = self.model(self.tokens[:size], self.positions[:size], self._batch(size), last_token_only=True)
        self._advance(size, logits)
        return logits

    def _advance(self, size: int, logits: torch.Tensor) -> None:
        """Inputs of the next greedy decode step, computed on the GPU (captured into the graph)."""
        self.tokens[:size].copy_(greedy_tokens(logits))
        self.positions[:size] += 1
        self.seq_lens[:size] += 1
        self._slots_from_tables(size)

    def _slots_from_tables(self, size: int) -> None:
        """Each row's cache slot for the token at its position, read off its block table on the GPU."""
        bs = self.kv.block_size
        column = self.positions[:size] // bs
        inside = column < self.tables.shape[1]  # past the table (a burst's last advance): scratch, never run
        block = self.tables[:size].gather(1, column.clamp(max=self.tables.shape[1] - 1)[:, None])[:, 0]
        block = torch.where(inside, block, self.scratch_block)
        self.slots[:size].copy_(block.long() * bs + self.positions[:size] % bs)

    def can_run(self, inp) -> bool:
        return max(inp.query_lens) == 1 and len(inp.query_lens) <= self.sizes[-1]

    def run(self, inp, fill=None) -> torch.Tensor:
        """Replay the step's graph: logits [batch, vocab]. fill: rows whose token is on the GPU (fill_tokens)."""
        size = self.load(inp)
        fill_tokens(self.tokens, fill)
        self.graphs[size].replay()
        self.replays += 1
        return self.outputs[size][:len(inp.query_lens)]

    def load(self, inp) -> int:
        """Copy the step into the static buffers, padded up to a captured size; returns that size."""
        b = len(inp.query_lens)
        size = next(s for s in self.sizes if s >= b)
        copy_list(self.tokens[:b], inp.token_ids, torch.long)
        copy_list(self.positions[:b], inp.positions, torch.long)
        self.positions[b:size].zero_()  # padding rows advance too: keep them inside their table
        copy_list(self.slots[:b], inp.slot_mapping, torch.long)
        self.slots[b:size].fill_(self.scratch_slot)
        self._load_tables(inp.block_tables)
        self.tables[b:size].fill_(self.scratch_block)
        seq_lens = [c + 1 for c in inp.context_lens]
        copy_list(self.seq_lens[:b], seq_lens, torch.int32)
        self.seq_lens[b:size].fill_(1)
        return size

    def _load_tables(self, block_tables: list[list[int]]) -> None:
        width = max(len(t) for t in block_tables)
        copy_list(self.tables[:len(block_tables), :width], padded_rows(block_tables, width, self.scratch_block),
                  torch.int32)
        # a burst may run past a table's end: scratch, not a stale block
        self.tables[:len(block_tables), width:].fill_(self.scratch_block)

    def run_burst(self, inp, steps: int) -> torch.Tensor:
        """`steps` greedy decode steps from `inp`: their tokens [steps, batch], still on the GPU. Every
        sequence's block table must already cover the positions the steps reach (or they land in the
        scratch block: the caller discards tokens past a sequence's end)."""
        return self._replay_steps(self.load(inp), len(inp.query_lens), steps)

    def continue_burst(self, block_tables: list[list[int] | None], steps: int) -> torch.Tensor:
        """`steps` more greedy decode steps of the rows of the last `run_burst` (or `continue_burst`), from the
        inputs its last replay advanced to. The sequences' block tables have grown to cover the new steps: they
        are copied in, and the slots of the next step read off them again. A row whose sequence left the batch
        (None) turns into a padding row: position 0 over the scratch block."""
        b = len(block_tables)
        size = next(s for s in self.sizes if s >= b)
        self._load_tables([[] if table is None else table for table in block_tables])
        left = self.tables[:size, 0] == self.scratch_block  # and the padding rows: no sequence owns that block
        self.positions[:size].masked_fill_(left, 0)
        self.seq_lens[:size].masked_fill_(left, 1)
        self._slots_from_tables(size)
        return self._replay_steps(size, b, steps)

    def _replay_steps(self, size: int, b: int, steps: int) -> torch.Tensor:
        tokens = torch.empty(steps, b, dtype=torch.long, device=self.device)
        for i in range(steps):
            self.graphs[size].replay()
            tokens[i].copy_(self.tokens[:b])
        self.replays += steps
        return tokens


class PrefillGraphs:
    """Graphs for a step of one sequence with 2..max(sizes) new tokens, a fresh prompt or one that continues a
    cached prefix, one graph per token count in `sizes`. A shorter step is padded up to the next count: its
    padding tokens sit after the real ones (causal attention keeps them out of the real tokens' rows), write
    their keys to the scratch slot, and the step's cu_seqlens, on the GPU, tell attention and the logits where
    the real tokens end. The attention kernel reads the context length from the GPU too, so one graph serves any
    prefix, the empty one included: a fresh prompt attends over its own keys, which the step writes to the cache
    first."""

    def __init__(self, model, kv, device: torch.device, sizes: list[int], max_blocks_per_seq: int,
                 scratch_block: int):
        self.model, self.kv, self.device, self.sizes = model, kv, device, sizes
        n = sizes[-1]
        self.scratch_slot = scratch_block * kv.block_size
        self.scratch_block = scratch_block
        self.tokens = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.long, device=device)
        self.table = torch.full((1, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(1, dtype=torch.int32, device=device)
        self.cu = torch.zeros(2, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays = 0

    def forward(self, size: int) -> torch.Tensor:
        """The forward each graph holds: the last real token's logits [1, vocab] of the step in the buffers."""
        # context_lens [1] only marks the step as continuing a prefix; the kernels read the real one on the GPU
        batch = PagedAttentionBatch([size], [1], self.kv, self.slots[:size], self.table, self.seq_lens, self.cu)
        return self.model(self.tokens[:size], self.positions[:size], batch, last_token_only=True)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self.seq_lens.fill_(size + 1)  # for the warm-up: one token of context, all rows real, all scratch
            self.cu[1] = size
            self.graphs[size], self.outputs[size] = capture_graph(self.device, pool,
                                                                  lambda size=size: self.forward(size))
        self._compile_one_split()
        torch.cuda.synchronize(self.device)
        log.info("captured prefill CUDA graphs for %s tokens in %.1fs", self.sizes,
                 time.perf_counter() - start)

    def _compile_one_split(self, tokens_each: int = 16) -> None:
        """One eager step of many prompts continuing a cached token, on scratch, no larger than the largest graph.
        The graphs above are of one sequence, whose attention splits its keys across programs; a step with many
        programs keeps them in one (no merge), a kernel variant Triton would otherwise compile in the first such
        step: in prefill-1000's timed run, 1.16 s of one step, the first to continue a long prompt
        (docs/performance.md, twenty-second session)."""
        seqs = max(self.sizes[-1] // tokens_each, 1)
        n = seqs * tokens_each
        tokens = torch.zeros(n, dtype=torch.long, device=self.device)
        slots = torch.full((n,), self.scratch_slot, dtype=torch.long, device=self.device)
        seq_lens = torch.full((seqs,), tokens_each + 1, dtype=torch.int32, device=self.device)
        cu = torch.arange(0, n + 1, tokens_each, dtype=torch.int32, device=self.device)
        batch = PagedAttentionBatch([tokens_each] * seqs, [1] * seqs, self.kv, slots,
                                    self.table.expand(seqs, -1).contiguous(), seq_lens, cu)
        self.model(tokens, tokens, batch, last_token_only=True)

    def can_run(self, inp) -> bool:
        """One sequence, 2..max(sizes) new tokens, and room in its table for the padding (the attention kernel
        reads the block table up to context + padded length)."""
        if len(inp.query_lens) != 1 or not 1 < inp.query_lens[0] <= self.sizes[-1] or inp.logit_rows() is not None:
            return False  # (a graph keeps the last token's logits only)
        size = next(s for s in self.sizes if s >= inp.query_lens[0])
        return inp.context_lens[0] + size <= self.table.shape[1] * self.kv.block_size

    def run(self, inp, fill=None) -> torch.Tensor:
        """Replay the step's graph: logits [1, vocab]. fill: rows whose token is on the GPU (fill_tokens)."""
        size = self.load(inp)
        fill_tokens(self.tokens, fill)
        self.graphs[size].replay()
        self.replays += 1
        return self.outputs[size]

    def load(self, inp) -> int:
        """Copy the step into the static buffers, padded up to a captured size; returns that size."""
        n = inp.query_lens[0]
        size = next(s for s in self.sizes if s >= n)
        copy_list(self.tokens[:n], inp.token_ids, torch.long)
        copy_list(self.positions[:n], inp.positions, torch.long)
        self.positions[n:size].zero_()
        copy_list(self.slots[:n], inp.slot_mapping, torch.long)
        self.slots[n:size].fill_(self.scratch_slot)
        table = inp.block_tables[0]
        copy_list(self.table[0, :len(table)], table, torch.int32)
        self.table[0, len(table):].fill_(self.scratch_block)
        copy_list(self.seq_lens, [inp.context_lens[0] + n], torch.int32)
        copy_list(self.cu, [0, n], torch.int32)
        return size
