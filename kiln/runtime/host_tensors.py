"""A step's tensors from Python lists of numbers, built fast and copied to the GPU without waiting for it.

torch.tensor reads a Python list element by element (~50 ns each: 0.2 ms for a 512 x 8 block table);
packing the numbers into an `array` first and wrapping its buffer is about four times faster.

To a GPU the numbers go through page-locked (pinned) host memory, so the copy is queued behind the GPU's work
instead of waiting for it (a copy from pageable memory waits for the stream's queued kernels). They used to take a
fresh pinned tensor per copy from torch's caching host allocator. Allocating page-locked memory is one of CUDA's
implicit synchronizations, and with a step queued ahead (kiln.runtime.executor) the cached blocks of two steps are
in use at once, so it was the first suspect for prefill-1000's doubled inter-token p99. It was not the cause (the
slow launches stayed; docs/performance.md, twentieth session), but the path was slow: with one pinned ring
allocated once (`StagingRing`), the median launch of a mixed step went from 57 to 30 ms of host time on an H200
(one run each). The sampled tokens likewise come back into pinned buffers that are reused (`readback_buffer`).
"""

from __future__ import annotations

import threading
from array import array
from collections import deque

import torch

_TYPECODES = {torch.long: "q", torch.int32: "i", torch.float32: "f"}
RING_BYTES = 16 << 20  # a mixed step of 8192 tokens at batch 512 stages about 0.5 MB: dozens of steps a lap
RING_ALIGN = 64  # bytes: each region starts on a cache line (and any dtype's alignment)
READBACK_ELEMENTS = 1 << 13  # a reused readback buffer's size: a burst of 16 steps at batch 512


