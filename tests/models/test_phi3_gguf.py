"""Phi-3 from GGUF (llama.cpp's `phi3` architecture) through `kiln convert`: tiny transformers Phi-3 models written
as llama.cpp's converter writes them (fused attn_qkv and ffn_up = [gate; up], NeoX rotary so no q/k permutation,
longrope as two factor tensors) convert to models with transformers' logits; transformers' own GGUF loader reads
the plain file back to the same weights."""

from __future__ import annotations

import gguf as gguf_py
import pytest
import torch
import transformers as tf

from conftest import add_gguf_shape, assert_kept_gguf_computes_the_dequantized_model, finish_gguf, make_tiny_hf
from family_checks import ATOL
from kiln.checkpoint.convert import convert_checkpoint
from kiln.models.base import PretrainedModel
from test_phi3 import TINY, longrope

# HF name (after "model.layers.{i}.") -> llama.cpp's (after "blk.{i}.")
LAYER_NAMES = {"self_attn.qkv_proj.weight": "attn_qkv.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "mlp.gate_up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
               "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"}
# case -> (config, whether transformers' GGUF loader reads it back: it does not read longrope's factor tensors)
CASES = {
    "sliding": (dict(TINY, head_dim=16, sliding_window=5), True),
    "longrope": (dict(TINY, head_dim=16, **longrope(64)), False),
}


def write_phi3_gguf(hf, path, linear_type: str = "F32") -> None:
    """The decoder's 2-D weights in `linear_type` (quantized by the gguf package)."""
    c, sd = hf.config, hf.state_dict()
    w = gguf_py.GGUFWriter(str(path), "phi3")
    add_gguf_shape(w, c)
    rope = c.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_pad_token_id(c.pad_token_id)  # (transformers' Phi3Config default, 32000, is past the tiny vocabulary)
    if c.sliding_window:
        w.add_sliding_window(c.sliding_window)
    w.add_file_type(gguf_py.LlamaFileType.ALL_F32)
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
               "output.weight": sd["lm_head.weight"]}
    if rope["rope_type"] == "longrope":  # as llama.cpp's Phi3MiniModel writes it
        w.add_float32("phi3.rope.scaling.attn_factor", rope.get("attention_factor") or hf_attention_factor(c))
        w.add_uint32("phi3.rope.scaling.original_context_length", rope["original_max_position_embeddings"])
        tensors["rope_factors_long.weight"] = torch.tensor(rope["long_factor"])
        tensors["rope_factors_short.weight"] = torch.tensor(rope["short_factor"])
    for i in range(c.num_hidden_layers):
        tensors.update({f"blk.{i}.{name}": sd[f"model.layers.{i}.{hf_name}"] for hf_name, name in LAYER_NAMES.items()})
    finish_gguf(w, tensors, None if linear_type == "F32" else linear_type)


def hf_attention_factor(c) -> float:
    """transformers' longrope attention factor when the config gives none (sqrt(1 + ln(s) / ln(original)))."""
    import math

    scale = c.max_position_embeddings / c.rope_parameters["original_max_position_embeddings"]
    return math.sqrt(1 + math.log(scale) / math.log(c.rope_parameters["original_max_position_embeddings"]))


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_phi3_gguf_converts_to_transformers_logits(case, tmp_path):
    config, read_back = CASES[case]
    hf = make_tiny_hf(tmp_path / "hf", tf.Phi3Config, tf.Phi3ForCausalLM, seed=5, **config)
    path = tmp_path / "tiny.gguf"
    write_phi3_gguf(hf, path)
    if read_back:
        theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
        for name, t in hf.state_dict().items():
            assert torch.equal(theirs.state_dict()[name], t), name

    model = PretrainedModel.from_checkpoint(convert_checkpoint(path, tmp_path / "ckpt", dtype="float32"))
    assert model.config.architecture == "Phi3ForCausalLM"
    assert model.config.sliding_window == config.get("sliding_window")
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))  # 20 > the 5-token window
    with torch.no_grad():
        diff = float((model(ids) - hf(ids, use_cache=False).logits).abs().max())
    assert diff <= ATOL, f"{case}: max logit diff {diff}"


def test_phi3_gguf_keeps_its_fused_q4_linears(tmp_path):
    """--keep-quantization splits the fused ffn_up's codes, scales and zeros into kiln's fc and gate as it splits the
    weights, and the kept model computes the dequantized conversion's logits."""
    hf = make_tiny_hf(tmp_path / "hf", tf.Phi3Config, tf.Phi3ForCausalLM, seed=5, **CASES["sliding"][0])
    path = tmp_path / "q4_0.gguf"
    write_phi3_gguf(hf, path, linear_type="Q4_0")
    assert_kept_gguf_computes_the_dequantized_model(path, tmp_path, ATOL)
