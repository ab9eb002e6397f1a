"""The prefill GEMMs of Llama-3-8B (bf16, a mixed step's 8192 rows) under the ways cuBLAS can be asked for them, on an
NVIDIA GPU, each checked against F.linear first:

    python scripts/bench_prefill_gemm.py [--rows 8192,4096]

- `F.linear`: kiln's call today, the weight stored [out, in] (cuBLAS "TN");
- `mm, weight [in, out]`: the weight stored transposed, x @ w (cuBLAS "NN"), as a layout the engine could keep;
- `cuBLASLt`: F.linear with torch.backends.cuda.preferred_blas_library("cublaslt");
- `two halves` (fc_gate only): its fc and gate rows as two calls, two outputs.

Then fc_gate with its activation: F.linear and then `silu_and_mul` (kiln's prompt path) against the Triton GEMM
with the activation as its epilogue (kiln.kernels.gated_gemm, `KILN_GATED_GEMM=1`) on each of its candidate tiles.

In prefill-1000's profile the fc_gate GEMM ran at about 91% of the square matmul rate and the other three at about
95%; this asks whether another layout or library closes that. Prints ms and TFLOP/s per shape and way, and the
square 8192 matmul's rate measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

HIDDEN, INTER, Q, KV = 4096, 14336, 4096, 1024
SHAPES = {"qkv": (Q + 2 * KV, HIDDEN), "o": (HIDDEN, Q), "fc_gate": (2 * INTER, HIDDEN), "proj": (HIDDEN, INTER)}


def ms_per_call(call, rounds: int = 5, iters: int = 20) -> float:
    """Median over rounds of back-to-back calls timed by CUDA events (each GEMM is long enough that launch gaps do
    not count)."""
    for _ in range(3):
        call()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def with_library(library: str, call):
    def run():
        torch.backends.cuda.preferred_blas_library(library)
        try:
            return call()
        finally:
            torch.backends.cuda.preferred_blas_library("cublas")
    return run


def ways(x: torch.Tensor, w: torch.Tensor, name: str) -> dict:
    wt = w.t().contiguous()
    out = {"F.linear": lambda: F.linear(x, w), "mm, weight [in, out]": lambda: torch.mm(x, wt),
           "cuBLASLt": with_library("cublaslt", lambda: F.linear(x, w))}
    if name == "fc_gate":
        fc, gate = w[:INTER], w[INTER:]  # contiguous row blocks
        out["two halves"] = lambda: (F.linear(x, fc), F.linear(x, gate))  # an activation could read both
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="8192,4096")
    args = parser.parse_args()
    torch.manual_seed(0)
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(50):  # about a second of work first: clocks ramp up under load (the first run's square rate
        a @ b            # was below some shapes' at a cold start)
    square = 2 * n ** 3 / ms_per_call(lambda: a @ b) / 1e9
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; square {n} matmul {square:.0f} TFLOP/s")
    for rows in map(int, args.rows.split(",")):
        for name, (n_out, k) in SHAPES.items():
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n_out, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
            ref = F.linear(x, w).float()
            flops = 2 * rows * n_out * k
            cells = []
            for way, call in ways(x, w, name).items():
                y = call()
                y = torch.cat(y, dim=-1) if isinstance(y, tuple) else y
                ok = torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2)
                ms = ms_per_call(call)
                rate = flops / ms / 1e9
                mark = "" if ok else " MISMATCH"
                cells.append(f"{way} {ms:.3f} ms {rate:.0f} TFLOP/s ({100 * rate / square:.1f}%){mark}")
            print(f"{name} {rows} x {n_out} x {k}: " + " | ".join(cells), flush=True)
        fc_gate_with_activation(rows, square)


def fc_gate_with_activation(rows: int, square: float) -> None:
    """fc_gate and SiLU-and-mul, as kiln runs them today and fused (each tile checked against the reference)."""
    from kiln.kernels import gated_gemm
    from kiln.kernels.activation import silu_and_mul

    n_out, k = SHAPES["fc_gate"]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n_out, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    ref = gated_gemm.silu_and_mul_gemm_ref(x, w).float()
    flops = 2 * rows * n_out * k
    ways = {"F.linear + silu_and_mul": lambda: silu_and_mul(F.linear(x, w))}
    for cfg in gated_gemm.GATED_GEMM_CONFIGS:
        label = "fused {BLOCK_M}x{BLOCK_N}x{BLOCK_K} w{num_warps} s{num_stages}".format(**cfg)
        label += " persistent" if cfg["PERSISTENT"] else ""  # (else two tiles share a label, one result lost)
        ways[label] = lambda cfg=cfg: gated_gemm.silu_and_mul_gemm(x, w, cfg)
    cells = []
    for way, call in ways.items():
        try:
            scale = ref.abs().max().item()
            ok = torch.allclose(call().float(), ref, rtol=2 ** -5, atol=2 ** -5 * scale)
            ms = ms_per_call(call)
            rate = flops / ms / 1e9
            mark = "" if ok else " MISMATCH"
            cells.append(f"{way} {ms:.3f} ms {rate:.0f} TFLOP/s ({100 * rate / square:.1f}%){mark}")
        except Exception as error:  # a tile that does not compile or fit: say so and go on
            cells.append(f"{way} failed: {type(error).__name__}: {str(error)[:120]}")
    print(f"fc_gate + activation {rows} x {n_out} x {k}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
