"""FP8 checkpoints of the Hugging Face ecosystem (quant_method "fp8" per-tensor static / dynamic and block-wise,
compressed-tensors float8 per-tensor / per-channel) import into kiln's FP8 formats. The tests write those
checkpoints themselves, in the published layouts, with the e4m3 quantization written out here."""

import json

import pytest
import torch
from act_reference import e4m3, fake_quant_hf, is_searched_scale
from reference import QUANT_LLAMA, is_decoder_linear
from safetensors.torch import load_file, save_file

from kiln.checkpoint.convert import convert_checkpoint
from kiln.errors import CheckpointError, ConfigError
from kiln.models.base import PretrainedModel

IDS = torch.tensor([[1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8]])
BLOCK = 32
# weight_block_size of the block layouts: 32 inputs, a kiln group size (imported as FP8_BLOCK_SCALES), and 16, not one
BLOCKS = {"block": (BLOCK, BLOCK), "block-narrow": (BLOCK, 16)}
FP8 = {"quant_method": "fp8", "activation_scheme": "static"}
CT = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
      "config_groups": {"group_0": {"targets": ["Linear"],
                                    "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                                "symmetric": True, "dynamic": False},
                                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                          "dynamic": True, "symmetric": True}}}}


def fp8_tensors(w: torch.Tensor, layout: str) -> dict:
    """One linear's weight [out, in] in the source layout: codes and the scale(s) they multiply."""
    w = w.float()
    if layout in BLOCKS:  # one multiplier per [rows, cols] block ("weight_scale_inv")
        (rows, cols), (out, inp) = BLOCKS[layout], w.shape
        blocks = w.reshape(out // rows, rows, inp // cols, cols).abs().amax((1, 3))
        s = blocks / 448
        full = s.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
        return {"weight": e4m3(w / full).to(torch.float8_e4m3fn), "weight_scale_inv": s}
    s = w.abs().amax(1, keepdim=True) / 448 if layout == "channel" else w.abs().amax() / 448
    codes = e4m3(w / s).to(torch.float8_e4m3fn)
    return {"weight": codes, "weight_scale": s.reshape([1] if layout == "tensor1" else list(s.shape))}


def write_fp8_checkpoint(hf_model, out_dir, quantization_config: dict, layout: str, drop: str | None = None,
                         fp8_lm_head: bool = False):
    """Save hf_model with every decoder linear (and lm_head with `fp8_lm_head`) in FP8 (input_scale per linear
    when static); `drop` omits the tensors whose name ends with it. Returns {hf linear name: its tensors}."""
    out_dir.mkdir(parents=True)
    tensors, sources = {}, {}
    for n, (name, p) in enumerate(hf_model.state_dict().items()):
        proj = name[: -len(".weight")]
        decoder_linear = proj.startswith("model.layers.") and proj.endswith("_proj")
        if not ((decoder_linear or fp8_lm_head and proj == "lm_head") and name.endswith(".weight")):
            tensors[name] = p.contiguous()
            continue
        t = fp8_tensors(p, layout)
        t["input_scale"] = torch.tensor(0.01 + 0.001 * n)  # distinct per linear: q, k, v differ
        sources[proj] = t
        tensors.update({f"{proj}.{leaf}": v for leaf, v in t.items()})
    tensors = {k: v.contiguous() for k, v in tensors.items() if drop is None or not k.endswith(drop)}
    save_file(tensors, str(out_dir / "model.safetensors"))
    config = hf_model.config.to_dict()
    config["quantization_config"] = quantization_config
    (out_dir / "config.json").write_text(json.dumps(config))
    return sources


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from conftest import make_hf_model

    return make_hf_model(tmp_path_factory.mktemp("fp8src") / "hf", **QUANT_LLAMA)


def _import(hf_model, tmp_path, config, layout):
    sources = write_fp8_checkpoint(hf_model, tmp_path / "src", config, layout)
    out = convert_checkpoint(tmp_path / "src", tmp_path / "ckpt")
    return sources, load_file(out / "rank0.safetensors"), PretrainedModel.from_checkpoint(out)


def _rows(t: dict, out: int) -> torch.Tensor:
    return t["weight_scale"].float().reshape(-1).expand(out)


@pytest.mark.parametrize("config,layout,algo", [
    (FP8, "tensor0", "FP8"),
    ({**FP8, "activation_scheme": "dynamic"}, "tensor0", "FP8_PER_CHANNEL_PER_TOKEN"),
    (CT, "channel", "FP8_PER_CHANNEL_PER_TOKEN"),
    ({**CT, "config_groups": {"g": {**CT["config_groups"]["group_0"],
                                    "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
                                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                          "dynamic": False}}}}, "tensor1", "FP8"),
], ids=["fp8-static", "fp8-dynamic", "ct-channel-token", "ct-tensor-static"])
def test_codes_and_scales_carry_over_exactly_and_the_model_runs(hf_model, tmp_path, config, layout, algo):
    sources, ckpt, model = _import(hf_model, tmp_path, config, layout)
    assert model.config.quantization.quant_algo.value == algo
    q, k, v = (sources[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv")
    qkv = "transformer.layers.1.attention.qkv."
    assert torch.equal(ckpt[qkv + "weight"].view(torch.uint8),
                       torch.cat([t["weight"] for t in (q, k, v)]).view(torch.uint8))
    assert torch.equal(ckpt[qkv + "weights_scaling_factor"],
                       torch.cat([_rows(t, t["weight"].shape[0]) for t in (q, k, v)]))
    if algo == "FP8":  # one input, one scale: the largest of q, k and v's
        assert ckpt[qkv + "activation_scaling_factor"].item() == max(t["input_scale"].item() for t in (q, k, v))
    else:
        assert qkv + "activation_scaling_factor" not in ckpt
    with torch.no_grad():
        ours, ref = model(IDS), fake_quant_hf(hf_model, ckpt, model.config)(IDS).logits
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("config,layout", [
    (FP8, "tensor0"),
    ({**CT, "ignore": []}, "channel"),
    ({**FP8, "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}, "block"),
], ids=["fp8-static", "ct-channel", "fp8-block"])
def test_an_fp8_lm_head_is_dequantized_into_the_full_precision_lm_head(hf_model, tmp_path, config, layout):
    """A source that stores lm_head in FP8 too: kiln's lm_head (full precision) holds codes times scale, not the
    codes read as plain floats."""
    sources = write_fp8_checkpoint(hf_model, tmp_path / "src", config, layout, fp8_lm_head=True)
    out = convert_checkpoint(tmp_path / "src", tmp_path / "ckpt")
    ckpt = load_file(out / "rank0.safetensors")
    t = sources["lm_head"]
    if layout == "block":
        scale = t["weight_scale_inv"].repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    else:
        scale = t["weight_scale"].float().reshape(-1, 1) if t["weight_scale"].numel() > 1 else t["weight_scale"]
    want = t["weight"].float() * scale
    assert ckpt["lm_head.weight"].dtype == torch.float32 and torch.equal(ckpt["lm_head.weight"], want)
    model = PretrainedModel.from_checkpoint(out)
    ref = fake_quant_hf(hf_model, ckpt, model.config)
    with torch.no_grad():
        ref.lm_head.weight.copy_(want)
        ours, theirs = model(IDS), ref(IDS).logits
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_block_scales_carry_over_exactly_as_fp8_block_scales(hf_model, tmp_path):
    """[32, 32] blocks (as DeepSeek-V3's and Qwen3's [128, 128]): the codes as they are, each block's scale on its
    32 rows, activations per token and group of 32 as the source runs them."""
    sources, ckpt, model = _import(hf_model, tmp_path, {**FP8, "activation_scheme": "dynamic",
                                                        "weight_block_size": [BLOCK, BLOCK]}, "block")
    assert model.config.quantization.quant_algo.value == "FP8_BLOCK_SCALES"
    assert model.config.quantization.group_size == BLOCK
    q, k, v = (sources[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv")
    qkv = "transformer.layers.1.attention.qkv."
    assert torch.equal(ckpt[qkv + "weight"].view(torch.uint8),
                       torch.cat([t["weight"] for t in (q, k, v)]).view(torch.uint8))
    assert torch.equal(ckpt[qkv + "weights_scaling_factor"],
                       torch.cat([t["weight_scale_inv"].repeat_interleave(BLOCK, 0) for t in (q, k, v)]))
    with torch.no_grad():
        ours, ref = model(IDS), fake_quant_hf(hf_model, ckpt, model.config)(IDS).logits
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_block_scales_of_another_width_are_requantized_per_channel_within_one_e4m3_step(hf_model, tmp_path):
    (rows, cols) = BLOCKS["block-narrow"]
    sources, ckpt, model = _import(hf_model, tmp_path, {**FP8, "activation_scheme": "dynamic",
                                                        "weight_block_size": [rows, cols]}, "block-narrow")
    assert model.config.quantization.quant_algo.value == "FP8_PER_CHANNEL_PER_TOKEN"
    t = sources["model.layers.0.mlp.down_proj"]
    s = t["weight_scale_inv"].repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    source_w = t["weight"].float() * s  # dequantized in float32, then re-quantized per output row
    row_scale = ckpt["transformer.layers.0.mlp.proj.weights_scaling_factor"]
    assert is_searched_scale(row_scale, source_w.abs().amax(1))  # kiln's per-channel quantizer
    source_w, row_scale = source_w.double(), row_scale.double()
    ours = ckpt["transformer.layers.0.mlp.proj.weight"].double() * row_scale[:, None]
    bound = torch.maximum(2.0 ** -4 * source_w.abs(), 2.0 ** -10 * row_scale[:, None])
    assert ((ours - source_w).abs() <= bound).all()
    with torch.no_grad():
        assert (model(IDS) - fake_quant_hf(hf_model, ckpt, model.config)(IDS).logits).abs().max() <= 1e-3


def test_checkpoint_without_scales_is_refused_naming_them(hf_model, tmp_path):
    write_fp8_checkpoint(hf_model, tmp_path / "src", FP8, "tensor0", drop=".weight_scale")
    with pytest.raises(CheckpointError,
                       match=r"missing tensor\(s\).*model\.layers\.0\.self_attn\.q_proj\.weight_scale"):
        convert_checkpoint(tmp_path / "src", tmp_path / "ckpt")
    write_fp8_checkpoint(hf_model, tmp_path / "src2", FP8, "tensor0", drop=".input_scale")
    with pytest.raises(CheckpointError, match=r"input_scale"):
        convert_checkpoint(tmp_path / "src2", tmp_path / "ckpt2")


@pytest.mark.parametrize("config,message", [
    ({**CT, "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "tensor_group"},
                                    "input_activations": None}}}, r"weights: this kiln imports float 8-bit"),
    ({**CT, "ignore": ["lm_head", "model.layers.0.mlp.down_proj"]}, r"kept unquantized.*down_proj"),
    ({**FP8, "weight_block_size": [BLOCK, BLOCK]}, r"block-wise FP8 .* dynamic activations"),
    ({"quant_method": "bitsandbytes"}, (r"'bitsandbytes' cannot be imported; this kiln imports "
                                       r"\['awq', 'gptq', 'fp8', 'compressed-tensors', 'mxfp4'\]")),
])
def test_unsupported_fp8_configs_are_refused(hf_model, tmp_path, config, message):
    write_fp8_checkpoint(hf_model, tmp_path / "src", config, "tensor0")
    with pytest.raises(ConfigError, match=message):
        convert_checkpoint(tmp_path / "src", tmp_path / "ckpt")


@pytest.mark.parametrize("config,layout,algo", [
    (FP8, "tensor0", "FP8"),
    (CT, "channel", "FP8_PER_CHANNEL_PER_TOKEN"),
    ({**FP8, "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}, "block", "FP8_BLOCK_SCALES"),
], ids=["fp8-static", "ct-channel-token", "fp8-block"])
def test_an_moe_checkpoint_imports_its_experts_codes_as_fp8_experts(tmp_path, config, layout, algo):
    """An FP8 MoE checkpoint (each expert's linears in FP8, as hub releases hold them, Qwen3-30B-A3B-FP8's in
    [128, 128] blocks): the experts' codes carry over exactly, each expert's scale on its rows (a block's on its
    rows' groups), and kiln's FP8 experts run weight-only (the experts' input scales are not read), so the model
    computes transformers' with attention's activations quantized and the experts' dequantized weights
    (act_reference.fake_quant_hf)."""
    import transformers as tf

    from kiln.models.mixtral.model import MixtralForCausalLM

    torch.manual_seed(0)
    hf = tf.MixtralForCausalLM(tf.MixtralConfig(vocab_size=127, hidden_size=64, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    tensors, sources = {}, {}
    for n, (name, p) in enumerate(load_file(tmp_path / "hf" / "model.safetensors").items()):
        proj = name[: -len(".weight")]
        if not is_decoder_linear(name):
            tensors[name] = p
            continue
        sources[proj] = t = {**fp8_tensors(p, layout), "input_scale": torch.tensor(0.01 + 0.001 * n)}
        tensors.update({f"{proj}.{leaf}": v for leaf, v in t.items()})
    (tmp_path / "src").mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "src" / "model.safetensors"))
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**hf_config, "quantization_config": config}))
    out = convert_checkpoint(tmp_path / "src", tmp_path / "ckpt")
    ckpt, model = load_file(out / "rank0.safetensors"), MixtralForCausalLM.from_checkpoint(out)
    assert model.config.quantization.quant_algo.value == algo
    experts = [sources[f"model.layers.1.block_sparse_moe.experts.{e}.w2"] for e in range(4)]
    proj = "transformer.layers.1.mlp.experts.proj."
    assert torch.equal(ckpt[proj + "weight"].view(torch.uint8),
                       torch.stack([t["weight"] for t in experts]).view(torch.uint8))
    scales = [t["weight_scale_inv"].float().repeat_interleave(BLOCK, 0) if layout == "block" else _rows(t, 64)[:, None]
              for t in experts]
    assert torch.equal(ckpt[proj + "weights_scaling_factor"], torch.stack(scales))
    with torch.no_grad():
        ours, ref = model(IDS), fake_quant_hf(hf, ckpt, model.config)(IDS).logits
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (ours - hf(IDS).logits).abs().max() > 1e-3 * ref.abs().max()
