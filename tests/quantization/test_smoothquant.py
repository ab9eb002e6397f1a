"""W8A8_SQ_PER_CHANNEL (SmoothQuant): the smoothing scales and the per-token int8 GEMM against float math written
out, quantize -> checkpoint -> build -> run against transformers with fake-quantized linears, TP=2 shards, and the
migration strength's validation and effect."""

import pytest
import torch
from act_reference import assert_engine_greedy_equals_fake_quant_hf, assert_logits_equal_fake_quant_hf, runtime_model
from reference import linear_tensors, quant_llama  # noqa: F401 (fixture)
from safetensors.torch import load_file

import kiln
import kiln.cli
from kiln.checkpoint.convert import load_source_model
from kiln.config import QuantConfig
from kiln.errors import ConfigError
from kiln.kernels import int8_gemm
from kiln.kernels.input_quant import INT8_ROWS
from kiln.mapping import Mapping
from kiln.models.base import PretrainedModel
from kiln.quantization import act_stats, calibration, smoothquant, w8a8

IDS = torch.tensor([[1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8]])
SQ = QuantConfig(quant_algo="W8A8_SQ_PER_CHANNEL")


@pytest.fixture(scope="module")
def sq_ckpt(quant_llama, tmp_path_factory):
    return PretrainedModel.quantize(quant_llama[0], tmp_path_factory.mktemp("sq") / "q", SQ, calib_size=4,
                                    calib_max_seq_len=64)


def test_smoothing_scale_is_the_papers_formula():
    act = torch.rand(32) * 10
    w1, w2 = torch.randn(16, 32), torch.randn(8, 32) * 3
    for alpha in (0.0, 0.5, 0.85):
        s = smoothquant.smoothing_scale(act, [w1, w2], alpha)
        w_max = torch.maximum(w1.abs().amax(0), w2.abs().amax(0))
        assert torch.allclose(s, act ** alpha / w_max ** (1 - alpha), rtol=1e-6)


def test_per_token_int8_and_emulated_gemm_equal_integer_math():
    x = torch.randn(7, 96) * torch.linspace(0.1, 5, 96)
    xq, s = int8_gemm.quantize_int8_rows_ref(x)
    assert torch.equal(s, x.abs().amax(1, keepdim=True) / 127)
    assert torch.equal(xq, torch.round(x / s).clamp(-127, 127).to(torch.int8))
    wq = torch.randint(-127, 128, (24, 96), dtype=torch.int8)
    ws = torch.rand(24) + 0.5
    y = int8_gemm.int8_gemm(xq, s, wq, ws, torch.float32)
    exact = (xq.long() @ wq.long().T).double()  # integer accumulation, as _int_mm does
    ref = exact * s.double() * ws.double()[None, :]
    assert ((y.double() - ref).abs() <= 2.0 ** -22 * ref.abs() + 1e-12).all()  # |acc| < 2^24: exact, then 3 roundings


def test_logits_equal_transformers_with_fake_quantized_linears(quant_llama, sq_ckpt):
    assert_logits_equal_fake_quant_hf(quant_llama[1], sq_ckpt, IDS)


def test_smoothing_folds_into_norms_and_prequant_on_row_layers(quant_llama, sq_ckpt):
    hf_dir, hf = quant_llama
    ckpt = load_file(sq_ckpt / "rank0.safetensors")
    prequant = sorted(k.split(".", 3)[-1] for k in ckpt if k.endswith("prequant_scaling_factor"))
    assert prequant == ["attention.dense.prequant_scaling_factor"] * 2 + ["mlp.proj.prequant_scaling_factor"] * 2
    # The folded norm is the source norm / s, with s from the calibrated max |x| and the weights written out.
    src = load_source_model(hf_dir, "auto", Mapping())
    tokens = calibration.token_batches(calibration.read_texts(None), calibration.source_tokenizer(src),
                                       src.config.vocab_size, 4, 64)
    absmax = act_stats.calibrate_absmax(src, tokens, SQ, "cpu")["transformer.layers.1.mlp.fc"]
    layer = hf.model.layers[1]
    w_max = torch.maximum(layer.mlp.gate_proj.weight.abs().amax(0), layer.mlp.up_proj.weight.abs().amax(0))
    s = (absmax.clamp(min=1e-5) ** 0.5 / w_max.detach().clamp(min=1e-5) ** 0.5)
    assert torch.allclose(ckpt["transformer.layers.1.post_layernorm.weight"],
                          layer.post_attention_layernorm.weight.detach() / s, rtol=1e-6)
    q, scale = w8a8.quantize_int8_per_channel(layer.mlp.gate_proj.weight.detach() * s, torch.float32)
    t = linear_tensors(ckpt, "transformer.layers.1.mlp.fc")
    assert torch.equal(t["weight"], q) and torch.equal(t["weights_scaling_factor"], scale)


def test_build_and_llm_greedy_equal_fake_quantized_transformers(quant_llama, sq_ckpt, tmp_path):
    assert_engine_greedy_equals_fake_quant_hf(quant_llama[1], sq_ckpt, tmp_path / "engine")


