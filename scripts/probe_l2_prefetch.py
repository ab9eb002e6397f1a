"""Would a GEMV run faster if the kernels before it had streamed its weights into L2? (H100 or later.)

A batch-1 decode step leaves the memory idle while its short kernels run (RMSNorm, attention and its merge: about
0.3 ms of a 2.3 ms W4A16 step on an H100), and then each GEMV streams its weights from DRAM, paying the first
loads' latency and its tail again (the int4 o_proj: 4.2 us for 8.4 MB, 2.0 TB/s). If those idle microseconds
prefetched the next GEMV's weights into L2 (50 MB on an H100), the GEMV would read them from there. This probe
measures the two numbers that decide it, on one GPU, nothing of the engine changed:

  1. each GEMV with its weights cold (L2 flushed) and hot (just read), and
  2. the same GEMV after a flush and a `cp.async.bulk.prefetch.L2` of its weights (sm_90's bulk L2 prefetch: one
     instruction a thread, nothing waits for it), with the GPU left idle for a few microseconds in between
     (torch.cuda._sleep) so the prefetch can land, against the same idle time without it.

    PYTHONPATH=. python scripts/probe_l2_prefetch.py
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kiln.kernels import quant_gemm
from kiln.quantization.weight_only import quantize_int4_groups

SUB = 8192  # bytes a thread prefetches (a multiple of 16)
THREADS = 128
CYCLES_PER_US = 1755  # the H100's 1755 MHz (an approximate idle time is all the probe needs)


@triton.jit
def _prefetch_l2_kernel(base, nbytes, SUB: tl.constexpr, THREADS: tl.constexpr):
    """Bytes [base, base + nbytes) into L2: thread t of program p prefetches SUB bytes at (p THREADS + t) SUB."""
    start = (tl.program_id(0).to(tl.int64) * THREADS + tl.arange(0, THREADS)) * SUB
    size = tl.maximum(tl.minimum(nbytes - start, SUB), 0).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [base + start, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_l2(t: torch.Tensor) -> None:
    nbytes = t.numel() * t.element_size()
    programs = triton.cdiv(nbytes, SUB * THREADS)
    _prefetch_l2_kernel[(programs,)](t.data_ptr(), nbytes, SUB=SUB, THREADS=THREADS, num_warps=THREADS // 32)


def timed_us(before, run, reps: int = 50) -> float:
    """Median microseconds of run() alone, each after before() and 100 us of idle GPU (neither timed: the idle
    time covers the host's launch of run, so no launch gap is timed, and lets a prefetch land)."""
    times = []
    for _ in range(reps):
        before()
        torch.cuda._sleep(int(100 * CYCLES_PER_US))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    flush_buffer = torch.empty(256 << 20, dtype=torch.uint8, device=dev)

    def flush():  # read, not written: no dirty lines left for the GEMV's loads to write back
        flush_buffer.max()


    x = torch.randn(1, 4096, dtype=torch.bfloat16, device=dev)
    print(f"# {torch.cuda.get_device_name(dev)}; times in us, median of 50")
    print("| GEMV | MB | cold | hot | prefetched | the prefetch kernel |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, n, k in (("int4 o_proj", 4096, 4096), ("int4 qkv", 6144, 4096), ("int4 down", 4096, 14336)):
        packed, scale, zero = quantize_int4_groups(torch.randn(n, k, device=dev) * 0.02, 128, True, torch.bfloat16)
        words = packed.view(torch.int64)
        rows = torch.randn(1, k, dtype=torch.bfloat16, device=dev)
        y = torch.empty(1, n, dtype=torch.bfloat16, device=dev)

        def gemv():
            quant_gemm._run_w4_gemv(rows, words, scale, zero, 128, y, (8, 256, 4))

        def prefetch():
            prefetch_l2(packed)
            prefetch_l2(scale)
            prefetch_l2(zero)
        report(name, packed.numel() / 1e6, gemv, prefetch, flush)
    w = torch.randn(4096, 4096, dtype=torch.bfloat16, device=dev)
    report("bf16 o_proj (cuBLAS)", w.numel() * 2 / 1e6, lambda: F.linear(x, w), lambda: prefetch_l2(w), flush)


def report(name, mb, gemv, prefetch, flush) -> None:
    gemv()  # compile
    prefetch()
    torch.cuda.synchronize()
    cold = timed_us(flush, gemv)
    hot = timed_us(gemv, gemv)
    prefetched = timed_us(lambda: (flush(), prefetch()), gemv)
    issue = timed_us(flush, prefetch)
    print(f"| {name} | {mb:.1f} | {cold:.1f} | {hot:.1f} | {prefetched:.1f} | {issue:.1f} |", flush=True)


if __name__ == "__main__":
    main()
