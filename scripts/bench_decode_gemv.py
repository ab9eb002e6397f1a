"""Batch-1 GEMVs of every weight format against the bf16 linear on Llama-3-8B shapes, as a decode step streams
them: `PYTHONPATH=. python scripts/bench_decode_gemv.py [--formats bf16,int8,fp8,int4]` (an NVIDIA GPU with Triton).

Each kernel is replayed from a CUDA graph over copies of its weight that together overflow the L2 cache, so
every call reads its weight from memory (kiln.kernels.bench_quant_gemm replays one weight, which a 4096 x 4096
int4 matrix leaves in L2). Formats run as their engines run them at batch 1: bf16 by `linear` (the GEMV or cuBLAS,
whichever measured faster), int8 by `w8a16_matmul`, fp8 on x's codes by `scaled_gemv` (per-tensor scales, as the FP8
engine's layers), `fp8-tok` by per-token quantization then `scaled_gemv` (the FP8 lm_head), int4 (group 128) by
`w4a16_matmul`. KILN_PDL=0 times them launched without programmatic dependent launch (kiln.kernels.pdl). Prints
microseconds and TB/s of the weight bytes (codes and scales), then the sum over 32 decoder layers (qkv, o_proj,
fc_gate, down)."""

import argparse
import logging

import torch

from kiln.kernels import quant_gemm as qg
from kiln.kernels.bench_quant_gemm import graph_us
from kiln.kernels.gemv import linear, scaled_gemv, static_fp8_gemv
from kiln.quantization.fp8 import quantize_fp8_per_token, quantize_fp8_static, quantize_fp8_weight
from kiln.quantization.weight_only import (
    quantize_int4_groups,
    quantize_int8_per_channel,
)

SHAPES = (("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("fc_gate", 28672, 4096), ("down", 4096, 14336),
          ("lm_head", 128256, 4096))
L2_OVERFLOW_BYTES = 256 * 2**20


def int4(w, x):
    packed, scale, _ = quantize_int4_groups(w, 128, False, torch.bfloat16)
    return (packed, scale), lambda c: qg.w4a16_matmul(x, c[0], c[1], None, 128)


def int8(w, x):
    q, s = quantize_int8_per_channel(w, torch.bfloat16)
    return (q, s), lambda c: qg.w8a16_matmul(x, c[0], c[1])


def fp8(w, x):
    """As the FP8 engine's decode runs: x arrives as e4m3 codes over the static scale (the norm, SiLU-and-mul or
    attention's merge wrote them), and the GEMV on codes runs the kernel kind its tuner picked (CUDA cores, int64
    words or the tensor cores; the choice is logged at INFO). `fp8-static` is the GEMV quantizing x itself."""
    q, s = quantize_fp8_weight(w, torch.bfloat16, per_channel=False)
    xq, xs = quantize_fp8_static(x, (x.abs().max().float() / 448.0).reshape(1))
    return (q, s.float()), lambda c: scaled_gemv(xq, xs, c[0], c[1], torch.bfloat16)


def fp8_static(w, x):
    q, s = quantize_fp8_weight(w, torch.bfloat16, per_channel=False)
    x_scale = (x.abs().max().float() / 448.0).reshape(1)
    return (q, s), lambda c: static_fp8_gemv(x, x_scale, c[0], c[1], torch.bfloat16)


def fp8_per_token(w, x):
    q, s = quantize_fp8_weight(w, torch.bfloat16, per_channel=True)
    return (q, s), lambda c: scaled_gemv(*quantize_fp8_per_token(x), c[0], c[1], torch.bfloat16)


def bf16(w, x):
    return (w.to(torch.bfloat16),), lambda c: linear(x, c[0])


FORMATS = {"bf16": bf16, "int8": int8, "fp8": fp8, "fp8-static": fp8_static, "fp8-tok": fp8_per_token, "int4": int4}


def time_format(make, w, x) -> tuple[float, int]:
    """(microseconds per call, weight bytes) over L2-overflowing copies of the format's tensors."""
    tensors, call = make(w, x)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    copies = [tuple(t.clone() for t in tensors) for _ in range(max(2, min(16, -(-L2_OVERFLOW_BYTES // nbytes))))]
    call(copies[0])  # autotunes outside the graph
    return graph_us(lambda: [call(c) for c in copies], iters=4) / len(copies), nbytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    formats = parser.parse_args().formats.split(",")
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # (the FP8 tuner's kinds and pick)
    torch.manual_seed(0)
    total = dict.fromkeys(formats, 0.0)
    for name, n, k in SHAPES:
        w = torch.randn(n, k, device="cuda") * 0.02
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        cells = []
        for fmt in formats:
            us, nbytes = time_format(FORMATS[fmt], w, x)
            cells.append(f"{fmt} {us:7.1f}us {nbytes / us / 1e6:4.2f}TB/s")
            if name != "lm_head":  # (the sum is the decoder layers')
                total[fmt] += us * 32
        print(f"{name:8} " + "   ".join(cells), flush=True)
    print("32 layers: " + ", ".join(f"{fmt} {t / 1e3:.2f} ms" for fmt, t in total.items()))


if __name__ == "__main__":
    main()
