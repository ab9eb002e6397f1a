"""Attention over the paged KV cache for one step of the batch.

Each layer first writes the step's new keys and values into their cache slots, for every sequence,
and only then attends: so a sequence that reuses a prefix block another sequence fills in this same
step reads it after it is written. A step of decode tokens only runs one paged-decode call over the
whole batch; new prompts run one varlen causal prefill; prompts that continue a cached prefix run one
paged prefill; a mixed step runs one call per kind of sequence, each reading its tokens and writing its
output through a view where they are one run (as the scheduler orders them), the decode call on a second CUDA
stream beside the prompts' (`_decode_stream`). Soft-capped scores gather each sequence's keys and attend per
sequence. On CUDA the Triton kernels run, elsewhere their torch references.

With a quantized cache (int8 / float8 codes, the layer's `kv_cache_scaling_factor` [s_k, s_v]) the new keys
and values are quantized once, written, and every path attends those codes: fresh prompts too (read back from
their slots), so prefill and decode see the same keys, and the reference forward (which emulates the cache)
matches the runtime.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property, partial

import torch

from kiln.kernels import triton_available
from kiln.kernels.paged_attention import (gather_rows, paged_decode_attention, paged_decode_attention_ref,
                                          paged_prefill_attention, paged_prefill_attention_ref,
                                          varlen_prefill_attention, varlen_prefill_attention_ref)
from kiln.quantization.kv_cache import dequantize, quantize
from kiln.runtime.kv_cache import PagedKVCache


@dataclass
class PagedAttentionBatch:
    query_lens: list[int]
    context_lens: list[int]  # tokens of each sequence already in the cache before this step
    kv: PagedKVCache
    slot_mapping: torch.Tensor  # [tokens] flat cache slot of each new token
    block_tables: torch.Tensor  # [batch, max_blocks] int32
    seq_lens: torch.Tensor  # [batch] int32: context + new tokens
    cu_seqlens: torch.Tensor  # [batch + 1] int32: where each sequence's new tokens start
    logit_rows: torch.Tensor | None = None  # the rows whose logits the step keeps, where not each sequence's last

    @property
    def max_seq_len(self) -> int:
        return max(c + q for c, q in zip(self.context_lens, self.query_lens))

    @property
    def decode_only(self) -> bool:
        return max(self.query_lens) == 1

    @property
    def fresh_prefill(self) -> bool:
        return max(self.context_lens) == 0

    @property
    def continuing_only(self) -> bool:
        """Every sequence has several new tokens after some cached ones."""
        return min(self.context_lens) > 0 and min(self.query_lens) > 1

    @cached_property
    def _context_lens(self) -> torch.Tensor:
        return self.seq_lens - (self.cu_seqlens[1:] - self.cu_seqlens[:-1])

    def last_token_rows(self, device: torch.device) -> torch.Tensor:
        """Index of each sequence's last new token, from cu_seqlens on the GPU (a captured step pads its
        tokens: the host's query_lens would point at padding); or `logit_rows`, where a step keeps more."""
        return self.cu_seqlens[1:].long() - 1 if self.logit_rows is None else self.logit_rows

    def cache_slots(self, layer):
        """(k_cache, v_cache, slot_mapping, kv_scale), the caches as [slots, kv_heads, d], for a kernel that
        writes the new keys and values as it makes them (as codes when kv_scale, [s_k, s_v], is not None)."""
        return (*self._flat_cache(layer), self.slot_mapping, layer.kv_cache_scaling_factor)

    def _flat_cache(self, layer):
        k_cache, v_cache = self.kv.k[layer.layer_idx], self.kv.v[layer.layer_idx]
        return k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])

    def attend(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_written: bool = False):
        """Write the new keys and values to the cache (unless `kv_written`: a kernel of the layer did), then
        attend."""
        k_cache, v_cache = self.kv.k[layer.layer_idx], self.kv.v[layer.layer_idx]
        k_flat, v_flat = self._flat_cache(layer)
        kv_scale = layer.kv_cache_scaling_factor  # None: the cache holds keys and values as they are
        if not kv_written:
            shared = v_cache is k_cache  # one tensor: the values are read from the keys' rows (latent attention)
            if kv_scale is not None:
                k = quantize(k, kv_scale[0], k_cache.dtype)
                v = k if shared else quantize(v, kv_scale[1], v_cache.dtype)
            _write(k_flat, self.slot_mapping, k)
            if not shared:
                _write(v_flat, self.slot_mapping, v)
        if layer.softcap is not None:
            return self._attend_each(layer, q, k_flat, v_flat, range(len(self.query_lens)))
        fast = q.is_cuda and triton_available()
        decode = paged_decode_attention if fast else paged_decode_attention_ref
        prefill = varlen_prefill_attention if fast else varlen_prefill_attention_ref
        continuing = paged_prefill_attention if fast else paged_prefill_attention_ref
        if layer.sinks is not None:  # (gpt-oss)
            decode, prefill, continuing = (partial(f, sinks=layer.sinks) for f in (decode, prefill, continuing))
        if self.decode_only:
            args = (q, k_cache, v_cache, self.block_tables, self.seq_lens, layer.scale, layer.sliding_window, kv_scale)
            # the output projection's quantized input, where the kernel can write it (paged_decode_attention)
            return decode(*args, out_quant=layer.out_quant) if fast else decode(*args)
        if self.fresh_prefill:
            k, v = self._new_keys(k, v, k_flat, v_flat, kv_scale, slice(None))
            return prefill(q, k, v, self.cu_seqlens, max(self.query_lens), layer.scale, layer.sliding_window,
                           kv_scale)
        if self.continuing_only:  # prefix hits and later chunks alone: no gather and scatter per layer
            return continuing(q, k_cache, v_cache, self.block_tables, self.cu_seqlens, self._context_lens,
                              layer.scale, layer.sliding_window, kv_scale, max(self.query_lens))
        # A mixed step (new requests joining running ones): one call for all the decode tokens, one for all
        # the fresh prompts, one for the prompts that continue a cached prefix or an earlier chunk.
        p = self._parts
        out = torch.empty_like(q)
        attend_decode = lambda: _attend_into(out, p.decode_tokens, decode, q, k_cache, v_cache,  # noqa: E731
                                             p.decode_tables, p.decode_lens, layer.scale, layer.sliding_window,
                                             kv_scale)
        side, first = (_decode_stream(q) if fast and p.num_decode and (p.fresh_max or p.other_max)
                       else (None, False))
        if side is not None:  # the decode tokens' attention beside the prompts', on the side stream
            side.wait_stream(torch.cuda.current_stream(q.device))
            if first:
                with torch.cuda.stream(side):
                    attend_decode()
        elif p.num_decode:
            attend_decode()
        if p.fresh_max:
            t = p.fresh_tokens
            _attend_into(out, t, prefill, q, *self._new_keys(k, v, k_flat, v_flat, kv_scale, t), p.fresh_cu,
                         p.fresh_max, layer.scale, layer.sliding_window, kv_scale)
        if p.other_max:  # prompts continuing a cached prefix: one call over the paged cache
            _attend_into(out, p.other_tokens, continuing, q, k_cache, v_cache, p.other_tables, p.other_cu,
                         p.other_ctx, layer.scale, layer.sliding_window, kv_scale, p.other_max)
        if side is not None:
            if not first:
                with torch.cuda.stream(side):
                    attend_decode()
            torch.cuda.current_stream(q.device).wait_stream(side)
        return out

    def _new_keys(self, k, v, k_flat, v_flat, kv_scale, rows):
        """The keys and values of the step's token `rows` (a slice or an index tensor) as attention over them reads
        them: as they came, or with a quantized cache the codes just written, read back from their slots. One
        gather each, where quantizing k and v again took eight elementwise kernels a layer: 185 us of every
        mixed step's layer in prefill-1000 with an FP8 cache on an H200, 1.55 s of the run (twenty-eighth
        session's profile)."""
        if kv_scale is None:
            return gather_rows(k, rows), gather_rows(v, rows)
        slots = self.slot_mapping[rows]
        return gather_rows(k_flat, slots), gather_rows(v_flat, slots)

    @cached_property
    def _parts(self) -> "_StepParts":
        """Which sequences of a mixed step decode, start fresh, or continue (computed once per step)."""
        from itertools import accumulate, chain

        from kiln.runtime.host_tensors import list_tensor  # lists of thousands of ints: its fast path

        starts = [0, *accumulate(self.query_lens)]
        pairs = list(enumerate(zip(self.query_lens, self.context_lens)))
        decode = [i for i, (n, _) in pairs if n == 1]
        fresh = [i for i, (n, c) in pairs if n > 1 and c == 0]
        other = [i for i, (n, c) in pairs if n > 1 and c > 0]
        cu_of = lambda seqs: [0, *accumulate(self.query_lens[i] for i in seqs)]  # noqa: E731
        device = self.slot_mapping.device
        as_tensor = lambda x, dtype=torch.long: list_tensor(x, dtype, device)  # noqa: E731

        def rows_of(x, seqs):  # the sequences' rows of a per-sequence tensor, gathered once a step for every layer
            return x.index_select(0, as_tensor(seqs))

        def tokens_index(seqs):  # their new tokens' rows of the flat token stream
            if _consecutive(seqs):
                return slice(starts[seqs[0]], starts[seqs[-1] + 1])
            return as_tensor(list(chain.from_iterable(range(starts[i], starts[i + 1]) for i in seqs)))

        return _StepParts(len(decode), rows_of(self.block_tables, decode), rows_of(self.seq_lens, decode),
                          tokens_index(decode), tokens_index(fresh), as_tensor(cu_of(fresh), torch.int32),
                          max((self.query_lens[i] for i in fresh), default=0),
                          rows_of(self.block_tables, other), tokens_index(other), as_tensor(cu_of(other), torch.int32),
                          as_tensor([self.context_lens[i] for i in other], torch.int32),
                          max((self.query_lens[i] for i in other), default=0))

    def _attend_each(self, layer, q, k_flat, v_flat, seqs) -> torch.Tensor:
        """Per sequence: gather its keys and values from the cache and attend densely (soft-capped scores)."""
        out = torch.empty_like(q)
        block_size = self.kv.block_size
        offsets = torch.arange(block_size, device=q.device)
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        for i in seqs:
            n, ctx, start = self.query_lens[i], self.context_lens[i], starts[i]
            blocks = self.block_tables[i, : -(-(ctx + n) // block_size)].long()
            slots = (blocks[:, None] * block_size + offsets).flatten()[: ctx + n]
            k, v = gather_rows(k_flat, slots), gather_rows(v_flat, slots)
            if layer.kv_cache_scaling_factor is not None:
                s = layer.kv_cache_scaling_factor
                k, v = dequantize(k, s[0], q.dtype), dequantize(v, s[1], q.dtype)
            out[start:start + n] = layer.attend_dense(q[start:start + n], k, v, ctx)
        return out


# A mixed step's decode attention streams the cache (memory-bound) while its prompts' attention multiplies
# (compute-bound): on a second CUDA stream the two share the SMs. The decode call is launched after the prompts' on
# a stream of higher priority, so as the prompts' programs finish, decode programs take their place. On an H200
# (scripts/ab_runtime_setting.py KILN_DECODE_ATTENTION_STREAM off,high,normal --requests 400 --rounds 2: 400 x
# 2048/128, Llama-3-8B shapes) it gains 0.2-0.6% at high priority, 0.6-0.8% at normal: the two kernels mostly take
# turns on the SMs (docs/performance.md). KILN_DECODE_ATTENTION_STREAM: "high" (the default), "normal" (the side
# stream at the main one's priority), "first" (at high priority, launched before the prompts' attention, so its
# programs take the SMs first; not yet timed) or "off" (one stream).
_STREAM_SETTINGS = {"high": (-1, False), "normal": (0, False), "first": (-1, True)}  # (priority, launched first)
_decode_streams: dict[tuple[torch.device, int], torch.cuda.Stream] = {}  # one per device and priority


def _decode_stream(q: torch.Tensor) -> tuple[torch.cuda.Stream | None, bool]:
    """(the side stream for a mixed step's decode attention on q's device, whether it is launched before the
    prompts' attention); the stream is None where turned off, or inside a CUDA graph's capture (captured steps
    keep one stream)."""
    setting = os.environ.get("KILN_DECODE_ATTENTION_STREAM", "high")
    if setting != "off" and setting not in _STREAM_SETTINGS:
        raise ValueError(f"KILN_DECODE_ATTENTION_STREAM={setting!r}: allowed values are high (the default), normal, "
                         "first and off")
    if setting == "off" or torch.cuda.is_current_stream_capturing():
        return None, False
    priority, first = _STREAM_SETTINGS[setting]
    key = (q.device, priority)
    if key not in _decode_streams:
        _decode_streams[key] = torch.cuda.Stream(q.device, priority=priority)
    return _decode_streams[key], first


def _attend_into(out: torch.Tensor, rows, attend, q: torch.Tensor, *args) -> None:
    """out[rows] = attend(q[rows], *args); where rows is a slice the kernel writes into that view of out itself."""
    if isinstance(rows, slice):
        attend(q[rows], *args, out=out[rows])
    else:
        out[rows] = attend(q[rows], *args)


def _consecutive(seqs: list[int]) -> bool:
    """Whether these (increasing) sequence indices are one run. The scheduler puts running sequences before new
    ones, so a mixed step's decoding, fresh and continuing sequences usually each are: then their tokens' rows of
    q, k, v and the output are slices, read and written as views, where an index tensor costs a gather (or a
    scatter) a layer."""
    return bool(seqs) and seqs[-1] - seqs[0] + 1 == len(seqs)


def _write(cache_flat: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """cache_flat[slots] = values; 1-byte codes through a uint8 view (no index_copy_ for float8 on the CPU)."""
    if cache_flat.element_size() == 1:
        cache_flat, values = cache_flat.view(torch.uint8), values.view(torch.uint8)
    cache_flat.index_copy_(0, slots, values)


@dataclass
class _StepParts:  # token rows: a slice where they are one run (_consecutive), else an index tensor
    num_decode: int  # sequences with one new token
    decode_tables: torch.Tensor  # their block tables
    decode_lens: torch.Tensor  # and lengths
    decode_tokens: torch.Tensor | slice  # and that token's row in the flat stream
    fresh_tokens: torch.Tensor | slice  # tokens of prompts with nothing cached yet
    fresh_cu: torch.Tensor  # their cu_seqlens
    fresh_max: int
    other_tables: torch.Tensor  # block tables of the prompts continuing a cached prefix or an earlier chunk
    other_tokens: torch.Tensor | slice  # their new tokens in the flat stream
    other_cu: torch.Tensor  # and those tokens' cu_seqlens
    other_ctx: torch.Tensor  # tokens each has cached before this step
    other_max: int  # the longest one's new tokens
