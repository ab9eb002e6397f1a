"""compressed-tensors checkpoints (llm-compressor's format, and most int4 / int8 releases on the Hugging Face hub)
import into kiln's W4A16, W8A16 and W8A8 with their codes and scales carried over exactly. The checkpoints are
written by the `compressed_tensors` package itself (its compressor packs, its config is the one it writes); the
reference is that package's own decompression of the same model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from act_reference import assert_logits_equal_fake_quant_hf
from reference import HF_LINEARS, QUANT_LLAMA, unpack
from safetensors.torch import load_file, save_file
from test_import_awq import pack_along_last
from test_import_gptq_act_order import SHARED_INPUT, act_order_int4

from kiln.checkpoint.convert import convert_checkpoint
from kiln.errors import CheckpointError, ConfigError
from kiln.models.base import PretrainedModel
from kiln.models.llama.model import LLaMAForCausalLM

ct = pytest.importorskip("compressed_tensors", reason="the compressed-tensors package writes these checkpoints "
                                                      "(pip install -e '.[test]')")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config)
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

GROUP = 64  # TP=2 splits the attention output's 128 inputs into 64 per rank: whole groups
IDS = torch.tensor([[1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8]])
INT8_ROWS = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)

FP8_GROUPS = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="group", group_size=GROUP,
                              dynamic=True)
INT4 = dict(num_bits=4, type="int", strategy="group", group_size=GROUP)
INT8 = dict(num_bits=8, type="int", symmetric=True, strategy="channel")

# name -> (weights' QuantizationArgs, input activations' or None, compressed-tensors format, kiln algorithm)
SCHEMES = {
    "w4a16": (dict(INT4, symmetric=True), None, "pack-quantized", "W4A16"),
    "w4a16_asym": (dict(INT4, symmetric=False), None, "pack-quantized", "W4A16"),
    "w8a16": (INT8, None, "pack-quantized", "W8A16"),
    "w8a8": (INT8, INT8_ROWS, "int-quantized", "W8A8_SQ_PER_CHANNEL"),
    # llm-compressor's FP8_BLOCK (Qwen3 and DeepSeek FP8 releases), with blocks of GROUP x GROUP
    "fp8_block": (dict(num_bits=8, type="float", symmetric=True, strategy="block", block_structure=[GROUP, GROUP]),
                  FP8_GROUPS, "float-quantized", "FP8_BLOCK_SCALES"),
}


def write_compressed(hf_model, out_dir, name: str):
    """Save a copy of hf_model quantized by SCHEMES[name] (min-max scales, lm_head ignored) as compressed-tensors
    writes it; return the package's own decompression of it (a transformers model with dense weights)."""
    weights, acts, fmt, _ = SCHEMES[name]
    args = QuantizationArgs(**weights)
    model = copy.deepcopy(hf_model)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=acts)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    _set_min_max_qparams(model, args)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)
    compressor.decompress_model(model)
    return model


def _set_min_max_qparams(model, args) -> None:
    """Each quantized module's scale (and zero) from its weights' min and max, as the tests' checkpoints use."""
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        scale, zero = calculate_qparams(*_ranges(module.weight.data, args), args)
        module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero.reshape(module.weight_zero_point.shape).to(
                module.weight_zero_point.dtype)


