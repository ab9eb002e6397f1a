"""OpenAI's gpt-oss (GptOssForCausalLM) converted from tiny transformers models matches it. This file declares the
cases; test_family_parity.py runs the shared checks over them."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from family_checks import shared_family
from kiln.models.gpt_oss.model import GptOssForCausalLM

# initializer_range 0.2: with transformers' 0.02 these tiny models repeat one token, a weak greedy check. gpt-oss's
# layout: sliding and full layers alternating (a window of 8 tokens here, 128 there), YaRN, 4 of 8 experts here.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.2,
            num_local_experts=8, num_experts_per_tok=4, sliding_window=8, pad_token_id=None, bos_token_id=1,
            eos_token_id=2, rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                             "original_max_position_embeddings": 64, "beta_fast": 32.0,
                                             "beta_slow": 1.0, "truncate": False})


CASES = {
    "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM, dict(TINY)),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return shared_family(tmp_path_factory, CASES)


def test_fields_follow_the_source(family):
    config = GptOssForCausalLM.from_hugging_face(family.hf("gpt_oss")[0]).config
    assert config.attention_sinks and config.moe_router_bias and config.moe_expert_bias
    assert (config.hidden_act, config.moe_swiglu_limit, config.moe_top_k) == ("quick_gelu", 7.0, 4)
    assert config.layer_types == ("sliding_attention", "full_attention", "sliding_attention")


def write_mxfp4(tmp_path):
    """OpenAI's release layout: each layer's experts as MXFP4 blocks and scales (random codes, scales 2^-7..2^-2)
    beside float attention, router and biases, with quantization_config mxfp4, in tmp_path / "mxfp4". Returns
    (transformers' float model holding the dequantized experts, the tensors written)."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from conftest import make_tiny_hf

    hf = make_tiny_hf(tmp_path / "float", tf.GptOssConfig, tf.GptOssForCausalLM, **TINY)
    tensors = load_file(tmp_path / "float" / "model.safetensors")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            prefix = f"model.layers.{i}.mlp.experts."
            for name, param in (("gate_up_proj", layer.mlp.experts.gate_up_proj),
                                ("down_proj", layer.mlp.experts.down_proj)):
                experts, rows_in, rows_out = param.shape  # transformers' float layout: [experts, in, out]
                blocks = torch.randint(0, 256, (experts, rows_out, rows_in // 32, 16), generator=g, dtype=torch.uint8)
                scales = torch.randint(120, 126, (experts, rows_out, rows_in // 32), generator=g, dtype=torch.uint8)
                del tensors[prefix + name]
                tensors[prefix + name + "_blocks"], tensors[prefix + name + "_scales"] = blocks, scales
                param.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    (tmp_path / "mxfp4").mkdir()
    save_file(tensors, tmp_path / "mxfp4" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                         "model.layers.*.mlp.router"]}
    (tmp_path / "mxfp4" / "config.json").write_text(json.dumps(config))
    return hf, tensors


def test_mxfp4_checkpoint_reads_as_the_float_model_transformers_dequantizes(tmp_path):
    """kiln reads the release's experts back exactly as transformers' own dequantizer does
    (integrations.mxfp4.convert_moe_packed_tensors): the converted model's logits equal transformers' float model
    holding those dequantized weights; with keep_quantization, as FP8_BLOCK_SCALES codes of the same values."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf, tensors = write_mxfp4(tmp_path)
    g = torch.Generator().manual_seed(5)
    model = GptOssForCausalLM.from_hugging_face(tmp_path / "mxfp4")
    assert model.config.quantization.quant_algo is None  # read as the float model
    ids = torch.randint(0, 128, (1, 16), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)
    gate_up = convert_moe_packed_tensors(tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"],
                                         tensors["model.layers.0.mlp.experts.gate_up_proj_scales"],
                                         dtype=torch.float32)
    assert torch.equal(model.read_weight("transformer.layers.0.mlp.experts.fc.weight"),
                       gate_up[..., 0::2].transpose(1, 2))  # bit for bit

    # --keep-quantization: the experts as FP8_BLOCK_SCALES codes over their groups' powers of two, still exact
    kept = GptOssForCausalLM.from_hugging_face(tmp_path / "mxfp4", keep_quantization=True)
    assert kept.config.quantization.quant_algo.value == "FP8_BLOCK_SCALES" and kept.config.quantization.group_size == 32
    codes = kept.read_weight("transformer.layers.0.mlp.experts.fc.weight")
    scales = kept.read_weight("transformer.layers.0.mlp.experts.fc.weights_scaling_factor")
    assert codes.dtype == torch.float8_e4m3fn and scales.shape == (8, 32, 2)
    assert torch.equal(codes.float() * scales.repeat_interleave(32, dim=-1), gate_up[..., 0::2].transpose(1, 2))
    assert kept.read_weight("transformer.layers.0.attention.qkv.weight").dtype == torch.float32  # (attention: float)
    with torch.no_grad():
        torch.testing.assert_close(kept(ids), hf(ids).logits, rtol=0, atol=1e-4)


def test_clamped_glu_and_large_sinks_match_transformers(tmp_path):
    """The family checks' model keeps its gates under gpt-oss's limit of 7 and its sinks near 0; here the
    experts' gate_up weights are 4 times larger (a share of gate and up values past the limit, checked) and the
    sinks spread over +-4: logits still within 1e-4 of transformers' in float32."""
    from conftest import make_tiny_hf

    hf = make_tiny_hf(tmp_path / "tiny", tf.GptOssConfig, tf.GptOssForCausalLM, **TINY)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape, generator=g) * 2)
            layer.mlp.experts.gate_up_proj.mul_(4)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 128, (1, 24), generator=g)
    seen = []
    hook = hf.model.layers[1].mlp.experts.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        want = hf(ids).logits
    hook.remove()
    gate_up = seen[0] @ hf.model.layers[1].mlp.experts.gate_up_proj[0]
    assert (gate_up.abs() > 7).float().mean() > 0.05  # the clamp is exercised
    with torch.no_grad():
        got = GptOssForCausalLM.from_hugging_face(tmp_path / "hf")(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_kiln_convert_keeps_mxfp4_experts_as_codes(tmp_path, capsys):
    """`kiln convert --keep-quantization` of the release layout writes FP8_BLOCK_SCALES experts (1 byte a weight,
    exact) that build and run as transformers' float model does; a float checkpoint refuses the flag."""
    import kiln.cli
    from safetensors.torch import load_file

    from kiln.models.base import PretrainedModel

    hf, _ = write_mxfp4(tmp_path)
    assert kiln.cli.main(["convert", "--model-dir", str(tmp_path / "mxfp4"), "--output-dir", str(tmp_path / "ckpt"),
                          "--keep-quantization"]) in (0, None)
    ckpt = load_file(tmp_path / "ckpt" / "rank0.safetensors")
    assert ckpt["transformer.layers.1.mlp.experts.proj.weight"].dtype == torch.float8_e4m3fn
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(PretrainedModel.from_checkpoint(tmp_path / "ckpt")(ids), hf(ids).logits,
                                   rtol=0, atol=1e-4)
    assert kiln.cli.main(["convert", "--model-dir", str(tmp_path / "float"), "--output-dir", str(tmp_path / "x"),
                          "--keep-quantization"]) != 0
    assert "--keep-quantization applies to GGUF files and MXFP4 checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
