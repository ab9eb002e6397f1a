"""The Llama family's own config.json fields (the shared reading, both transformers forms: kiln.models.hf_config)."""

from __future__ import annotations


def llama_structure(hf: dict) -> dict:
    """Mistral's sliding window applies to every layer."""
    return dict(sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None)
