"""Programmatic dependent launch (PDL, Hopper and later): the next kernel of a stream starts while this one ends.

A batch-1 decode step is a chain of ~300 short kernels, and each one's first microseconds (scheduling its programs,
the first loads' memory latency) and last (the programs that finish late, the final store) leave most of the GPU
idle: the GEMVs of int4 or int8 weights stream at 1.2-2.1 TB/s on a decode step's small shapes against 3 TB/s of
copy bandwidth. Launched with PDL, a kernel's programs are scheduled as soon as every program of the kernel
before it has started (`allow_dependents`), and each waits (`wait_for_inputs`) until that kernel has finished and
its writes are visible. Before the wait a kernel may read what no kernel of the step writes, its weights: a GEMV
requests its first tile of weights while the kernel before it ends.

The contract of a kernel that takes `USE_PDL` (launched with `**pdl_args(device)`):
  1. it calls `allow_dependents(USE_PDL)` first;
  2. before `wait_for_inputs(USE_PDL)` it reads only weights and writes nothing.
Waiting is transitive (a kernel ends only after its own wait), so what a kernel does after its wait never overlaps
an earlier kernel; only weight reads may. Kernels launched without PDL (torch's, cuBLAS's) wait for the whole
previous kernel as usual.
CUDA graphs keep the launches' programmatic edges. `KILN_PDL=0` turns it off (to compare, or to rule it out).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: every kernel launches plainly
    triton = None
try:  # Triton 3.3 and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: no PDL, and the helpers below do nothing
    gdc_wait = None


@functools.cache
def _gpu_has_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: a CUDA GPU of compute capability 9.0 or later, a Triton that has
    it, and KILN_PDL unset or 1."""
    if gdc_wait is None or device.type != "cuda" or os.environ.get("KILN_PDL", "1") == "0":
        return False
    return _gpu_has_pdl(device.index if device.index is not None else torch.cuda.current_device())


def pdl_args(device: torch.device) -> dict:
    """The launch keywords of a kernel that takes USE_PDL: the flag, and Triton's launch_pdl where it is on."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"USE_PDL": False}


if triton is not None and gdc_wait is not None:

    @triton.jit
    def allow_dependents(USE_PDL: tl.constexpr):
        """Let the next kernel's programs be scheduled once every program of this one has started."""
        if USE_PDL:
            gdc_launch_dependents()

    @triton.jit
    def wait_for_inputs(USE_PDL: tl.constexpr):
        """Block until the kernel before this one has finished and its writes are visible."""
        if USE_PDL:
            gdc_wait()

elif triton is not None:  # USE_PDL is always False here

    @triton.jit
    def allow_dependents(USE_PDL: tl.constexpr):
        pass

    @triton.jit
    def wait_for_inputs(USE_PDL: tl.constexpr):
        pass
