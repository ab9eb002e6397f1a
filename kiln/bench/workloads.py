"""Benchmark workloads: how many requests, of what prompt and output lengths, sharing what prefix.

The named ones are the lines of docs/performance.md (and of the GPU runtime's targets); a JSON file
(a list of objects with these fields) adds any other: `kiln bench --workload-file mine.json`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.errors import ConfigError


@dataclass(frozen=True)
class Workload:
    name: str
    num_requests: int
    input_len: int  # prompt tokens, the shared prefix included
    output_len: int
    shared_prefix_len: int = 0  # the first request runs alone, then the others reuse its cached prefix
    baseline_requests: int = 64  # transformers runs at most this many of them (at that batch size)

    def __post_init__(self):
        for name in ("num_requests", "input_len", "output_len", "baseline_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"workload {self.name!r}: {name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.shared_prefix_len < self.input_len:
            raise ConfigError(f"workload {self.name!r}: shared_prefix_len must be in [0, input_len "
                              f"{self.input_len}), got {self.shared_prefix_len!r}")

    def prompts(self, vocab_size: int, seed: int = 0) -> list[list[int]]:
        """Random token ids; with a shared prefix, every prompt starts with the same prefix_len tokens."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (self.num_requests, self.input_len), generator=g)
        ids[:, : self.shared_prefix_len] = ids[0, : self.shared_prefix_len]
        return ids.tolist()


NAMED_WORKLOADS = {w.name: w for w in (
    Workload("decode-1", 1, 128, 256),  # batch-1 decode: bandwidth-bound
    Workload("offline-64", 64, 128, 128),
    Workload("offline-3000", 3000, 128, 128),  # throughput, decode-heavy
    Workload("prefill-1000", 1000, 2048, 128, baseline_requests=16),  # throughput, prefill-heavy
    Workload("long-1000", 1000, 1000, 1000, baseline_requests=16),  # long generations (TensorRT-LLM's 1000/1000)
    Workload("ttft-2048", 1, 2048, 1),  # time to first token of one long prompt
    Workload("prefix-64", 64, 1056, 16, shared_prefix_len=1024),  # followers reuse a 1024-token prefix
)}


def custom_workload(num_requests: int, input_len: int, output_len: int) -> Workload:
    return Workload(f"custom-{num_requests}x{input_len}-{output_len}", num_requests, input_len, output_len)


def read_workload_file(path: str | Path) -> list[Workload]:
    path = Path(path)
    fields = {f.name for f in dataclasses.fields(Workload)}
    required = sorted(f.name for f in dataclasses.fields(Workload) if f.default is dataclasses.MISSING)
    try:
        items = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the workload file ({e}); it must be a JSON list of objects "
                          f"with fields {sorted(fields)}") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"{path}: must be a JSON list of objects with fields {sorted(fields)}")
    workloads = []
    for n, item in enumerate(items):
        unknown, missing = sorted(set(item) - fields), [f for f in required if f not in item]
        wrong = [f"unknown fields {unknown}"] * bool(unknown) + [f"missing fields {missing}"] * bool(missing)
        if wrong:
            raise ConfigError(f"{path}: workload {n} has {' and '.join(wrong)}; required: {required}, optional: "
                              f"{sorted(fields - set(required))}")
        workloads.append(Workload(**item))
    return workloads


def select(names: str | None, path: str | None, num_requests: int, input_len: int, output_len: int) -> list[Workload]:
    """The workloads a bench run measures: named ones, a file's, or one from the length flags."""
    chosen = []
    for name in (names.split(",") if names else []):
        if name not in NAMED_WORKLOADS:
            raise ConfigError(f"unknown workload {name!r}; named workloads: {sorted(NAMED_WORKLOADS)}")
        chosen.append(NAMED_WORKLOADS[name])
    if path:
        chosen += read_workload_file(path)
    return chosen or [Workload("decode-1", 1, input_len, output_len), custom_workload(num_requests, input_len,
                                                                                       output_len)]
