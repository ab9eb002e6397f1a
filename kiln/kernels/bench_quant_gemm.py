"""Check the weight-only matmul kernels against their references, then time them against bf16 F.linear on
Llama-3-8B layer shapes: `python -m kiln.kernels.bench_quant_gemm` (an NVIDIA GPU with Triton).

Correctness: random inputs, shapes that are not multiples of any tile or group, both kernels (GEMV and GEMM)
and every int4 variant; the bound is 3 units in the last place of x's dtype on sum_k |x_k| |w_k| (the
reference rounds the dequantized weight to x's dtype, the kernel need not, and both round the output).
Speed: each call is replayed from a CUDA graph, so launch overhead is not counted (the engine decodes from
graphs too). GB/s counts the bytes a call must move at least: packed weights, scales, x and y. Dequantizing
to bf16 and calling cuBLAS would cost the bf16 time plus the dequantization, so the fused kernels must beat
the bf16 column at every size where they are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels import quant_gemm as qg
from kiln.kernels import triton_available
from kiln.quantization.weight_only import dequantize_int4, quantize_int4_groups, quantize_int8_per_channel

DTYPE = torch.bfloat16
# (name, out, in): the fused QKV, attention output, fused fc+gate and MLP down projection of one layer.
LLAMA3_8B = (("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("fc_gate", 28672, 4096), ("down", 4096, 14336))
ROWS = (1, 4, 16, 64, 128, 256)


def graph_us(fn, iters: int = 50) -> float:
    """Microseconds per call, replaying `iters` calls from one CUDA graph (after an eager warm-up)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * iters)


def bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """3 ulps of x's dtype on sum_k |x_k| |w_k| (see the module docstring), plus the smallest normal."""
    eps = torch.finfo(x.dtype).eps  # 2 units of roundoff
    return 1.5 * eps * (x.float().abs() @ w.float().abs().T) + torch.finfo(x.dtype).tiny


