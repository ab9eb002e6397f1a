"""Mapping (which slice a rank owns) and the shard rules, checked against slicing written out here."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import ConfigError
from kiln.mapping import (Mapping, kv_heads_per_rank, padded_vocab_size, replicate, shard_column, shard_qkv,
                          shard_row, shard_vocab)


def ranks(tp: int, pp: int = 1):
    return [Mapping.of(tp_size=tp, pp_size=pp, rank=r) for r in range(tp * pp)]


def test_ranks_are_laid_out_tensor_parallel_first():
    for m in ranks(4, 3):
        assert m.rank == m.pp_rank * 4 + m.tp_rank
        assert 0 <= m.tp_rank < 4 and 0 <= m.pp_rank < 3
    stages = [[m.rank for m in ranks(4, 3) if m.pp_rank == s] for s in range(3)]
    assert stages == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [m.is_first_pp_rank for m in ranks(2, 2)] == [True, True, False, False]
    assert [m.is_last_pp_rank for m in ranks(2, 2)] == [False, False, True, True]


@pytest.mark.parametrize("layers, pp", [(1, 1), (2, 2), (3, 2), (7, 3), (10, 4), (32, 5)])
def test_pp_layers_partition_the_layers_in_order(layers, pp):
    parts = [Mapping.of(pp_size=pp, rank=s).pp_layers(layers) for s in range(pp)]
    assert [i for part in parts for i in part] == list(range(layers))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)  # earlier stages take the remainder


def test_pp_larger_than_the_layers_is_refused():
    with pytest.raises(ConfigError, match="pp_size"):
        Mapping.of(pp_size=4).pp_layers(3)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_and_row_shards_tile_the_tensor(tp):
    w = torch.randn(8, 12)
    cols = [shard_column(w, m) for m in ranks(tp)]
    assert all(c.shape == (8 // tp, 12) for c in cols)
    assert torch.equal(torch.cat(cols, 0), w)
    rows = [shard_row(w, m) for m in ranks(tp)]
    assert all(r.shape == (8, 12 // tp) for r in rows)
    assert torch.equal(torch.cat(rows, 1), w)
    bias = torch.randn(8)
    assert torch.equal(torch.cat([shard_column(bias, m) for m in ranks(tp)]), bias)
    assert all(torch.equal(shard_row(bias, m), bias) for m in ranks(tp))  # added once after the all-reduce
    assert all(replicate(w, m) is w for m in ranks(tp))


def test_shards_of_different_pp_stages_are_the_same_tp_slices():
    w = torch.randn(8, 4)
    for m in ranks(2, 3):
        assert torch.equal(shard_column(w, m), w[m.tp_rank * 4:(m.tp_rank + 1) * 4])


def test_indivisible_split_names_tp_size():
    with pytest.raises(ConfigError, match="tp_size=3"):
        shard_column(torch.randn(8, 4), Mapping.of(tp_size=3))
    with pytest.raises(ConfigError, match="tp_size=3"):
        shard_row(torch.randn(4, 8), Mapping.of(tp_size=3))


@pytest.mark.parametrize("vocab, tp", [(127, 2), (127, 4), (128, 4), (5, 8), (10, 1)])
def test_vocab_shards_pad_with_zeros(vocab, tp):
    w = torch.randn(vocab, 3) + 5  # no zero rows of its own
    padded = -(-vocab // tp) * tp
    assert padded_vocab_size(vocab, tp) == padded
    parts = [shard_vocab(w, m) for m in ranks(tp)]
    assert all(p.shape == (padded // tp, 3) for p in parts)
    whole = torch.cat(parts)
    assert torch.equal(whole[:vocab], w)
    assert torch.all(whole[vocab:] == 0)


def reference_qkv(full, heads, kv, d, tp, r):
    """Rank r's [q_r; k_r; v_r], sliced head by head."""
    q, k, v = full[:heads * d], full[heads * d:(heads + kv) * d], full[(heads + kv) * d:]
    qh = heads // tp
    q_r = q[r * qh * d:(r + 1) * qh * d]
    if kv >= tp:
        kh = kv // tp
        k_heads = range(r * kh, (r + 1) * kh)
    else:
        k_heads = [r // (tp // kv)]  # the KV head this rank's queries attend with
    k_r = torch.cat([k[h * d:(h + 1) * d] for h in k_heads])
    v_r = torch.cat([v[h * d:(h + 1) * d] for h in k_heads])
    return torch.cat([q_r, k_r, v_r])


@pytest.mark.parametrize("heads, kv, tp", [(4, 4, 2), (4, 2, 2), (8, 2, 2), (4, 2, 4), (8, 2, 8), (4, 1, 4),
                                           (8, 8, 1), (8, 4, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_shard_takes_each_ranks_heads(heads, kv, tp, bias):
    d = 4
    shape = ((heads + 2 * kv) * d,) if bias else ((heads + 2 * kv) * d, 6)
    full = torch.randn(shape)
    per_rank_kv = max(kv // tp, 1)
    assert kv_heads_per_rank(kv, tp) == per_rank_kv
    for m in ranks(tp):
        got = shard_qkv(full, m, num_heads=heads, num_kv_heads=kv, head_size=d)
        assert got.shape[0] == (heads // tp + 2 * per_rank_kv) * d
        assert torch.equal(got, reference_qkv(full, heads, kv, d, tp, m.tp_rank))


@pytest.mark.parametrize("kv, tp", [(3, 2), (2, 3), (4, 6)])
def test_kv_heads_that_do_not_fit_tp_are_refused(kv, tp):
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        kv_heads_per_rank(kv, tp)
