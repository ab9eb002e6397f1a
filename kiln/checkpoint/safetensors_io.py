"""A small safetensors reader and a streaming writer, with bounded memory.

The reader uses plain reads instead of mmap so that resident memory holds one tensor at a time
(a mapped file counts in RSS as long as it stays mapped), and checks every offset against the file
size so a truncated or corrupt file is named, not crashed on. The writer lays out the header from
the tensors' specs first and then takes the tensors one by one, in any order: a conversion never
holds more than the tensor it is writing. Format: https://github.com/huggingface/safetensors
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from kiln.errors import CheckpointError

DTYPE_CODES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CODE_OF_DTYPE = {v: k for k, v in DTYPE_CODES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFile:
    """Lazy reader: parses the header at open, reads a tensor's bytes only when asked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        self.file_size = self.path.stat().st_size
        self.header, self.metadata, self.data_start = self._read_header()

    def _read_header(self):
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({self.file_size} bytes)")
            (size,) = struct.unpack("<Q", prefix)
            if size > MAX_HEADER_BYTES or 8 + size > self.file_size:
                raise CheckpointError(f"{self.path}: corrupt or truncated safetensors header "
                                      f"(header size {size}, file size {self.file_size})")
            try:
                header = json.loads(f.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{self.path}: corrupt safetensors header (not valid JSON)") from None
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + size
        for name, info in header.items():
            self._check_entry(name, info, data_start)
        return header, metadata, data_start

    def _check_entry(self, name: str, info: dict, data_start: int) -> None:
        try:
            dtype = DTYPE_CODES[info["dtype"]]
            begin, end = info["data_offsets"]
            nbytes = math.prod(info["shape"]) * dtype.itemsize
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: corrupt safetensors entry for tensor {name!r}") from None
        if end - begin != nbytes or data_start + end > self.file_size:
            raise CheckpointError(f"{self.path}: tensor {name!r} runs past the end of the file or has the wrong "
                                  f"size (the file is truncated or corrupt; re-download or re-convert it)")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        if name not in self.header:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        info = self.header[name]
        begin, end = info["data_offsets"]
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
        dtype = DTYPE_CODES[info["dtype"]]
        if not buffer:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])


    def load_all(self, device: torch.device, threads: int = 8) -> dict[str, torch.Tensor]:
        """Every tensor, copied onto `device` straight from a mapping of the file, several at a time: no
        staging copy, and the reads of some overlap the host-to-device copies of others. (The whole file
        ends up in memory at once: for loading an engine onto a GPU, not for streaming a conversion.)"""
        import mmap
        from concurrent.futures import ThreadPoolExecutor

        with open(self.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: never written back

        def copy(name: str) -> tuple[str, torch.Tensor]:
            info = self.header[name]
            begin, end = info["data_offsets"]
            dtype = DTYPE_CODES[info["dtype"]]
            if begin == end:
                return name, torch.empty(info["shape"], dtype=dtype, device=device)
            view = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=self.data_start + begin)
            return name, view.to(device, copy=True).view(dtype).reshape(info["shape"])

        try:  # (a copy from pageable memory has read its source when it returns: the mapping can close)
            with ThreadPoolExecutor(max_workers=threads) as pool:
                return dict(pool.map(copy, self.keys()))
        finally:
            mapped.close()


class SafetensorsWriter:
    """Streaming writer: the header comes from `specs` (name -> (dtype, shape)); tensors follow in any order."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = specs
        header, offset = {}, 0
        self.offsets = {}
        for name, (dtype, shape) in specs.items():
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": CODE_OF_DTYPE[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self.offsets[name] = offset
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
        self.data_start = 8 + len(raw)
        self.pending = set(specs)
        self.file = open(self.path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.file.truncate(self.data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                                  f"expected {dtype} {tuple(shape)}")
        self.file.seek(self.data_start + self.offsets[name])
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self.file.write(data.view(torch.uint8).numpy().data)  # a view: no copy of the bytes
        self.pending.discard(name)

    def close(self) -> None:
        self.file.close()
        if self.pending:
            raise CheckpointError(f"{self.path}: tensors never written: {sorted(self.pending)[:10]}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.file.close()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Write a dict of in-memory tensors (small files, tests, engines)."""
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    with SafetensorsWriter(path, specs, metadata) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
