"""ModelRunner: one rank's model shard and its paged KV cache; runs the forward of one scheduled step.

The step's inputs are plain data (`StepInputs`, built by the front end, which owns the block tables),
so the same step runs in-process or is broadcast from rank 0 to every rank of a tensor/pipeline-parallel
group. With pipeline parallelism each stage receives the previous stage's hidden states and sends its
own on; the last stage's first tensor-parallel rank hands the logits to rank 0.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.distributed as dist

from kiln.kernels import triton_available
from kiln.layers.linear import choose_linear_kernels
from kiln.quantization.kv_cache import cache_dtype
from kiln.runtime.cuda_graphs import (DecodeGraphs, PrefillGraphs, cuda_graph_batch_sizes,
                                     prefill_graph_token_counts)
from kiln.runtime.host_tensors import fill_tokens, list_tensor, padded_tables, readback_buffer, release_readback
from kiln.runtime.kv_cache import PagedKVCache, bytes_per_block, plan_num_blocks
from kiln.runtime.paged_batch import PagedAttentionBatch
from kiln.runtime.sampler import greedy_tokens, sample_tokens

log = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """One step of the batch: each sequence's new tokens, flattened, and where their KV lives."""

    token_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    context_lens: list[int]  # tokens already cached before this step
    slot_mapping: list[int]  # flat cache slot of each new token
    block_tables: list[list[int]]
    # Per sequence, whether the step returns the logits of each of its new tokens (prompt logprobs), not only of
    # its last; None: the last of each
    all_logits: list[bool] | None = None

    def logit_rows(self) -> list[int] | None:
        """The flat rows whose logits the step returns, in order, where all_logits asks for more than the last."""
        if not self.all_logits or not any(self.all_logits):
            return None
        rows, end = [], 0
        for n, every in zip(self.query_lens, self.all_logits):
            rows += range(end, end + n) if every else [end + n - 1]
            end += n
        return rows

    def last_rows(self) -> list[int]:
        """Each sequence's last row among those the step returns: its index, or past the runs all_logits keeps."""
        every = self.all_logits or [False] * len(self.query_lens)
        return [end - 1 for end in accumulate(n if all_rows else 1 for n, all_rows in zip(self.query_lens, every))]


