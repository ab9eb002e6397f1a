"""Reading a Hugging Face config.json (transformers 4.x and 5.x forms): the fields every family shares.

transformers 5.x writes rope_parameters (theta included; per layer type for Gemma 3) and dtype; 4.x
rope_theta, rope_scaling, torch_dtype. Each family's reader starts from `common_fields` and sets only
its structural differences.
"""

from __future__ import annotations

import math
from typing import Callable

from kiln.config import ROPE_SCALING_FIELDS, PretrainedConfig, conversion_dtype
from kiln.errors import ConfigError
from kiln.mapping import Mapping

# Fields a Hugging Face config must give per rope type; longrope's and yarn's others are derived when absent (as
# transformers derives them). (kiln's freq_factors comes from GGUF files only.)
ROPE_FIELDS = {**{k: ROPE_SCALING_FIELDS[k] for k in ("linear", "dynamic", "llama3")},
               "longrope": ("short_factor", "long_factor"), "yarn": ()}
# HF activation names -> kiln's.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu", "relu2": "relu2"}


def rope_parameters(hf: dict) -> tuple[dict, dict | None]:
    """(global rope parameters, the sliding layers' own or None), in one dict form for 4.x and 5.x."""
    params = dict(hf.get("rope_parameters") or {})
    local = None
    if "full_attention" in params:  # transformers 5 per-layer-type form (Gemma 3)
        local, params = params.get("sliding_attention"), dict(params["full_attention"])
    if hf.get("rope_scaling"):
        params = {**params, **hf["rope_scaling"]}
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if local is None and "rope_local_base_freq" in hf:
        local = {"rope_theta": hf["rope_local_base_freq"]}
    return params, local


def rope(hf: dict, path: str) -> tuple[float, dict | None]:
    """(rotary base, kiln rotary_scaling) of the global layers."""
    params, _ = rope_parameters(hf)
    theta = params["rope_theta"]
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_FIELDS:
        raise ConfigError(f"{path}: rope type {kind!r} is not supported; supported: "
                          f"default, {', '.join(ROPE_FIELDS)}")
    if kind == "longrope":
        params.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    missing = [f for f in ROPE_FIELDS[kind] if params.get(f) is None]
    if missing:
        raise ConfigError(f"{path}: rope scaling {kind!r} needs field(s) {missing}")
    if kind == "longrope":
        return theta, _longrope(hf, params)
    if kind == "yarn":
        return theta, _yarn(hf, params)
    out = {"type": kind, **{f: params[f] for f in ROPE_FIELDS[kind]}}
    if kind == "dynamic" and "original_max_position_embeddings" in params:
        out["original_max_position_embeddings"] = params["original_max_position_embeddings"]
    return theta, out


def _longrope(hf: dict, params: dict) -> dict:
    """Phi-3's longrope, with the cos/sin attention factor transformers derives when the config has none."""
    original = params["original_max_position_embeddings"] or hf.get("max_position_embeddings")
    factor = params.get("factor") or hf.get("max_position_embeddings", original) / original
    mscale = params.get("attention_factor")
    if mscale is None:
        mscale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"type": "longrope", "short_factor": list(params["short_factor"]),
            "long_factor": list(params["long_factor"]), "original_max_position_embeddings": original,
            "attention_factor": mscale}


def _yarn(hf: dict, params: dict) -> dict:
    """YaRN with every field transformers defaults or derives filled in: the original context (the config's own
    max_position_embeddings when absent), the factor (their ratio when absent, as DeepSeek-V3 configs leave it),
    the cos/sin attention factor (0.1 ln(factor) + 1, or the ratio of two such with mscale and mscale_all_dim), and
    the ramp's bounds beta_fast 32 and beta_slow 1, truncated to whole indices unless `truncate` is false."""
    original = params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or \
        hf["max_position_embeddings"]
    factor = params.get("factor") or hf["max_position_embeddings"] / original
    mscale = lambda m: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0  # noqa: E731
    attention = params.get("attention_factor")
    if attention is None:
        both = params.get("mscale") and params.get("mscale_all_dim")
        attention = mscale(params["mscale"]) / mscale(params["mscale_all_dim"]) if both else mscale(1)
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "attention_factor": float(attention), "beta_fast": params.get("beta_fast") or 32,
            "beta_slow": params.get("beta_slow") or 1, "truncate": params.get("truncate", True)}


def partial_rotary_factor(hf: dict) -> float:
    params, _ = rope_parameters(hf)
    return params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))


def eos_ids(*values) -> tuple[int, ...]:
    ids = []
    for v in values:
        for i in (v if isinstance(v, list) else [v]):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


def source_dtype(hf: dict) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return name if name in ("float32", "float16", "bfloat16") else "float32"


def activation(name: str, path: str) -> str:
    if name not in ACTIVATIONS:
        raise ConfigError(f"{path}: activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def common_fields(hf: dict, dtype: str, generation: dict | None, path: str) -> dict:
    """PretrainedConfig fields named alike across Llama-style configs (raises KeyError for a missing one); dtype is
    the one the conversion writes."""
    heads = hf["num_attention_heads"]
    theta, scaling = rope(hf, path)
    head_size = hf.get("head_dim") or hf["hidden_size"] // heads
    factor = partial_rotary_factor(hf)
    return dict(
        architecture=hf["architectures"][0],
        dtype=dtype,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_size=head_size,
        intermediate_size=hf["intermediate_size"],
        hidden_act=activation(hf.get("hidden_activation") or hf.get("hidden_act", "silu"), path),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rotary_base=theta,
        rotary_scaling=scaling,
        rotary_dim=int(head_size * factor) if factor != 1.0 else None,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids((generation or {}).get("eos_token_id"), hf.get("eos_token_id")),
    )


def global_layers(layer_types) -> tuple[int, ...]:
    """The full-attention layers of a layer_types list: the rotary-free ones of Command R7B's and EXAONE 4.0's
    hybrid layouts."""
    return tuple(i for i, t in enumerate(layer_types) if t == "full_attention")


def sliding_fields(hf: dict) -> dict:
    """sliding_window and per-layer layer_types, as transformers 5 writes them (or None)."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    types = hf.get("layer_types")
    if not window:
        return dict(sliding_window=None, layer_types=None)
    return dict(sliding_window=window, layer_types=tuple(types) if types else None)


def config_from_hf(hf: dict, dtype: str, mapping: Mapping, generation: dict | None, path: str,
                   structure: Callable[[dict], dict]) -> PretrainedConfig:
    """common_fields plus the family's `structure(hf)` (its overrides), errors naming the file (not the dtype's:
    a bad one is the caller's request)."""
    dtype = conversion_dtype(dtype, source_dtype(hf))
    try:
        return PretrainedConfig(**{**common_fields(hf, dtype, generation, path), **structure(hf)}, mapping=mapping)
    except KeyError as e:
        raise ConfigError(f"{path}: required field {e.args[0]!r} is missing") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
