"""build(model) -> Engine, engine dirs on disk, and the checks a load makes first.

References: the transformers model for logits, and HF's own weights (read with transformers) for the
fused runtime layout; the engine files are read back with the `safetensors` package, not with kiln.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

import kiln
from kiln.builder import Engine, build, build_checkpoint, describe, resolve_build_config
from kiln.checkpoint.convert import convert_checkpoint
from kiln.config import BuildConfig
from kiln.errors import ConfigError, EngineVersionError, OutputExistsError
from kiln.models.llama.model import LLaMAForCausalLM
from kiln.version import FORMAT_VERSION

from conftest import TINY_LLAMA, make_hf_model


def _ids(seed=0, batch=2, length=13):
    return torch.randint(0, TINY_LLAMA["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_weight(hf, name):
    return dict(hf.named_parameters())[name].detach()


@pytest.fixture(scope="module")
def saved_engine(tiny_llama_session, tmp_path_factory):
    hf_dir, hf = tiny_llama_session
    out = tmp_path_factory.mktemp("engine") / "engine"
    build(LLaMAForCausalLM.from_hugging_face(hf_dir)).save(out)
    return out, hf


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_runtime_model_logits_match_transformers(arch, tiny_llama_session, tiny_mistral_session):
    hf_dir, hf = tiny_llama_session if arch == "llama" else tiny_mistral_session
    engine = build(LLaMAForCausalLM.from_hugging_face(hf_dir))
    assert isinstance(engine, Engine)
    ids = _ids(length=13)  # longer than the Mistral sliding window (8)
    with torch.no_grad():
        ours, theirs = engine.runtime_model()(ids), hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_save_and_from_dir_round_trip_gives_identical_logits(tiny_llama_session, saved_engine):
    hf_dir, _ = tiny_llama_session
    engine_dir, _ = saved_engine
    built = build(LLaMAForCausalLM.from_hugging_face(hf_dir))
    loaded = Engine.from_dir(engine_dir)
    ids = _ids(seed=1)
    with torch.no_grad():
        assert torch.equal(built.runtime_model()(ids), loaded.runtime_model()(ids))
    assert loaded.build_config == built.build_config
    assert loaded.config == built.config


def test_engine_dir_has_manifest_fused_weights_and_report(saved_engine):
    engine_dir, hf = saved_engine
    config = json.loads((engine_dir / "config.json").read_text())
    assert config["build_config"]["max_seq_len"] == TINY_LLAMA["max_position_embeddings"]  # filled from the model
    assert isinstance(config["plan"], dict) and config["plan"]
    fp = config["fingerprint"]
    assert fp["format_version"] == FORMAT_VERSION
    assert fp["kiln_version"] == kiln.__version__
    assert fp["torch_version"] == torch.__version__
    assert re.fullmatch(r"[0-9a-f]{64}", fp["rank0_sha256"])
    report = json.loads((engine_dir / "build_report.json").read_text())
    assert report["build_seconds"] >= 0
    assert report["parameters_per_rank"] == sum(p.numel() for p in hf.parameters())

    with safe_open(engine_dir / "rank0.safetensors", "pt") as f:
        names = set(f.keys())
        for i in range(TINY_LLAMA["num_hidden_layers"]):
            fused = f.get_tensor(f"transformer.layers.{i}.mlp.fc_gate.weight")
            expected = torch.cat([_hf_weight(hf, f"model.layers.{i}.mlp.gate_proj.weight"),
                                  _hf_weight(hf, f"model.layers.{i}.mlp.up_proj.weight")])
            assert torch.equal(fused, expected)
            qkv = f.get_tensor(f"transformer.layers.{i}.attention.qkv.weight")
            assert torch.equal(qkv, torch.cat([_hf_weight(hf, f"model.layers.{i}.self_attn.{p}_proj.weight")
                                               for p in "qkv"]))
    assert not any(n.endswith(".mlp.fc.weight") or n.endswith(".mlp.gate.weight") for n in names)


def test_fingerprint_hash_follows_the_weights(tiny_llama_session, tmp_path):
    hf_dir, _ = tiny_llama_session
    other_dir = tmp_path / "other_hf"
    make_hf_model(other_dir, seed=1)
    hashes = []
    for i, src in enumerate([hf_dir, hf_dir, other_dir]):
        out = build(LLaMAForCausalLM.from_hugging_face(src)).save(tmp_path / f"e{i}")
        hashes.append(json.loads((out / "config.json").read_text())["fingerprint"]["rank0_sha256"])
    assert hashes[0] == hashes[1]  # same weights, same hash
    assert hashes[0] != hashes[2]  # other weights, other hash


def test_build_checkpoint_of_tp2_writes_each_rank_shard(tiny_llama_session, tmp_path):
    hf_dir, hf = tiny_llama_session
    ckpt = convert_checkpoint(hf_dir, tmp_path / "ckpt", tp_size=2)
    out = build_checkpoint(ckpt, tmp_path / "engine")
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["mapping"]["tp_size"] == 2
    assert {"rank0_sha256", "rank1_sha256"} <= set(config["fingerprint"])
    half = TINY_LLAMA["intermediate_size"] // 2
    gate, up = (_hf_weight(hf, f"model.layers.1.mlp.{p}_proj.weight") for p in ("gate", "up"))
    for rank in range(2):
        with safe_open(out / f"rank{rank}.safetensors", "pt") as f:
            fused = f.get_tensor("transformer.layers.1.mlp.fc_gate.weight")
        rows = slice(rank * half, (rank + 1) * half)  # column-parallel: each rank its rows of gate and of up
        assert torch.equal(fused, torch.cat([gate[rows], up[rows]]))
        assert Engine.from_dir(out, rank=rank).config.mapping.rank == rank


def test_other_format_version_is_refused_with_the_rebuild_command(saved_engine, tmp_path):
    import shutil

    engine_dir = tmp_path / "engine"
    shutil.copytree(saved_engine[0], engine_dir)
    config = json.loads((engine_dir / "config.json").read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (engine_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineVersionError) as err:
        Engine.from_dir(engine_dir)
    assert "kiln build" in str(err.value)
    assert str(FORMAT_VERSION + 1) in str(err.value)


def test_existing_output_dir_is_refused_unless_overwrite(tiny_llama_session, tmp_path):
    hf_dir, _ = tiny_llama_session
    engine = build(LLaMAForCausalLM.from_hugging_face(hf_dir))
    out = engine.save(tmp_path / "engine")
    (out / "marker").write_text("old")
    with pytest.raises(OutputExistsError):
        engine.save(out)
    assert (out / "marker").exists()  # refused before touching anything
    engine.save(out, overwrite=True)
    assert not (out / "marker").exists()
    Engine.from_dir(out)


def test_build_checkpoint_refuses_existing_output_dir(tiny_llama_session, tmp_path):
    hf_dir, _ = tiny_llama_session
    ckpt = convert_checkpoint(hf_dir, tmp_path / "ckpt")
    (tmp_path / "engine").mkdir()
    with pytest.raises(OutputExistsError):
        build_checkpoint(ckpt, tmp_path / "engine")
    build_checkpoint(ckpt, tmp_path / "engine", overwrite=True)
    assert (tmp_path / "engine" / "rank0.safetensors").is_file()


def test_max_seq_len_beyond_the_model_is_a_config_error_naming_it(tiny_llama_session):
    hf_dir, _ = tiny_llama_session
    model = LLaMAForCausalLM.from_hugging_face(hf_dir)
    too_long = TINY_LLAMA["max_position_embeddings"] + 1
    with pytest.raises(ConfigError, match="max_seq_len"):
        build(model, BuildConfig(max_seq_len=too_long))
    # With rope scaling the model can go past its trained length, so the same limit is accepted.
    scaled = model.config.replace(rotary_scaling={"type": "linear", "factor": 2.0})
    assert resolve_build_config(scaled, BuildConfig(max_seq_len=too_long)).max_seq_len == too_long


def test_build_limits_are_filled_and_kept(tiny_llama_session):
    hf_dir, _ = tiny_llama_session
    bc = build(LLaMAForCausalLM.from_hugging_face(hf_dir), BuildConfig(max_seq_len=64, max_batch_size=3)).build_config
    assert (bc.max_seq_len, bc.max_input_len, bc.max_batch_size) == (64, 64, 3)


def test_describe_checkpoint_and_engine(tiny_llama_session, saved_engine, tmp_path):
    hf_dir, _ = tiny_llama_session
    engine_dir, _ = saved_engine
    ckpt = convert_checkpoint(hf_dir, tmp_path / "ckpt")
    h, f = TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"]

    info = describe(ckpt)
    assert info["kind"] == "checkpoint"
    assert info["config"]["architecture"] == "LlamaForCausalLM"
    tensors = info["ranks"]["rank0.safetensors"]["tensors"]
    assert tensors["transformer.layers.0.mlp.fc.weight"] == [f, h]
    assert info["ranks"]["rank0.safetensors"]["bytes"] == (ckpt / "rank0.safetensors").stat().st_size

    info = describe(engine_dir)
    assert info["kind"] == "engine"
    assert "build_config" in info["config"]
    tensors = info["ranks"]["rank0.safetensors"]["tensors"]
    assert tensors["transformer.layers.0.mlp.fc_gate.weight"] == [2 * f, h]
    assert "transformer.layers.0.mlp.fc.weight" not in tensors
