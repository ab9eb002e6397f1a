"""Qwen2 and Qwen3 from GGUF (llama.cpp's `qwen2` and `qwen3` architectures) through `kiln convert`: tiny
transformers models written as GGUF the way llama.cpp's converter writes them (q/k rows as Hugging Face has them:
llama.cpp runs Qwen with NeoX rotary) convert to models with transformers' logits. transformers' own GGUF loader
reads each file back to the same weights, so the layout written here is the one it (and llama.cpp) expects."""

from __future__ import annotations

import gguf as gguf_py
import numpy as np
import pytest
import torch
import transformers as tf

from conftest import add_gguf_shape, make_tiny_hf
from family_checks import ATOL
from kiln.checkpoint.convert import convert_checkpoint
from kiln.models.base import PretrainedModel

# HF name (after "model.layers.{i}.") -> llama.cpp's (after "blk.{i}.")
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=1e6, initializer_range=0.2)
# case -> (GGUF architecture, transformers classes, config). Qwen3's head_dim is not hidden / heads (as in the real
# models: key_length in the file), and transformers 5's GGUF loader does not read key_length, so it cannot read
# that file back; the qwen3_even case has the head_dim it assumes.
CASES = {
    "qwen2": ("qwen2", tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(TINY, tie_word_embeddings=False)),
    "qwen2_tied": ("qwen2", tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(TINY, tie_word_embeddings=True)),
    "qwen3": ("qwen3", tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(TINY, head_dim=32, tie_word_embeddings=False)),
    "qwen3_even": ("qwen3", tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(TINY, head_dim=128, tie_word_embeddings=True)),
}


def write_qwen_gguf(hf, path, arch: str) -> None:
    c, sd = hf.config, hf.state_dict()
    w = gguf_py.GGUFWriter(str(path), arch)
    add_gguf_shape(w, c)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf_py.LlamaFileType.ALL_F32)
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        tensors.update({f"blk.{i}.{name}": sd[f"model.layers.{i}.{hf_name}"]
                        for hf_name, name in LAYER_NAMES.items() if f"model.layers.{i}.{hf_name}" in sd})
    for name, t in tensors.items():
        w.add_tensor(name, t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_qwen_gguf_converts_to_transformers_logits(case, tmp_path):
    arch, config_cls, model_cls, config = CASES[case]
    hf = make_tiny_hf(tmp_path / "hf", config_cls, model_cls, seed=4, **config)
    path = tmp_path / "tiny.gguf"
    write_qwen_gguf(hf, path, arch)
    assert ("blk.0.attn_q.bias" in {t.name for t in gguf_py.GGUFReader(path).tensors}) == (arch == "qwen2")

    if case != "qwen3":  # transformers reads the file back to the weights written
        theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
        for name, t in hf.state_dict().items():
            assert torch.equal(theirs.state_dict()[name], t), name

    out = convert_checkpoint(path, tmp_path / "ckpt", dtype="float32")
    model = PretrainedModel.from_checkpoint(out)
    assert model.config.architecture == model_cls.__name__
    assert (model.config.qk_norm, model.config.qkv_bias) == (arch == "qwen3", arch == "qwen2")
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((model(ids) - hf(ids, use_cache=False).logits).abs().max())
    assert diff <= ATOL, f"{case}: max logit diff {diff}"
