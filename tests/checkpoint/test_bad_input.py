"""Bad input gives a KilnError that names the file or field, and leaves nothing half-written."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import leftovers, make_hf_model
from kiln.checkpoint.convert import convert_checkpoint
from kiln.errors import (CheckpointError, ConfigError, EngineVersionError, KilnError, OutputExistsError,
                         UnsupportedArchitectureError)
from kiln.models.base import PretrainedModel
from kiln.models.llama.model import LLaMAForCausalLM


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("good") / "hf"
    make_hf_model(hf_dir, seed=11)
    return hf_dir


@pytest.fixture(scope="module")
def good_sharded_hf(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("good_sharded") / "hf"
    make_hf_model(hf_dir, seed=11, save_kwargs={"max_shard_size": "40KB"})
    assert (hf_dir / "model.safetensors.index.json").is_file()
    return hf_dir


@pytest.fixture
def src(good_hf, tmp_path):
    """A private copy of the good HF dir, to break."""
    copy = tmp_path / "src"
    shutil.copytree(good_hf, copy)
    return copy


def convert_fails(src: Path, out: Path, error: type, *needles: str, **kwargs) -> KilnError:
    with pytest.raises(error) as info:
        convert_checkpoint(src, out, **kwargs)
    assert isinstance(info.value, KilnError)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert leftovers(out) == [], "a failed convert left files behind"
    return info.value


def edit_config(hf_dir: Path, **changes) -> None:
    path = hf_dir / "config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_missing_config_json(src, tmp_path):
    (src / "config.json").unlink()
    convert_fails(src, tmp_path / "out", CheckpointError, "config.json", str(src))


def test_missing_source_dir(tmp_path):
    convert_fails(tmp_path / "nowhere", tmp_path / "out", CheckpointError, "nowhere")


def test_truncated_safetensors(src, tmp_path):
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    convert_fails(src, tmp_path / "out", CheckpointError, str(path))


def test_truncated_second_shard_fails_after_writing_began(good_sharded_hf, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(good_sharded_hf, src)
    shards = sorted(src.glob("model-*.safetensors"))
    last = shards[-1]
    last.write_bytes(last.read_bytes()[:-100])
    convert_fails(src, tmp_path / "out", CheckpointError, last.name)


def test_truncated_pytorch_model_bin(src, tmp_path):
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    path = src / "pytorch_model.bin"
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    convert_fails(src, tmp_path / "out", CheckpointError, str(path))


def test_corrupt_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    convert_fails(path, tmp_path / "out", CheckpointError, str(path))


def test_corrupt_safetensors_header(src, tmp_path):
    path = src / "model.safetensors"
    data = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", data[:8])
    data[8:8 + size] = b"\xff{not json" + b" " * (size - 10)
    path.write_bytes(bytes(data))
    convert_fails(src, tmp_path / "out", CheckpointError, str(path))


def test_absurd_safetensors_header_size(src, tmp_path):
    path = src / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 2 ** 60)
    path.write_bytes(bytes(data))
    convert_fails(src, tmp_path / "out", CheckpointError, str(path))


def test_config_hidden_size_does_not_match_the_weights(src, tmp_path):
    edit_config(src, hidden_size=128)
    err = convert_fails(src, tmp_path / "out", CheckpointError, "config.json")
    assert "shape" in str(err)


def test_config_missing_a_required_field(src, tmp_path):
    path = src / "config.json"
    d = json.loads(path.read_text())
    del d["num_hidden_layers"]
    path.write_text(json.dumps(d))
    convert_fails(src, tmp_path / "out", ConfigError, "num_hidden_layers", str(path))


def test_config_json_not_json(src, tmp_path):
    (src / "config.json").write_text("{ this is not json")
    convert_fails(src, tmp_path / "out", CheckpointError, "config.json")


def test_unknown_architecture_lists_the_supported_ones(src, tmp_path):
    edit_config(src, architectures=["FrobnicatorForCausalLM"])
    convert_fails(src, tmp_path / "out", UnsupportedArchitectureError, "FrobnicatorForCausalLM",
                  "LlamaForCausalLM", "MistralForCausalLM")


def test_unsupported_rope_type_names_it(src, tmp_path):
    # ("su": early Phi-3 configs' name for what transformers now calls longrope)
    edit_config(src, rope_parameters={"rope_type": "su", "rope_theta": 10000.0, "factor": 2.0})
    convert_fails(src, tmp_path / "out", ConfigError, "'su'", "config.json", "longrope, yarn")


def test_bad_dtype_names_the_field(src, tmp_path):
    """A requested dtype kiln does not write is the caller's error, not the source config's: no file named."""
    error = convert_fails(src, tmp_path / "out", ConfigError, "requested dtype", "float64", "bfloat16",
                          dtype="float64")
    assert "config.json" not in str(error)


def test_tp_size_that_does_not_divide_the_heads(src, tmp_path):
    # 4 attention heads, 2 KV heads: tp_size 3 divides neither
    err = convert_fails(src, tmp_path / "out", ConfigError, "tp_size", tp_size=3)
    assert "3" in str(err)


def test_sharded_index_naming_a_missing_shard(good_sharded_hf, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(good_sharded_hf, src)
    missing = sorted(src.glob("model-*.safetensors"))[0]
    missing.unlink()
    convert_fails(src, tmp_path / "out", CheckpointError, missing.name)


def test_index_naming_a_tensor_no_shard_has(good_sharded_hf, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(good_sharded_hf, src)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    index_path.write_text(json.dumps(index))
    convert_fails(src, tmp_path / "out", CheckpointError, "model.layers.1.mlp.down_proj.weight")


# ---- kiln checkpoints ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_ckpt(good_hf, tmp_path_factory):
    return convert_checkpoint(good_hf, tmp_path_factory.mktemp("ckpt") / "ckpt", dtype="float32")


def test_checkpoint_with_another_format_version(good_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_ckpt, ckpt)
    path = ckpt / "config.json"
    d = json.loads(path.read_text())
    d["format_version"] = d["format_version"] + 1
    path.write_text(json.dumps(d))
    with pytest.raises(EngineVersionError) as info:
        PretrainedModel.from_checkpoint(ckpt)
    assert str(path) in str(info.value) and "convert" in str(info.value)


def test_checkpoint_without_format_version(good_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_ckpt, ckpt)
    path = ckpt / "config.json"
    d = json.loads(path.read_text())
    del d["format_version"]
    path.write_text(json.dumps(d))
    with pytest.raises(EngineVersionError, match="format_version"):
        PretrainedModel.from_checkpoint(ckpt)


def test_checkpoint_with_a_truncated_rank_file(good_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_ckpt, ckpt)
    path = ckpt / "rank0.safetensors"
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="rank0.safetensors"):
        PretrainedModel.from_checkpoint(ckpt)


def test_checkpoint_missing_its_rank_file(good_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_ckpt, ckpt)
    (ckpt / "rank0.safetensors").unlink()
    with pytest.raises(CheckpointError, match="rank0.safetensors"):
        PretrainedModel.from_checkpoint(ckpt)


def test_checkpoint_config_that_does_not_match_its_rank_file(good_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_ckpt, ckpt)
    path = ckpt / "config.json"
    d = json.loads(path.read_text())
    d["intermediate_size"] = 128
    path.write_text(json.dumps(d))
    with pytest.raises(CheckpointError) as info:
        PretrainedModel.from_checkpoint(ckpt)
    assert "rank0.safetensors" in str(info.value) and "mlp.fc.weight" in str(info.value)


def test_a_quantized_checkpoint_missing_its_scales_says_how_to_remake_it(good_hf, tmp_path):
    """issue 4's bad input: a quantized checkpoint whose rank file lacks scales names the file, the tensors and the
    command that writes a whole one."""
    from safetensors.torch import save_file

    from kiln.config import QuantConfig

    ckpt = PretrainedModel.quantize(good_hf, tmp_path / "w8", QuantConfig(quant_algo="W8A16"))
    tensors = load_file(ckpt / "rank0.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("weights_scaling_factor")},
              str(ckpt / "rank0.safetensors"))
    with pytest.raises(CheckpointError) as info:
        PretrainedModel.from_checkpoint(ckpt)
    message = str(info.value)
    for needle in ("rank0.safetensors", "weights_scaling_factor", "missing", "`kiln quantize --quant-algo W8A16`"):
        assert needle in message, needle


def test_converting_a_kiln_checkpoint_again_is_refused(good_ckpt, tmp_path):
    convert_fails(good_ckpt, tmp_path / "out", CheckpointError, str(good_ckpt), "kiln checkpoint")


# ---- output dir ------------------------------------------------------------------------------------

def test_existing_output_dir_is_refused_then_replaced_with_overwrite(good_hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me unless told")
    with pytest.raises(OutputExistsError) as info:
        convert_checkpoint(good_hf, out)
    assert str(out) in str(info.value) and "overwrite" in str(info.value)
    assert (out / "old.txt").read_text() == "keep me unless told"

    convert_checkpoint(good_hf, out, dtype="float32", overwrite=True)
    assert not (out / "old.txt").exists()
    assert {p.name for p in out.iterdir()} >= {"config.json", "rank0.safetensors"}
    assert PretrainedModel.from_checkpoint(out).config.dtype == "float32"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_failed_overwrite_keeps_the_old_output(src, good_hf, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(good_hf, out, dtype="float32")
    before = (out / "rank0.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError):
        convert_checkpoint(src, out, overwrite=True)
    assert (out / "rank0.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


# ---- PretrainedModel.load ----------------------------------------------------------------------------

def test_load_lists_missing_unexpected_and_misshaped_names(good_hf):
    model = LLaMAForCausalLM.from_hugging_face(good_hf, dtype="float32")
    weights = {name: model.read_weight(name) for name in model.weight_specs()}
    weights.pop("transformer.layers.1.mlp.gate.weight")
    weights["transformer.layers.7.attention.qkv.weight"] = torch.zeros(3)
    weights["transformer.ln_f.weight"] = torch.zeros(65)
    fresh = LLaMAForCausalLM.from_hugging_face(good_hf, dtype="float32")
    with pytest.raises(CheckpointError) as info:
        fresh.load(weights)
    message = str(info.value)
    for needle in ("missing", "transformer.layers.1.mlp.gate.weight", "unexpected",
                   "transformer.layers.7.attention.qkv.weight", "mis-shaped", "transformer.ln_f.weight", "65"):
        assert needle in message, needle


def test_load_with_the_right_weights_works(good_hf):
    model = LLaMAForCausalLM.from_hugging_face(good_hf, dtype="float32")
    weights = {name: model.read_weight(name) for name in model.weight_specs()}
    fresh = LLaMAForCausalLM.from_hugging_face(good_hf, dtype="float32")
    fresh.load(weights)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
