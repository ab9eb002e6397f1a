"""W4A16_GPTQ made by `kiln quantize` (kiln.quantization.gptq): the rounding against its definition, and the
quantize -> checkpoint -> model path against transformers with the checkpoint's weights written out here."""

import pytest
import torch
from reference import HF_LINEARS, dequantize, linear_tensors, quant_llama, rtn_int4  # noqa: F401
from safetensors.torch import load_file

from kiln.config import QuantConfig
from kiln.mapping import Mapping
from kiln.models.base import PretrainedModel
from kiln.quantization.gptq import act_order, gptq_int4
from kiln.quantization.methods import quantized_linears

IDS = torch.tensor([[1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8]])


def in_input_order(tensors: dict, group: int) -> torch.Tensor:
    """The checkpoint tensors' weight [out, in] with its columns back in input order (column j of the codes is
    input channel input_permutation[j])."""
    w = dequantize(tensors, group)
    full = torch.empty_like(w)
    full[:, tensors["input_permutation"].long()] = w
    return full


def correlated_inputs(n: int, inp: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) * 0.1 + torch.eye(inp)
    return (torch.randn(n, inp, generator=g) @ mix) * torch.linspace(0.2, 3.0, inp)


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("group", [32, 128])
def test_gptq_halves_the_output_error_of_round_to_nearest_on_its_calibration_inputs(zero_point, group):
    x = correlated_inputs(1024, 384)
    w = torch.randn(96, 384, generator=torch.Generator().manual_seed(1)) * 0.05
    t = gptq_int4(w, x.T @ x, group, zero_point, torch.float32)
    codes, s, z = rtn_int4(w, group, zero_point)
    rtn = ((codes - z.repeat_interleave(group, 1)[:, :384]) * s.repeat_interleave(group, 1)[:, :384]).float()
    err_gptq = (x @ (in_input_order(t, group) - w).T).pow(2).mean()
    err_rtn = (x @ (rtn - w).T).pow(2).mean()
    assert err_gptq < 0.5 * err_rtn
    assert sorted(t["input_permutation"].tolist()) == list(range(384))
    assert ("zero_point" in t) == zero_point and t["weights_scaling_factor"].shape == (96, 384 // group)


def test_with_a_diagonal_hessian_gptq_is_round_to_nearest_in_act_order():
    """H diagonal: no column's error reaches another (the inverse Hessian's factor is diagonal), so GPTQ rounds
    every column as round-to-nearest does, with the groups formed in act order (decreasing H diagonal)."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    diagonal = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5
    t = gptq_int4(w, torch.diag(diagonal), 32, True, torch.float32)
    order = torch.argsort(diagonal, descending=True)
    assert torch.equal(t["input_permutation"].long(), order)
    codes, s, z = rtn_int4(w[:, order], 32, True)
    assert torch.equal(dequantize(t, 32), dequantize({"weight": _pack(codes), "weights_scaling_factor": s,
                                                      "zero_point": z}, 32))


def _pack(codes: torch.Tensor) -> torch.Tensor:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def test_act_order_keeps_each_tensor_parallel_slice_on_its_rank():
    diagonal = torch.tensor([1.0, 5.0, 3.0, 2.0, 9.0, 0.5, 4.0, 7.0])
    assert act_order(diagonal).tolist() == [4, 7, 1, 6, 2, 3, 0, 5]
    assert act_order(diagonal, 2).tolist() == [1, 2, 3, 0, 4, 7, 6, 5]


def test_dead_inputs_get_zero_weight():
    x = correlated_inputs(256, 64)
    x[:, 5] = 0
    t = gptq_int4(torch.randn(8, 64), x.T @ x, 32, False, torch.float32)
    assert torch.equal(in_input_order(t, 32)[:, 5], torch.zeros(8))


@pytest.fixture(scope="module")
def gptq_ckpt(quant_llama, tmp_path_factory):
    qc = QuantConfig(quant_algo="W4A16_GPTQ", group_size=64, has_zero_point=True)
    return PretrainedModel.quantize(quant_llama[0], tmp_path_factory.mktemp("gptq") / "q", qc, calib_size=4,
                                    calib_max_seq_len=64)


def test_quantized_model_equals_transformers_with_the_checkpoint_weights(quant_llama, gptq_ckpt):
    """Every decoder linear is act-order int4 (a real permutation); the model's logits equal transformers' with
    each weight written back from the checkpoint's codes, zeros, scales and permutation."""
    import copy

    hf = quant_llama[1]
    ckpt = load_file(gptq_ckpt / "rank0.safetensors")
    model = PretrainedModel.from_checkpoint(gptq_ckpt)
    assert model.config.quantization.quant_algo.value == "W4A16_GPTQ"
    ref = copy.deepcopy(hf)
    config = model.config
    q, kv = config.num_attention_heads * config.head_size, config.num_key_value_heads * config.head_size
    for name in quantized_linears(model):
        t = linear_tensors(ckpt, name)
        assert not torch.equal(t["input_permutation"], torch.arange(t["input_permutation"].numel(), dtype=torch.int32))
        i, kiln_name = int(name.split(".")[2]), name.split(".", 3)[3]
        w = in_input_order(t, 64)
        hf_names = HF_LINEARS[kiln_name]
        for hf_name, part in zip(hf_names, w.split([q, kv, kv]) if len(hf_names) == 3 else (w,)):
            ref.model.layers[i].get_submodule(hf_name).weight.data.copy_(part)
    with torch.no_grad():
        ours, expected, full = model(IDS), ref(IDS).logits, hf(IDS).logits
    assert (ours - expected).abs().max() <= 1e-4
    assert (ours - full).abs().max() > 1e-4  # the reference is really quantized


def test_tensor_parallel_checkpoint_keeps_row_parallel_inputs_on_their_rank(quant_llama, tmp_path):
    """At TP=2 the row-parallel layers (attention output, mlp.proj) sort within each rank's inputs: every rank's
    shard is written (the shard rule refuses a permutation across ranks) and holds a permutation of its own."""
    qc = QuantConfig(quant_algo="W4A16_GPTQ", group_size=32)
    out = PretrainedModel.quantize(quant_llama[0], tmp_path / "tp2", qc, mapping=Mapping.of(2), calib_size=4,
                                   calib_max_seq_len=64)
    for rank in range(2):
        perm = load_file(out / f"rank{rank}.safetensors")["transformer.layers.0.mlp.proj.input_permutation"]
        assert sorted(perm.tolist()) == list(range(perm.numel()))


def test_a_quantized_lm_head_is_round_to_nearest_in_identity_order(quant_llama, tmp_path):
    """lm_head's input is not calibrated (the calibrations stream the decoder layers): with --quantize-lm-head,
    W4A16_GPTQ's lm_head is W4A16's round-to-nearest, its permutation the identity."""
    qc = QuantConfig(quant_algo="W4A16_GPTQ", group_size=32, exclude_modules=())
    out = PretrainedModel.quantize(quant_llama[0], tmp_path / "head", qc, calib_size=4, calib_max_seq_len=64)
    head = linear_tensors(load_file(out / "rank0.safetensors"), "lm_head")
    w = quant_llama[1].lm_head.weight.detach()
    codes, s, _ = rtn_int4(w, 32, False)
    assert torch.equal(head["input_permutation"], torch.arange(w.shape[1], dtype=torch.int32))
    assert torch.equal(dequantize(head, 32), dequantize({"weight": _pack(codes), "weights_scaling_factor": s}, 32))


# ---- the FP8 formats with --weight-rounding gptq: e4m3 codes rounded by GPTQ on round-to-nearest's scales ----

FP8_FORMATS = {"FP8": {}, "FP8_PER_CHANNEL_PER_TOKEN": {}, "FP8_BLOCK_SCALES": {"group_size": 32}}


@pytest.mark.parametrize("algo", FP8_FORMATS)
def test_gptq_fp8_lowers_the_output_error_of_round_to_nearest_on_the_same_scales(algo):
    """Each FP8 format's round-to-nearest scales (a tensor's, a row's, a group's of 32), codes in input order, and
    on the calibration inputs less than two thirds of round-to-nearest's output error."""
    from kiln.quantization.fp8 import quantize_fp8_weight
    from kiln.quantization.fp8_block import quantize_fp8_groups_weight
    from kiln.quantization.gptq import ROUNDERS

    qc = QuantConfig(quant_algo=algo, **FP8_FORMATS[algo])
    x = correlated_inputs(1024, 384)
    w = torch.randn(96, 384, generator=torch.Generator().manual_seed(1)) * 0.05
    t = ROUNDERS[qc.quant_algo](w, x.T @ x, qc, torch.bfloat16, 1)
    rtn = quantize_fp8_groups_weight(w, 32, torch.bfloat16) if algo == "FP8_BLOCK_SCALES" else \
        quantize_fp8_weight(w, torch.bfloat16, per_channel=algo != "FP8")
    assert torch.equal(t["weights_scaling_factor"], rtn[1]) and t["weight"].dtype == torch.float8_e4m3fn

    def output_error(codes, scale):
        per_input = scale.float()[:, None] if scale.dim() == 1 else scale.float().repeat_interleave(32, dim=1)
        return (x @ (codes.float() * per_input - w).T).pow(2).mean()
    assert output_error(t["weight"], t["weights_scaling_factor"]) < 2 / 3 * output_error(*rtn)


def test_with_a_diagonal_hessian_gptq_fp8_is_round_to_nearest():
    from kiln.quantization.fp8 import quantize_fp8_weight
    from kiln.quantization.gptq import gptq_fp8

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    diagonal = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5
    q_rtn, scale = quantize_fp8_weight(w, torch.float32, per_channel=True)
    codes = gptq_fp8(w, torch.diag(diagonal), scale[:, None])
    assert torch.equal(codes.view(torch.uint8), q_rtn.view(torch.uint8))


def test_gptq_fp8_keeps_each_column_on_its_own_scale_past_a_dead_input():
    """Group scales (FP8_BLOCK_SCALES g32) and an input that never fires: with a diagonal Hessian GPTQ is
    round-to-nearest, so every live column's codes are round-to-nearest's on its own group's scale (the scales
    follow the columns into the rounding order, a dead input counted as 1 there as in the inversion)."""
    from kiln.quantization.fp8_block import quantize_fp8_groups_weight
    from kiln.quantization.gptq import gptq_fp8

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    diagonal = torch.rand(64, generator=torch.Generator().manual_seed(5)) * 0.4 + 0.8
    diagonal[5] = 0
    q_rtn, scale = quantize_fp8_groups_weight(w, 32, torch.float32)
    codes = gptq_fp8(w, torch.diag(diagonal), scale.repeat_interleave(32, dim=1))
    live = torch.arange(64) != 5
    assert torch.equal(codes.view(torch.uint8)[:, live], q_rtn.view(torch.uint8)[:, live])
    assert torch.equal(codes[:, 5].float(), torch.zeros(16))


# ---- AWQ's int4 formats with --weight-rounding gptq: int4 codes rounded by GPTQ on AWQ's own scales ----

@pytest.mark.parametrize("zero_point", [False, True])
def test_gptq_on_awq_scales_lowers_the_output_error_of_round_to_nearest(zero_point):
    """W4A16_AWQ's tensors for a smoothing s (the weight W * s, round to nearest's group scales and zero points),
    then GPTQ's codes on those same scales with the Hessian of x / s: on the calibration inputs, less than two
    thirds of round-to-nearest's output error; with a diagonal Hessian, round-to-nearest's codes exactly."""
    from kiln.quantization.gptq import gptq_int4_on_scales, smoothed_hessian
    from kiln.quantization.weight_only import Int4GroupMethod, unpack_int4

    x = correlated_inputs(1024, 384)
    w = torch.randn(96, 384, generator=torch.Generator().manual_seed(1)) * 0.05
    s = torch.rand(384, generator=torch.Generator().manual_seed(2)) + 0.5
    rtn = Int4GroupMethod(32, zero_point, prequant=True).quantize(w, torch.float32, s)
    scale, zero = rtn["weights_scaling_factor"], rtn.get("zero_point")
    codes = gptq_int4_on_scales(w * s, smoothed_hessian(x.T @ x, s), scale, zero, 32)

    def output_error(u):
        z = zero if zero is not None else torch.full_like(scale, 8)
        q = (u.float() - z.repeat_interleave(32, dim=1)) * scale.repeat_interleave(32, dim=1)
        return ((x / s) @ q.T - x @ w.T).pow(2).mean()
    assert output_error(codes) < 2 / 3 * output_error(unpack_int4(rtn["weight"]))
    diagonal = torch.diag(torch.rand(384, generator=torch.Generator().manual_seed(3)) + 0.5)
    assert torch.equal(gptq_int4_on_scales(w * s, diagonal, scale, zero, 32), unpack_int4(rtn["weight"]))


ROUNDED_FORMATS = {**FP8_FORMATS, "W4A16_AWQ": {"group_size": 64}, "W4A8_AWQ": {"group_size": 64}}


@pytest.mark.parametrize("algo", ROUNDED_FORMATS)
def test_gptq_rounding_is_a_plain_checkpoint_of_its_format(quant_llama, tmp_path, algo):
    """--weight-rounding gptq changes the codes only: the config records it, every decoder linear keeps the
    format's other tensors (weight scales and zero points: round-to-nearest's, AWQ's on its smoothed and clipped
    weight; AWQ's prequant scales; static activation scales: the calibrated maximum) and gets codes of its own,
    and the model's logits equal transformers' running the checkpoint's weights with the format's activation
    rounding."""
    from act_reference import assert_logits_equal_fake_quant_hf

    hf_dir, hf = quant_llama
    kw = dict(calib_size=4, calib_max_seq_len=64)
    nearest = load_file(PretrainedModel.quantize(hf_dir, tmp_path / "rtn", QuantConfig(quant_algo=algo,
                                                                                       **ROUNDED_FORMATS[algo]), **kw)
                        / "rank0.safetensors")
    qc = QuantConfig(quant_algo=algo, weight_rounding="gptq", **ROUNDED_FORMATS[algo])
    out = PretrainedModel.quantize(hf_dir, tmp_path / "gptq", qc, **kw)
    ckpt = load_file(out / "rank0.safetensors")
    model = PretrainedModel.from_checkpoint(out)
    assert model.config.quantization.weight_rounding == "gptq"
    for name in quantized_linears(model):
        t, rtn = linear_tensors(ckpt, name), linear_tensors(nearest, name)
        assert t.keys() == rtn.keys()
        for leaf in set(t) - {"weight"}:
            assert torch.equal(t[leaf], rtn[leaf]), (name, leaf)
        assert not torch.equal(t["weight"].view(torch.uint8), rtn["weight"].view(torch.uint8)), name
    for name, tensor in ckpt.items():  # AWQ's scales folded into the norms, as round to nearest's
        assert name.startswith(tuple(quantized_linears(model))) or torch.equal(tensor, nearest[name]), name
    assert_logits_equal_fake_quant_hf(hf, out, IDS)


def test_gptq_rounding_for_an_algorithm_without_it_is_refused(quant_llama, tmp_path):
    from kiln.errors import ConfigError

    for algo in ("W8A16", "W4A16", "W8A8_SQ_PER_CHANNEL"):
        with pytest.raises(ConfigError, match="weight_rounding 'gptq'.*FP8_BLOCK_SCALES.*W4A16_GPTQ"):
            PretrainedModel.quantize(quant_llama[0], tmp_path / algo, QuantConfig(quant_algo=algo,
                                                                                  weight_rounding="gptq"))
        assert not (tmp_path / algo).exists()
    with pytest.raises(ConfigError, match="weight_rounding.*'nearest', 'gptq'"):
        QuantConfig(quant_algo="FP8", weight_rounding="optimal")


@pytest.mark.parametrize("algo", ["FP8", "W4A16_AWQ"])
def test_cli_weight_rounding_and_tensor_parallel_ranks(quant_llama, tmp_path, capsys, algo):
    """`kiln quantize --weight-rounding gptq --tp-size 2`: the config records it, the report's label says it, and
    each rank's shard is its slice of the TP=1 checkpoint's codes (GPTQ rounds the unsharded weights, in input
    order, so the row-parallel layers split like any checkpoint of the format: e4m3 codes, or int4 codes packed
    two a byte along the inputs)."""
    import json

    import kiln.cli

    args = ["quantize", "--model-dir", str(quant_llama[0]), "--quant-algo", algo, "--weight-rounding", "gptq",
            "--calib-size", "4", "--calib-max-seq-len", "64", "--group-size", "64"]
    assert kiln.cli.main([*args, "--output-dir", str(tmp_path / "tp1")]) == 0
    assert f"{algo} (GPTQ-rounded)" in capsys.readouterr().out
    assert kiln.cli.main([*args, "--output-dir", str(tmp_path / "tp2"), "--tp-size", "2"]) == 0
    assert json.loads((tmp_path / "tp2" / "config.json").read_text())["quantization"]["weight_rounding"] == "gptq"
    full = load_file(tmp_path / "tp1" / "rank0.safetensors")
    ranks = [load_file(tmp_path / "tp2" / f"rank{r}.safetensors") for r in range(2)]
    for name, dim in (("transformer.layers.0.mlp.proj.weight", 1), ("transformer.layers.0.mlp.fc.weight", 0)):
        whole = torch.cat([r[name].view(torch.uint8) for r in ranks], dim=dim)
        assert torch.equal(whole, full[name].view(torch.uint8)), name
