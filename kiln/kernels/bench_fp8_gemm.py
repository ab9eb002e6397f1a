"""Time the FP8 GEMM paths against bf16 F.linear on Llama-3-8B layer shapes at the row counts of offline
decode (64-1024 sequences) and prefill (2048-8192 tokens): `python -m kiln.kernels.bench_fp8_gemm` (an FP8 GPU).

Columns, each replayed from a CUDA graph (kiln.kernels.bench_quant_gemm.graph_us):
- bf16: F.linear on the bf16 weight.
- quant: kiln's row quantizer (static scale), the pass ahead of every FP8 GEMM of more than two rows.
- rowwise: torch._scaled_mm with a scale per row of x and per column of w (what kiln.quantization.fp8 calls).
- tensorwise: torch._scaled_mm with one scale each (cuBLAS's own FP8 scaling), for comparison.
- fp8 layer: what an FP8 linear of more than two rows costs in the engine (kiln.quantization.fp8.fp8_gemm after
  the quantizer).
Each FP8 result is first checked against float32 math on the same e4m3 values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels import triton_available
from kiln.kernels.bench_quant_gemm import LLAMA3_8B, graph_us
from kiln.kernels.fp8_quant import quantize_fp8_rows
from kiln.quantization.fp8 import fp8_gemm, fp8_gemm_emulated, quantize_fp8_weight

ROWS = (64, 256, 512, 1024, 2048, 8192)


def candidates(x, wb, wq, w_scale, a_scale):
    xq, x_scale = quantize_fp8_rows(x, a_scale)
    col_scale = w_scale.float()[None, :]
    one = torch.ones((), device=x.device)
    return {
        "bf16": lambda: F.linear(x, wb),
        "quant": lambda: quantize_fp8_rows(x, a_scale),
        "rowwise": lambda: torch._scaled_mm(xq, wq.T, scale_a=x_scale, scale_b=col_scale, out_dtype=x.dtype),
        "tensorwise": lambda: torch._scaled_mm(xq, wq.T, scale_a=one, scale_b=one, out_dtype=x.dtype),
        "fp8 layer": lambda: fp8_gemm(*quantize_fp8_rows(x, a_scale), wq, w_scale, x.dtype),
    }, (xq, x_scale)


def bench_shape(name: str, n: int, k: int, totals: dict) -> None:
    w = torch.randn(n, k, device="cuda") * 0.02
    wb = w.to(torch.bfloat16)
    wq, w_scale = quantize_fp8_weight(w, torch.bfloat16, per_channel=False)
    for m in ROWS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a_scale = (x.float().abs().max() / 448).reshape(1).to(torch.bfloat16)
        cands, (xq, x_scale) = candidates(x, wb, wq, w_scale, a_scale)
        ref = fp8_gemm_emulated(xq, x_scale, wq, w_scale, torch.bfloat16).float()
        err = (cands["rowwise"]().float() - ref).abs().max().item()
        assert err <= 1e-2 * ref.abs().max().item(), f"{name} m{m}: rowwise _scaled_mm off by {err}"
        times = {c: graph_us(fn) for c, fn in cands.items()}
        flops = 2 * m * n * k
        print(f"{name:<8} m{m:<5} " + "  ".join(
            f"{c} {t:7.1f}us" + ("" if c == "quant" else f" {flops / t / 1e6:4.0f}TF") for c, t in times.items()),
            flush=True)
        for c, t in times.items():
            totals[(m, c)] = totals.get((m, c), 0.0) + t


def main():
    if not triton_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("bench_fp8_gemm needs an NVIDIA GPU with FP8 tensor cores (sm_89+) and Triton")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    totals: dict = {}
    for name, n, k in LLAMA3_8B:
        bench_shape(name, n, k, totals)
    print("one decoder layer's linears (sum of the four shapes), µs and speed-up over bf16:")
    for m in ROWS:
        base = totals[(m, "bf16")]
        print(f"  m{m:<5} " + "  ".join(f"{c} {t:7.1f}us {base / t:4.2f}x" for (mm, c), t in totals.items()
                                        if mm == m))


if __name__ == "__main__":
    main()
