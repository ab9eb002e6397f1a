"""Qwen2, Qwen3 and their MoE variants from GGUF (llama.cpp's `qwen2`, `qwen3`, `qwen2moe` and `qwen3moe`) through
`kiln convert`: tiny transformers models written as GGUF the way llama.cpp's converter writes them (q/k rows as
Hugging Face has them: llama.cpp runs Qwen with NeoX rotary; each projection's experts stacked in one tensor)
convert to models with transformers' logits. transformers' own GGUF loader reads the files whose sizes it can
read back to the same weights, so the layout written here is the one it (and llama.cpp) expects."""

from __future__ import annotations

import gguf as gguf_py
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from conftest import add_gguf_shape, assert_kept_gguf_computes_the_dequantized_model, finish_gguf, make_tiny_hf
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
MOE = dict(num_experts=4, num_experts_per_tok=2)
# case -> (GGUF architecture, transformers classes, config, whether transformers' GGUF loader can read it back).
# That loader does not read key_length, expert_feed_forward_length, expert_shared_feed_forward_length or a dense
# layer's place, so it reads back only files whose sizes are its defaults (head_dim 128, Qwen2-MoE's 1408 and 5632,
# Qwen3-MoE's 768); the other cases have the sizes real models have that it cannot read.
CASES = {
    "qwen2": ("qwen2", tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(TINY, tie_word_embeddings=False), True),
    "qwen2_tied": ("qwen2", tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(TINY, tie_word_embeddings=True), True),
    "qwen3": ("qwen3", tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(TINY, head_dim=32), False),
    # YaRN, as llama.cpp writes Qwen2.5's long-context setting (rope.scaling.type, factor, original context)
    "qwen2_yarn": ("qwen2", tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(TINY, rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=16)), True),
    "qwen3_default_head": ("qwen3", tf.Qwen3Config, tf.Qwen3ForCausalLM,
                           dict(TINY, head_dim=128, tie_word_embeddings=True), True),
    # experts with a sigmoid-gated shared expert, top-k weights not renormalized (llama.cpp's rule for qwen2moe)
    "qwen2moe": ("qwen2moe", tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                 dict(TINY, **MOE, moe_intermediate_size=1408, shared_expert_intermediate_size=5632), True),
    "qwen2moe_dense_layer": ("qwen2moe", tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                             dict(TINY, **MOE, num_hidden_layers=3, mlp_only_layers=[1], moe_intermediate_size=32,
                                  shared_expert_intermediate_size=48), False),
    # q/k norms, top-k weights renormalized (llama.cpp's rule for qwen3moe)
    "qwen3moe": ("qwen3moe", tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                 dict(TINY, **MOE, head_dim=128, moe_intermediate_size=768, norm_topk_prob=True), True),
}
# Qwen-MoE per-expert HF names (after "mlp.") -> llama.cpp's stacked tensor (after "blk.{i}.")
EXPERTS = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight", "down_proj": "ffn_down_exps.weight"}
SHARED = {"shared_expert.gate_proj.weight": "ffn_gate_shexp.weight", "shared_expert.up_proj.weight":
          "ffn_up_shexp.weight", "shared_expert.down_proj.weight": "ffn_down_shexp.weight",
          "gate.weight": "ffn_gate_inp.weight"}


