"""GLM-4.5 from GGUF (llama.cpp's `glm4moe`) through `kiln convert`: a tiny transformers model written as GGUF the way
llama.cpp's converter writes it (q/k rows as Hugging Face has them, NeoX rotary over the first
`rope.dimension_count` dims; experts stacked; the balance bias as `exp_probs_b.bias`; a multi-token-prediction layer
counted in `block_count` and stored last) converts to a model with transformers' logits."""

from __future__ import annotations

import gguf as gguf_py
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from conftest import add_gguf_shape, assert_kept_gguf_computes_the_dequantized_model, finish_gguf, make_tiny_hf
from family_checks import ATOL
from kiln.checkpoint.convert import convert_checkpoint
from kiln.errors import CheckpointError
from kiln.models.base import PretrainedModel

# HF name (after "model.layers.{i}.") -> llama.cpp's (after "blk.{i}.")
LAYER_NAMES = {
    **{f"self_attn.{p}_proj.{kind}": f"attn_{p}.{kind}" for p in "qkv" for kind in ("weight", "bias")},
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    **{f"mlp.shared_experts.{p}_proj.weight": f"ffn_{p}_shexp.weight" for p in ("gate", "up", "down")},
}
EXPERTS = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight", "down_proj": "ffn_down_exps.weight"}
CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.2,
              moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
              first_k_dense_replace=1, attention_bias=True, use_qk_norm=True, n_group=4, topk_group=2,
              routed_scaling_factor=2.5)


def write_glm4_moe_gguf(hf_dir, c, path, linear_type: str = "F32", gating: int = 2) -> None:
    """As llama.cpp's convert_hf_to_gguf.py writes GLM-4.5, plus one multi-token-prediction layer (random) after the
    decoder's, which kiln must not read."""
    sd = load_file(hf_dir / "model.safetensors")
    w = gguf_py.GGUFWriter(str(path), "glm4moe")
    add_gguf_shape(w, c)
    w.add_block_count(c.num_hidden_layers + 1)  # (replaces the shape's: llama.cpp counts the prediction layer)
    w.add_nextn_predict_layers(1)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(int(c.head_dim * c.rope_parameters["partial_rotary_factor"]))
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf_py.LlamaFileType.ALL_F32)
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_leading_dense_block_count(c.first_k_dense_replace)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    w.add_expert_weights_norm(c.norm_topk_prob)
    w.add_expert_gating_func(gguf_py.ExpertGatingFuncType(gating))
    w.add_expert_group_count(c.n_group)
    w.add_expert_group_used_count(c.topk_group)
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
               "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        hf = f"model.layers.{i}."
        tensors.update({f"blk.{i}.{name}": sd[hf + hf_name] for hf_name, name in LAYER_NAMES.items()
                        if hf + hf_name in sd})
        if hf + "mlp.experts.0.gate_proj.weight" in sd:
            tensors.update({f"blk.{i}.{name}": torch.stack([sd[f"{hf}mlp.experts.{e}.{proj}.weight"]
                                                            for e in range(c.n_routed_experts)])
                            for proj, name in EXPERTS.items()})
    last = c.num_hidden_layers - 1  # the prediction layer: the last layer's shapes, other values, and its own parts
    tensors.update({name.replace(f"blk.{last}.", f"blk.{last + 1}."): torch.randn_like(t)
                    for name, t in list(tensors.items()) if name.startswith(f"blk.{last}.")})
    tensors[f"blk.{last + 1}.nextn.eh_proj.weight"] = torch.randn(c.hidden_size, 2 * c.hidden_size)
    finish_gguf(w, tensors, None if linear_type == "F32" else linear_type)


def test_tiny_glm4_moe_gguf_converts_to_transformers_logits(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM, seed=4, **CONFIG)
    path = tmp_path / "tiny.gguf"
    write_glm4_moe_gguf(tmp_path / "hf", hf.config, path)
    model = PretrainedModel.from_checkpoint(convert_checkpoint(path, tmp_path / "ckpt", dtype="float32"))
    c = model.config
    assert c.architecture == "Glm4MoeForCausalLM" and c.num_hidden_layers == 3  # (not the prediction layer)
    assert (c.rotary_dim, c.qk_norm, c.qkv_bias, c.moe_dense_layers) == (16, True, True, (0,))
    assert (c.moe_router, c.moe_num_groups, c.moe_topk_groups, c.moe_routed_scaling) == ("sigmoid", 4, 2, 2.5)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((model(ids) - hf(ids, use_cache=False).logits).abs().max())
    assert diff <= ATOL, f"max logit diff {diff}"


def test_glm4_moe_gguf_keeps_its_q4_experts(tmp_path):
    """--keep-quantization: Q4_0 experts and linears stay int4 and compute what the dequantized conversion does."""
    hf = make_tiny_hf(tmp_path / "hf", tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM, seed=4,
                      **dict(CONFIG, moe_intermediate_size=64, intermediate_size=128))  # (blocks of 32 inputs)
    path = tmp_path / "q4_0.gguf"
    write_glm4_moe_gguf(tmp_path / "hf", hf.config, path, linear_type="Q4_0")
    assert_kept_gguf_computes_the_dequantized_model(path, tmp_path, ATOL)
    kept = load_file(tmp_path / "kept" / "rank0.safetensors")
    assert kept["transformer.layers.1.mlp.experts.fc.weight"].dtype == torch.uint8


def test_a_softmax_gated_glm4_moe_gguf_is_refused_by_name(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM, seed=4, **CONFIG)
    path = tmp_path / "softmax.gguf"
    write_glm4_moe_gguf(tmp_path / "hf", hf.config, path, gating=1)
    with pytest.raises(CheckpointError, match="expert_gating_func"):
        convert_checkpoint(path, tmp_path / "ckpt", dtype="float32")
    assert not (tmp_path / "ckpt").exists()  # nothing written