class ModelRunner:
    def __init__(self, model, device: torch.device, build_config, plan: dict | None = None):
        """plan: the engine's (kiln.builder.plan_for): its CUDA graphs' batch sizes and prefill token counts, chosen
        at build time; without one (a model not loaded from an engine) the same rules choose them here."""
        self.model = model
        self.device = torch.device(device)
        config = model.config
        self.mapping = config.mapping
        self.hidden_size = config.hidden_size
        self.dtype = config.torch_dtype
        model.prepare_runtime()
        choose_linear_kernels(model)  # times kernels while the memory the KV cache will take is still free
        layers = self.mapping.pp_layers(config.num_hidden_layers)
        kv_layout = config.kv_cache_layout(self.mapping.tp_size)
        kv_dtype = cache_dtype(config.quantization, self.dtype)  # int8 / float8 codes for a quantized cache
        block_bytes = bytes_per_block(len(layers), build_config.tokens_per_block, kv_layout, kv_dtype)
        # Activations of the largest step, and its logits, with room to spare.
        reserve = 16 * build_config.max_num_tokens * (config.hidden_size + config.intermediate_size) * 4 \
            + build_config.max_batch_size * config.vocab_size * 4
        self.num_blocks = self._agree_across_ranks(plan_num_blocks(build_config, block_bytes, self.device, reserve,
                                                                   kv_dtype))
        self.kv_token_capacity = self.num_blocks * build_config.tokens_per_block  # for `kiln bench` to report
        self.graph_batch_sizes = (plan["cuda_graph_batch_sizes"] if plan
                                  else cuda_graph_batch_sizes(build_config.max_batch_size))
        if build_config.max_draft_len:  # a speculative step of one sequence, its draft as rows (executor.draft_rows)
            rows = cuda_graph_batch_sizes(1 + build_config.max_draft_len)
            self.graph_batch_sizes = sorted(set(self.graph_batch_sizes) | set(rows))
        self.graph_prefill_tokens = (plan["cuda_graph_prefill_tokens"] if plan
                                     else prefill_graph_token_counts(build_config))
        use_graphs = self._can_use_graphs(config)
        # With graphs, one block past the plan is their scratch space for padding rows: taking it from the
        # plan could leave less than the one max_seq_len sequence the plan guarantees (it would never finish).
        physical = self.num_blocks + 1 if use_graphs else self.num_blocks
        self.kv = PagedKVCache(layers, physical, build_config.tokens_per_block, kv_layout, kv_dtype, self.device)
        self.graphs = self.prefill_graphs = None
        self._burst_in_graphs, self._eager_next = False, None  # where the last decode burst ran, for its continuation
        if use_graphs:
            blocks_per_seq = -(-build_config.max_seq_len // build_config.tokens_per_block)
            self.graphs = DecodeGraphs(model, self.kv, self.device, self.graph_batch_sizes, blocks_per_seq,
                                       scratch_block=physical - 1)
            self.graphs.capture()
            if self.graph_prefill_tokens:
                self.prefill_graphs = PrefillGraphs(model, self.kv, self.device, self.graph_prefill_tokens,
                                                    blocks_per_seq, scratch_block=physical - 1)
                self.prefill_graphs.capture()
            if os.environ.get("KILN_WARM_LM_HEAD", "1") == "1":  # (KILN_WARM_LM_HEAD=0 turns it off)
                self._warm_lm_head(build_config.max_batch_size)

    def _warm_lm_head(self, max_rows: int) -> None:
        """lm_head run once at every row count a step can give it (a row a sequence), so that the cuBLAS kernels
        those shapes pick are set up now. The first GEMM at a new row count waits at its launch for all the GPU's
        queued work, with lazy or eager module loading alike, and not for its output's allocation
        (scripts/launch_wait_probe.py on an H200): while prefill-1000's batch fills, every step brings a new row
        count, and each such step's launch waited for the one queued before it (docs/performance.md)."""
        start = time.perf_counter()
        hidden = torch.zeros(max_rows, self.hidden_size, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            for rows in range(1, max_rows + 1):
                self.model.lm_head(hidden[:rows])
        torch.cuda.synchronize(self.device)
        log.info("ran lm_head at 1-%d rows in %.2fs (KILN_WARM_LM_HEAD)", max_rows, time.perf_counter() - start)

    def _can_use_graphs(self, config) -> bool:
        """One CUDA GPU, no pipeline or tensor split, rotary frequencies that do not depend on the length,
        and no score soft-capping (whose attention runs per sequence, with host-side lengths)."""
        scaling = config.rotary_scaling
        return (self.device.type == "cuda" and triton_available() and self.mapping.world_size == 1
                and os.environ.get("KILN_CUDA_GRAPHS", "1") != "0" and config.attn_logit_softcapping is None
                and not (scaling and scaling["type"] in ("dynamic", "longrope")))

    def _agree_across_ranks(self, num_blocks: int) -> int:
        """Every rank must hold the same block tables: take the smallest cache any rank can afford."""
        if self.mapping.world_size == 1 or not dist.is_initialized():
            return num_blocks
        t = torch.tensor([num_blocks], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def _batch(self, inp: StepInputs) -> PagedAttentionBatch:
        tables = padded_tables(inp.block_tables, max(len(t) for t in inp.block_tables), 0, self.device)
        seq_lens = [c + q for c, q in zip(inp.context_lens, inp.query_lens)]
        as_tensor = lambda x, dtype: list_tensor(x, dtype, self.device)  # noqa: E731
        rows = inp.logit_rows()
        return PagedAttentionBatch(inp.query_lens, inp.context_lens, self.kv, as_tensor(inp.slot_mapping, torch.long),
                                   tables, as_tensor(seq_lens, torch.int32),
                                   as_tensor([0, *accumulate(inp.query_lens)], torch.int32),
                                   None if rows is None else as_tensor(rows, torch.long))

    @torch.inference_mode()
    def execute(self, inp: StepInputs) -> torch.Tensor | None:
        """Run this rank's part of the step. Returns the last-token logits [batch, vocab] on the rank
        that produced them (the last stage), None elsewhere.

        With pipeline stages the step is cut into pp_size micro-batches of whole sequences that flow
        through the stages one after another, so stage k works on micro-batch i while stage k+1 works on
        micro-batch i-1 (GPipe-style, within the step)."""
        for graphs in (self.graphs, self.prefill_graphs):
            if graphs is not None and graphs.can_run(inp):
                return graphs.run(inp)
        m = self.mapping
        if m.pp_size == 1:
            return self._forward(inp, None)
        sends, outputs = [], []
        for micro in split_step(inp, m.pp_size):
            hidden = None
            if not m.is_first_pp_rank:
                hidden = torch.empty(len(micro.token_ids), self.hidden_size, dtype=self.dtype, device=self.device)
                dist.recv(hidden, src=m.rank - m.tp_size)
            out = self._forward(micro, hidden)
            if m.is_last_pp_rank:
                outputs.append(out)
            else:
                sends.append(dist.isend(out.contiguous(), dst=m.rank + m.tp_size))
        for work in sends:
            work.wait()
        return torch.cat(outputs) if m.is_last_pp_rank else None

    @torch.inference_mode()
    def decode_burst(self, inp: StepInputs, steps: int) -> BurstTokens:
        """`steps` greedy decode steps back to back: tokens [steps, batch], on their way to the host. In CUDA
        graphs when they can run (on the GPU, no host sync in between); else eagerly, one step after another."""
        self._burst_in_graphs = self.graphs is not None and self.graphs.can_run(inp)
        if self._burst_in_graphs:
            return BurstTokens(self.graphs.run_burst(inp, steps))
        tokens, positions = (list_tensor(x, torch.long, self.device) for x in (inp.token_ids, inp.positions))
        return BurstTokens(self._eager_burst(inp.block_tables, tokens, positions, steps))

    @torch.inference_mode()
    def continue_burst(self, block_tables: list[list[int] | None], steps: int) -> BurstTokens:
        """`steps` more greedy decode steps of the last burst's rows, from where it ended, queued before the host
        reads that burst's tokens. The caller grew every block table to cover them (and no sequence left the last
        burst early: each had room for all its steps); None: the row's sequence has left the batch, and the row
        runs no more (its tokens are -1)."""
        if self._burst_in_graphs:
            return BurstTokens(self.graphs.continue_burst(block_tables, steps))
        tokens, positions = self._eager_next
        live = [i for i, table in enumerate(block_tables) if table is not None]
        index = torch.tensor(live, device=self.device)
        out = torch.full((steps, len(block_tables)), -1, dtype=torch.long, device=self.device)
        out[:, index] = self._eager_burst([block_tables[i] for i in live], tokens[index], positions[index], steps)
        if self._eager_next is not None:  # where every row goes on from, the rows that left included
            tokens, positions = tokens.clone(), positions.clone()
            tokens[index], positions[index] = self._eager_next
            self._eager_next = tokens, positions
        return BurstTokens(out)

    def _eager_burst(self, block_tables: list[list[int]], tokens: torch.Tensor, positions: torch.Tensor,
                     steps: int) -> torch.Tensor:
        """The same steps without graphs, the next step's inputs advanced on tensors (as the graphs do: no
        per-sequence host work between steps). A sequence leaves the burst when its next position is past
        its block table (the caller reserved blocks up to its end): its later entries stay -1, never read."""
        n = len(block_tables)
        out = torch.full((steps, n), -1, dtype=torch.long, device=self.device)
        rows = torch.arange(n, device=self.device)
        tables = padded_tables(block_tables, max(len(t) for t in block_tables), 0, self.device)
        ends = list_tensor([len(t) * self.kv.block_size for t in block_tables], torch.long, self.device)
        self._eager_next = None
        for i in range(steps):
            tokens = greedy_tokens(self.model(tokens, positions, self._decode_batch(positions, tables),
                                              last_token_only=True))
            out[i, rows] = tokens
            positions = positions + 1
            if i == steps - 1:
                if len(rows) == n:  # every sequence ran every step: `continue_burst` may go on from here
                    self._eager_next = tokens, positions
                break
            keep = positions < ends  # the first position past a table
            if not keep.all():
                if not keep.any():
                    break
                rows, tokens, positions, ends, tables = (x[keep] for x in (rows, tokens, positions, ends, tables))
        return out

    def _decode_batch(self, positions: torch.Tensor, tables: torch.Tensor) -> PagedAttentionBatch:
        """One new token per sequence at `positions`, its cache slot read off the block tables."""
        bs, n = self.kv.block_size, len(positions)
        slots = tables.gather(1, (positions // bs)[:, None])[:, 0].long() * bs + positions % bs
        return PagedAttentionBatch([1] * n, positions.tolist(), self.kv, slots, tables, (positions + 1).int(),
                                   torch.arange(n + 1, dtype=torch.int32, device=self.device))

    @torch.inference_mode()
    def execute_ahead(self, inp: StepInputs, rows: list[int], seqs: list, fill=None) -> torch.Tensor:
        """Run the step (in a CUDA graph where one takes it) and sample the next token of the sequences `seqs`, its
        rows `rows`, leaving them on the device: nothing is read back, so the host can queue the next step before
        they exist. The sequences apply no penalties (their history on the host may lack a token in flight).
        fill: (token rows, indices into `earlier`, earlier): those rows' inputs (IN_FLIGHT in inp.token_ids) are
        the samples of the step before, still on the device (fill_tokens)."""
        graphs = next((g for g in (self.graphs, self.prefill_graphs) if g is not None and g.can_run(inp)), None)
        logits = self._forward(inp, None, fill) if graphs is None else graphs.run(inp, fill)
        if len(rows) < logits.shape[0]:
            logits = logits.index_select(0, list_tensor(rows, torch.long, self.device))
        return sample_tokens(logits.float(), seqs)

    def _forward(self, inp: StepInputs, hidden: torch.Tensor | None, fill=None) -> torch.Tensor:
        positions = list_tensor(inp.positions, torch.long, self.device)
        tokens = None if hidden is not None else list_tensor(inp.token_ids, torch.long, self.device)
        fill_tokens(tokens, fill)
        return self.model(tokens, positions, self._batch(inp), hidden_states=hidden, last_token_only=True)


class BurstTokens:
    """A decode burst's tokens [steps, batch] on their way to the host. On the GPU they are copied to pinned
    memory as soon as the burst is queued, and an event marks the copy: reading them waits for this burst alone,
    not for the next one queued behind it. The pinned buffer is a reused one (host_tensors.readback_buffer): a
    fresh pinned allocation can wait for the whole GPU, the burst just queued included."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.copied, self.buffer, self.read = tokens, None, None, None
        if tokens.is_cuda:
            self.buffer = readback_buffer(tokens.numel(), tokens.dtype)
            self.tokens = self.buffer[:tokens.numel()].view(tokens.shape)
            self.tokens.copy_(tokens, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()

    def per_sequence(self) -> list[list[int]]:
        """Each sequence's tokens, in step order (waits for the burst)."""
        if self.read is None:
            if self.copied is not None:
                self.copied.synchronize()
            self.read = self.tokens.T.tolist()
            if self.buffer is not None:  # read: the buffer is free for the next burst
                release_readback(self.buffer)
                self.buffer = self.tokens = None
        return self.read


def split_step(inp: StepInputs, parts: int) -> list[StepInputs]:
    """Cut a step into at most `parts` micro-batches of whole sequences with similar token counts."""
    target = -(-len(inp.token_ids) // parts)
    groups, current, tokens = [], [], 0
    for i, n in enumerate(inp.query_lens):
        current.append(i)
        tokens += n
        if tokens >= target and len(groups) < parts - 1:
            groups.append(current)
            current, tokens = [], 0
    if current:
        groups.append(current)
    starts = [0]
    for n in inp.query_lens:
        starts.append(starts[-1] + n)
    micro = []
    for group in groups:
        lo, hi = starts[group[0]], starts[group[-1] + 1]
        micro.append(StepInputs(inp.token_ids[lo:hi], inp.positions[lo:hi], [inp.query_lens[i] for i in group],
                                [inp.context_lens[i] for i in group], inp.slot_mapping[lo:hi],
                                [inp.block_tables[i] for i in group],
                                inp.all_logits and [inp.all_logits[i] for i in group]))
    return micro
