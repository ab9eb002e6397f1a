"""Lazy access to the tensors and metadata of a GGUF file (llama.cpp's format), through the `gguf`
package. Quantized tensors (Q8_0, Q4_0, Q4_1, K-quants, ...) are dequantized to float32 on read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kiln.errors import CheckpointError


class GGUFFile:
    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: GGUF file not found")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises ValueError, struct.error, ... on a bad file
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str):
        value = self.field(key)
        if value is None:
            raise CheckpointError(f"{self.path}: GGUF metadata field {key!r} is missing")
        return value

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def type_name(self, name: str) -> str:
        """The tensor's GGML type, by name ("F32", "Q4_K", ...)."""
        return self.tensors[name].tensor_type.name

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored: for a block-quantized type, its bytes [rows, bytes a row]."""
        return self.tensors[name].data

    def get(self, name: str) -> torch.Tensor:
        import gguf

        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        t = self.tensors[name]
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        # GGUF lists dims fastest-first; torch wants them slowest-first.
        shape = tuple(int(d) for d in reversed(t.shape))
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a writable copy
