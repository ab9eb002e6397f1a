"""LLM(hf_dir) converts and builds in-process; the engine is cached so the next start just loads it.

The cache key covers the source (path, file sizes and modification times), the dtype, whether a GGUF's 4-bit
linears are kept, the build config's engine fields and kiln's format version, so any change to them rebuilds (its
RUNTIME_FIELDS, such as the KV cache's memory fraction, apply at load and rebuild nothing). Root: $KILN_CACHE_DIR, else
$XDG_CACHE_HOME/kiln, else ~/.cache/kiln.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kiln.config import BuildConfig
from kiln.version import FORMAT_VERSION


def cache_root() -> Path:
    if os.environ.get("KILN_CACHE_DIR"):
        return Path(os.environ["KILN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiln"


def _file_stamps(src: Path) -> list:
    files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file())
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def engine_cache_dir(src: str | Path, dtype: str, build_config: BuildConfig | None, world_key=None,
                     keep_quantization: bool = False) -> Path:
    src = Path(src).resolve()
    kept = {"keep_quantization": True} if keep_quantization else {}  # (absent otherwise: earlier keys still hold)
    key = json.dumps({"src": str(src), "files": _file_stamps(src), "dtype": dtype, **kept,
                      "build_config": (build_config or BuildConfig()).engine_fields(),  # (None: the defaults)
                      "world": world_key, "format_version": FORMAT_VERSION}, sort_keys=True)
    return cache_root() / "engines" / f"{src.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
