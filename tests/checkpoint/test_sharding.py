"""A tensor/pipeline-parallel checkpoint holds exactly the tp=1 tensors, split as the design says.

The rank files are read back and reassembled here with logic written independently of kiln's
shard functions: column-parallel on dim 0, row-parallel on dim 1, the fused QKV per rank as
[q_r; k_r; v_r] (KV heads replicated when tp_size exceeds them), vocab-parallel with zero padding,
replicated norms (and row-parallel biases) identical on every tp rank, layers split over pp stages.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import make_hf_model
from kiln.checkpoint.convert import convert_checkpoint
from kiln.checkpoint.safetensors_io import SafetensorsFile

VOCAB = 127  # not divisible by any tp_size > 1 used here: the vocab is padded

CASES = {
    # name: (tp, pp, hf overrides)
    "tp2_pp2": (2, 2, dict(num_hidden_layers=3)),
    "tp2": (2, 1, {}),
    "pp2": (1, 2, dict(num_hidden_layers=3)),
    "tp2_biases": (2, 1, dict(attention_bias=True, mlp_bias=True)),
    "tp4_gqa_replicated_kv": (4, 1, dict(num_key_value_heads=2)),   # tp > kv heads
    "tp4_mqa": (4, 1, dict(num_key_value_heads=1)),
    "tp2_pp2_tied": (2, 2, dict(tie_word_embeddings=True, num_hidden_layers=3)),
}

LAYER = re.compile(r"transformer\.layers\.(\d+)\.(.+)$")


def read_all(path) -> dict[str, torch.Tensor]:
    f = SafetensorsFile(path)
    return {name: f.get(name) for name in f.keys()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            tp, pp, overrides = CASES[case]
            root = tmp_path_factory.mktemp(case)
            make_hf_model(root / "hf", seed=7, vocab_size=VOCAB, **overrides)
            full = convert_checkpoint(root / "hf", root / "tp1", dtype="float32")
            sharded = convert_checkpoint(root / "hf", root / "sharded", dtype="float32", tp_size=tp, pp_size=pp)
            cache[case] = full, sharded
        return cache[case]
    return get


def reassemble_qkv(pieces, config, tp):
    """[q_r; k_r; v_r] per rank -> the full [q; k; v], checking replicated KV heads agree."""
    heads, kv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_size"]
    q_rows = heads // tp * d
    kv_rows = max(kv // tp, 1) * d
    for p in pieces:
        assert p.shape[0] == q_rows + 2 * kv_rows
    q = torch.cat([p[:q_rows] for p in pieces])
    ks = [p[q_rows:q_rows + kv_rows] for p in pieces]
    vs = [p[q_rows + kv_rows:] for p in pieces]
    if kv >= tp:
        return torch.cat([q, torch.cat(ks), torch.cat(vs)])
    ranks_per_head = tp // kv
    k_heads, v_heads = [], []
    for h in range(kv):
        group = range(h * ranks_per_head, (h + 1) * ranks_per_head)  # the ranks whose queries use KV head h
        for r in group:
            assert torch.equal(ks[r], ks[group[0]]) and torch.equal(vs[r], vs[group[0]])
        k_heads.append(ks[group[0]])
        v_heads.append(vs[group[0]])
    return torch.cat([q, *k_heads, *v_heads])


def reassemble(name, pieces, config, tp):
    leaf = LAYER.match(name).group(2) if LAYER.match(name) else name
    if name in ("transformer.vocab_embedding.weight", "lm_head.weight"):
        rows = -(-VOCAB // tp)
        assert all(p.shape[0] == rows for p in pieces), name
        whole = torch.cat(pieces)
        assert torch.all(whole[VOCAB:] == 0), f"{name}: the vocab padding is not zero"
        return whole[:VOCAB]
    if leaf.startswith("attention.qkv."):
        return reassemble_qkv(pieces, config, tp)
    if leaf in ("attention.dense.weight", "mlp.proj.weight"):
        return torch.cat(pieces, dim=1)
    if leaf.startswith("mlp.fc.") or leaf.startswith("mlp.gate."):
        return torch.cat(pieces, dim=0)
    # replicated: norms, and the row-parallel biases (added once, after the all-reduce)
    assert leaf.endswith("layernorm.weight") or leaf == "transformer.ln_f.weight" or \
        leaf in ("attention.dense.bias", "mlp.proj.bias"), f"unexpected tensor {name}"
    for p in pieces[1:]:
        assert torch.equal(p, pieces[0]), f"{name}: replicated tensor differs between tp ranks"
    return pieces[0]


@pytest.mark.parametrize("case", list(CASES))
def test_rank_files_together_hold_exactly_the_tp1_tensors(converted, case):
    tp, pp, overrides = CASES[case]
    full_dir, sharded_dir = converted(case)
    full = read_all(full_dir / "rank0.safetensors")
    config = json.loads((sharded_dir / "config.json").read_text())
    assert config["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
    assert sorted(p.name for p in sharded_dir.glob("rank*.safetensors")) == \
        sorted(f"rank{r}.safetensors" for r in range(tp * pp))
    ranks = [read_all(sharded_dir / f"rank{r}.safetensors") for r in range(tp * pp)]
    num_layers = config["num_hidden_layers"]
    tied = overrides.get("tie_word_embeddings", False)

    stage_layers = []
    for stage in range(pp):
        stage_ranks = ranks[stage * tp:(stage + 1) * tp]  # rank = pp_rank * tp_size + tp_rank
        names = set(stage_ranks[0])
        for r in stage_ranks[1:]:
            assert set(r) == names, "tp ranks of one stage hold different tensor names"
        stage_layers.append(sorted({int(LAYER.match(n).group(1)) for n in names if LAYER.match(n)}))
        assert ("transformer.vocab_embedding.weight" in names) == (stage == 0)
        assert ("transformer.ln_f.weight" in names) == (stage == pp - 1)
        assert ("lm_head.weight" in names) == (stage == pp - 1 and not (tied and pp == 1))
        for name in names:
            expected = full["transformer.vocab_embedding.weight"] if name == "lm_head.weight" and tied else full[name]
            got = reassemble(name, [r[name] for r in stage_ranks], config, tp)
            assert got.dtype == expected.dtype and torch.equal(got, expected), name
        if pp > 1:
            assert 0 < sum(t.numel() for t in stage_ranks[0].values()) < sum(t.numel() for t in full.values())

    # every layer on exactly one stage, in order, as evenly as possible
    assert [i for layers in stage_layers for i in layers] == list(range(num_layers))
    sizes = [len(layers) for layers in stage_layers]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1

    # nothing of the original is missing
    covered = set().union(*ranks)
    assert set(full) <= covered


def test_tp_shards_are_smaller(converted):
    full_dir, sharded_dir = converted("tp2")
    full = SafetensorsFile(full_dir / "rank0.safetensors")
    for r in range(2):
        f = SafetensorsFile(sharded_dir / f"rank{r}.safetensors")
        name = "transformer.layers.0.mlp.proj.weight"
        assert f.shape(name) == (full.shape(name)[0], full.shape(name)[1] // 2)
