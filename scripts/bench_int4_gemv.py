"""Batch-1 int4 GEMV against the bf16 linear on Llama-3-8B shapes, as a decode step streams them:
`PYTHONPATH=. python scripts/bench_int4_gemv.py` (an NVIDIA GPU with Triton).

Each kernel is replayed from a CUDA graph over copies of its weight that together overflow the L2 cache, so
every call reads its weight from memory (kiln.kernels.bench_quant_gemm replays one weight, which a 4096 x 4096
int4 matrix leaves in L2). Prints microseconds, TB/s of weight bytes (packed codes and scales for int4), the
speed-up and the tile the autotuner chose, then the sum over 32 decoder layers (qkv, o_proj, fc_gate, down)."""

import torch

from kiln.kernels import quant_gemm as qg
from kiln.kernels.bench_quant_gemm import graph_us
from kiln.kernels.gemv import linear
from kiln.quantization.weight_only import quantize_int4_groups

SHAPES = (("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("fc_gate", 28672, 4096), ("down", 4096, 14336),
          ("lm_head", 128256, 4096))


def timed(fn_per_copy, copies) -> float:
    """Microseconds per call: passes over `copies` replayed from one CUDA graph."""
    return graph_us(lambda: [fn_per_copy(c) for c in copies], iters=4) / len(copies)


def main():
    torch.manual_seed(0)
    total = {"bf16": 0, "w4": 0}
    for name, n, k in SHAPES:
        bench_shape(name, n, k, total)
    print(f"32 layers: bf16 {total['bf16']/1e3:.2f} ms, w4 {total['w4']/1e3:.2f} ms")


def bench_shape(name, n, k, total):
    w = torch.randn(n, k, device="cuda") * 0.02
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    packed, scale, _ = quantize_int4_groups(w, 128, False, torch.bfloat16)
    nbytes4 = packed.numel() + scale.numel() * 2
    ncopy = max(2, min(16, -(-256 * 2**20 // nbytes4)))
    c4 = [(packed.clone(), scale.clone()) for _ in range(ncopy)]
    t4 = timed(lambda c: qg.w4a16_matmul(x, c[0], c[1], None, 128), c4)
    wb = w.to(torch.bfloat16)
    ncopyb = max(2, min(8, -(-256 * 2**20 // (wb.numel() * 2))))
    cb = [wb.clone() for _ in range(ncopyb)]
    tb = timed(lambda c: linear(x, c), cb)
    cfg = {key[:2]: str(v) for key, v in qg._TUNED[qg._w4_gemv_kernel][0].cache.items()}.get((n, k))
    print(f"{name:8} bf16 {tb:7.1f}us {wb.numel() * 2 / tb / 1e6:5.2f}TB/s   w4 {t4:7.1f}us "
          f"{nbytes4 / t4 / 1e6:5.2f}TB/s  {tb / t4:4.2f}x  {cfg}", flush=True)
    if name != "lm_head":  # (the sum is the decoder layers')
        total["bf16"] += tb * 32
        total["w4"] += t4 * 32


if __name__ == "__main__":
    main()
