"""Llama-family config.json (transformers 4.x and 5.x forms) -> kiln PretrainedConfig."""

from __future__ import annotations

from kiln.config import PretrainedConfig
from kiln.mapping import Mapping
from kiln.models import hf_config


def llama_structure(hf: dict) -> dict:
    """Mistral's sliding window applies to every layer."""
    return dict(sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None)


def config_from_hf(hf: dict, dtype: str, mapping: Mapping, generation: dict | None = None,
                   path: str = "config.json") -> PretrainedConfig:
    return hf_config.config_from_hf(hf, dtype, mapping, generation, path, llama_structure)