def write_compressed_moe(hf_dir, out_dir, name: str) -> dict:
    """hf_dir's saved MoE checkpoint, one tensor set per expert as transformers 4 and the hub hold them, quantized
    by SCHEMES[name] (routers and lm_head ignored, as llm-compressor's MoE recipes do) and written as
    compressed-tensors writes it; return its tensors as the package decompresses them (float weights)."""
    weights, acts, fmt, _ = SCHEMES[name]
    args = QuantizationArgs(**weights)
    root = torch.nn.Module()  # the saved names, an nn.Linear for each decoder matrix (transformers 5 stacks experts)
    for tensor_name, t in load_file(hf_dir / "model.safetensors").items():
        *path, leaf, kind = tensor_name.split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        if tensor_name.startswith("model.layers.") and t.dim() == 2:
            parent.add_module(leaf, torch.nn.Linear(t.shape[1], t.shape[0], bias=False))
            getattr(parent, leaf).weight.data = t.clone()
        else:
            parent.add_module(leaf, torch.nn.Module())
            getattr(parent, leaf).register_parameter(kind, torch.nn.Parameter(t.clone(), requires_grad=False))
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=acts)
    ignore = ["lm_head", "re:.*block_sparse_moe.gate$"]
    apply_quantization_config(root, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore))
    _set_min_max_qparams(root, args)
    compressor = ModelCompressor.from_pretrained_model(root, quantization_format=fmt)
    compressor.compress_model(root)
    out_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in root.state_dict().items()}, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text((hf_dir / "config.json").read_text())
    compressor.update_config(out_dir)
    compressor.decompress_model(root)
    return {k: v for k, v in root.state_dict().items() if not k.endswith(("_scale", "_zero_point", "g_idx"))}


