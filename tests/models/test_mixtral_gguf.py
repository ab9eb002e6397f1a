"""Mixtral from GGUF: llama.cpp writes it as a `llama` file with experts (`llama.expert_count`), q/k rows permuted
for interleaved rotary as for any `llama` file, the router `ffn_gate_inp` and each projection's experts stacked
(`ffn_gate_exps`, since April 2024) or one tensor an expert (`ffn_gate.{e}`, the files before). Both convert to a
MixtralForCausalLM with transformers' logits; Q4_0 experts stay int4 with --keep-quantization."""

from __future__ import annotations

import gguf as gguf_py
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from conftest import (add_gguf_shape, assert_kept_gguf_computes_the_dequantized_model, finish_gguf,
                      half_to_interleaved, make_tiny_hf)
from family_checks import ATOL
from kiln.checkpoint.convert import convert_checkpoint
from kiln.models.base import PretrainedModel

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.2,
              num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, tie_word_embeddings=False)
LAYER_NAMES = {"self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "block_sparse_moe.gate.weight": "ffn_gate_inp.weight"}
EXPERTS = {"w1": "gate", "w3": "up", "w2": "down"}  # transformers' Mixtral names -> llama.cpp's


def write_mixtral_gguf(hf_dir, c, path, stacked: bool, linear_type: str = "F32") -> None:
    """As llama.cpp's convert_hf_to_gguf.py writes Mixtral (its LlamaModel with experts)."""
    sd = load_file(hf_dir / "model.safetensors")
    w = gguf_py.GGUFWriter(str(path), "llama")
    add_gguf_shape(w, c)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf_py.LlamaFileType.ALL_F32)
    w.add_expert_count(c.num_local_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
               "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        hf, b = f"model.layers.{i}.", f"blk.{i}."
        tensors.update({b + name: sd[hf + hf_name] for hf_name, name in LAYER_NAMES.items()})
        tensors[b + "attn_q.weight"] = half_to_interleaved(sd[hf + "self_attn.q_proj.weight"], c.num_attention_heads)
        tensors[b + "attn_k.weight"] = half_to_interleaved(sd[hf + "self_attn.k_proj.weight"], c.num_key_value_heads)
        for theirs, ours in EXPERTS.items():
            per_expert = [sd[f"{hf}block_sparse_moe.experts.{e}.{theirs}.weight"] for e in range(c.num_local_experts)]
            if stacked:
                tensors[f"{b}ffn_{ours}_exps.weight"] = torch.stack(per_expert)
            else:
                tensors.update({f"{b}ffn_{ours}.{e}.weight": t for e, t in enumerate(per_expert)})
    finish_gguf(w, tensors, None if linear_type == "F32" else linear_type)


@pytest.mark.parametrize("stacked", [True, False])
def test_tiny_mixtral_gguf_converts_to_transformers_logits(tmp_path, stacked):
    hf = make_tiny_hf(tmp_path / "hf", tf.MixtralConfig, tf.MixtralForCausalLM, seed=4, **CONFIG)
    path = tmp_path / "tiny.gguf"
    write_mixtral_gguf(tmp_path / "hf", hf.config, path, stacked)
    model = PretrainedModel.from_checkpoint(convert_checkpoint(path, tmp_path / "ckpt", dtype="float32"))
    c = model.config
    assert c.architecture == "MixtralForCausalLM" and (c.moe_num_experts, c.moe_top_k) == (4, 2)
    assert c.moe_intermediate_size == 64 and c.moe_normalize_topk
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((model(ids) - hf(ids, use_cache=False).logits).abs().max())
    assert diff <= ATOL, f"max logit diff {diff}"


def test_mixtral_gguf_keeps_its_q4_experts(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", tf.MixtralConfig, tf.MixtralForCausalLM, seed=4, **CONFIG)
    path = tmp_path / "q4_0.gguf"
    write_mixtral_gguf(tmp_path / "hf", hf.config, path, stacked=True, linear_type="Q4_0")
    assert_kept_gguf_computes_the_dequantized_model(path, tmp_path, ATOL)
    assert load_file(tmp_path / "kept" / "rank0.safetensors")["transformer.layers.1.mlp.experts.fc.weight"].dtype \
        == torch.uint8
