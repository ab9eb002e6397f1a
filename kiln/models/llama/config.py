"""Llama-family config.json (transformers 4.x and 5.x forms) -> kiln PretrainedConfig."""

from __future__ import annotations

from kiln.config import ROPE_SCALING_FIELDS, PretrainedConfig
from kiln.errors import ConfigError
from kiln.mapping import Mapping

# transformers 5.x writes rope_parameters (theta included) and dtype; 4.x rope_theta, rope_scaling, torch_dtype.
ROPE_FIELDS = ROPE_SCALING_FIELDS


def _rope(hf: dict, path: str) -> tuple[float, dict | None]:
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_FIELDS:
        raise ConfigError(f"{path}: rope type {kind!r} is not supported; supported: "
                          f"default, {', '.join(ROPE_FIELDS)}")
    missing = [f for f in ROPE_FIELDS[kind] if f not in scaling]
    if missing:
        raise ConfigError(f"{path}: rope scaling {kind!r} needs field(s) {missing}")
    out = {"type": kind, **{f: scaling[f] for f in ROPE_FIELDS[kind]}}
    if kind == "dynamic" and "original_max_position_embeddings" in scaling:
        out["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    return theta, out


def _eos_ids(*values) -> tuple[int, ...]:
    ids = []
    for v in values:
        for i in (v if isinstance(v, list) else [v]):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


def source_dtype(hf: dict) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return name if name in ("float32", "float16", "bfloat16") else "float32"


def config_from_hf(hf: dict, dtype: str, mapping: Mapping, generation: dict | None = None,
                   path: str = "config.json") -> PretrainedConfig:
    try:
        heads = hf["num_attention_heads"]
        theta, scaling = _rope(hf, path)
        sliding = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        return PretrainedConfig(
            architecture=hf["architectures"][0],
            dtype=source_dtype(hf) if dtype == "auto" else dtype,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_size=hf.get("head_dim") or hf["hidden_size"] // heads,
            intermediate_size=hf["intermediate_size"],
            hidden_act=hf.get("hidden_act", "silu"),
            norm_epsilon=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rotary_base=theta,
            rotary_scaling=scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            sliding_window=sliding,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_eos_ids((generation or {}).get("eos_token_id"), hf.get("eos_token_id")),
            mapping=mapping,
        )
    except KeyError as e:
        raise ConfigError(f"{path}: required field {e.args[0]!r} is missing") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
