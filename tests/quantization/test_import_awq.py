"""Pre-quantized Hugging Face checkpoints (AutoAWQ GEMM, GPTQ) import into kiln's W4A16-with-zero-point format
with their codes, zeros and scales carried over exactly. The tests write those checkpoints themselves, in the
formats' published layouts, with the quantization and packing math written out here."""

import copy
import json

import pytest
import torch
from reference import HF_LINEARS, QUANT_LLAMA, unpack
from safetensors.torch import load_file, save_file

from kiln.checkpoint.convert import convert_checkpoint
from kiln.errors import ConfigError
from kiln.mapping import Mapping
from kiln.models.base import PretrainedModel
from kiln.models.llama.model import LLaMAForCausalLM

GROUP = 64  # TP=2 splits the attention output's 128 inputs into 64 per rank: whole groups
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
IDS = torch.tensor([[1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8]])


def asymmetric_int4(w_in_out: torch.Tensor, group: int):
    """AutoAWQ's group-wise asymmetric int4 of w [in, out], groups along `in`: s = (max - min) / 15 (rounded to
    float16), z = clamp(-round(min / s), 0, 15), q = clamp(round(w / s) + z, 0, 15)."""
    inp, out = w_in_out.shape
    g = w_in_out.float().reshape(inp // group, group, out)
    hi, lo = g.amax(1), g.amin(1)
    s = ((hi - lo).clamp(min=1e-5) / 15).half()
    z = (-torch.round(lo / s.float())).clamp(0, 15)
    q = (torch.round(g / s.float()[:, None]) + z[:, None]).clamp(0, 15)
    return q.reshape(inp, out).long(), z.long(), s  # codes [in, out], zeros [groups, out], scales [groups, out]


def pack_along_last(codes: torch.Tensor, order) -> torch.Tensor:
    """int codes [..., 8n] -> int32 [..., n]: nibble i of word c holds code 8c + order[i]."""
    words = codes.reshape(*codes.shape[:-1], -1, 8).to(torch.int64)
    packed = sum(words[..., order[i]] << (4 * i) for i in range(8))
    return (packed - ((packed >> 31) << 32)).to(torch.int32)  # two's complement into int32


def packed_int4(w: torch.Tensor, method: str, checkpoint_format: str, group: int):
    """One linear's weight [out, in] as AWQ-GEMM or GPTQ packs it: ({leaf: tensor}, (codes, zeros, scales))."""
    q, z, s = asymmetric_int4(w.T, group)
    if method == "awq":
        tensors = {"qweight": pack_along_last(q, AWQ_ORDER), "qzeros": pack_along_last(z, AWQ_ORDER)}
    else:  # along the input dim in plain order; the original format stores zero - 1
        stored = z - 1 if checkpoint_format == "gptq" else z
        tensors = {"qweight": pack_along_last(q.T, list(range(8))).T.contiguous(),
                   "qzeros": pack_along_last(stored & 0xF, list(range(8))),
                   "g_idx": torch.arange(w.shape[1], dtype=torch.int32) // group}
    return {**tensors, "scales": s}, (q, z, s)


def write_prequantized(hf_model, out_dir, method: str, checkpoint_format: str = "gptq", lm_head: bool = False):
    """Save hf_model as an AWQ-GEMM or GPTQ checkpoint (GPTQModel's `lm_head: true` packs lm_head too); return
    {hf linear name: (codes, zeros, scales)}."""
    out_dir.mkdir(parents=True)
    tensors, quantized = {}, {}
    for name, p in hf_model.state_dict().items():
        proj = name[: -len(".weight")]
        decoder_linear = proj.startswith("model.layers.") and proj.endswith("_proj") and name.endswith(".weight")
        if not (decoder_linear or lm_head and name == "lm_head.weight"):
            tensors[name] = p.contiguous()
            continue
        packed, quantized[proj] = packed_int4(p, method, checkpoint_format, GROUP)
        tensors.update({f"{proj}.{leaf}": t for leaf, t in packed.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"))
    config = hf_model.config.to_dict()
    config["quantization_config"] = (
        {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": GROUP, "zero_point": True}
        if method == "awq" else
        {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False,
         "checkpoint_format": checkpoint_format, "lm_head": lm_head})
    (out_dir / "config.json").write_text(json.dumps(config))
    return quantized


def dequantized_hf(hf_model, quantized):
    """hf_model with each quantized linear's weight replaced by (q - z) * s, written out."""
    model = copy.deepcopy(hf_model)
    with torch.no_grad():
        for proj, (q, z, s) in quantized.items():
            group_of = torch.arange(q.shape[0]) // GROUP
            w = (q.double() - z.double()[group_of]) * s.double()[group_of]  # [in, out]
            model.get_submodule(proj).weight.copy_(w.T.float())
    return model


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    from conftest import make_hf_model

    return make_hf_model(tmp_path_factory.mktemp("float") / "hf", **QUANT_LLAMA)


@pytest.fixture(scope="module", params=["awq", "gptq", "gptq_v2"])
def imported(request, hf_llama, tmp_path_factory):
    """(method, quantized source tensors, TP=1 kiln checkpoint dir) for each pre-quantized format."""
    tmp = tmp_path_factory.mktemp(request.param)
    method, fmt = ("awq", None) if request.param == "awq" else ("gptq", request.param)
    quantized = write_prequantized(hf_llama, tmp / "src", method, fmt or "gptq")
    return request.param, quantized, tmp / "src", convert_checkpoint(tmp / "src", tmp / "ckpt")


def test_config_detects_the_format_as_w4a16_with_zero_point(imported):
    model = LLaMAForCausalLM.from_hugging_face(imported[2])
    qc = model.config.quantization
    assert (qc.quant_algo.value, qc.group_size, qc.has_zero_point) == ("W4A16", GROUP, True)
    assert json.loads((imported[3] / "config.json").read_text())["quantization"]["quant_algo"] == "W4A16"


def test_codes_zeros_and_scales_are_carried_over_exactly(imported):
    _, quantized, _, ckpt_dir = imported
    ckpt = load_file(ckpt_dir / "rank0.safetensors")
    for i in range(2):
        for kiln_name, hf_names in HF_LINEARS.items():
            parts = [quantized[f"model.layers.{i}.{h}"] for h in hf_names]
            prefix = f"transformer.layers.{i}.{kiln_name}."
            assert ckpt[prefix + "weight"].dtype == torch.uint8
            assert torch.equal(unpack(ckpt[prefix + "weight"]), torch.cat([q.T for q, _, _ in parts]))
            assert torch.equal(ckpt[prefix + "zero_point"], torch.cat([z.T for _, z, _ in parts]).float())
            assert torch.equal(ckpt[prefix + "weights_scaling_factor"], torch.cat([s.T for _, _, s in parts]).float())
    assert ckpt["lm_head.weight"].dtype == torch.float32


def test_logits_equal_transformers_with_the_dequantized_weights(hf_llama, imported):
    _, quantized, src, ckpt_dir = imported
    ref = dequantized_hf(hf_llama, quantized)
    with torch.no_grad():
        expected, full = ref(IDS).logits, hf_llama(IDS).logits
        for model in (LLaMAForCausalLM.from_hugging_face(src), PretrainedModel.from_checkpoint(ckpt_dir)):
            assert (model(IDS) - expected).abs().max() <= 1e-4
    assert (expected - full).abs().max() > 1e-3  # the reference really is the quantized model


def test_tp2_conversion_shards_the_imported_tensors(imported, tmp_path):
    _, _, src, ckpt_dir = imported
    out = convert_checkpoint(src, tmp_path / "tp2", tp_size=2)
    full = load_file(ckpt_dir / "rank0.safetensors")
    for rank in range(2):
        model = PretrainedModel.from_checkpoint(out, rank=rank)
        shard = load_file(out / f"rank{rank}.safetensors")
        assert model.mapping == Mapping.of(2, rank=rank)
        for name in model.weight_specs():
            assert torch.equal(shard[name], model.shard_rule(name)(full[name], model.mapping)), name


def test_gptq_with_lm_head_true_imports_lm_head_quantized(hf_llama, tmp_path):
    quantized = write_prequantized(hf_llama, tmp_path / "src", "gptq", lm_head=True)
    ckpt_dir = convert_checkpoint(tmp_path / "src", tmp_path / "ckpt")
    ckpt = load_file(ckpt_dir / "rank0.safetensors")
    q, z, s = quantized["lm_head"]
    assert torch.equal(unpack(ckpt["lm_head.weight"]), q.T) and torch.equal(ckpt["lm_head.zero_point"], z.T.float())
    assert torch.equal(ckpt["lm_head.weights_scaling_factor"], s.T.float())
    model = PretrainedModel.from_checkpoint(ckpt_dir)
    assert model.config.quantization.exclude_modules == ()
    without_head = {k: v for k, v in quantized.items() if k != "lm_head"}
    with torch.no_grad():
        ours, expected = model(IDS), dequantized_hf(hf_llama, quantized)(IDS).logits
        float_head = dequantized_hf(hf_llama, without_head)(IDS).logits
    assert (ours - expected).abs().max() <= 1e-4
    assert (ours - float_head).abs().max() > 1e-3  # lm_head really is the imported int4 one


def test_gptq_lm_head_true_with_tied_embeddings_is_refused(tmp_path):
    from conftest import make_hf_model

    hf = make_hf_model(tmp_path / "hf", tie_word_embeddings=True, **QUANT_LLAMA)
    write_prequantized(hf, tmp_path / "src", "gptq", lm_head=True)
    with pytest.raises(ConfigError, match=r"lm_head: true.*tie_word_embeddings.*--quantize-lm-head"):
        LLaMAForCausalLM.from_hugging_face(tmp_path / "src")


@pytest.mark.parametrize("change, field", [({"version": "gemv"}, "version"), ({"bits": 8}, "bits"),
                                            ({"quant_method": "gptq", "checkpoint_format": "marlin"},
                                             "checkpoint_format"),
                                            ({"quant_method": "bitsandbytes"}, "quant_method")])
def test_unsupported_quantization_configs_are_refused(hf_llama, tmp_path, change, field):
    src = tmp_path / "src"
    write_prequantized(hf_llama, src, "awq")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"].update(change)
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=field):
        LLaMAForCausalLM.from_hugging_face(src)
