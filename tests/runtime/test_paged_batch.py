"""PagedAttentionBatch.attend against the reference AttentionBatch on whole sequences without a cache.

Each sequence's earlier keys and values are placed in scattered blocks of a PagedKVCache; the step's new
queries must then attend exactly as the same rows of an uncached forward over the whole sequence would.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kiln.config import KVCacheLayout
from kiln.kernels import triton_available
from kiln.kernels.input_quant import InputQuant
from kiln.layers.attention import Attention, AttentionBatch
from kiln.quantization.kv_cache import quantize
from kiln.runtime.kv_cache import PagedKVCache
from kiln.runtime.paged_batch import PagedAttentionBatch

HEADS, KV_HEADS, HEAD_SIZE, BLOCK = 4, 2, 16, 4


@dataclass
class Layer:
    """What attend reads of an attention layer; the dense math is Attention's own."""

    sliding_window: int | None = None
    softcap: float | None = None
    layer_idx: int = 0
    scale: float = HEAD_SIZE ** -0.5
    kv_cache_dtype: torch.dtype | None = None  # int8 / float8 codes: a quantized cache
    kv_cache_scaling_factor: torch.Tensor | None = None  # [s_k, s_v] with a quantized cache
    out_quant: InputQuant | None = None  # the output projection's quantized input, where decode writes it
    sinks: torch.Tensor | None = None  # gpt-oss: a logit per head in each softmax's denominator
    attend_dense = Attention.attend_dense


