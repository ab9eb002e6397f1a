"""Lazy access to the weights of a Hugging Face model dir.

Reads single-file and sharded safetensors (model.safetensors[.index.json]) and pickled
pytorch_model*.bin (loaded with weights_only=True, so a checkpoint cannot run code). Tensors are
read one at a time when asked for.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.checkpoint.safetensors_io import SafetensorsFile
from kiln.config import read_json
from kiln.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class HFWeights:
    """name -> tensor over the weight files of an HF dir; each file is opened on first use."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self._open: dict[str, object] = {}
        self.file_of = self._index()

    def _index(self) -> dict[str, str]:
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            if (self.dir / index_name).is_file():
                weight_map = read_json(self.dir / index_name, "weight index").get("weight_map")
                if not isinstance(weight_map, dict):
                    raise CheckpointError(f"{self.dir / index_name}: has no 'weight_map' object")
                for file in set(weight_map.values()):
                    if not (self.dir / file).is_file():
                        raise CheckpointError(f"{self.dir / file}: shard listed in {index_name} is missing")
                return weight_map
        singles = sorted(self.dir.glob("*.safetensors")) or sorted(self.dir.glob("pytorch_model*.bin"))
        if not singles:
            raise CheckpointError(f"{self.dir}: no weights found (expected model.safetensors, "
                                  f"{SAFETENSORS_INDEX}, pytorch_model.bin or {BIN_INDEX})")
        return {name: f.name for f in singles for name in self._file(f.name).keys()}

    def _file(self, file: str):
        if file not in self._open:
            path = self.dir / file
            self._open[file] = SafetensorsFile(path) if file.endswith(".safetensors") else _BinFile(path)
        return self._open[file]

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def keys(self) -> list[str]:
        return list(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise CheckpointError(f"{self.dir}: the checkpoint has no tensor {name!r}")
        return self._file(self.file_of[name]).get(name)


class _BinFile:
    def __init__(self, path: Path):
        try:
            self.tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises several types for truncated or foreign files
            raise CheckpointError(f"{path}: cannot read PyTorch weights ({type(e).__name__}: {e})") from None
        self.path = path

    def keys(self):
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]
