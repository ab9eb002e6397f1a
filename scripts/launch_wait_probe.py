"""Does a GEMM of a new shape wait for the GPU at its launch, and why? Suspects: CUDA's lazy loading (a kernel
loaded at its first launch; cuBLAS picks kernels by shape), and torch's caching allocator (a size it holds no
free block for is a cudaMalloc). On an NVIDIA GPU:

    python scripts/launch_wait_probe.py                              # torch's default: lazy loading
    CUDA_MODULE_LOADING=EAGER python scripts/launch_wait_probe.py    # every kernel loaded with its module

On an H200 (twenty-second session) the first launch at each new row count waited the whole queue under both
loading modes, and the second did not: not lazy loading. Two more cases look at the allocator: an allocation
alone at new sizes, and the GEMM into an output made before the queue filled (at the row counts the first case
met, so it shows the allocation's share only once cuBLAS has seen the shape). Row 391 after 390 is a new shape
whose output fits the block 390's freed.

Queues about 200 ms of matmuls, then times the host's launch of lm_head's GEMM (Llama-3-8B's 128256 x 4096,
bf16) at a row count, with the queue still full: microseconds if the launch returns at once, about the queue's
200 ms if it waited for the GPU. Each row count runs twice; the second time its kernel is loaded.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F


def main() -> None:
    device = torch.device("cuda")
    start = time.perf_counter()
    torch.zeros(1, device=device)
    print(f"CUDA_MODULE_LOADING={os.environ.get('CUDA_MODULE_LOADING')}; CUDA context in "
          f"{time.perf_counter() - start:.2f} s")
    weight = torch.randn(128256, 4096, device=device, dtype=torch.bfloat16)
    square = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    square @ square  # its kernel loaded, and the time of one measured
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        square @ square
    torch.cuda.synchronize()
    repeats = max(int(0.2 / ((time.perf_counter() - start) / 10)), 1)  # about 200 ms of queued work
    cases = {  # what is launched at a row count, with the queue full
        "GEMM": lambda x, out: F.linear(x, weight),
        "GEMM into a made output": lambda x, out: torch.matmul(x, weight.t(), out=out),
        "allocation alone": lambda x, out: torch.empty(x.shape[0] + 1000, 128256, device=device,
                                                       dtype=torch.bfloat16),
    }
    for case, launch_one in cases.items():
        print(f"-- {case}")
        for rows in (3, 17, 100, 257, 390, 391, 3, 17, 100, 257, 390, 391):
            x = torch.randn(rows, 4096, device=device, dtype=torch.bfloat16)
            out = torch.empty(rows, 128256, device=device, dtype=torch.bfloat16)
            torch.cuda.synchronize()
            for _ in range(repeats):
                square @ square
            start = time.perf_counter()
            launch_one(x, out)
            launch = time.perf_counter() - start
            torch.cuda.synchronize()
            print(f"rows {rows:4d}: launch {launch * 1e3:8.3f} ms with {repeats} matmuls queued", flush=True)
        weight = weight.clone()  # (a fresh weight: cuBLAS's choices cached per pointer, if any, start again)
        torch.cuda.empty_cache()  # (the allocator's cached blocks go: each case starts as the first did)


if __name__ == "__main__":
    main()
