"""`kiln convert --keep-quantization`: a GGUF file's 4-bit linears (Q4_0, Q4_1, Q4_K) become kiln W4A16 at group 32
with the file's own codes, and the model computes what the dequantized conversion computes. The reference for
every format is the `gguf` package's own dequantization (the plain conversion reads the file through it)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import add_gguf_shape, half_to_interleaved, make_hf_model
from kiln.checkpoint.convert import convert_checkpoint
from kiln.errors import ConfigError
from kiln.models.base import PretrainedModel
from kiln.quantization.gguf_import import BLOCK_FORMATS, int4_groups

T = gguf.GGMLQuantizationType
IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))


def random_blocks(rows: int, cols: int, type_name: str, rng) -> np.ndarray:
    """Random bytes of a [rows, cols] weight in a 4-bit format, its float16 scales (and mins) set to sane values."""
    size, weights, _ = BLOCK_FORMATS[type_name]
    raw = rng.integers(0, 256, (rows, cols // weights * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    halves = 1 if type_name == "Q4_0" else 2  # d, or d and m / dmin
    blocks[:, :2 * halves] = (rng.standard_normal((len(blocks), halves)) * 0.02).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("type_name", list(BLOCK_FORMATS))
def test_blocks_unpack_to_the_gguf_packages_dequantization(type_name):
    rng = np.random.default_rng(1)
    raw = random_blocks(6, 512, type_name, rng)
    blocks = raw.reshape(-1, BLOCK_FORMATS[type_name][0])
    blocks[0, :2] = 0  # a block (Q4_0, Q4_1) or group (Q4_K) whose scale is 0: one value
    if type_name == "Q4_K":
        blocks[1, 4] = 0  # group 0's 6-bit scale in the second super-block
    want = gguf.quants.dequantize(raw, T[type_name]).reshape(6, 512).astype(np.float64)
    codes, scale, zero = int4_groups(raw, type_name)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and tuple(scale.shape) == (6, 512 // 32)
    group = torch.arange(512) // 32
    got = ((codes.double() - zero.double()[:, group]) * scale.double()[:, group]).numpy()
    # one float32 rounding of z (a quotient) and of the product d * sc (Q4_K) apart
    assert np.abs(got - want).max() <= 4e-7 * np.abs(want).max()
    if type_name == "Q4_0":  # w = (q - 8) d: kiln's own symmetric grid, exactly
        assert np.array_equal(got, want) and bool((zero[scale != 1] == 8).all())


# A tiny Llama with 256-wide rows (Q4_K's super-block), each linear in its own type: layer 1's v projection in Q8_0
# keeps that layer's fused QKV in full precision.
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
TYPES = {("attn_q", 0): "Q4_1", ("attn_k", 0): "Q4_1", ("attn_v", 0): "Q4_0", ("attn_output", 0): "Q4_1",
         ("attn_q", 1): "Q4_0", ("attn_k", 1): "Q4_0", ("attn_v", 1): "Q8_0", ("attn_output", 1): "Q4_0"}
MLP = ("ffn_gate", "ffn_up", "ffn_down")  # Q4_K in both layers
HF_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def write_mixed_gguf(hf, path) -> None:
    """hf's norms and embeddings; its linears quantized by gguf.quants (Q4_0, Q4_1, Q8_0, q/k rows in llama.cpp's
    rotary order) or, for Q4_K, which that package cannot quantize, random blocks."""
    c, sd, rng = hf.config, hf.state_dict(), np.random.default_rng(2)
    w = gguf.GGUFWriter(str(path), "llama")
    add_gguf_shape(w, c)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    for i in range(c.num_hidden_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[f"model.layers.{i}.input_layernorm.weight"].numpy())
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[f"model.layers.{i}.post_attention_layernorm.weight"].numpy())
        for name, hf_name in HF_LINEARS.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}.get(name)
            t = (half_to_interleaved(t, heads) if heads else t).numpy()
            kind = TYPES.get((name, i), "Q4_K")
            if kind == "Q4_K":
                w.add_tensor(f"blk.{i}.{name}.weight", random_blocks(*t.shape, kind, rng), raw_dtype=T[kind])
            else:
                w.add_tensor(f"blk.{i}.{name}.weight", gguf.quants.quantize(t, T[kind]), raw_dtype=T[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(gguf path, dequantized checkpoint, kept checkpoint)."""
    tmp = tmp_path_factory.mktemp("keep")
    path = tmp / "mixed.gguf"
    write_mixed_gguf(make_hf_model(tmp / "hf", seed=7, **SHAPE), path)
    return (path, convert_checkpoint(path, tmp / "float", dtype="float32"),
            convert_checkpoint(path, tmp / "kept", dtype="float32", keep_quantization=True))


def test_kept_checkpoint_records_w4a16_and_what_stays_in_full_precision(mixed):
    _, _, kept = mixed
    qc = json.loads((kept / "config.json").read_text())["quantization"]
    assert (qc["quant_algo"], qc["group_size"], qc["has_zero_point"]) == ("W4A16", 32, True)
    assert qc["exclude_modules"] == ["lm_head", "transformer.layers.1.attention.qkv"]  # the Q8_0 v projection
    tensors = load_file(kept / "rank0.safetensors")
    assert tensors["transformer.layers.0.attention.qkv.weight"].dtype == torch.uint8
    assert tensors["transformer.layers.1.attention.qkv.weight"].dtype == torch.float32