def check(name: str, out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    err = (out.float() - ref.float()).abs()
    ok = bool((err <= bound(x, w)).all())
    print(f"  {name:<58} max err {err.max().item():.3g} (|y| max {ref.abs().max().item():.3g}) "
          f"{'ok' if ok else 'FAIL'}", flush=True)
    if not ok:
        raise SystemExit(f"{name}: kernel differs from its reference beyond the bound")


def check_correctness() -> None:
    """Odd shapes, every variant, both kernels; one config each (AUTOTUNE off keeps this quick)."""
    print("correctness (first config of each kernel):", flush=True)
    qg.AUTOTUNE = False
    for m in (1, 3, 37, 130):
        for n, k, group, zero in ((77, 200, 32, True), (131, 456, 64, False), (96, 576, 128, True),
                                  (50, 1000, 128, False)):
            x = torch.randn(m, k, device="cuda", dtype=DTYPE)
            packed, scale, z = quantize_int4_groups(torch.randn(n, k, device="cuda"), group, zero, DTYPE)
            w = dequantize_int4(packed, scale, z, group, DTYPE)
            check(f"w4a16 m{m} n{n} k{k} g{group} zero={zero}", qg.w4a16_matmul(x, packed, scale, z, group),
                  qg.w4a16_matmul_ref(x, packed, scale, z, group), x, w)
        for n, k in ((77, 200), (130, 1000)):
            x = torch.randn(m, k, device="cuda", dtype=DTYPE)
            q, scale = quantize_int8_per_channel(torch.randn(n, k, device="cuda"), DTYPE)
            check(f"w8a16 m{m} n{n} k{k}", qg.w8a16_matmul(x, q, scale), qg.w8a16_matmul_ref(x, q, scale), x,
                  q.float() * scale.float()[:, None])
    for n, k, group, zero in ((77, 200, 32, True), (131, 456, 64, False), (4096, 4096, 128, True)):
        packed, scale, z = quantize_int4_groups(torch.randn(n, k, device="cuda"), group, zero, DTYPE)
        same = torch.equal(qg.w4a16_dequantize(packed, scale, z, group, DTYPE),
                           dequantize_int4(packed, scale, z, group, DTYPE))
        print(f"  w4a16_dequantize n{n} k{k} g{group} zero={zero}: {'bit-equal' if same else 'FAIL'}", flush=True)
        if not same:
            raise SystemExit("w4a16_dequantize differs from dequantize_int4")
    qg.AUTOTUNE = True


def bench_shape(name: str, n: int, k: int, totals: dict) -> None:
    w = torch.randn(n, k, device="cuda") * 0.02
    wb = w.to(DTYPE)
    packed, scale, _ = quantize_int4_groups(w, 128, False, DTYPE)
    packed_z, scale_z, zero = quantize_int4_groups(w, 128, True, DTYPE)
    q8, s8 = quantize_int8_per_channel(w, DTYPE)
    w4 = dequantize_int4(packed, scale, None, 128, DTYPE)
    for m in ROWS:
        x = torch.randn(m, k, device="cuda", dtype=DTYPE)
        io = (m * k + m * n) * 2
        cands = {"bf16": (lambda: F.linear(x, wb), wb.numel() * 2 + io),
                 "w4g128": (lambda: qg.w4a16_matmul(x, packed, scale, None, 128),
                            packed.numel() + scale.numel() * 2 + io),
                 "w4g128zp": (lambda: qg.w4a16_matmul(x, packed_z, scale_z, zero, 128),
                             packed.numel() + scale.numel() * 4 + io),
                "w8": (lambda: qg.w8a16_matmul(x, q8, s8), q8.numel() + s8.numel() * 2 + io)}
        if m >= 16:  # the two int4 paths DEQUANT_MIN_ROWS chooses between, forced
            cands["w4 fused"] = (lambda: qg.w4a16_fused_matmul(x, packed, scale, None, 128), cands["w4g128"][1])
            cands["w4 deq+cuBLAS"] = (lambda: F.linear(x, qg.w4a16_dequantize(packed, scale, None, 128, DTYPE)),
                                      cands["w4g128"][1])
        check(f"tuned w4a16 {name} m{m}", cands["w4g128"][0](), F.linear(x, w4), x, w4)
        times = {c: graph_us(fn) for c, (fn, _) in cands.items()}
        line = "  ".join(f"{c} {t:7.1f}us {cands[c][1] / t / 1e3:5.0f}GB/s" for c, t in times.items())
        print(f"{name:<8} m{m:<4} {line}", flush=True)
        for c, t in times.items():
            totals[(m, c)] = totals.get((m, c), 0.0) + t


def weights_left_or_right(totals: dict) -> None:
    """The int4 GEMM's best tile with the weights on the MMA's right (y = x W^T) and on its left (y^T = W x^T,
    unpacked in registers), each with x's column pairs split by a copy first or in the kernel (X_AS_IS), per shape
    and row count, the copy's time included: which kinds of tile the tuner should keep."""
    print("int4 GEMM, best tile per operand side and x handover (us):", flush=True)
    for name, n, k in LLAMA3_8B:
        packed, scale, _ = quantize_int4_groups(torch.randn(n, k, device="cuda") * 0.02, 128, False, DTYPE)
        for m in (16, 64, 128):
            x = torch.randn(m, k, device="cuda", dtype=DTYPE)
            y = torch.empty(m, n, device="cuda", dtype=DTYPE)
            best = {}
            for tile in qg._w4_gemm_tiles(qg.rows_bucket(m)):
                us = graph_us(lambda: qg._run_w4_gemm(x, packed, scale, None, 128, y, tile))
                side = ("left" if tile[5] else "right") + (", x as is" if tile[6] else "")
                if us < best.get(side, (float("inf"),))[0]:
                    best[side] = (us, tile)
            line = "  ".join(f"{side} {us:7.1f}us {tile}" for side, (us, tile) in best.items())
            print(f"  {name:<8} m{m:<4} {line}", flush=True)
            for side, (us, _) in best.items():
                totals[(m, side)] = totals.get((m, side), 0.0) + us


def main():
    if not triton_available():
        raise SystemExit("bench_quant_gemm needs an NVIDIA GPU with Triton")
    print(f"device: {torch.cuda.get_device_name()}, activations {DTYPE}", flush=True)
    torch.manual_seed(0)
    check_correctness()
    totals: dict = {}
    for name, n, k in LLAMA3_8B:
        bench_shape(name, n, k, totals)
    print("one decoder layer's linears (sum of the four shapes), speed-up over bf16:")
    for m in ROWS:
        base = totals[(m, "bf16")]
        print(f"  m{m:<4} " + "  ".join(f"{c} {base / t:4.2f}x" for (mm, c), t in totals.items() if mm == m))
    sides: dict = {}
    weights_left_or_right(sides)
    print("  one decoder layer: " + "  ".join(f"m{m} {side} {us:.1f}us" for (m, side), us in sides.items()))
    print(f"int4 GEMV tiles (BLOCK_N, BLOCK_KW, warps) by (N, in/8, group, zero, rows): "
          f"{ {key[1:6]: tile for key, tile in qg._PICKED.items() if key[0] == 'gemv'} }")
    print(f"int4 GEMM tiles (BLOCK_M, BLOCK_N, SPLIT, warps, stages, WEIGHTS_LEFT) by (N, in/2, group, zero, rows "
          f"bucket): { {key[:5]: tile for key, tile in qg._PICKED.items() if key[0] != 'gemv'} }")
    for kernel, (tuned, _) in qg._TUNED.items():
        print(f"best configs of {kernel.fn.__name__}: "
              f"{ {key[:3]: str(cfg) for key, cfg in tuned.cache.items()} }")


if __name__ == "__main__":
    main()
