"""Collectives over the tensor-parallel group. With tp_size 1 they are no-ops, so the single-process
reference path never touches torch.distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist

from kiln.mapping import Mapping

_TP_GROUPS: dict[tuple[int, ...], object] = {}


def tp_group(mapping: Mapping):
    """The process group of this rank's pipeline stage (created once, collectively, on first use)."""
    if not dist.is_initialized():
        raise RuntimeError("tensor parallelism needs torch.distributed: launch with torchrun or "
                           "LLM(..., tensor_parallel_size=N)")
    ranks = tuple(mapping.pp_rank * mapping.tp_size + r for r in range(mapping.tp_size))
    if ranks not in _TP_GROUPS:
        if mapping.tp_size == dist.get_world_size():
            _TP_GROUPS[ranks] = dist.group.WORLD
        else:  # new_group must be called by every rank for every group
            for stage in range(mapping.pp_size):
                group_ranks = tuple(stage * mapping.tp_size + r for r in range(mapping.tp_size))
                _TP_GROUPS[group_ranks] = dist.new_group(list(group_ranks))
    return _TP_GROUPS[ranks]


def all_reduce(x: torch.Tensor, mapping: Mapping) -> torch.Tensor:
    if mapping.tp_size == 1:
        return x
    dist.all_reduce(x, group=tp_group(mapping))
    return x


def all_gather_last_dim(x: torch.Tensor, mapping: Mapping) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(mapping.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=tp_group(mapping))
    return torch.cat(parts, dim=-1)


def leave_process_group() -> None:
    """Destroy the process group, dropping our references to its subgroups first (a group object that
    outlives destroy_process_group aborts the interpreter at exit)."""
    _TP_GROUPS.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