def test_kept_weights_and_logits_are_the_dequantized_files(mixed):
    """Each kept linear dequantizes to the float conversion's weight (the gguf package's dequantization, q/k rows
    in Hugging Face's order), and the two models' logits agree."""
    _, float_ckpt, kept_ckpt = mixed
    full, kept = (PretrainedModel.from_checkpoint(c).materialize() for c in (float_ckpt, kept_ckpt))
    checked = []
    for name, layer in kept.named_modules():
        if getattr(layer, "quant_method", None) is not None and layer.quant_method.name == "W4A16":
            want = full.get_submodule(name).weight.double()
            got = layer.quant_method.dequantize(layer, torch.float64)
            assert (got - want).abs().max() <= 4e-7 * want.abs().max(), name
            checked.append(name)
    assert len(checked) == 9  # two layers' dense, fc, gate and proj, and layer 0's qkv
    with torch.no_grad():
        assert (kept(IDS) - full(IDS)).abs().max() <= 1e-4


def test_auto_dtype_of_a_kept_file_is_float16(mixed, tmp_path):
    """The int4 kernels take 16-bit activations and the file's scales are float16; a plain conversion of the same
    file is float32 (its dequantized weights exactly)."""
    path, float_ckpt, _ = mixed
    kept = convert_checkpoint(path, tmp_path / "auto", keep_quantization=True)
    assert json.loads((kept / "config.json").read_text())["dtype"] == "float16"
    assert json.loads((convert_checkpoint(path, tmp_path / "plain") / "config.json").read_text())["dtype"] == "float32"


def test_keep_quantization_refuses_what_it_cannot_keep(tmp_path):
    hf = make_hf_model(tmp_path / "hf", seed=7)
    with pytest.raises(ConfigError, match=r"--keep-quantization applies to GGUF files"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out", keep_quantization=True)
    path = tmp_path / "f32.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    add_gguf_shape(w, hf.config)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    sd = hf.state_dict()
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    for i in range(hf.config.num_hidden_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[f"model.layers.{i}.input_layernorm.weight"].numpy())
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[f"model.layers.{i}.post_attention_layernorm.weight"].numpy())
        for name, hf_name in HF_LINEARS.items():
            w.add_tensor(f"blk.{i}.{name}.weight", sd[f"model.layers.{i}.{hf_name}.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match=r"keeps linears stored in \['Q4_0', 'Q4_1', 'Q4_K'\], and this file's "
                                          r"are \['F32'\]"):
        convert_checkpoint(path, tmp_path / "out", keep_quantization=True)
    assert not (tmp_path / "out").exists()


def test_llm_keeps_a_ggufs_4_bit_linears_and_generates_what_the_dequantized_file_does(mixed, tmp_path, monkeypatch):
    """LLM(gguf, keep_quantization=True) (kiln run / serve --keep-quantization) converts and builds in-process with
    the 4-bit linears kept, cached apart from the plain build, and decodes the plain engine's greedy tokens."""
    from kiln import LLM, SamplingParams
    from kiln.builder import Engine

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    path, _, _ = mixed
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = {}
    for keep in (False, True):
        with LLM(path, dtype="float32", device="cpu", keep_quantization=keep) as llm:
            algo = Engine.from_dir(llm.engine_dir).config.quantization.quant_algo
            assert (algo is not None and algo.value == "W4A16") == keep
            outputs[keep] = llm.generate([1, 17, 5, 99, 42], params)[0].outputs[0].token_ids
    assert len(list((tmp_path / "cache" / "engines").iterdir())) == 2
    assert outputs[True] == outputs[False]


def test_inspect_tells_what_a_gguf_converts_to_and_what_keep_quantization_keeps(mixed, capsys):
    """`kiln inspect FILE.gguf`: the config kiln convert gives it, its tensor types, and the linears
    --keep-quantization would keep (without reading a weight)."""
    import kiln.cli

    path, _, _ = mixed
    kiln.cli.main(["inspect", str(path), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["config"]["architecture"]) == ("gguf", "LlamaForCausalLM")
    assert info["tensor_types"] == {"F32": 7, "Q4_K": 6, "Q4_1": 3, "Q4_0": 4, "Q8_0": 1}
    assert info["keep_quantization"] == {"kept_linears": 9,
                                         "full_precision": ["lm_head", "transformer.layers.1.attention.qkv"]}
    kiln.cli.main(["inspect", str(path)])
    assert "--keep-quantization  keeps 9 linears at 4 bits" in capsys.readouterr().out


def test_fractional_zeros_are_found_once_per_layer(mixed):
    """Q4_1 and Q4_K zeros are not whole numbers, which the fused int4 GEMM cannot take
    (kiln.kernels.quant_gemm.w4a16_matmul): the engine's prepare step marks those layers, not Q4_0's."""
    _, _, kept_ckpt = mixed
    model = PretrainedModel.from_checkpoint(kept_ckpt).materialize()
    model.prepare_runtime()
    marks = [model.get_submodule(f"transformer.layers.{name}").integer_zeros
             for name in ("0.attention.qkv", "0.attention.dense", "1.attention.dense", "1.mlp.proj")]
    assert marks == [False, False, True, False]  # Q4_1 q/k, Q4_1, Q4_0, Q4_K
