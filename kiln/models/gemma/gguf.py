"""Gemma, Gemma 2 and Gemma 3 from a GGUF file (llama.cpp's `gemma`, `gemma2` and `gemma3` architectures): its
metadata read as the Hugging Face config it came from, and the GGUF tensor names -> kiln names (one map: a Gemma
or Gemma 2 model simply has no tensors for the norms it lacks).

What GGUF leaves out, llama.cpp fixes by rule (src/llama-model.cpp, LLM_ARCH_GEMMA2 and LLM_ARCH_GEMMA3), and so do
we. Gemma 3: every 6th layer is global, the others slide (unless the file has sliding_window_pattern); sliding
layers rotate with base 10000 and no scaling; queries are scaled by head_dim ** -1/2, except Gemma 3 27B
(62 layers), which uses (hidden / heads) ** -1/2. Gemma 2: even layers slide (transformers' own rule for its
configs, which gemma_structure applies); queries are scaled by head_dim ** -1/2, except Gemma 2 27B (46 layers),
(hidden / heads) ** -1/2; its soft-capping is in the metadata. Gemma: none of these.
llama.cpp's converter stores each RMSNorm's scale as 1 + w (it adds Gemma's unit offset), so w is the
stored value minus 1; q/k rows are not permuted (Gemma uses NeoX rotary there).
Files from llama.cpp's converter carry no chat template: Gemma's turn format is the default.
"""

from __future__ import annotations

from kiln.checkpoint.gguf_source import GGUFFile
from kiln.checkpoint.name_map import NameMap, Src
from kiln.models.llama.convert import L
from kiln.models.llama.gguf import hf_shape_from_gguf

GEMMA_GGUF_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
SLIDING_PATTERN = 6  # llama.cpp: hparams.set_swa_pattern(6)
# layers of the 27B models, whose queries are scaled by (hidden / heads) ** -1/2 rather than head_dim ** -1/2
HIDDEN_SCALED_QUERIES = {"gemma2": 46, "gemma3": 62}
LOCAL_ROPE_BASE = 10000.0  # llama.cpp: rope_freq_base_train_swa
END_OF_TURN = "<end_of_turn>"  # ends a chat turn: a stop token beside <eos>, as in Gemma's generation_config

# Gemma 3's chat template (text only): a system message is prefixed to the first user turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def hf_config_from_gguf(gguf: GGUFFile, dtype: str) -> dict:
    """The config.json (transformers 5 form) that the file's `gemma.*`, `gemma2.*` or `gemma3.*` metadata encodes."""
    arch = gguf.require("general.architecture")
    k = lambda key: gguf.require(f"{arch}.{key}")  # noqa: E731
    tokens = gguf.field("tokenizer.ggml.tokens") or []
    config = {
        **hf_shape_from_gguf(gguf, dtype, (tokens.index(END_OF_TURN),) if END_OF_TURN in tokens else ()),
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {"rope_type": "default", "rope_theta": float(gguf.field(f"{arch}.rope.freq_base", 10000.0))},
    }
    layers, hidden, heads, head_dim = (config[f] for f in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                           "head_dim"))
    if arch in HIDDEN_SCALED_QUERIES:  # Gemma 2 and 3: sliding layers, query scale, soft-capping
        config.update(sliding_window=k("attention.sliding_window"),
                      query_pre_attn_scalar=hidden // heads if layers == HIDDEN_SCALED_QUERIES[arch] else head_dim,
                      final_logit_softcapping=gguf.field(f"{arch}.final_logit_softcapping"),
                      attn_logit_softcapping=gguf.field(f"{arch}.attn_logit_softcapping"))
    if arch == "gemma3":
        full_rope = dict(config["rope_parameters"], rope_theta=float(gguf.field("gemma3.rope.freq_base", 1000000.0)))
        if gguf.field("gemma3.rope.scaling.type") == "linear":  # Gemma 3 4B-27B: the global layers only
            full_rope.update(rope_type="linear", factor=float(k("rope.scaling.factor")))
        config.update(rope_parameters={"full_attention": full_rope, "sliding_attention": {
            "rope_type": "default", "rope_theta": LOCAL_ROPE_BASE}},
            layer_types=_layer_types(gguf.field("gemma3.attention.sliding_window_pattern", SLIDING_PATTERN), layers))
    return config


def _layer_types(pattern, layers: int) -> list[str]:
    """sliding_window_pattern as newer converters write it: n (every n-th layer global) or one bool per layer
    (True: sliding)."""
    sliding = pattern if isinstance(pattern, list) else [(i + 1) % pattern != 0 for i in range(layers)]
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def _minus_one(w, config):
    return w - 1


def gguf_name_map(tied: bool) -> NameMap:
    b = "blk.{i}."
    norm = lambda name: Src(name, _minus_one)  # noqa: E731
    return NameMap({
        "transformer.vocab_embedding.weight": "token_embd.weight",
        "transformer.ln_f.weight": norm("output_norm.weight"),
        "lm_head.weight": "token_embd.weight" if tied else "output.weight",
        L + "input_layernorm.weight": norm(b + "attn_norm.weight"),
        L + "attention.qkv.weight": (b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"),
        L + "attention.q_norm.weight": norm(b + "attn_q_norm.weight"),
        L + "attention.k_norm.weight": norm(b + "attn_k_norm.weight"),
        L + "attention.dense.weight": b + "attn_output.weight",
        L + "attention_out_layernorm.weight": norm(b + "post_attention_norm.weight"),
        L + "post_layernorm.weight": norm(b + "ffn_norm.weight"),  # HF's pre_feedforward_layernorm
        L + "mlp_out_layernorm.weight": norm(b + "post_ffw_norm.weight"),
        L + "mlp.fc.weight": b + "ffn_gate.weight",
        L + "mlp.gate.weight": b + "ffn_up.weight",
        L + "mlp.proj.weight": b + "ffn_down.weight",
    })