def write_qwen_gguf(hf_dir, c, path, arch: str, linear_type: str = "F32") -> None:
    """As llama.cpp's convert_hf_to_gguf.py writes it, from the saved checkpoint (one tensor per expert there);
    the decoder's 2-D weights in `linear_type` (quantized by the gguf package)."""
    sd = load_file(hf_dir / "model.safetensors")
    w = gguf_py.GGUFWriter(str(path), arch)
    add_gguf_shape(w, c)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if c.rope_parameters["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf_py.RopeScalingType.YARN)
        w.add_rope_scaling_factor(c.rope_parameters["factor"])
        w.add_rope_scaling_orig_ctx_len(c.rope_parameters["original_max_position_embeddings"])
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf_py.LlamaFileType.ALL_F32)
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        hf = f"model.layers.{i}."
        tensors.update({f"blk.{i}.{name}": sd[hf + hf_name] for hf_name, name in LAYER_NAMES.items()
                        if hf + hf_name in sd})
        tensors.update({f"blk.{i}.{name}": sd[hf + "mlp." + hf_name] for hf_name, name in SHARED.items()
                        if hf + "mlp." + hf_name in sd})
        if hf + "mlp.shared_expert_gate.weight" in sd:  # a vector in GGUF
            tensors[f"blk.{i}.ffn_gate_inp_shexp.weight"] = sd[hf + "mlp.shared_expert_gate.weight"].reshape(-1)
        if hf + "mlp.experts.0.gate_proj.weight" in sd:
            tensors.update({f"blk.{i}.{name}": torch.stack([sd[f"{hf}mlp.experts.{e}.{proj}.weight"]
                                                            for e in range(c.num_experts)])
                            for proj, name in EXPERTS.items()})
    if arch.endswith("moe"):
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        if getattr(c, "shared_expert_intermediate_size", 0):
            w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    finish_gguf(w, tensors, None if linear_type == "F32" else linear_type)


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_qwen_gguf_converts_to_transformers_logits(case, tmp_path):
    arch, config_cls, model_cls, config, read_back = CASES[case]
    hf = make_tiny_hf(tmp_path / "hf", config_cls, model_cls, seed=4, **config)
    path = tmp_path / "tiny.gguf"
    write_qwen_gguf(tmp_path / "hf", hf.config, path, arch)
    assert ("blk.0.attn_q.bias" in {t.name for t in gguf_py.GGUFReader(path).tensors}) == arch.startswith("qwen2")

    if read_back:  # transformers reads the file back to the weights written
        theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
        for name, t in hf.state_dict().items():
            assert torch.equal(theirs.state_dict()[name], t), name

    out = convert_checkpoint(path, tmp_path / "ckpt", dtype="float32")
    model = PretrainedModel.from_checkpoint(out)
    assert model.config.architecture == model_cls.__name__
    assert (model.config.qk_norm, model.config.qkv_bias) == (arch.startswith("qwen3"), arch.startswith("qwen2"))
    assert model.config.moe_dense_layers == tuple(config.get("mlp_only_layers", ()))
    if arch.endswith("moe"):
        assert model.config.moe_normalize_topk == (arch == "qwen3moe")
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((model(ids) - hf(ids, use_cache=False).logits).abs().max())
    assert diff <= ATOL, f"{case}: max logit diff {diff}"


def test_qwen_gguf_keeps_its_q4_linears(tmp_path):
    """--keep-quantization on a Qwen2 file (q/k rows as Hugging Face has them): its Q4_1 linears become W4A16 and
    the model computes what the dequantized conversion computes."""
    arch, config_cls, model_cls, config, _ = CASES["qwen2"]
    hf = make_tiny_hf(tmp_path / "hf", config_cls, model_cls, seed=4, **config)
    path = tmp_path / "q4_1.gguf"
    write_qwen_gguf(tmp_path / "hf", hf.config, path, arch, linear_type="Q4_1")
    plain = assert_kept_gguf_computes_the_dequantized_model(path, tmp_path, ATOL)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((plain(ids) - hf(ids, use_cache=False).logits).abs().max()) > 10 * ATOL  # Q4_1 shows


@pytest.mark.parametrize("case", ["qwen3moe", "qwen2moe_dense_layer"])
def test_qwen_moe_gguf_keeps_its_q4_experts(case, tmp_path):
    """--keep-quantization on MoE files whose stacked experts are Q4_0 too: the experts stay int4 (W4A16 experts,
    group 32), not only the dense linears, and the model computes what the dequantized conversion computes."""
    arch, config_cls, model_cls, config, _ = CASES[case]
    if case == "qwen2moe_dense_layer":  # blocks of 32 along every expert's inputs
        config = dict(config, moe_intermediate_size=64, shared_expert_intermediate_size=64)
    hf = make_tiny_hf(tmp_path / "hf", config_cls, model_cls, seed=4, **config)
    path = tmp_path / "q4_0.gguf"
    write_qwen_gguf(tmp_path / "hf", hf.config, path, arch, linear_type="Q4_0")
    assert_kept_gguf_computes_the_dequantized_model(path, tmp_path, ATOL)
    kept = load_file(tmp_path / "kept" / "rank0.safetensors")
    experts = [n for n in kept if ".mlp.experts." in n and n.endswith(".weight")]
    assert experts and all(kept[n].dtype == torch.uint8 for n in experts)
    assert kept[experts[0]].dim() == 3 and kept[experts[0].replace(".weight", ".zero_point")].dim() == 3