def test_tp2_rank_files_reassemble_to_tp1(quant_llama, sq_ckpt, tmp_path):
    out = PretrainedModel.quantize(quant_llama[0], tmp_path / "tp2", SQ, Mapping.of(2), calib_size=4,
                                   calib_max_seq_len=64)
    full = load_file(sq_ckpt / "rank0.safetensors")
    ranks = [load_file(out / f"rank{r}.safetensors") for r in range(2)]
    proj = "transformer.layers.1.mlp.proj."
    assert torch.equal(torch.cat([r[proj + "weight"] for r in ranks], 1), full[proj + "weight"])
    assert torch.equal(torch.cat([r[proj + "prequant_scaling_factor"] for r in ranks]), full[proj + "prequant_scaling_factor"])
    assert all(torch.equal(r[proj + "weights_scaling_factor"], full[proj + "weights_scaling_factor"]) for r in ranks)
    model = PretrainedModel.from_checkpoint(out, rank=1)
    for name in model.weight_specs():
        assert torch.equal(ranks[1][name], model.shard_rule(name)(full[name], model.mapping)), name


def test_alpha_is_validated_and_recorded(quant_llama, tmp_path):
    with pytest.raises(ConfigError, match=r"smoothquant_alpha must be a number in \[0, 1\] or 'auto', got 1.5"):
        QuantConfig(quant_algo="W8A8_SQ_PER_CHANNEL", smoothquant_alpha=1.5)
    qc = QuantConfig(quant_algo="W8A8_SQ_PER_CHANNEL", smoothquant_alpha=0.8)
    assert QuantConfig.from_dict(qc.to_dict()) == qc
    assert kiln.cli.main(["quantize", "--model-dir", str(quant_llama[0]), "--output-dir", str(tmp_path / "q"),
                          "--quant-algo", "W8A8_SQ_PER_CHANNEL", "--smoothquant-alpha", "0.8",
                          "--calib-size", "2", "--calib-max-seq-len", "32"]) == 0
    assert PretrainedModel.from_checkpoint(tmp_path / "q").config.quantization.smoothquant_alpha == 0.8


def test_fused_int8_input_quantization_changes_no_logit(sq_ckpt):
    """prepare_runtime has the norms before qkv and fc_gate (their smoothing folded in, no prequant scale) and the
    gated activation before mlp.proj (its prequant scale multiplied in) write SmoothQuant's int8 codes and row scales
    (Int8Rows): the logits are bit for bit those of each linear quantizing its own input. The attention output
    (decode attention's kernels) keeps its own pass."""
    from kiln.kernels.int8_gemm import Int8Rows

    model = runtime_model(sq_ckpt, fused=True)
    layer = model.transformer.layers["1"]
    for norm in (layer.input_layernorm, layer.post_layernorm):  # smoothing folded in: no prequant scale
        assert norm.out_quant.kind == INT8_ROWS and norm.out_quant.prequant is None
    proj_input = layer.mlp.act_quant  # the prequant scale multiplied in
    assert proj_input.kind == INT8_ROWS and proj_input.prequant is layer.mlp.proj.prequant_scaling_factor
    rows = layer.input_layernorm(torch.randn(3, model.config.hidden_size))
    assert isinstance(rows, Int8Rows) and rows.q.dtype == torch.int8 and rows.scale.shape == (3, 1)
    with torch.no_grad():
        assert torch.equal(model(IDS), runtime_model(sq_ckpt, fused=False)(IDS))


def test_auto_alpha_takes_the_grid_point_of_least_int8_output_error():
    """The search returns the candidate whose smoothing, with both sides int8 as the engine runs them, gives the
    least output error on the inputs: never worse than the default 0.5 (on the grid), and here better."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.2, 2, 64)
    x[:, 5] *= 40  # an outlier channel, as SmoothQuant's inputs have
    weights = [torch.randn(32, 64, generator=g) * 0.05, torch.randn(16, 64, generator=g) * 0.05]
    absmax = x.abs().amax(0)
    alpha, s = smoothquant.search_alpha(x, weights, absmax)
    refs = [x @ w.T for w in weights]
    errors = {a: smoothquant.int8_output_error(x, weights, refs, smoothquant.smoothing_scale(absmax, weights, a))
              for a in smoothquant.ALPHA_CANDIDATES}
    assert errors[alpha] == min(errors.values()) and errors[alpha] < errors[0.5]
    assert torch.equal(s, smoothquant.smoothing_scale(absmax, weights, alpha))


def test_auto_alpha_checkpoint_runs_and_records_auto(quant_llama, tmp_path, capsys):
    """--smoothquant-alpha auto: the config says "auto", the checkpoint equals transformers with its weights
    fake-quantized, and a word other than auto is refused by the command line."""
    assert kiln.cli.main(["quantize", "--model-dir", str(quant_llama[0]), "--output-dir", str(tmp_path / "q"),
                          "--quant-algo", "W8A8_SQ_PER_CHANNEL", "--smoothquant-alpha", "auto",
                          "--calib-size", "4", "--calib-max-seq-len", "64"]) == 0
    assert PretrainedModel.from_checkpoint(tmp_path / "q").config.quantization.smoothquant_alpha == "auto"
    assert_logits_equal_fake_quant_hf(quant_llama[1], tmp_path / "q", IDS)
    with pytest.raises(SystemExit):
        kiln.cli.main(["quantize", "--model-dir", str(quant_llama[0]), "--output-dir", str(tmp_path / "r"),
                       "--quant-algo", "W8A8_SQ_PER_CHANNEL", "--smoothquant-alpha", "high"])
    assert "neither a number in [0, 1] nor 'auto'" in capsys.readouterr().err
