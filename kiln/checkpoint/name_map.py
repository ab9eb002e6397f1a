"""Declarative maps from kiln weight names to a source format's tensor names.

A table entry maps one kiln name pattern to one or more source tensors (`{i}` is the layer index);
several sources are concatenated on dim 0 (the fused QKV). A source named with `{e}` is one tensor per
expert, stacked on a new dim 0 over config.moe_num_experts (MoE). A source may carry a transform of
(tensor, config), applied after stacking, e.g. undoing a rotary row permutation or taking one half of a
fused source tensor. Model classes declare these tables; this
module is the only code that walks them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from kiln.errors import CheckpointError


@dataclass(frozen=True)
class Src:
    name: str
    transform: Callable | None = None  # (tensor, config) -> tensor


def _compile(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


class NameMap:
    def __init__(self, table: dict[str, str | Src | tuple]):
        self.entries = []
        for kiln_pattern, sources in table.items():
            sources = sources if isinstance(sources, tuple) else (sources,)
            sources = tuple(s if isinstance(s, Src) else Src(s) for s in sources)
            self.entries.append((_compile(kiln_pattern), sources))

    def sources(self, kiln_name: str) -> tuple[Src, ...]:
        for pattern, sources in self.entries:
            match = pattern.match(kiln_name)
            if match:
                layer = match.groupdict().get("i")
                return tuple(Src(s.name.replace("{i}", layer or ""), s.transform) for s in sources)
        raise CheckpointError(f"no source mapping for kiln weight {kiln_name!r}")

    def source_names(self, kiln_name: str, config) -> list[str]:
        """Every source tensor a kiln weight reads (expert sources expanded)."""
        return [name for src in self.sources(kiln_name) for name in _expand(src.name, config)]

    def load(self, kiln_name: str, source, config) -> torch.Tensor:
        """The full (unsharded) kiln tensor, read from `source` (anything with get(name))."""
        parts = []
        for src in self.sources(kiln_name):
            names = _expand(src.name, config)
            tensor = torch.stack([source.get(n) for n in names]) if "{e}" in src.name else source.get(names[0])
            parts.append(src.transform(tensor, config) if src.transform else tensor)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _expand(name: str, config) -> list[str]:
    if "{e}" not in name:
        return [name]
    return [name.replace("{e}", str(e)) for e in range(config.moe_num_experts)]
