"""Every dir (and file) kiln writes is written atomically: into a temporary sibling, then renamed into place.

A crash or an error half-way leaves at most a hidden `.name.tmp-*` sibling (removed on the way out
when Python gets the chance), never a dir at the target path that would load.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

from kiln.errors import OutputExistsError


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False):
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target}: output dir already exists; pass --overwrite (overwrite=True) "
                                "to replace it, or choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():  # overwrite: move the old one aside so the swap is two renames
            old = target.parent / f".{target.name}.old-{tag}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """One file into an existing dir, the same way: a hidden sibling, then a rename over the target."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json_atomic(path: str | Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
