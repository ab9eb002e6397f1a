"""A step's tensors from Python lists of numbers, built fast: at batch 512 the runtime builds several every step.

torch.tensor reads a Python list element by element (~50 ns each: 0.2 ms for a 512 x 8 block table);
packing the numbers into an `array` first and wrapping its buffer is about four times faster.
"""

from __future__ import annotations

from array import array

import torch

_TYPECODES = {torch.long: "q", torch.int32: "i", torch.float32: "f"}


def list_tensor(values: list, dtype: torch.dtype, device: torch.device | str, pin_memory: bool = False
                ) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype, device=device) for int64, int32 or float32, 1-D; pinned on the host if
    asked (the source of a non_blocking copy to the GPU).

    To a GPU the copy goes through pinned memory without blocking: a plain copy from pageable memory waits for
    the stream's queued kernels to finish, so the host could not build the next step while the GPU runs this one.
    (torch keeps the pinned buffer until the copy is done.)"""
    if not values:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=dtype, device=device, pin_memory=pin_memory)
    host = torch.frombuffer(array(_TYPECODES[dtype], values), dtype=dtype)
    if pin_memory:
        return host.pin_memory()
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def padded_tables(tables: list[list[int]], width: int, fill: int, device: torch.device | str,
                  pin_memory: bool = False) -> torch.Tensor:
    """Block tables as one [batch, width] int32 tensor, short rows padded with `fill`, from one flat list."""
    flat, pad = [], [fill] * width
    for table in tables:
        flat += table
        flat += pad[len(table):]
    return list_tensor(flat, torch.int32, device, pin_memory).view(len(tables), width)


def fill_tokens(tokens: torch.Tensor, fill) -> None:
    """tokens[rows] = earlier[source] for fill = (rows, source, earlier), on the tokens' device; None: nothing. The
    rows are a step's inputs that are the samples of the step before it, not yet read by the host (a step queued
    ahead, kiln.runtime.executor)."""
    if fill is not None:
        rows, source, earlier = fill
        device = tokens.device
        tokens[list_tensor(rows, torch.long, device)] = earlier[list_tensor(source, torch.long, device)]
