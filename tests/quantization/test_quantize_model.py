"""quantize -> checkpoint -> from_checkpoint -> build -> run, for each algorithm, against transformers with the
weights replaced by their dequantization (written out in reference.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import kiln
import kiln.cli
from kiln.builder import engine_weights
from kiln.config import QuantConfig
from kiln.errors import CheckpointError, ConfigError
from kiln.mapping import Mapping
from kiln.models.base import PretrainedModel
from kiln.quantization.weight_only import quantize_int8_per_channel
from reference import dequantized_hf, linear_tensors, quant_llama, rtn_int4, unpack  # noqa: F401
from conftest import hf_greedy, leftovers

CONFIGS = {
    "W8A16": QuantConfig(quant_algo="W8A16"),
    "W4A16_g64": QuantConfig(quant_algo="W4A16", group_size=64),
    "W4A16_g32_zp": QuantConfig(quant_algo="W4A16", group_size=32, has_zero_point=True),
    "W4A16_g128_zp": QuantConfig(quant_algo="W4A16", group_size=128, has_zero_point=True),
    "W4A16_AWQ_g64": QuantConfig(quant_algo="W4A16_AWQ", group_size=64),
}
IDS = torch.tensor([[1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8]])


@pytest.fixture(scope="module")
def quantized(quant_llama, tmp_path_factory):
    """name -> checkpoint dir of the shared tiny Llama under each config (made once)."""
    out = tmp_path_factory.mktemp("quantized")
    return {name: PretrainedModel.quantize(quant_llama[0], out / name, qc, calib_size=4, calib_max_seq_len=64)
            for name, qc in CONFIGS.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers_with_dequantized_weights(quant_llama, quantized, name):
    hf_dir, hf = quant_llama
    ckpt = load_file(quantized[name] / "rank0.safetensors")
    model = PretrainedModel.from_checkpoint(quantized[name])
    with torch.no_grad():
        ours, ref = model(IDS), dequantized_hf(hf, ckpt, model.config)(IDS).logits
        full = hf(IDS).logits
    assert (ours - ref).abs().max() <= 1e-4
    assert (ours - full).abs().max() > 1e-4  # the comparison would see a model that was not quantized


@pytest.mark.parametrize("name", ["W8A16", "W4A16_g64", "W4A16_g32_zp"])
def test_checkpoint_codes_are_round_to_nearest_of_the_source(quant_llama, quantized, name):
    hf = quant_llama[1]
    qc = CONFIGS[name]
    ckpt = load_file(quantized[name] / "rank0.safetensors")
    w = hf.model.layers[1].mlp.down_proj.weight.detach()
    t = linear_tensors(ckpt, "transformer.layers.1.mlp.proj")
    if qc.quant_algo.value == "W8A16":
        q, s = quantize_int8_per_channel(w, torch.float32)
        assert t["weight"].dtype == torch.int8 and torch.equal(t["weight"], q) and torch.equal(t["weights_scaling_factor"], s)
        return
    codes, s, z = rtn_int4(w, qc.group_size, qc.has_zero_point)
    assert t["weight"].dtype == torch.uint8 and t["weight"].shape == (w.shape[0], w.shape[1] // 2)
    assert torch.equal(unpack(t["weight"]), codes) and torch.equal(t["weights_scaling_factor"], s)
    assert ("zero_point" in t) == qc.has_zero_point and (not qc.has_zero_point or torch.equal(t["zero_point"], z))


def test_config_records_the_quantization_and_inspect_shows_it(quantized, capsys):
    d = json.loads((quantized["W4A16_g32_zp"] / "config.json").read_text())
    assert d["quantization"] == {"quant_algo": "W4A16", "kv_cache_quant_algo": None, "group_size": 32,
                                 "has_zero_point": True, "exclude_modules": ["lm_head"], "smoothquant_alpha": 0.5,
                                 "keep_sensitive_layers": 0, "weight_rounding": "nearest"}
    assert kiln.cli.main(["inspect", str(quantized["W4A16_g32_zp"])]) == 0
    assert "'quant_algo': 'W4A16'" in capsys.readouterr().out


def test_lm_head_and_embeddings_stay_full_precision(quantized):
    ckpt = load_file(quantized["W4A16_g64"] / "rank0.safetensors")
    assert ckpt["lm_head.weight"].dtype == torch.float32 and "lm_head.weights_scaling_factor" not in ckpt
    assert ckpt["transformer.vocab_embedding.weight"].dtype == torch.float32
    assert ckpt["transformer.layers.0.mlp.fc.weight"].dtype == torch.uint8


def test_exclude_modules_keeps_named_layers_in_full_precision(quant_llama, tmp_path):
    hf_dir, hf = quant_llama
    qc = QuantConfig(quant_algo="W8A16", exclude_modules=("lm_head", "mlp.proj", "transformer.layers.0.attention.*"))
    ckpt = load_file(PretrainedModel.quantize(hf_dir, tmp_path / "q", qc) / "rank0.safetensors")
    assert torch.equal(ckpt["transformer.layers.1.mlp.proj.weight"], hf.model.layers[1].mlp.down_proj.weight)
    assert ckpt["transformer.layers.0.attention.dense.weight"].dtype == torch.float32
    assert ckpt["transformer.layers.1.attention.dense.weight"].dtype == torch.int8


def test_awq_folds_into_norms_and_keeps_prequant_on_row_layers(quantized, quant_llama):
    ckpt = load_file(quantized["W4A16_AWQ_g64"] / "rank0.safetensors")
    prequant = sorted(k.split(".", 3)[-1] for k in ckpt if k.endswith("prequant_scaling_factor"))
    assert prequant == ["attention.dense.prequant_scaling_factor"] * 2 + ["mlp.proj.prequant_scaling_factor"] * 2
    hf_layers = quant_llama[1].model.layers
    folded = [not torch.equal(ckpt[f"transformer.layers.{i}.{kiln_norm}.weight"], getattr(hf_layers[i], hf_norm).weight)
              for i in range(2) for kiln_norm, hf_norm in (("input_layernorm", "input_layernorm"),
                                                           ("post_layernorm", "post_attention_layernorm"))]
    assert any(folded)  # the searched scales moved into the norms (alpha = 0 may leave one as it was)


def test_awq_reduces_layer_output_error_versus_round_to_nearest(quant_llama, tmp_path):
    qc = CONFIGS["W4A16_AWQ_g64"]
    out = PretrainedModel.quantize(quant_llama[0], tmp_path / "q", qc, calib_size=4, calib_max_seq_len=64,
                                   evaluate=True)
    errors = json.loads((out / "quant_report.json").read_text())["awq_layer_mse"]
    assert len(errors) == 10  # 2 layers x (qkv, dense, fc, gate, proj)
    assert all(e["awq"] <= e["rtn"] for e in errors.values())  # alpha = 0 is RTN, so never worse
    assert sum(e["awq"] for e in errors.values()) < 0.95 * sum(e["rtn"] for e in errors.values())


def test_tp2_rank_files_reassemble_to_tp1(quant_llama, quantized, tmp_path):
    qc = CONFIGS["W4A16_AWQ_g64"]
    out = PretrainedModel.quantize(quant_llama[0], tmp_path / "tp2", qc, Mapping.of(2), calib_size=4,
                                   calib_max_seq_len=64)
    full = load_file(quantized["W4A16_AWQ_g64"] / "rank0.safetensors")
    ranks = [load_file(out / f"rank{r}.safetensors") for r in range(2)]
    layer = "transformer.layers.1."
    for leaf in ("weight", "weights_scaling_factor"):  # column: output rows; row: input dim in whole groups
        assert torch.equal(torch.cat([r[layer + "mlp.fc." + leaf] for r in ranks]), full[layer + "mlp.fc." + leaf])
        assert torch.equal(torch.cat([r[layer + "mlp.proj." + leaf] for r in ranks], 1), full[layer + "mlp.proj." + leaf])
    pq = layer + "attention.dense.prequant_scaling_factor"
    assert torch.equal(torch.cat([r[pq] for r in ranks]), full[pq])
    model = PretrainedModel.from_checkpoint(out, rank=1)  # every rank file matches its config
    for name in model.weight_specs():
        assert torch.equal(ranks[1][name], model.shard_rule(name)(full[name], model.mapping)), name


def test_row_groups_may_not_straddle_ranks(tmp_path):
    from conftest import make_hf_model

    make_hf_model(tmp_path / "hf", hidden_size=128, intermediate_size=192)  # proj: 96 inputs per rank
    qc = QuantConfig(quant_algo="W4A16", group_size=64)
    with pytest.raises(ConfigError, match="group_size"):
        PretrainedModel.quantize(tmp_path / "hf", tmp_path / "q", qc, Mapping.of(2))
    assert leftovers(tmp_path / "q") == []


def test_build_and_llm_greedy_equal_dequantized_transformers(quant_llama, quantized, tmp_path):
    hf = quant_llama[1]
    ckpt_dir = quantized["W4A16_AWQ_g64"]
    model = PretrainedModel.from_checkpoint(ckpt_dir)
    fused = dict(engine_weights(model))
    assert fused["transformer.layers.0.mlp.fc_gate.weight"].shape == (512, 64)  # fc and gate packed rows
    kiln.build(model, kiln.BuildConfig(max_batch_size=2, max_seq_len=64)).save(tmp_path / "engine")
    prompt = [1, 17, 5, 99, 42]
    ref = dequantized_hf(hf, load_file(ckpt_dir / "rank0.safetensors"), model.config)
    with kiln.LLM(tmp_path / "engine", device="cpu") as llm:
        out = llm.generate(prompt, kiln.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(ref, prompt, 8)


def format_bytes(config, qc: QuantConfig) -> int:
    """A model's size from its format's definition alone (issue 4's memory line): each decoder linear of (out, in)
    weights as 1 byte a weight and one scale an output (W8A16), or half a byte and one scale (and zero) per group
    of inputs (W4A16); AWQ's input scales on the two linears after no norm; the rest in the model dtype."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_size, config.num_key_value_heads * config.head_size
    dtype_bytes = torch.empty(0, dtype=getattr(torch, config.dtype)).element_size()
    linears = [(q + 2 * kv, h), (h, q), (2 * inter, h), (h, inter)]  # qkv, dense, fc_gate, proj: (out, in)
    if qc.quant_algo.value == "W8A16":
        per_layer = sum(o * i + o * dtype_bytes for o, i in linears)
    else:
        groups = lambda i: -(-i // qc.group_size)  # noqa: E731
        per_layer = sum(o * i // 2 + o * groups(i) * dtype_bytes * (1 + qc.has_zero_point) for o, i in linears)
        if qc.quant_algo.value == "W4A16_AWQ":
            per_layer += (q + inter) * dtype_bytes
    full_precision = (2 * config.vocab_size * h + (2 * layers + 1) * h) * dtype_bytes  # embedding, lm_head, norms
    return layers * per_layer + full_precision


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_engine_holds_exactly_the_formats_size(quantized, name, tmp_path):
    model = PretrainedModel.from_checkpoint(quantized[name])
    kiln.build(model, kiln.BuildConfig(max_batch_size=1, max_seq_len=32)).save(tmp_path / "engine")
    held = sum(t.numel() * t.element_size() for f in (tmp_path / "engine").glob("*.safetensors")
               for t in load_file(f).values())
    assert held == format_bytes(model.config, CONFIGS[name])


def test_checkpoint_with_missing_scales_is_refused(quantized, tmp_path):
    import shutil

    from kiln.checkpoint.safetensors_io import save_tensors

    bad = tmp_path / "bad"
    shutil.copytree(quantized["W8A16"], bad)
    tensors = load_file(bad / "rank0.safetensors")
    del tensors["transformer.layers.0.mlp.fc.weights_scaling_factor"]
    save_tensors(bad / "rank0.safetensors", tensors)
    with pytest.raises(CheckpointError, match="weights_scaling_factor"):
        PretrainedModel.from_checkpoint(bad)


def test_w4a16_engines_carry_the_norms_between_their_gemvs(quantized, monkeypatch):
    """prepare_runtime (DecoderLayer.defer_norms) has a W4A16 engine's output projections begin the RMSNorm after
    them (post_layernorm, then the next layer's input norm; the last layer's final norm stays a kernel), for its
    decode GEMVs on a GPU; not W8A16's, not where a linear scales its input first (AWQ's prequant), and not with
    KILN_DEFER_NORMS=0. On the CPU no GEMV begins a norm: the logits are those of the model without it."""
    from act_reference import runtime_model

    monkeypatch.setenv("KILN_DEFER_NORMS", "1")
    model = runtime_model(quantized["W4A16_g64"], fused=True)
    first, last = model.transformer.layers["0"], model.transformer.layers["1"]
    assert first.norms_begun == (first.post_layernorm, last.input_layernorm)
    assert last.norms_begun == (last.post_layernorm, None)
    with torch.no_grad():
        assert torch.equal(model(IDS), runtime_model(quantized["W4A16_g64"], fused=False)(IDS))
    for name in ("W8A16", "W4A16_AWQ_g64"):
        layers = runtime_model(quantized[name], fused=True).transformer.layers.values()
        assert all(layer.norms_begun == (None, None) for layer in layers), name
    monkeypatch.setenv("KILN_DEFER_NORMS", "0")
    layers = runtime_model(quantized["W4A16_g64"], fused=True).transformer.layers.values()
    assert all(layer.norms_begun == (None, None) for layer in layers)


def test_a_pending_norm_read_by_a_plain_linear_is_the_norm_kernel_output():
    """A PendingNorm (the stream, the stream times the norm's weight, its sums of squares in parts) that reaches a
    linear without a fused kernel is finished first (PendingNorm.normed): the RMSNorm's output, but for the one
    rounding that moves (the weight multiplies before the 1/rms), within two bf16 units of each value."""
    from kiln.kernels.rmsnorm import rms_norm_ref
    from kiln.layers.linear import ColumnLinear
    from kiln.layers.normalization import PendingNorm

    torch.manual_seed(3)
    stream = (torch.randn(2, 256) * 4).bfloat16()
    weight = (torch.rand(256) + 0.5).bfloat16()
    squares = stream.float().pow(2).view(2, 8, 32).sum(-1)  # as 8 programs of 32 outputs leave them
    pending = PendingNorm(stream, stream * weight, squares, 1e-5)
    want = rms_norm_ref(stream, weight, 1e-5)
    assert ((pending.normed().float() - want.float()).abs() <= 2 ** -6 * want.float().abs()).all()
    linear = ColumnLinear(256, 16, False, Mapping())
    linear.weight.data = torch.randn(16, 256).bfloat16()
    assert torch.equal(linear(pending), linear(pending.normed()))