def _paged_vs_reference(layer: Layer, steps: list[tuple[int, int]], device: str) -> None:
    """steps: (tokens already cached, new tokens) per sequence."""
    gen = torch.Generator().manual_seed(len(steps) * 100 + sum(c for c, _ in steps))
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    lengths = [c + n for c, n in steps]
    q, k, v = rand(sum(lengths), HEADS, HEAD_SIZE), rand(sum(lengths), KV_HEADS, HEAD_SIZE), \
        rand(sum(lengths), KV_HEADS, HEAD_SIZE)
    expected = AttentionBatch(lengths).attend(layer, q, k, v)

    widest = -(-max(lengths) // BLOCK)
    num_blocks = widest * len(steps) + 3
    kv = PagedKVCache([0], num_blocks, BLOCK, KVCacheLayout(KV_HEADS, HEAD_SIZE), layer.kv_cache_dtype or torch.float32,
                      torch.device(device))
    stored_k, stored_v = _as_stored(layer, k, 0), _as_stored(layer, v, 1)
    order = torch.randperm(num_blocks, generator=gen).tolist()  # scattered, not in sequence order
    tables, slots, new_rows, start = [], [], [], 0
    for i, (ctx, n) in enumerate(steps):
        table = order[i * widest:(i + 1) * widest]
        tables.append(table)
        for pos in range(ctx + n):
            slot = table[pos // BLOCK] * BLOCK + pos % BLOCK
            if pos < ctx:  # in the cache from earlier steps
                _bytes(kv.k[0]).view(-1, KV_HEADS, HEAD_SIZE)[slot] = stored_k[start + pos]
                _bytes(kv.v[0]).view(-1, KV_HEADS, HEAD_SIZE)[slot] = stored_v[start + pos]
            else:
                slots.append(slot)
                new_rows.append(start + pos)
        start += ctx + n
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    cu = [0]
    for _, n in steps:
        cu.append(cu[-1] + n)
    batch = PagedAttentionBatch([n for _, n in steps], [c for c, _ in steps], kv,
                                torch.tensor(slots, dtype=torch.long, device=device), as_tensor(tables),
                                as_tensor(lengths), as_tensor(cu))
    rows = torch.tensor(new_rows, device=device)
    out = batch.attend(layer, q[rows], k[rows], v[rows])
    torch.testing.assert_close(out, expected[rows], atol=1e-4, rtol=1e-4)


def _as_stored(layer: Layer, x: torch.Tensor, which: int) -> torch.Tensor:
    """x as the cache holds it: itself, or its codes (bytes) in a quantized cache."""
    if layer.kv_cache_dtype is None:
        return x
    return _bytes(quantize(x, layer.kv_cache_scaling_factor[which], layer.kv_cache_dtype))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t  # (no float8 index_put on the CPU)


DEVICES = ["cpu"] + (["cuda"] if triton_available() else [])  # CUDA runs the Triton kernels
STEPS = {
    "mixed": [(5, 6), (9, 1), (0, 7), (13, 3)],  # a prefill continuing a cached prefix, decode, a fresh prompt
    # as the scheduler orders a step (running sequences first): each kind's tokens are one run, read as a slice
    "mixed_in_runs": [(9, 1), (4, 1), (5, 6), (11, 2), (0, 7), (0, 3)],
    "decode_only": [(9, 1), (1, 1), (16, 1), (4, 1)],
    "fresh_prefill": [(0, 7), (0, 1), (0, 12)],
    "continuing_only": [(5, 6), (16, 3), (1, 9)],  # prefix hits or later chunks, no other kind beside them
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 3, 8])
@pytest.mark.parametrize("kind", list(STEPS))
def test_paged_attention_equals_uncached_attention(kind, window, device):
    _paged_vs_reference(Layer(sliding_window=window), STEPS[kind], device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(STEPS))
def test_attention_sinks_equal_uncached_attention(kind, device):
    """gpt-oss's sinks through every path (decode, fresh prefill, a continued prefix, a mixed step) as the
    uncached attention applies them (Attention.attend_dense), over a window as gpt-oss's sliding layers have."""
    sinks = torch.tensor([0.3, -1.0, 2.5, 0.0, 1.0, -0.5, 4.0, -3.0][:HEADS], device=device)
    _paged_vs_reference(Layer(sliding_window=4, sinks=sinks), STEPS[kind], device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("code_dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("kind", list(STEPS))
def test_quantized_cache_equals_uncached_attention_over_the_same_codes(kind, code_dtype, device):
    """Every path (decode, fresh prefill, a continued prefix) attends the codes; the uncached reference
    quantize-dequantizes k and v the same way."""
    scales = torch.tensor([4.5, 4.0], device=device) / (127.0 if code_dtype == torch.int8 else 448.0)
    _paged_vs_reference(Layer(kv_cache_dtype=code_dtype, kv_cache_scaling_factor=scales),
                        STEPS[kind], device)


def test_a_mixed_step_reads_each_kind_of_sequence_by_slice_where_its_tokens_are_one_run():
    """The token rows of STEPS["mixed_in_runs"] are slices (views, no gather), those of STEPS["mixed"] index tensors
    where a kind's sequences are split (the continuing prompts 0 and 3). Each kind's block tables and lengths are
    gathered once for the step."""
    def parts(steps):
        tables = torch.arange(len(steps) * 3, dtype=torch.int32).view(len(steps), 3)
        lens = torch.tensor([c + n for c, n in steps], dtype=torch.int32)
        return PagedAttentionBatch([n for _, n in steps], [c for c, _ in steps], None, torch.zeros(1), tables, lens,
                                   None)._parts
    runs, split = parts(STEPS["mixed_in_runs"]), parts(STEPS["mixed"])
    assert (runs.decode_tokens, runs.other_tokens, runs.fresh_tokens) == (slice(0, 2), slice(2, 10), slice(10, 20))
    assert runs.decode_lens.tolist() == [10, 5] and runs.other_tables[:, 0].tolist() == [6, 9]
    assert split.other_tokens.tolist() == [0, 1, 2, 3, 4, 5, 14, 15, 16] and split.other_tables[:, 0].tolist() == [0, 9]
    assert (split.fresh_tokens, split.decode_tokens, split.decode_lens.tolist()) == (slice(7, 14), slice(6, 7), [10])


@pytest.mark.parametrize("kind", list(STEPS))
def test_soft_capped_scores_through_the_paged_cache(kind):
    _paged_vs_reference(Layer(softcap=5.0), STEPS[kind], "cpu")


def test_a_later_step_reads_the_keys_an_earlier_step_wrote_to_the_cache():
    # Step 1 prefills 4 tokens into block 0; step 2 writes 2 more into block 2 and reads all 6.
    layer = Layer()
    kv = PagedKVCache([0], 3, BLOCK, KVCacheLayout(KV_HEADS, HEAD_SIZE), torch.float32, torch.device("cpu"))
    k, v, q = torch.randn(6, KV_HEADS, HEAD_SIZE), torch.randn(6, KV_HEADS, HEAD_SIZE), torch.randn(6, HEADS, HEAD_SIZE)
    batch = PagedAttentionBatch([4], [0], kv, torch.arange(4), torch.tensor([[0]], dtype=torch.int32),
                                torch.tensor([4], dtype=torch.int32), torch.tensor([0, 4], dtype=torch.int32))
    batch.attend(layer, q[:4], k[:4], v[:4])
    torch.testing.assert_close(kv.k[0][0], k[:4])
    step = PagedAttentionBatch([2], [4], kv, torch.tensor([8, 9]), torch.tensor([[0, 2]], dtype=torch.int32),
                               torch.tensor([6], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32))
    out = step.attend(layer, q[4:], k[4:], v[4:])
    torch.testing.assert_close(out, AttentionBatch([6]).attend(layer, q, k, v)[4:], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not triton_available(), reason="the side stream is a CUDA stream: needs a GPU with Triton")
@pytest.mark.parametrize("setting", ["high", "normal", "first", "off"])
@pytest.mark.parametrize("kind", ["mixed", "mixed_in_runs"])
def test_a_mixed_step_with_its_decode_attention_on_a_side_stream(kind, setting, monkeypatch):
    """KILN_DECODE_ATTENTION_STREAM runs the decode tokens' attention on a second stream beside the prompts' (or,
    off, on the one stream): the output is the same, and the stream is the one the setting asks for."""
    from kiln.runtime import paged_batch

    monkeypatch.setenv("KILN_DECODE_ATTENTION_STREAM", setting)
    monkeypatch.setattr(paged_batch, "_decode_streams", {})
    _paged_vs_reference(Layer(), STEPS[kind], "cuda")
    expected = [] if setting == "off" else [paged_batch._STREAM_SETTINGS[setting][0]]
    assert [level for _, level in paged_batch._decode_streams] == expected


def test_an_unknown_decode_attention_stream_setting_names_the_allowed_values(monkeypatch):
    from kiln.runtime.paged_batch import _decode_stream

    monkeypatch.setenv("KILN_DECODE_ATTENTION_STREAM", "fast")
    with pytest.raises(ValueError, match="allowed values are high .the default., normal, first and off"):
        _decode_stream(torch.zeros(1))
