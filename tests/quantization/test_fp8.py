"""FP8, FP8_PER_CHANNEL_PER_TOKEN and FP8_BLOCK_SCALES: the e4m3 format math against float math written out,
quantize -> checkpoint -> from_checkpoint -> build -> run against transformers with fake-quantized linears
(act_reference.py), TP=2 shards, and the errors (no FP8 GPU, unknown algorithm)."""

import pytest
import torch
from act_reference import (assert_engine_greedy_equals_fake_quant_hf, assert_logits_equal_fake_quant_hf, e4m3,
                           is_searched_scale, runtime_model)
from reference import linear_tensors, quant_llama  # noqa: F401 (fixture)
from safetensors.torch import load_file

from kiln.builder import engine_weights
from kiln.config import QuantConfig
from kiln.errors import ConfigError
from kiln.kernels.input_quant import FP8_GROUPS, FP8_ROWS, FP8_STATIC
from kiln.mapping import Mapping
from kiln.models.base import PretrainedModel
from kiln.quantization import fp8, fp8_block

IDS = torch.tensor([[1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8]])
ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES")
# e4m3: 3 mantissa bits, so round-to-nearest is within 2^-4 of |w| for normal values; below 2^-6 (subnormals,
# spacing 2^-9) within 2^-10, in units of the scale.
E4M3_REL, E4M3_SUBNORMAL_ABS = 2.0 ** -4, 2.0 ** -10


