"""W4A8_AWQ: int4 AWQ weights with static FP8 activations; quantize -> checkpoint -> build -> run against transformers
with fake-quantized linears (act_reference.py), the activation scale against the calibration written out, TP=2."""

import pytest
import torch
from act_reference import assert_engine_greedy_equals_fake_quant_hf, assert_logits_equal_fake_quant_hf, runtime_model
from reference import linear_tensors, quant_llama  # noqa: F401 (fixture)
from safetensors.torch import load_file

from kiln.checkpoint.convert import load_source_model
from kiln.config import QuantConfig
from kiln.mapping import Mapping
from kiln.models.base import PretrainedModel
from kiln.quantization import awq, calibration
from kiln.quantization.act_stats import calibrate_absmax

IDS = torch.tensor([[1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8]])
W4A8 = QuantConfig(quant_algo="W4A8_AWQ", group_size=64)


@pytest.fixture(scope="module")
def w4a8_ckpt(quant_llama, tmp_path_factory):
    return PretrainedModel.quantize(quant_llama[0], tmp_path_factory.mktemp("w4a8") / "q", W4A8, calib_size=4,
                                    calib_max_seq_len=64)


def test_logits_equal_transformers_with_fake_quantized_linears(quant_llama, w4a8_ckpt):
    assert_logits_equal_fake_quant_hf(quant_llama[1], w4a8_ckpt, IDS)


def test_activation_scale_is_max_of_the_smoothed_input_over_448(quant_llama, w4a8_ckpt):
    src = load_source_model(quant_llama[0], "auto", Mapping())
    tokens = calibration.token_batches(calibration.read_texts(None), calibration.source_tokenizer(src),
                                       src.config.vocab_size, 4, 64)
    absmax = calibrate_absmax(src, tokens, W4A8, "cpu")
    scales, *_ = awq.calibrate(src, tokens, W4A8, "cpu")
    ckpt = load_file(w4a8_ckpt / "rank0.safetensors")
    for name in ("transformer.layers.0.attention.qkv", "transformer.layers.1.mlp.proj"):
        t = linear_tensors(ckpt, name)
        expected = (absmax[name] / scales[name]).max() / 448
        assert torch.allclose(t["activation_scaling_factor"], expected.reshape(1), rtol=1e-6), name
        assert t["weight"].dtype == torch.uint8


def test_build_run_and_tp2_shards(quant_llama, w4a8_ckpt, tmp_path):
    assert_engine_greedy_equals_fake_quant_hf(quant_llama[1], w4a8_ckpt, tmp_path / "engine")
    tp2 = PretrainedModel.quantize(quant_llama[0], tmp_path / "tp2", W4A8, Mapping.of(2), calib_size=4,
                                   calib_max_seq_len=64)
    full = load_file(w4a8_ckpt / "rank0.safetensors")
    rank1 = load_file(tp2 / "rank1.safetensors")
    model = PretrainedModel.from_checkpoint(tp2, rank=1)
    for name in model.weight_specs():
        assert torch.equal(rank1[name], model.shard_rule(name)(full[name], model.mapping)), name


def test_fused_input_quantization_changes_no_logit(w4a8_ckpt):
    """prepare_runtime has the norms (AWQ's scales folded into them) and the gated activation (proj's prequant scale
    multiplied in) write W4A8's e4m3 inputs over their static scales (Fp8Rows): the logits are bit for bit those of
    each linear quantizing its own input. Decode attention's merge leaves dense's input alone: its prequant scale."""
    from kiln.kernels.fp8_quant import Fp8Rows
    from kiln.kernels.input_quant import FP8_STATIC

    model = runtime_model(w4a8_ckpt, fused=True)
    layer = model.transformer.layers["1"]
    for norm, linear in ((layer.input_layernorm, layer.attention.qkv), (layer.post_layernorm, layer.mlp.fc_gate)):
        assert norm.out_quant.kind == FP8_STATIC and norm.out_quant.scale is linear.activation_scaling_factor
        assert norm.out_quant.prequant is None
    proj_input = layer.mlp.act_quant
    assert proj_input.kind == FP8_STATIC and proj_input.prequant is layer.mlp.proj.prequant_scaling_factor
    assert isinstance(layer.input_layernorm(torch.randn(3, model.config.hidden_size)), Fp8Rows)
    with torch.no_grad():
        assert torch.equal(model(IDS), runtime_model(w4a8_ckpt, fused=False)(IDS))


def test_no_gemv_carries_a_norm_before_w4a8_linears(w4a8_ckpt, monkeypatch):
    """W4A8's input is quantized after the norm (its e4m3 codes over a static scale), so its int4 linears carry no
    pending norm (DecoderLayer.defer_norms), whether or not a linear scales its input first."""
    monkeypatch.setenv("KILN_DEFER_NORMS", "1")
    for layer in runtime_model(w4a8_ckpt, fused=True).transformer.layers.values():
        assert layer.norms_begun == (None, None)
        linears = (layer.attention.qkv, layer.attention.dense, layer.mlp.fc_gate, layer.mlp.proj)
        assert not any(linear.quant_method.carries_norms(linear) for linear in linears)
