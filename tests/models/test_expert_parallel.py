"""Expert parallelism (Mapping.moe_tp_size x moe_ep_size = tp_size): the mapping validates and round-trips, rank
files reassemble exactly to the TP=1 tensors, the ranks' partial expert outputs sum to the TP=1 output, and two
worker processes give the TP=1 greedy tokens for Mixtral and Qwen2-MoE (shared expert)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers as tf
from family_checks import GREEDY, Family, prompt
from safetensors import safe_open
from test_mixtral import TINY as MIXTRAL
from test_qwen import MOE
from test_qwen import TINY as QWEN

from kiln.builder import build_checkpoint
from kiln.checkpoint.convert import convert_checkpoint
from kiln.errors import ConfigError
from kiln.llmapi.llm import LLM
from kiln.mapping import Mapping
from kiln.models.base import PretrainedModel

CASES = {
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, MIXTRAL),  # 4 experts, top-2
    "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                  dict(QWEN, **MOE, shared_expert_intermediate_size=48, num_hidden_layers=3, mlp_only_layers=[1])),
}
EXPERT_PREFIX = ".mlp.experts."


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return Family(tmp_path_factory, CASES)


# ---- Mapping ---------------------------------------------------------------------------------------------

def test_moe_sizes_default_to_tensor_parallel_experts():
    m = Mapping.of(tp_size=4)
    assert (m.moe_tp_size, m.moe_ep_size) == (4, 1)
    assert Mapping.of(tp_size=4, moe_ep_size=2).moe_tp_size == 2  # the other one is derived
    assert Mapping.of(tp_size=4, moe_tp_size=1).moe_ep_size == 4


def test_moe_groups_follow_tensor_parallel_rank():
    ms = [Mapping.of(tp_size=4, pp_size=2, rank=r, moe_tp_size=2, moe_ep_size=2) for r in range(8)]
    assert [m.moe_ep_rank for m in ms] == [0, 0, 1, 1] * 2
    assert [m.moe_tp_rank for m in ms] == [0, 1, 0, 1] * 2
    assert [m.local_experts(8) for m in ms[:4]] == [range(4)] * 2 + [range(4, 8)] * 2
    assert ms[3].with_rank(0).moe_ep_size == 2


@pytest.mark.parametrize("kwargs, field", [
    (dict(tp_size=4, moe_tp_size=2, moe_ep_size=1), "moe_tp_size * moe_ep_size"),
    (dict(tp_size=4, moe_ep_size=3), "moe_ep_size"),
    (dict(tp_size=4, moe_tp_size=3), "moe_tp_size"),
    (dict(tp_size=2, moe_ep_size=0), "moe_ep_size"),
    (dict(tp_size=2, moe_tp_size="2"), "moe_tp_size"),
])
def test_bad_moe_sizes_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=re.escape(f"Mapping.{field}")):
        Mapping.of(**kwargs)


def test_experts_not_divisible_by_moe_ep_size_are_refused():
    with pytest.raises(ConfigError, match="moe_ep_size"):
        Mapping.of(tp_size=4, moe_ep_size=4).local_experts(6)


def test_mapping_round_trips_and_old_configs_load():
    m = Mapping.of(tp_size=4, pp_size=2, moe_tp_size=2, moe_ep_size=2)
    d = m.to_dict()
    assert (d["moe_tp_size"], d["moe_ep_size"]) == (2, 2)
    assert Mapping.from_dict(json.loads(json.dumps(d)), rank=5) == m.with_rank(5)
    old = Mapping.from_dict({"world_size": 2, "tp_size": 2, "pp_size": 1})
    assert (old.moe_tp_size, old.moe_ep_size) == (2, 1)
    assert old.to_dict() == {"world_size": 2, "tp_size": 2, "pp_size": 1}  # defaults are left out, as before
    with pytest.raises(ConfigError, match="unknown field"):
        Mapping.from_dict({**d, "moe_cluster_size": 1})


# ---- checkpoints -----------------------------------------------------------------------------------------

def read_rank(ckpt, rank: int) -> dict[str, torch.Tensor]:
    with safe_open(ckpt / f"rank{rank}.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def reassemble_expert(parts: list[torch.Tensor], name: str, moe_tp: int, moe_ep: int) -> torch.Tensor:
    """parts in TP-rank order: cat each EP group's moe_tp slices on the intermediate dim, then the groups'
    experts on dim 0."""
    inter_dim = 2 if name.endswith("proj.weight") else 1
    groups = [torch.cat(parts[g * moe_tp:(g + 1) * moe_tp], dim=inter_dim) for g in range(moe_ep)]
    return torch.cat(groups, dim=0)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tp, moe_tp, moe_ep", [(2, 1, 2), (4, 2, 2)])
def test_expert_rank_files_reassemble_to_single_rank(family, case, tp, moe_tp, moe_ep, tmp_path):
    hf_dir, _ = family.hf(case)
    one = read_rank(convert_checkpoint(hf_dir, tmp_path / "tp1", dtype="float32"), 0)
    ckpt = convert_checkpoint(hf_dir, tmp_path / "ep", dtype="float32", tp_size=tp, moe_tp_size=moe_tp,
                              moe_ep_size=moe_ep)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1, "moe_tp_size": moe_tp,
                                 "moe_ep_size": moe_ep}
    ranks = [read_rank(ckpt, r) for r in range(tp)]
    experts = [n for n in one if EXPERT_PREFIX in n]
    assert experts
    for name in experts:
        parts = [r[name] for r in ranks]
        assert parts[0].shape[0] == one[name].shape[0] // moe_ep
        assert torch.equal(reassemble_expert(parts, name, moe_tp, moe_ep), one[name]), name
    for name in (n for n in one if ".mlp.router." in n or "shared_expert_gate" in n):
        assert all(torch.equal(r[name], one[name]) for r in ranks), name  # replicated as before
    shared = [n for n in one if ".shared_expert.fc." in n]
    assert bool(shared) == (case == "qwen2_moe")
    for name in shared:  # shared experts stay column-parallel over the whole TP group
        assert torch.equal(torch.cat([r[name] for r in ranks]), one[name])


def test_ranks_partial_expert_outputs_sum_to_single_rank(family, tmp_path):
    """The forward of tp=4 (moe_ep=2 x moe_tp=2), in one process: each rank's local-expert partial sum, added
    up (the all-reduce), is the TP=1 experts' output."""
    hf_dir, _ = family.hf("mixtral")
    one = PretrainedModel.from_checkpoint(convert_checkpoint(hf_dir, tmp_path / "tp1", dtype="float32")).materialize()
    ckpt = convert_checkpoint(hf_dir, tmp_path / "ep", dtype="float32", tp_size=4, moe_tp_size=2, moe_ep_size=2)
    ranks = [PretrainedModel.from_checkpoint(ckpt, rank=r).materialize() for r in range(4)]
    moe = one.transformer.layers["0"].mlp
    x = torch.randn(9, MIXTRAL["hidden_size"], generator=torch.Generator().manual_seed(0))
    weights, experts = torch.softmax(moe.router(x), -1).topk(2, dim=-1)
    with torch.no_grad():
        want = moe.experts(x, experts, weights)
        got = sum(r.transformer.layers["0"].mlp.experts(x, experts, weights) for r in ranks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- runtime ---------------------------------------------------------------------------------------------

def test_expert_parallel_greedy_tokens_equal_single_rank(family, tmp_path, kiln_cache):
    """EP=2 (tp=2, moe_ep=2, moe_tp=1) engines run by two workers give the TP=1 (transformers) tokens."""
    for case in CASES:
        hf_dir, hf = family.hf(case)
        ckpt = convert_checkpoint(hf_dir, tmp_path / f"ckpt-{case}", dtype="float32", tp_size=2, moe_ep_size=2)
        engine = build_checkpoint(ckpt, tmp_path / f"engine-{case}")
        assert json.loads((engine / "config.json").read_text())["mapping"]["moe_ep_size"] == 2
        with LLM(engine, tensor_parallel_size=2, device="cpu") as llm:
            out = llm.generate([prompt(hf)[0].tolist()], GREEDY)
        assert out[0].outputs[0].token_ids == family.hf_tokens(case), case


def test_kiln_convert_takes_moe_sizes(family, tmp_path, capsys):
    from kiln.cli import main

    hf_dir, _ = family.hf("mixtral")
    out = tmp_path / "ckpt"
    assert main(["convert", "--model-dir", str(hf_dir), "--output-dir", str(out), "--tp-size", "2",
                 "--moe-ep-size", "2"]) == 0
    assert json.loads((out / "config.json").read_text())["mapping"]["moe_tp_size"] == 1
    assert main(["convert", "--model-dir", str(hf_dir), "--output-dir", str(tmp_path / "bad"), "--tp-size", "2",
                 "--moe-tp-size", "2", "--moe-ep-size", "2"]) == 1
    assert "moe_tp_size * moe_ep_size" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