@pytest.fixture(scope="module")
def quantized(quant_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8")
    return {a: PretrainedModel.quantize(quant_llama[0], out / a, QuantConfig(quant_algo=a), calib_size=4,
                                        calib_max_seq_len=64) for a in ALGOS}


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_codes_round_to_nearest_e4m3_and_dequantize_exactly(per_channel):
    """Per tensor: max |w| maps to 448. Per channel: each row's scale is the searched candidate of least squared
    error, never worse than max |w| / 448."""
    w = torch.randn(48, 80) * torch.logspace(-3, 0, 80)  # columns over three decades: subnormals too
    q, s = fp8.quantize_fp8_weight(w, torch.bfloat16, per_channel)
    amax = w.abs().amax(1) if per_channel else w.abs().amax().expand(48)
    plain = (amax / 448).to(torch.bfloat16)
    if per_channel:
        assert is_searched_scale(s, amax)

        def row_errors(scale):
            return ((e4m3(w / scale.float()[:, None]) * scale.double()[:, None] - w.double()) ** 2).sum(1)
        assert (row_errors(s) <= row_errors(plain)).all() and (row_errors(s) < row_errors(plain)).any()
    else:
        assert torch.equal(s, plain)
    assert q.dtype == torch.float8_e4m3fn and torch.equal(q.double(), e4m3(w / s.float()[:, None]))
    deq = q.double() * s.double()[:, None]
    assert torch.equal(fp8.dequantize_fp8(q, s, torch.float32).double(), deq)  # exact: the quantizer's reconstruction
    bound = torch.maximum(E4M3_REL * w.double().abs(), E4M3_SUBNORMAL_ABS * s.double()[:, None])
    assert ((deq - w.double()).abs() <= bound * (1 + 2 ** -7)).all()  # (bf16 scale rounding: the 2^-7)


def test_group_scales_are_searched_round_to_nearest_e4m3_and_dequantize_exactly():
    """FP8_BLOCK_SCALES: one scale per row and group of 32 inputs (72 inputs: the last group has 8), the candidate
    max|w| / 448 x 2^(j / 16) of least squared error; never worse than max|w| / 448 alone."""
    w = torch.randn(24, 72) * torch.logspace(-3, 0, 72)
    q, s = fp8_block.quantize_fp8_groups_weight(w, 32, torch.bfloat16)
    group_of = torch.arange(72) // 32
    amax = torch.stack([w[:, group_of == g].abs().amax(1) for g in range(3)], 1)
    assert s.shape == (24, 3) and is_searched_scale(s, amax)
    scale = s.float()[:, group_of]
    assert q.dtype == torch.float8_e4m3fn and torch.equal(q.double(), e4m3(w / scale))
    deq = q.double() * scale.double()
    assert torch.equal(fp8_block.dequantize_fp8_groups(q, s, 32, torch.float32).double(), deq)
    bound = torch.maximum(E4M3_REL * w.double().abs(), E4M3_SUBNORMAL_ABS * scale.double())
    assert ((deq - w.double()).abs() <= bound * (1 + 2 ** -7)).all()

    def group_errors(scale_of_group):
        full = scale_of_group.float()[:, group_of].double()
        err = (e4m3(w / full) * full - w.double()) ** 2
        return torch.stack([err[:, group_of == g].sum(1) for g in range(3)], 1)
    searched, plain = group_errors(s), group_errors((amax / 448).to(torch.bfloat16))
    assert (searched <= plain).all() and (searched < plain).float().mean() > 0.5  # the search pays off mostly


def test_group_activation_scales_and_the_gemm_equal_float64_math():
    """Activations per token and group (the kiln.kernels.fp8_quant reference), and the GEMM's scaled sums, against
    float64 math on the same codes: sum over groups of (codes' dot) * x scale * w scale."""
    from kiln.kernels.fp8_quant import quantize_fp8_groups_ref

    x, group = torch.randn(5, 200) * 3, 64  # 200 inputs: groups of 64, 64, 64, 8
    xq, xs = quantize_fp8_groups_ref(x, group)
    group_of = torch.arange(200) // group
    amax = torch.stack([x[:, group_of == g].abs().amax(1) for g in range(4)], 1)
    assert xs.shape == (5, 4) and torch.equal(xs, amax / 448)
    assert torch.equal(xq.double(), e4m3(x / xs[:, group_of]))
    wq, ws = fp8_block.quantize_fp8_groups_weight(torch.randn(40, 200), group, torch.float32)
    y = fp8_block.fp8_groups_matmul(fp8.Fp8Rows(xq, xs), wq, ws, group, torch.float32)
    ref = sum((xq.double()[:, group_of == g] @ wq.double()[:, group_of == g].T) * xs.double()[:, g:g + 1]
              * ws.double()[None, :, g] for g in range(4))
    terms = (xq.double().abs() * xs.double()[:, group_of]) @ (wq.double().abs() * ws.double()[:, group_of]).T
    assert ((y.double() - ref).abs() <= 200 * 2.0 ** -24 * terms + 2.0 ** -24 * ref.abs()).all()


def test_per_token_and_static_activation_quantization():
    x = torch.randn(6, 64) * 3
    xq, s = fp8.quantize_fp8_per_token(x)
    assert torch.equal(s, x.abs().amax(1, keepdim=True) / 448)
    assert torch.equal(xq.double(), e4m3(x / s)) and (xq.float().abs().amax(1) == 448).all()
    xq, s = fp8.quantize_fp8_static(x * 10, torch.tensor([0.01]))  # beyond the range: saturates, no NaN
    assert s.shape == (6, 1) and torch.equal(xq.double(), e4m3(x * 10 / 0.01)) and not xq.float().isnan().any()


def test_emulated_gemm_equals_float64_math_on_the_codes():
    xq, xs = fp8.quantize_fp8_per_token(torch.randn(5, 256))
    wq, ws = fp8.quantize_fp8_weight(torch.randn(40, 256), torch.float32, True)
    y = fp8.fp8_gemm(xq, xs, wq, ws, torch.float32)
    ref = (xq.double() @ wq.double().T) * xs.double() * ws.double()[None, :]
    terms = (xq.double().abs() @ wq.double().abs().T) * xs.double() * ws.double()[None, :]
    # products of two e4m3 values are exact in float32; only the float32 sum and the output rounding differ
    assert ((y.double() - ref).abs() <= 256 * 2.0 ** -24 * terms + 2.0 ** -24 * ref.abs()).all()


@pytest.mark.parametrize("algo", ALGOS)
def test_logits_equal_transformers_with_fake_quantized_linears(quant_llama, quantized, algo):
    assert_logits_equal_fake_quant_hf(quant_llama[1], quantized[algo], IDS)


def test_checkpoint_tensors(quant_llama, quantized):
    ckpt = load_file(quantized["FP8"] / "rank0.safetensors")
    t = linear_tensors(ckpt, "transformer.layers.1.attention.qkv")
    assert t["weight"].dtype == torch.float8_e4m3fn and t["weights_scaling_factor"].shape == (t["weight"].shape[0],)
    assert t["weights_scaling_factor"].unique().numel() == 1  # per-tensor: the fused QKV is one tensor
    assert t["activation_scaling_factor"].shape == (1,)
    fc, gate = (linear_tensors(ckpt, f"transformer.layers.1.mlp.{m}") for m in ("fc", "gate"))
    assert torch.equal(fc["activation_scaling_factor"], gate["activation_scaling_factor"])  # one input
    pc = load_file(quantized["FP8_PER_CHANNEL_PER_TOKEN"] / "rank0.safetensors")
    t = linear_tensors(pc, "transformer.layers.1.mlp.proj")
    assert set(t) == {"weight", "weights_scaling_factor"}
    w = quant_llama[1].model.layers[1].mlp.down_proj.weight.detach()
    assert is_searched_scale(t["weights_scaling_factor"], w.abs().amax(1))


@pytest.mark.parametrize("algo", ALGOS)
def test_build_and_llm_greedy_equal_fake_quantized_transformers(quant_llama, quantized, algo, tmp_path):
    fused = dict(engine_weights(PretrainedModel.from_checkpoint(quantized[algo])))
    assert fused["transformer.layers.0.mlp.fc_gate.weights_scaling_factor"].shape[0] == 512  # fc and gate rows
    assert_engine_greedy_equals_fake_quant_hf(quant_llama[1], quantized[algo], tmp_path / "engine")


def test_fused_input_quantization_changes_no_logit(quantized):
    """prepare_runtime has the norms and the gated activation write the FP8 linears' e4m3 inputs (Fp8Rows), over the
    static scale (FP8) or with a scale per token (FP8_PER_CHANNEL_PER_TOKEN): the logits are bit for bit those of
    each linear quantizing its own input."""
    from kiln.kernels.fp8_quant import Fp8Rows

    model = runtime_model(quantized["FP8"], fused=True)
    layer = model.transformer.layers["1"]
    for written, linear in ((layer.input_layernorm.out_quant, layer.attention.qkv),
                            (layer.post_layernorm.out_quant, layer.mlp.fc_gate), (layer.mlp.act_quant, layer.mlp.proj),
                            (layer.attention.out_quant, layer.attention.dense)):
        assert written.kind == FP8_STATIC and written.scale is linear.activation_scaling_factor
    assert isinstance(layer.input_layernorm(torch.randn(3, model.config.hidden_size)), Fp8Rows)
    with torch.no_grad():
        assert torch.equal(model(IDS), runtime_model(quantized["FP8"], fused=False)(IDS))
    per_token = runtime_model(quantized["FP8_PER_CHANNEL_PER_TOKEN"], fused=True)
    layer = per_token.transformer.layers["1"]
    assert layer.input_layernorm.out_quant.kind == layer.post_layernorm.out_quant.kind == layer.mlp.act_quant.kind \
        == FP8_ROWS  # (attention's too, which decode attention's merge leaves to dense: a token spans the heads)
    normed = layer.input_layernorm(torch.randn(3, per_token.config.hidden_size))
    assert isinstance(normed, Fp8Rows) and normed.scale.shape == (3, 1) and normed.scale.unique().numel() == 3
    with torch.no_grad():
        unfused = runtime_model(quantized["FP8_PER_CHANNEL_PER_TOKEN"], fused=False)
        assert torch.equal(per_token(IDS), unfused(IDS))


def test_block_scaled_inputs_written_by_the_norms_and_the_activation_change_no_logit(quantized):
    """FP8_BLOCK_SCALES: prepare_runtime has the norms and the gated activation write their linears' e4m3 input
    with a scale per group (Fp8Rows), and stores the weight scales column-major: the logits are bit for bit those
    of each linear quantizing its own input from row-major scales."""
    from kiln.kernels.fp8_quant import Fp8Rows

    model = runtime_model(quantized["FP8_BLOCK_SCALES"], fused=True)
    layer, group = model.transformer.layers["1"], model.config.quantization.group_size
    for written in (layer.input_layernorm.out_quant, layer.post_layernorm.out_quant, layer.mlp.act_quant,
                    layer.attention.out_quant):
        assert written.kind == FP8_GROUPS and written.group == group
    assert layer.mlp.proj.weights_scaling_factor.stride(0) == 1  # column-major
    hidden = model.config.hidden_size
    normed = layer.input_layernorm(torch.randn(3, hidden))
    assert isinstance(normed, Fp8Rows) and normed.scale.shape == (3, -(-hidden // group))
    with torch.no_grad():
        assert torch.equal(model(IDS), runtime_model(quantized["FP8_BLOCK_SCALES"], fused=False)(IDS))


def test_tp2_rank_files_reassemble_to_tp1(quant_llama, quantized, tmp_path):
    out = PretrainedModel.quantize(quant_llama[0], tmp_path / "tp2", QuantConfig(quant_algo="FP8"), Mapping.of(2),
                                   calib_size=4, calib_max_seq_len=64)
    full = load_file(quantized["FP8"] / "rank0.safetensors")
    ranks = [load_file(out / f"rank{r}.safetensors") for r in range(2)]
    layer = "transformer.layers.1."
    for leaf in ("weight", "weights_scaling_factor"):  # column: output rows
        name = layer + "mlp.fc." + leaf
        assert torch.equal(torch.cat([r[name] for r in ranks]).float(), full[name].float())
    proj = layer + "mlp.proj."
    assert torch.equal(torch.cat([r[proj + "weight"] for r in ranks], 1).float(), full[proj + "weight"].float())
    for name in (proj + "weights_scaling_factor", proj + "activation_scaling_factor",
                 layer + "attention.qkv.activation_scaling_factor"):  # row output scales and per-tensor: whole
        assert all(torch.equal(r[name], full[name]) for r in ranks)
    model = PretrainedModel.from_checkpoint(out, rank=1)
    for name in model.weight_specs():
        assert torch.equal(ranks[1][name].float(), model.shard_rule(name)(full[name], model.mapping).float()), name


def test_group_scales_shard_with_their_rows_and_whole_groups(quant_llama, quantized, tmp_path):
    """FP8_BLOCK_SCALES at TP=2: a column-parallel layer's scales split by rows, a row-parallel one's by groups."""
    qc = QuantConfig(quant_algo="FP8_BLOCK_SCALES", group_size=64)
    full_dir = PretrainedModel.quantize(quant_llama[0], tmp_path / "tp1", qc)
    out = PretrainedModel.quantize(quant_llama[0], tmp_path / "tp2", qc, Mapping.of(2))
    full = load_file(full_dir / "rank0.safetensors")
    ranks = [load_file(out / f"rank{r}.safetensors") for r in range(2)]
    layer = "transformer.layers.1."
    assert full[layer + "mlp.proj.weights_scaling_factor"].shape == (128, 4)  # 256 inputs in groups of 64
    for name, dim in (("mlp.fc.weights_scaling_factor", 0), ("mlp.proj.weights_scaling_factor", 1),
                      ("mlp.proj.weight", 1)):
        assert torch.equal(torch.cat([r[layer + name] for r in ranks], dim).float(), full[layer + name].float())
    model = PretrainedModel.from_checkpoint(out, rank=1)
    for name in model.weight_specs():
        assert torch.equal(ranks[1][name].float(), model.shard_rule(name)(full[name], model.mapping).float()), name


def test_a_group_straddling_ranks_is_refused(quant_llama, tmp_path):
    from conftest import leftovers, make_hf_model

    make_hf_model(tmp_path / "hf", hidden_size=128, intermediate_size=192)  # proj: 96 inputs per rank
    with pytest.raises(ConfigError, match=r"transformer\.layers\.0\.mlp\.proj: QuantConfig\.group_size \(64\) must "
                                          r"divide a row-parallel layer's input features per rank \(96\)"):
        PretrainedModel.quantize(tmp_path / "hf", tmp_path / "q", QuantConfig(quant_algo="FP8_BLOCK_SCALES",
                                                                              group_size=64), Mapping.of(2))
    assert leftovers(tmp_path / "q") == []


def test_fp8_on_a_gpu_without_fp8_tensor_cores_names_the_capability():
    fp8.check_fp8_capability((9, 0))
    fp8.check_fp8_capability((8, 9))
    with pytest.raises(ConfigError, match=r"compute capability sm_89 or newer.*this GPU is sm_80"):
        fp8.check_fp8_capability((8, 0))


def test_unknown_algorithm_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"quant_algo must be one of \[.*'FP8_PER_CHANNEL_PER_TOKEN'"):
        QuantConfig(quant_algo="FP16")


def test_every_weight_algorithm_has_a_method():
    from kiln.config import WEIGHT_ALGOS
    from kiln.quantization.methods import METHODS

    assert set(METHODS) == set(WEIGHT_ALGOS)
