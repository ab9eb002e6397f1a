"""Model registry: Hugging Face architecture name -> kiln model class.

Each family registers itself in its own folder; this table is the one place that lists them, and
modules are imported only when a class is asked for (no import-time work).
"""

from __future__ import annotations

import importlib

from kiln.errors import UnsupportedArchitectureError
from kiln.models.base import DecoderModelForCausalLM, PretrainedModel

# HF architecture name -> (module, class name). Checkpoints store the HF name as `architecture`.
_REGISTRY = {
    "LlamaForCausalLM": ("kiln.models.llama.model", "LLaMAForCausalLM"),
    "MistralForCausalLM": ("kiln.models.llama.model", "LLaMAForCausalLM"),
    "Ernie4_5ForCausalLM": ("kiln.models.llama_like.model", "Ernie45ForCausalLM"),
    "Exaone4ForCausalLM": ("kiln.models.exaone.model", "Exaone4ForCausalLM"),
    "GemmaForCausalLM": ("kiln.models.gemma.model", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("kiln.models.gemma.model", "GemmaForCausalLM"),
    "Gemma3ForCausalLM": ("kiln.models.gemma.model", "GemmaForCausalLM"),
    "CohereForCausalLM": ("kiln.models.cohere.model", "CohereForCausalLM"),
    "Cohere2ForCausalLM": ("kiln.models.cohere.model", "CohereForCausalLM"),
    "ArceeForCausalLM": ("kiln.models.llama_like.model", "ArceeForCausalLM"),
    "DeepseekV2ForCausalLM": ("kiln.models.deepseek.model", "DeepseekV3ForCausalLM"),
    "DeepseekV3ForCausalLM": ("kiln.models.deepseek.model", "DeepseekV3ForCausalLM"),
    "Glm4ForCausalLM": ("kiln.models.glm4.model", "Glm4ForCausalLM"),
    "Glm4MoeForCausalLM": ("kiln.models.glm4_moe.model", "Glm4MoeForCausalLM"),
    "GPT2LMHeadModel": ("kiln.models.gpt2.model", "GPT2ForCausalLM"),
    "GptOssForCausalLM": ("kiln.models.gpt_oss.model", "GptOssForCausalLM"),
    "GraniteForCausalLM": ("kiln.models.granite.model", "GraniteForCausalLM"),
    "GraniteMoeForCausalLM": ("kiln.models.granite.model", "GraniteForCausalLM"),
    "GPTNeoXForCausalLM": ("kiln.models.gpt_neox.model", "GPTNeoXForCausalLM"),
    "MiniMaxM2ForCausalLM": ("kiln.models.minimax.model", "MiniMaxM2ForCausalLM"),
    "MixtralForCausalLM": ("kiln.models.mixtral.model", "MixtralForCausalLM"),
    "Olmo2ForCausalLM": ("kiln.models.olmo.model", "OlmoForCausalLM"),
    "Olmo3ForCausalLM": ("kiln.models.olmo.model", "OlmoForCausalLM"),
    "OlmoeForCausalLM": ("kiln.models.llama_like.model", "OlmoeForCausalLM"),
    "Phi3ForCausalLM": ("kiln.models.phi3.model", "Phi3ForCausalLM"),
    "Starcoder2ForCausalLM": ("kiln.models.llama_like.model", "Starcoder2ForCausalLM"),
    "Qwen2ForCausalLM": ("kiln.models.qwen.model", "QWenForCausalLM"),
    "Qwen3ForCausalLM": ("kiln.models.qwen.model", "QWenForCausalLM"),
    "Qwen2MoeForCausalLM": ("kiln.models.qwen.model", "QWenForCausalLM"),
    "Qwen3MoeForCausalLM": ("kiln.models.qwen.model", "QWenForCausalLM"),
    "SeedOssForCausalLM": ("kiln.models.llama_like.model", "SeedOssForCausalLM"),
    "SmolLM3ForCausalLM": ("kiln.models.smollm3.model", "SmolLM3ForCausalLM"),
}
MODEL_MAP = dict(_REGISTRY)


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def model_class(architecture: str) -> type[PretrainedModel]:
    if architecture not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}")
    module, name = _REGISTRY[architecture]
    return getattr(importlib.import_module(module), name)


__all__ = ["MODEL_MAP", "PretrainedModel", "DecoderModelForCausalLM", "model_class", "supported_architectures"]
