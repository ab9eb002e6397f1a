"""Meta's params.json -> kiln PretrainedConfig (sizes the file leaves out are read off the weights)."""

from __future__ import annotations

from pathlib import Path

from kiln.config import PretrainedConfig, conversion_dtype, read_json
from kiln.errors import ConfigError
from kiln.mapping import Mapping

# Llama 3.1's `use_scaled_rope`: the llama3 scaling its reference code hard-codes.
LLAMA31_ROPE_SCALING = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}


def config_from_meta(meta_dir: Path, weights, dtype: str, mapping: Mapping) -> PretrainedConfig:
    path = meta_dir / "params.json"
    params = read_json(path, "Meta params.json")
    try:
        dim, heads = params["dim"], params["n_heads"]
        vocab, _ = weights.shape("tok_embeddings.weight")
        intermediate = weights.shape("layers.0.feed_forward.w1.weight")[0]
        return PretrainedConfig(
            architecture="LlamaForCausalLM",
            dtype=conversion_dtype(dtype, "bfloat16"),  # Meta publishes bfloat16 weights
            vocab_size=vocab,
            hidden_size=dim,
            num_hidden_layers=params["n_layers"],
            num_attention_heads=heads,
            num_key_value_heads=params.get("n_kv_heads") or heads,
            head_size=dim // heads,
            intermediate_size=intermediate,
            norm_epsilon=params.get("norm_eps", 1e-5),
            max_position_embeddings=params.get("max_seq_len", 8192 if params.get("use_scaled_rope") else 4096),
            rotary_base=params.get("rope_theta", 10000.0),
            rotary_scaling=LLAMA31_ROPE_SCALING if params.get("use_scaled_rope") else None,
            tie_word_embeddings="output.weight" not in weights,
            mapping=mapping,
        )
    except KeyError as e:
        raise ConfigError(f"{path}: required field {e.args[0]!r} is missing") from None
