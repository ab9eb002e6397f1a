"""Phi-3 / Phi-3.5 from a GGUF file (llama.cpp's `phi3` architecture): the metadata read as the Hugging Face config
it came from, and the GGUF tensor names -> kiln names.

llama.cpp keeps Phi-3's fused projections: `attn_qkv` is [q; k; v] (kiln's fused QKV as it is) and `ffn_up` is the
source's gate_up_proj, [gate; up], split here as from Hugging Face. q/k rows are not permuted (NeoX rotary).
Longrope (Phi-3 128k, Phi-3.5) is stored as two tensors of per-frequency factors, `rope_factors_long` and
`rope_factors_short`, with `phi3.rope.scaling.original_context_length` and `.attn_factor`; a partial rotary (Phi-4
mini) as `rope.dimension_count` below the head size.
"""

from __future__ import annotations

from kiln.checkpoint.gguf_source import GGUFFile
from kiln.checkpoint.name_map import NameMap, Src
from kiln.config import conversion_dtype
from kiln.models.llama.convert import L, gguf_table
from kiln.models.llama.gguf import GGUF_FILE_DTYPES
from kiln.models.phi3.model import gate_half, up_half


def hf_config_from_gguf(gguf: GGUFFile, dtype: str) -> dict:
    """The Phi3ForCausalLM config.json (transformers 5 form) that the file's `phi3.*` metadata encodes."""
    k = lambda key: gguf.require(f"phi3.{key}")  # noqa: E731
    hidden, heads = k("embedding_length"), k("attention.head_count")
    head_dim = gguf.field("phi3.attention.key_length") or hidden // heads
    tokens = gguf.field("tokenizer.ggml.tokens") or []
    eos = [gguf.field("tokenizer.ggml.eos_token_id"), gguf.field("tokenizer.ggml.eot_token_id")]
    rope = {"rope_type": "default", "rope_theta": float(gguf.field("phi3.rope.freq_base", 10000.0)),
            "partial_rotary_factor": gguf.field("phi3.rope.dimension_count", head_dim) / head_dim}
    if "rope_factors_long.weight" in gguf:
        rope.update(rope_type="longrope", long_factor=gguf.get("rope_factors_long.weight").tolist(),
                    short_factor=gguf.get("rope_factors_short.weight").tolist(),
                    original_max_position_embeddings=k("rope.scaling.original_context_length"),
                    attention_factor=gguf.field("phi3.rope.scaling.attn_factor"))
    return {
        "architectures": ["Phi3ForCausalLM"],
        "dtype": conversion_dtype(dtype, GGUF_FILE_DTYPES.get(gguf.field("general.file_type"), "float32")),
        "vocab_size": int(gguf.field("phi3.vocab_size") or len(tokens) or gguf.tensors["token_embd.weight"].shape[1]),
        "hidden_size": hidden,
        "num_hidden_layers": k("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": gguf.field("phi3.attention.head_count_kv") or heads,
        "head_dim": head_dim,
        "intermediate_size": k("feed_forward_length"),
        "hidden_act": "silu",
        "rms_norm_eps": float(k("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": k("context_length"),
        "rope_parameters": rope,
        "sliding_window": gguf.field("phi3.attention.sliding_window"),
        "tie_word_embeddings": "output.weight" not in gguf,
        "bos_token_id": gguf.field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": [int(e) for e in dict.fromkeys(eos) if e is not None],
    }


def gguf_name_map(tied: bool) -> NameMap:
    """llama.cpp's shared table with Phi-3's fused projections in place of the separate ones."""
    b = "blk.{i}."
    return NameMap({
        **gguf_table(tied, rotary_rows=False),
        L + "attention.qkv.weight": b + "attn_qkv.weight",
        L + "mlp.fc.weight": Src(b + "ffn_up.weight", gate_half),
        L + "mlp.gate.weight": Src(b + "ffn_up.weight", up_half),
    })