def _ranges(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of each set of weights that shares a scale under args' strategy."""
    if args.strategy == "group":
        w = w.reshape(w.shape[0], -1, GROUP)
    elif args.strategy == "block":
        rows, cols = args.block_structure
        w = w.reshape(w.shape[0] // rows, rows, w.shape[1] // cols, cols).transpose(1, 2).flatten(2)
    return w.amin(-1), w.amax(-1)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    from conftest import make_hf_model

    return make_hf_model(tmp_path_factory.mktemp("float") / "hf", **QUANT_LLAMA)


@pytest.fixture(scope="module", params=list(SCHEMES))
def imported(request, hf_llama, tmp_path_factory):
    """(scheme name, the package's decompressed model, source dir, TP=1 kiln checkpoint dir)."""
    tmp = tmp_path_factory.mktemp(request.param)
    reference = write_compressed(hf_llama, tmp / "src", request.param)
    return request.param, reference, tmp / "src", convert_checkpoint(tmp / "src", tmp / "ckpt")


def _kiln_weight(t: dict) -> torch.Tensor:
    """A kiln linear's float weight, from its checkpoint tensors (int4 groups of GROUP, int8 rows, or e4m3 codes
    with a scale per row and group of GROUP)."""
    s = t["weights_scaling_factor"].double()
    if t["weight"].dtype == torch.float8_e4m3fn:
        return t["weight"].double() * s[:, torch.arange(t["weight"].shape[1]) // GROUP]
    if t["weight"].dtype == torch.uint8:
        g = torch.arange(t["weight"].shape[1] * 2) // GROUP
        z = t["zero_point"].double() if "zero_point" in t else torch.full_like(s, 8.0)
        return (unpack(t["weight"]).double() - z[:, g]) * s[:, g]
    return t["weight"].double() * s[:, None]


def test_config_records_the_kiln_format(imported):
    name, _, src, ckpt_dir = imported
    source = json.loads((src / "config.json").read_text())["quantization_config"]
    assert source["quant_method"] == "compressed-tensors" and source["format"] == SCHEMES[name][2]
    qc = json.loads((ckpt_dir / "config.json").read_text())["quantization"]
    assert qc["quant_algo"] == SCHEMES[name][3]
    if qc["quant_algo"] in ("W4A16", "FP8_BLOCK_SCALES"):
        assert (qc["group_size"], qc["has_zero_point"]) == (GROUP, name.endswith("asym"))
    assert qc["exclude_modules"] == ["lm_head"]


def test_weights_are_the_packages_decompression_exactly(imported):
    """Every kiln linear dequantizes to the weights compressed_tensors decompresses, bit for bit (each is one
    product of a code and a float32 scale), and its codes are integers of the source's range."""
    name, reference, _, ckpt_dir = imported
    ckpt = load_file(ckpt_dir / "rank0.safetensors")
    for i in range(2):
        for kiln_name, hf_names in HF_LINEARS.items():
            t = {k.rsplit(".", 1)[1]: v for k, v in ckpt.items()
                 if k.rsplit(".", 1)[0] == f"transformer.layers.{i}.{kiln_name}"}
            expected = torch.cat([reference.get_submodule(f"model.layers.{i}.{h}").weight for h in hf_names])
            assert torch.equal(_kiln_weight(t).float(), expected.float()), (name, i, kiln_name)
            # W8A8's row-parallel layers hold kiln's prequant scale; the source's smoothing is in its weights, so 1
            has_prequant = name == "w8a8" and kiln_name in ("attention.dense", "mlp.proj")
            assert ("prequant_scaling_factor" in t) == has_prequant
            if has_prequant:
                assert bool((t["prequant_scaling_factor"] == 1).all())
    assert ckpt["lm_head.weight"].dtype == torch.float32


def test_logits_equal_the_packages_decompressed_model(hf_llama, imported):
    name, reference, src, ckpt_dir = imported
    if SCHEMES[name][1] is not None:
        # quantized activations too: the reference is float math over the checkpoint's tensors, each input
        # quantized per token (int8) or per token and group (e4m3) (act_reference), and the tensors themselves
        # are the package's (the test above).
        assert_logits_equal_fake_quant_hf(hf_llama, ckpt_dir, IDS)
        return
    with torch.no_grad():
        expected, full = reference(IDS).logits, hf_llama(IDS).logits
        for model in (LLaMAForCausalLM.from_hugging_face(src), PretrainedModel.from_checkpoint(ckpt_dir)):
            assert (model(IDS) - expected).abs().max() <= 1e-4
    assert (expected - full).abs().max() > 1e-3  # the reference really is the quantized model


def test_tp2_conversion_shards_the_imported_tensors(imported, tmp_path):
    _, _, src, ckpt_dir = imported
    out = convert_checkpoint(src, tmp_path / "tp2", tp_size=2)
    full = load_file(ckpt_dir / "rank0.safetensors")
    shards = [load_file(out / f"rank{rank}.safetensors") for rank in range(2)]
    for name in ("transformer.layers.0.attention.dense.weight", "transformer.layers.0.mlp.proj.weight"):
        assert torch.equal(torch.cat([s[name] for s in shards], dim=1), full[name])  # row-parallel: input halves
    name = "transformer.layers.1.mlp.fc.weights_scaling_factor"
    assert torch.equal(torch.cat([s[name] for s in shards], dim=0), full[name])  # column-parallel: output halves


def _with_quantization_config(src, dst, change) -> None:
    """dst: a copy of the source dir whose config.json's quantization_config went through `change`."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    change(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config))


def _group(qc: dict) -> dict:
    return qc["config_groups"]["group_0"]


BAD_CONFIGS = {
    "two bits": (lambda qc: _group(qc)["weights"].update(num_bits=2), r"integer weights of 2 bits.*imports "
                 r"pack-quantized int4 by group \(W4A16\)"),
    "group size": (lambda qc: _group(qc)["weights"].update(group_size=48), r"weights.group_size is 48; kiln's "
                   r"W4A16 holds groups of 32, 64 or 128"),
    "a decoder layer ignored": (lambda qc: qc.update(ignore=["lm_head", "model.layers.0.mlp.down_proj"]),
                                r"layers kept unquantized \['model.layers.0.mlp.down_proj'\] are not supported"),
    "act order": (lambda qc: _group(qc)["weights"].update(actorder="columns"), r"actorder 'columns' is not one of"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_format_kiln_cannot_import_is_refused_by_name(hf_llama, tmp_path, case):
    src = tmp_path / "src"
    write_compressed(hf_llama, src, "w4a16")
    change, message = BAD_CONFIGS[case]
    _with_quantization_config(src, tmp_path / "bad", change)
    with pytest.raises(ConfigError, match=message):
        convert_checkpoint(tmp_path / "bad", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_routers_a_source_ignores_are_accepted_and_a_decoder_linear_is_not():
    """llm-compressor's MoE recipes leave the routers unquantized (kiln keeps them float too); as names or as "re:"
    patterns, Mixtral's and Qwen's."""
    from kiln.quantization.hf_import import check_ignored

    check_ignored(["lm_head", "re:.*lm_head", "model.layers.0.mlp.gate", "re:.*mlp.gate$",
                   "model.layers.1.block_sparse_moe.gate", "re:.*shared_expert_gate$"], "config.json")
    for linear in ("model.layers.0.mlp.gate_proj", "re:.*mlp.gate_proj$", "model.layers.0.mlp.experts.0.gate_proj"):
        with pytest.raises(ConfigError, match="layers kept unquantized"):
            check_ignored(["lm_head", linear], "config.json")


def test_a_missing_scale_tensor_is_named_and_nothing_is_written(hf_llama, tmp_path):
    src = tmp_path / "src"
    write_compressed(hf_llama, src, "w4a16_asym")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight_zero_point"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight_zero_point"):
        convert_checkpoint(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_group_act_order_imports_as_gptq_act_order(hf_llama, tmp_path):
    """actorder "group" (older llm-compressor GPTQ) keeps each input channel where it was and stores its group as
    weight_g_idx. The package no longer writes it, so the act-order quantization is written out here
    (test_import_gptq_act_order's) and stored in the compressed-tensors layout of the asymmetric checkpoint."""
    src = tmp_path / "src"
    write_compressed(hf_llama, src, "w4a16_asym")
    tensors, reference = load_file(src / "model.safetensors"), copy.deepcopy(hf_llama)
    g, perms = torch.Generator().manual_seed(0), {}
    for name, w in hf_llama.state_dict().items():
        proj = name[: -len(".weight")]
        if proj + ".weight_packed" not in tensors:
            continue
        layer, kind = proj.rsplit(".", 2)[0], proj.rsplit(".", 1)[1]
        perm = perms.setdefault((layer, SHARED_INPUT.get(kind, kind)), torch.randperm(w.shape[1], generator=g))
        q, z, s, g_idx = act_order_int4(w.T, perm)  # [in, out] codes in source order, [groups, out] zeros, scales
        tensors[proj + ".weight_packed"] = pack_along_last(q.T, list(range(8)))
        tensors[proj + ".weight_zero_point"] = pack_along_last(z, list(range(8))).T.contiguous()
        tensors[proj + ".weight_scale"] = s.T.float().contiguous()
        tensors[proj + ".weight_g_idx"] = g_idx
        with torch.no_grad():
            gi = g_idx.long()
            reference.get_submodule(proj).weight.copy_(((q.double() - z.double()[gi]) * s.double()[gi]).T.float())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(src / "model.safetensors"))
    _with_quantization_config(src, tmp_path / "act", lambda qc: _group(qc)["weights"].update(actorder="group"))

    ckpt = convert_checkpoint(tmp_path / "act", tmp_path / "ckpt")
    assert json.loads((ckpt / "config.json").read_text())["quantization"]["quant_algo"] == "W4A16_GPTQ"
    with torch.no_grad():
        expected, full = reference(IDS).logits, hf_llama(IDS).logits
        assert (PretrainedModel.from_checkpoint(ckpt)(IDS) - expected).abs().max() <= 1e-4
    assert (expected - full).abs().max() > 1e-3


def test_block_fp8_with_activations_kiln_would_not_match_is_refused(hf_llama, tmp_path):
    """FP8_BLOCK_SCALES quantizes activations per token and group of the block's width; a source whose activations
    go per token (or in other groups) would run differently, so it is refused rather than imported inexactly."""
    src = tmp_path / "src"
    write_compressed(hf_llama, src, "fp8_block")
    _with_quantization_config(src, tmp_path / "bad", lambda qc: _group(qc)["input_activations"].update(
        strategy="token", group_size=None))
    with pytest.raises(ConfigError, match=r"imported with dynamic activations in groups of the block's width \(64\)"):
        convert_checkpoint(tmp_path / "bad", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


KV_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def _with_kv_scales(src, dst, scheme: dict, scales: dict) -> None:
    """dst: src with `kv_cache_scheme` and each layer's self_attn.k_scale / v_scale (scales: layer -> (k, v)); a
    float src gets a quantization_config of no config groups (its KV cache alone quantized)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config.setdefault("quantization_config", {"quant_method": "compressed-tensors", "config_groups": {}})
    config["quantization_config"]["kv_cache_scheme"] = scheme
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(dst / "model.safetensors")
    for i, (k, v) in scales.items():  # a 0-d and a 1-element tensor: both forms are in the wild
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(k)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([v])
    save_file(tensors, str(dst / "model.safetensors"))


@pytest.mark.parametrize("weights,kv_type,kv_algo", [("w8a16", "float", "FP8"), ("w4a16", "int", "INT8"),
                                                      (None, "float", "FP8")])
def test_kv_cache_scheme_imports_each_layers_scales(hf_llama, tmp_path, weights, kv_type, kv_algo):
    """kv_cache_scheme's static per-tensor scales (self_attn.k_scale, v_scale) become kiln's quantized KV cache
    with the same [s_k, s_v] per layer, beside quantized weights or (None) over float ones."""
    src = tmp_path / "src"
    if weights is None:  # a float checkpoint that quantizes its KV cache alone
        hf_llama.save_pretrained(src)
    else:
        write_compressed(hf_llama, src, weights)
    scales = {0: (0.012, 0.009), 1: (0.021, 0.007)}  # the tiny model's keys reach ~4: well inside 448 s
    _with_kv_scales(src, tmp_path / "kv", dict(KV_SCHEME, type=kv_type), scales)

    ckpt = convert_checkpoint(tmp_path / "kv", tmp_path / "ckpt")
    qc = json.loads((ckpt / "config.json").read_text())["quantization"]
    assert (qc["quant_algo"], qc["kv_cache_quant_algo"]) == (weights and SCHEMES[weights][3], kv_algo)
    tensors = load_file(ckpt / "rank0.safetensors")
    for i, (k, v) in scales.items():
        assert torch.equal(tensors[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"],
                           torch.tensor([k, v], dtype=torch.float32))
    without = convert_checkpoint(src, tmp_path / "plain")
    with torch.no_grad():  # the reference forward emulates the cache (test_kv_cache_quant), so the scales show
        diff = (PretrainedModel.from_checkpoint(ckpt)(IDS) - PretrainedModel.from_checkpoint(without)(IDS)).abs()
    assert diff.max() > 1e-4


def test_kv_cache_scheme_kiln_cannot_hold_is_refused(hf_llama, tmp_path):
    src = tmp_path / "src"
    write_compressed(hf_llama, src, "w8a16")
    _with_kv_scales(src, tmp_path / "kv", dict(KV_SCHEME, strategy="attn_head"), {0: (0.01, 0.01), 1: (0.01, 0.01)})
    with pytest.raises(ConfigError, match=r"kv_cache_scheme: .* cannot be imported; kiln's KV cache takes static, "
                                          r"symmetric, per-tensor scales"):
        convert_checkpoint(tmp_path / "kv", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("name", ["w4a16", "w4a16_asym", "w8a16"])
def test_an_moe_checkpoint_imports_its_experts_as_quantized_experts(name, tmp_path):
    """llm-compressor's MoE checkpoints (routers ignored, each expert's linears compressed like any other) import
    as kiln's W4A16 or W8A16 experts and compute what transformers computes on the package's decompression."""
    import transformers as tf

    from kiln.models.mixtral.model import MixtralForCausalLM

    torch.manual_seed(0)
    hf = tf.MixtralForCausalLM(tf.MixtralConfig(vocab_size=127, hidden_size=64, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    decompressed = write_compressed_moe(tmp_path / "hf", tmp_path / "ct", name)
    (tmp_path / "ref").mkdir()
    save_file({k: v.contiguous() for k, v in decompressed.items()}, str(tmp_path / "ref" / "model.safetensors"))
    (tmp_path / "ref" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32).eval()
    model = MixtralForCausalLM.from_hugging_face(tmp_path / "ct", dtype="float32")
    experts = model.weight_specs()["transformer.layers.0.mlp.experts.fc.weight"]
    assert experts == ((torch.int8, (4, 64, 64)) if name == "w8a16" else (torch.uint8, (4, 64, 32)))
    with torch.no_grad():
        ours, theirs = model(IDS), ref(IDS).logits
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours - hf(IDS).logits).abs().max() > 1e-4  # the comparison would see a model that was not quantized
