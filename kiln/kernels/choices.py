"""Kernel choices made by timing on the GPU (a tile, the GEMV or cuBLAS), kept on disk so that a restarted engine
does not time them again.

The first open of an engine times the candidate kernels of every layer shape and batch size it runs (a W4A16
Llama-3-8B's first open, compiling and timing them, took 42.7 s on an H200), and a redeployed server would time
them again at every start. Triton keeps its compiled kernels on disk; this keeps the choices beside them.

One JSON file per version of kiln's kernel code (a hash of kiln/kernels/*.py), torch and Triton, under
<cache root>/kernel-choices/ (the cache root of kiln.llmapi.engine_cache: $KILN_CACHE_DIR, else
$XDG_CACHE_HOME/kiln, else ~/.cache/kiln), so a change to any of them starts afresh. Entries are keyed by the
kind of choice, the GPU's name and the choice's own key. A write merges with what other processes (tensor-parallel
ranks) wrote before it and lands atomically (a temporary sibling, then a rename); two writes at the same moment can
lose one entry, which is then timed again at the next start. With KILN_AUTOTUNE=0 (the first candidate everywhere,
as the tests run) the file is neither read nor written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from kiln.checkpoint.atomic import atomic_write_text

log = logging.getLogger("kiln")
_MISSING = object()
_write_failed = False  # (logged once)
_disk: dict | None = None  # the file's entries as this process last read them (None: not read yet)
_ALL: list["KernelChoices"] = []  # every kind, for forget_all
counts = {"timed": 0, "from_disk": 0}  # choices made since the last forget_all, by where they came from


def enabled() -> bool:
    """Tuning is on (KILN_AUTOTUNE is not 0) and not under Triton's CPU interpreter (which cannot time)."""
    return os.environ.get("KILN_AUTOTUNE", "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1"


class KernelChoices:
    """A dict of one kind of choice, key (a tuple) -> value (a tuple, a bool or None), backed by the shared file.
    Lookups hit memory first, then the file; every new choice is written through."""

    def __init__(self, kind: str):
        self.kind = kind
        self._memory: dict = {}
        _ALL.append(self)

    def get(self, key, default=None):
        value = self._lookup(key)
        return default if value is _MISSING else value

    def __contains__(self, key) -> bool:
        return self._lookup(key) is not _MISSING

    def __getitem__(self, key):
        value = self._lookup(key)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key, value) -> None:
        self._memory[key] = value
        counts["timed"] += 1
        if enabled():
            _write(self._disk_key(key), value)

    def items(self):
        return self._memory.items()

    def _lookup(self, key):
        if key in self._memory:
            return self._memory[key]
        if not enabled():
            return _MISSING
        value = _read().get(self._disk_key(key), _MISSING)
        if value is not _MISSING:
            self._memory[key] = value = tuple(value) if isinstance(value, list) else value
            counts["from_disk"] += 1
        return value

    def _disk_key(self, key) -> str:
        return "|".join([self.kind, _gpu_name(), *map(str, key)])


def held() -> dict:
    """Every choice this process holds, "kind|key" -> value (what kiln bench records of what its tuners kept)."""
    return {"|".join([c.kind, *map(str, key)]): value for c in _ALL for key, value in c.items()}


def forget_all() -> None:
    """Drop every choice this process holds in memory, as a restarted process starts: the next lookups read the
    file again."""
    global _disk
    for choices in _ALL:
        choices._memory.clear()
    _disk = None
    counts.update(timed=0, from_disk=0)


def choices_file() -> Path:
    from kiln.llmapi.engine_cache import cache_root  # (here: the kernels must not import the LLM API at load)

    return cache_root() / "kernel-choices" / f"{_version_hash()}.json"


@functools.cache
def _version_hash() -> str:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    sources = sorted(Path(__file__).parent.glob("*.py"))
    digest = hashlib.sha256(f"torch {torch.__version__} triton {triton_version}".encode())
    for path in sources:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _gpu_name() -> str:
    return torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"


def _read() -> dict:
    global _disk
    if _disk is None:
        _disk = _load(choices_file())
    return _disk


def _load(path: Path) -> dict:
    """The file's entries; an unreadable file (a crash mid-write cannot make one, an edit can) counts as empty,
    so the choices are timed again and the file rewritten."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write(disk_key: str, value) -> None:
    """Add one entry to the file. A cache that cannot be written (a read-only home, a full disk) is no reason to
    stop an engine: the choice stays in memory, and the failure is logged once."""
    global _disk, _write_failed
    path = choices_file()
    entries = _load(path)  # what other processes wrote since this one read it
    entries[disk_key] = list(value) if isinstance(value, tuple) else value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(entries, indent=0, sort_keys=True))
    except OSError as e:
        if not _write_failed:
            log.warning("kernel choices are not kept for the next start: cannot write %s (%s); set "
                        "KILN_CACHE_DIR to a writable dir", path, e)
        _write_failed = True
        return
    _disk = entries
