"""Hugging Face -> kiln conversion matches transformers: logits (float32, <= 1e-4) and greedy generation.

Covers the Llama features that change the math (GQA, rope scalings, tied embeddings, biases, an
explicit head_dim, Mistral's sliding window), every weight-file layout (single / sharded safetensors,
pytorch_model.bin single / sharded), both config.json forms (transformers 5 and 4.x) and half dtypes.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import greedy_tokens, hf_forward, make_hf_model, to_4x_config
from kiln.checkpoint.convert import convert_checkpoint
from kiln.checkpoint.safetensors_io import SafetensorsFile
from kiln.models.base import PretrainedModel
from kiln.models.llama.model import LLaMAForCausalLM

ATOL = 1e-4
GEN_TOKENS = 32

CASES = {
    "llama_gqa": ("llama", {}),
    "llama3_rope": ("llama", dict(rope_theta=500000.0, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),  # wavelengths fall in all three llama3 bands
    "linear_rope": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    # max_position_embeddings below the test lengths, so the dynamic NTK base actually grows
    "dynamic_rope": ("llama", dict(max_position_embeddings=16,
                                   rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=4.0))),
    "tied": ("llama", dict(tie_word_embeddings=True)),
    "untied_mha": ("llama", dict(num_key_value_heads=4)),
    "biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "head_dim": ("llama", dict(head_dim=32)),  # != hidden_size / num_attention_heads (16)
    "mistral_sliding_window": ("mistral", dict(sliding_window=5)),  # window < every test sequence
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """case -> (hf_dir, transformers model), made once per module."""
    made = {}

    def get(case):
        if case not in made:
            arch, overrides = CASES[case]
            hf_dir = tmp_path_factory.mktemp(case) / "hf"
            made[case] = hf_dir, make_hf_model(hf_dir, arch=arch, **overrides)
        return made[case]
    return get


def _ids(vocab: int, shape, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def assert_matches_hf(model, hf, check_generate: bool = True):
    vocab = hf.config.vocab_size
    ids = _ids(vocab, (2, 24))
    with torch.no_grad():
        # HF's dynamic NTK keeps the frequencies of the longest sequence it has seen until it sees one shorter
        # than max_position_embeddings; a 1-token forward resets it (a no-op for every other rope type).
        hf(ids[:, :1], use_cache=False)
        ours, theirs = model(ids), hf(ids, use_cache=False).logits
    assert _max_diff(ours, theirs) <= ATOL
    prompt = _ids(vocab, (1, 8), seed=2)
    ours_gen = greedy_tokens(model, prompt, GEN_TOKENS)
    theirs_gen = greedy_tokens(hf_forward(hf), prompt, GEN_TOKENS)
    assert ours_gen.tolist() == theirs_gen.tolist()
    if check_generate:
        with torch.no_grad():
            # no EOS: the tiny random model may pick token 2 (its eos id), and the loop above never stops
            config = copy.deepcopy(hf.generation_config)
            config.eos_token_id, config.pad_token_id = None, 0
            hf.generation_config, saved = config, hf.generation_config
            try:
                generated = hf.generate(prompt, do_sample=False, max_new_tokens=GEN_TOKENS)
            finally:
                hf.generation_config = saved
        assert generated.shape[1] == prompt.shape[1] + GEN_TOKENS
        assert ours_gen.tolist() == generated.tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_from_hugging_face_matches_transformers(hf_models, case):
    hf_dir, hf = hf_models(case)
    model = LLaMAForCausalLM.from_hugging_face(hf_dir, dtype="float32")
    assert model.config.architecture == hf.config.architectures[0]
    # HF's dynamic NTK recomputes its frequencies per cached step, so its cached generate() is not the
    # no-cache reference; the no-cache greedy loop above covers it.
    assert_matches_hf(model, hf, check_generate=case != "dynamic_rope")


@pytest.mark.parametrize("case", ["llama_gqa", "tied", "biases", "head_dim", "llama3_rope",
                                  "mistral_sliding_window"])
def test_convert_checkpoint_then_from_checkpoint_matches_transformers(hf_models, tmp_path, case):
    hf_dir, hf = hf_models(case)
    out = convert_checkpoint(hf_dir, tmp_path / "ckpt", dtype="float32")
    assert {p.name for p in out.iterdir()} >= {"config.json", "rank0.safetensors", "generation_config.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == hf.config.architectures[0]
    assert config["dtype"] == "float32"
    model = PretrainedModel.from_checkpoint(out)
    assert isinstance(model, LLaMAForCausalLM)
    assert_matches_hf(model, hf, check_generate=False)


# ---- weight-file layouts ------------------------------------------------------------------------

def _write_bin(hf, hf_dir: Path, shards: int) -> None:
    """pytorch_model.bin (or N shards + pytorch_model.bin.index.json), as transformers 4.x wrote them."""
    for f in hf_dir.glob("*.safetensors*"):
        f.unlink()
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    if shards == 1:
        torch.save(state, hf_dir / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for s in range(shards):
        file = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[s::shards]}
        torch.save(part, hf_dir / file)
        weight_map.update({n: file for n in part})
    (hf_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


LAYOUTS = ["safetensors", "sharded_safetensors", "bin", "sharded_bin"]


@pytest.fixture(scope="module")
def layout_reference(hf_models, tmp_path_factory):
    """The untied GQA model's single-file conversion, whose tensors every other layout must reproduce."""
    hf_dir, _ = hf_models("llama_gqa")
    out = convert_checkpoint(hf_dir, tmp_path_factory.mktemp("layout_ref") / "ckpt", dtype="float32")
    f = SafetensorsFile(out / "rank0.safetensors")
    return {n: f.get(n) for n in f.keys()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_weight_file_layout_converts_the_same(hf_models, layout_reference, tmp_path, layout):
    ref_dir, hf = hf_models("llama_gqa")
    hf_dir = tmp_path / "hf"
    if layout == "sharded_safetensors":
        hf.save_pretrained(hf_dir, max_shard_size="40KB")
        assert (hf_dir / "model.safetensors.index.json").is_file()
        assert len(list(hf_dir.glob("model-*.safetensors"))) > 1
        assert not (hf_dir / "model.safetensors").exists()
    else:
        shutil.copytree(ref_dir, hf_dir)
        if layout in ("bin", "sharded_bin"):
            _write_bin(hf, hf_dir, shards=1 if layout == "bin" else 3)
            assert not list(hf_dir.glob("*.safetensors"))

    model = LLaMAForCausalLM.from_hugging_face(hf_dir, dtype="float32")
    assert_matches_hf(model, hf, check_generate=False)

    out = convert_checkpoint(hf_dir, tmp_path / "ckpt", dtype="float32")
    f = SafetensorsFile(out / "rank0.safetensors")
    assert sorted(f.keys()) == sorted(layout_reference)
    for name, ref in layout_reference.items():
        assert torch.equal(f.get(name), ref), name


# ---- config.json forms --------------------------------------------------------------------------

@pytest.mark.parametrize("scaling_key", ["type", "rope_type"])
@pytest.mark.parametrize("case", ["llama_gqa", "llama3_rope", "linear_rope", "dynamic_rope", "mistral_sliding_window"])
def test_transformers_4x_config_converts_identically(hf_models, tmp_path, case, scaling_key):
    hf_dir, hf = hf_models(case)
    old_dir = tmp_path / "hf4"
    shutil.copytree(hf_dir, old_dir)
    to_4x_config(old_dir, scaling_key)
    old = json.loads((old_dir / "config.json").read_text())
    assert "rope_parameters" not in old and "dtype" not in old and "rope_theta" in old

    new_model = LLaMAForCausalLM.from_hugging_face(hf_dir, dtype="auto")
    old_model = LLaMAForCausalLM.from_hugging_face(old_dir, dtype="auto")
    assert old_model.config == new_model.config
    if case not in ("llama_gqa", "mistral_sliding_window"):
        assert old_model.config.rotary_scaling is not None
    for name in new_model.weight_specs():
        assert torch.equal(old_model.read_weight(name), new_model.read_weight(name)), name
    assert_matches_hf(old_model, hf, check_generate=False)


@pytest.mark.parametrize("form", ["5.x", "4.x"])
def test_auto_dtype_follows_the_config(hf_models, tmp_path, form):
    hf_dir, _ = hf_models("llama_gqa")
    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    if form == "4.x":
        to_4x_config(src)
    path = src / "config.json"
    d = json.loads(path.read_text())
    d["torch_dtype" if form == "4.x" else "dtype"] = "bfloat16"
    path.write_text(json.dumps(d))
    model = LLaMAForCausalLM.from_hugging_face(src)
    assert model.config.dtype == "bfloat16"
    assert all(model.read_weight(n).dtype == torch.bfloat16 for n in model.weight_specs())


# ---- dtypes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtype_conversion_is_the_float32_weights_cast(hf_models, tmp_path, dtype):
    hf_dir, _ = hf_models("biases")
    torch_dtype = getattr(torch, dtype)
    full = LLaMAForCausalLM.from_hugging_face(hf_dir, dtype="float32")
    half = LLaMAForCausalLM.from_hugging_face(hf_dir, dtype=dtype)
    assert half.config.dtype == dtype
    expected = {name: full.read_weight(name) for name in full.weight_specs()}
    assert all(t.dtype == torch.float32 for t in expected.values())
    for name, ref in expected.items():
        got = half.read_weight(name)
        assert got.dtype == torch_dtype, name
        assert torch.equal(got, ref.to(torch_dtype)), name

    out = convert_checkpoint(hf_dir, tmp_path / "ckpt", dtype=dtype)
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    f = SafetensorsFile(out / "rank0.safetensors")
    assert sorted(f.keys()) == sorted(expected)
    for name, ref in expected.items():
        got = f.get(name)
        assert got.dtype == torch_dtype, name
        assert torch.equal(got, ref.to(torch_dtype)), name
    loaded = PretrainedModel.from_checkpoint(out).materialize()
    assert all(p.dtype == torch_dtype for p in loaded.parameters())
