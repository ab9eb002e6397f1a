"""kiln: turn a trained LLM checkpoint into a fast inference engine and run it.

    from kiln import LLM, SamplingParams
    LLM("path/to/hf_or_engine").generate("Hello", SamplingParams(max_tokens=32))

Names are imported on first use, so `import kiln` stays cheap.
"""

from kiln.version import __version__

_EXPORTS = {
    "Mapping": "kiln.mapping",
    "PretrainedConfig": "kiln.config",
    "QuantConfig": "kiln.config",
    "QuantAlgo": "kiln.config",
    "BuildConfig": "kiln.config",
    "build": "kiln.builder",
    "Engine": "kiln.builder",
    "LLM": "kiln.llmapi.llm",
    "SamplingParams": "kiln.llmapi.sampling_params",
    "RequestOutput": "kiln.llmapi.sampling_params",
    "convert_checkpoint": "kiln.checkpoint.convert",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")


__all__ = ["__version__", *_EXPORTS]