class StagingRing:
    """Pinned host memory for host-to-device copies, handed out round a ring instead of allocated per copy.

    Offsets are virtual (they only grow; the byte is at offset % capacity), so a region may be written again once
    the ring has gone a whole lap past its start. Each copy records a fence (a CUDA event) after it is queued;
    before a region's bytes are reused, the fences of the regions there are waited for: with dozens of steps a
    lap, they finished long before, so no wait is ever long. new_fence(device) records one on the device's current
    stream, after the copy."""

    def __init__(self, nbytes: int = RING_BYTES, pin_memory: bool = True, new_fence=None):
        self.buffer = _reusable_empty(nbytes, torch.uint8, pin_memory)
        self.new_fence = new_fence or _recorded_event
        self.next = 0  # virtual offset of the next region
        self.pending: deque = deque()  # (virtual start, fence) of each region a queued copy may read, oldest first
        self.lock = threading.Lock()  # (a server's threads may build tensors at once)

    def copy(self, host: torch.Tensor, dst: torch.Tensor | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
        """host (a contiguous CPU tensor) copied through the ring into dst (filled in place, same numel), or
        into a new tensor on `device`; returns that tensor. The copy is queued on the current stream."""
        with self.lock:
            start, staged = self._take(host.numel() * host.element_size())
            staged = staged.view(host.dtype).view(host.shape)
            staged.copy_(host)
            if dst is None:
                out = staged.to(device, non_blocking=True)
            else:
                out = dst.copy_(staged.view(dst.shape), non_blocking=True)
            self.pending.append((start, self.new_fence(out.device)))
        return out

    def fits(self, nbytes: int) -> bool:
        return nbytes <= len(self.buffer) // 4  # (larger ones would lap the ring every few copies)

    def _take(self, nbytes: int) -> tuple[int, torch.Tensor]:
        capacity = len(self.buffer)
        size = -(-nbytes // RING_ALIGN) * RING_ALIGN
        start = self.next
        if start % capacity + size > capacity:  # no room before the end: start the next lap
            start += capacity - start % capacity
        end = start + size
        while self.pending and self.pending[0][0] + capacity < end:  # its bytes are about to be overwritten
            self.pending.popleft()[1].synchronize()
        self.next = end
        return start, self.buffer[start % capacity:start % capacity + nbytes]


def _reusable_empty(numel: int, dtype: torch.dtype, pin_memory: bool = True) -> torch.Tensor:
    """A host buffer that later steps write into. Made outside inference mode even when the first step to ask
    runs in it: an inference tensor may not be written outside inference mode, and steps run in and out of it
    (a step queued ahead copies its tokens back outside)."""
    with torch.inference_mode(False):
        return torch.empty(numel, dtype=dtype, pin_memory=pin_memory)


def _recorded_event(device: torch.device):
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


_rings: dict[int, StagingRing] = {}
_readbacks: list[torch.Tensor] = []  # free pinned readback buffers (each of READBACK_ELEMENTS int64)


def _ring(device: torch.device) -> StagingRing:
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _rings:
        _rings[index] = StagingRing()
    return _rings[index]


def to_cuda(host: torch.Tensor, device: torch.device | str, dst: torch.Tensor | None = None) -> torch.Tensor:
    """A CPU tensor copied to a CUDA device without waiting for the GPU: through the staging ring, or (a CUDA
    graph being captured, or too large for the ring) through pinned memory of its own."""
    device = torch.device(device)
    ring = _ring(device)
    if torch.cuda.is_current_stream_capturing() or not ring.fits(host.numel() * host.element_size()):
        pinned = host.pin_memory()  # (torch keeps the pinned buffer until the copy is done)
        return pinned.to(device, non_blocking=True) if dst is None else dst.copy_(pinned.view(dst.shape),
                                                                                  non_blocking=True)
    return ring.copy(host, dst, device)


def readback_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A pinned host buffer of at least numel int64 (or `dtype`) elements for a device-to-host copy; give it back
    with release_readback once read. Reused, since each new pinned allocation can wait for the whole GPU."""
    if dtype == torch.long and numel <= READBACK_ELEMENTS:
        if _readbacks:
            return _readbacks.pop()
        return _reusable_empty(READBACK_ELEMENTS, torch.long)
    return torch.empty(numel, dtype=dtype, pin_memory=True)  # (rare, and used once: left to torch's allocator)


def release_readback(buffer: torch.Tensor) -> None:
    """A readback buffer whose copy has finished and been read: free for the next one."""
    if buffer.dtype == torch.long and buffer.numel() == READBACK_ELEMENTS:
        _readbacks.append(buffer)


def list_tensor(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype, device=device) for int64, int32 or float32, 1-D; to a GPU without
    waiting for it (to_cuda)."""
    if not values:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=dtype, device=device)
    host = torch.frombuffer(array(_TYPECODES[dtype], values), dtype=dtype)
    return to_cuda(host, device) if torch.device(device).type == "cuda" else host.to(device)


def copy_list(dst: torch.Tensor, values: list, dtype: torch.dtype) -> None:
    """dst (a view of as many elements as values, any shape) = values, queued without waiting for the GPU: how a
    step's inputs reach a CUDA graph's static buffers."""
    if not values:
        return
    host = torch.frombuffer(array(_TYPECODES[dtype], values), dtype=dtype)
    if dst.is_cuda:
        to_cuda(host, dst.device, dst)
    else:
        dst.copy_(host.view(dst.shape))


def padded_rows(tables: list[list[int]], width: int, fill: int) -> list[int]:
    """Block tables as one flat row-major list of [batch, width], short rows padded with `fill`."""
    flat, pad = [], [fill] * width
    for table in tables:
        flat += table
        flat += pad[len(table):]
    return flat


def padded_tables(tables: list[list[int]], width: int, fill: int, device: torch.device | str) -> torch.Tensor:
    """Block tables as one [batch, width] int32 tensor, short rows padded with `fill`."""
    return list_tensor(padded_rows(tables, width, fill), torch.int32, device).view(len(tables), width)


def fill_tokens(tokens: torch.Tensor, fill) -> None:
    """tokens[rows] = earlier[source] for fill = (rows, source, earlier), on the tokens' device; None: nothing. The
    rows are a step's inputs that are the samples of the step before it, not yet read by the host (a step queued
    ahead, kiln.runtime.executor)."""
    if fill is not None:
        rows, source, earlier = fill
        device = tokens.device
        tokens[list_tensor(rows, torch.long, device)] = earlier[list_tensor(source, torch.long, device)]
