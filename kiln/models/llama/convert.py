"""Llama-family name maps: Hugging Face, Meta and GGUF tensor names -> kiln names.

kiln's `mlp.fc` is the gate projection and `mlp.gate` the up projection (TensorRT-LLM's naming).
Meta and GGUF store q/k rows in interleaved rotary order; `interleaved_to_half` undoes that.
"""

from __future__ import annotations

from kiln.checkpoint.name_map import NameMap, Src
from kiln.layers.rotary import interleaved_to_half

L = "transformer.layers.{i}."


def _q_rows(w, config):
    return interleaved_to_half(w, config.num_attention_heads)


def _k_rows(w, config):
    return interleaved_to_half(w, config.num_key_value_heads)


def hf_name_map(tied: bool) -> NameMap:
    return NameMap(hf_table(tied))


def hf_table(tied: bool) -> dict:
    """The Llama HF names, which many families share (Qwen, Mixtral, Gemma extend this table)."""
    hf = "model.layers.{i}."
    table = {
        "transformer.vocab_embedding.weight": "model.embed_tokens.weight",
        "transformer.ln_f.weight": "model.norm.weight",
        "lm_head.weight": "model.embed_tokens.weight" if tied else "lm_head.weight",
        L + "input_layernorm.weight": hf + "input_layernorm.weight",
        L + "post_layernorm.weight": hf + "post_attention_layernorm.weight",
        L + "attention.dense.weight": hf + "self_attn.o_proj.weight",
        L + "attention.dense.bias": hf + "self_attn.o_proj.bias",
        L + "mlp.fc.weight": hf + "mlp.gate_proj.weight",
        L + "mlp.gate.weight": hf + "mlp.up_proj.weight",
        L + "mlp.proj.weight": hf + "mlp.down_proj.weight",
        L + "mlp.fc.bias": hf + "mlp.gate_proj.bias",
        L + "mlp.gate.bias": hf + "mlp.up_proj.bias",
        L + "mlp.proj.bias": hf + "mlp.down_proj.bias",
    }
    return {**table, **qkv_table()}


def qkv_table(q_rows=None, k_rows=None) -> dict:
    """The fused QKV's weight and bias from HF's q/k/v_proj, the q and k rows through a transform where given (a
    rotary layout reordered: Cohere, ERNIE 4.5, GLM-4)."""
    attn = "model.layers.{i}.self_attn."
    return {L + f"attention.qkv.{kind}": (Src(attn + f"q_proj.{kind}", q_rows), Src(attn + f"k_proj.{kind}", k_rows),
                                          attn + f"v_proj.{kind}") for kind in ("weight", "bias")}


def gguf_moe_table() -> dict:
    """llama.cpp's MoE names (its architectures with experts share them): the router, each projection's experts
    stacked in one tensor, and a shared expert's projections."""
    b = "blk.{i}."
    return {
        L + "mlp.router.weight": b + "ffn_gate_inp.weight",
        L + "mlp.experts.fc.weight": b + "ffn_gate_exps.weight",
        L + "mlp.experts.gate.weight": b + "ffn_up_exps.weight",
        L + "mlp.experts.proj.weight": b + "ffn_down_exps.weight",
        L + "mlp.shared_expert.fc.weight": b + "ffn_gate_shexp.weight",
        L + "mlp.shared_expert.gate.weight": b + "ffn_up_shexp.weight",
        L + "mlp.shared_expert.proj.weight": b + "ffn_down_shexp.weight",
    }


def meta_name_map(tied: bool) -> NameMap:
    m = "layers.{i}."
    return NameMap({
        "transformer.vocab_embedding.weight": "tok_embeddings.weight",
        "transformer.ln_f.weight": "norm.weight",
        "lm_head.weight": "tok_embeddings.weight" if tied else "output.weight",
        L + "input_layernorm.weight": m + "attention_norm.weight",
        L + "post_layernorm.weight": m + "ffn_norm.weight",
        L + "attention.qkv.weight": (Src(m + "attention.wq.weight", _q_rows), Src(m + "attention.wk.weight", _k_rows),
                                     m + "attention.wv.weight"),
        L + "attention.dense.weight": m + "attention.wo.weight",
        L + "mlp.fc.weight": m + "feed_forward.w1.weight",
        L + "mlp.gate.weight": m + "feed_forward.w3.weight",
        L + "mlp.proj.weight": m + "feed_forward.w2.weight",
    })


def gguf_name_map(tied: bool, stacked_experts: bool = True) -> NameMap:
    """A `llama` file's names, Mixtral's experts among them: stacked one tensor a projection (`ffn_gate_exps`), or
    one a projection and expert (`ffn_gate.{e}`, llama.cpp's files before April 2024)."""
    b = "blk.{i}."
    experts = {} if stacked_experts else {
        L + f"mlp.experts.{ours}.weight": b + f"ffn_{theirs}.{{e}}.weight"
        for ours, theirs in (("fc", "gate"), ("gate", "up"), ("proj", "down"))}
    return NameMap({**gguf_table(tied), **gguf_moe_table(), **experts})


def gguf_table(tied: bool, rotary_rows: bool = True) -> dict:
    """llama.cpp's names, which the families that read GGUF share (Qwen extends this table). rotary_rows: q/k rows
    stored in interleaved rotary order, as llama.cpp's converter permutes them for `llama`; else as Hugging Face
    has them (architectures llama.cpp runs with NeoX rotary)."""
    b = "blk.{i}."
    q, k = b + "attn_q.weight", b + "attn_k.weight"
    return {
        "transformer.vocab_embedding.weight": "token_embd.weight",
        "transformer.ln_f.weight": "output_norm.weight",
        "lm_head.weight": "token_embd.weight" if tied else "output.weight",
        L + "input_layernorm.weight": b + "attn_norm.weight",
        L + "post_layernorm.weight": b + "ffn_norm.weight",
        L + "attention.qkv.weight": ((Src(q, _q_rows), Src(k, _k_rows)) if rotary_rows else (q, k)) + (
            b + "attn_v.weight",),
        L + "attention.dense.weight": b + "attn_output.weight",
        L + "mlp.fc.weight": b + "ffn_gate.weight",
        L + "mlp.gate.weight": b + "ffn_up.weight",
        L + "mlp.proj.weight": b + "ffn_down.weight",
    }
