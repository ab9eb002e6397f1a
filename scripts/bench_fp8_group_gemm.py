"""Time FP8_BLOCK_SCALES' group GEMM and GEMV (kiln.kernels.fp8_group_gemm) beside bf16 F.linear on Llama-3-8B's
linear shapes, from batch-1 decode to prompt-sized row counts, on an FP8 GPU:

    PYTHONPATH=. python scripts/bench_fp8_group_gemm.py [--group 128]

Each result is first checked against the torch reference on fresh random inputs. Columns, microseconds a call
replayed from a CUDA graph (kiln.kernels.bench_quant_gemm.graph_us):
- bf16: F.linear on the same weight in bf16.
- quant: the activations' group quantization pass (quantize_fp8_groups), ahead of every group GEMM.
- row-major / column-major: the GEMM (its tile autotuned) with the weight scales [N, G] stored either way; the
  engine stores them column-major (Fp8BlockMethod.prepare).
- then each GEMM tile alone (column-major scales), or for up to 16 rows the GEMV split into 1, 2, 4, 8 and 16 parts
  of the input dim (the default split in brackets).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton

from kiln.kernels import fp8_group_gemm as gg
from kiln.kernels import num_sms
from kiln.kernels.bench_quant_gemm import LLAMA3_8B, graph_us
from kiln.kernels.fp8_quant import quantize_fp8_groups
from kiln.quantization.fp8_block import quantize_fp8_groups_weight

ROWS = (1, 16, 64, 512, 4096)


def column_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def forced_tile(config, xq, xs, wq, ws, group: int, y):
    """A call of the GEMM kernel on one tile, outside the autotuner."""
    m, (n, k) = xq.shape[0], wq.shape
    grid = (triton.cdiv(m, config.kwargs["BLOCK_M"]), triton.cdiv(n, config.kwargs["BLOCK_N"]))
    return lambda: gg._fp8_group_gemm_kernel[grid](
        xq, xs, wq, ws, y, m, n, k, xq.stride(0), *xs.stride(), *ws.stride(), gg.rows_bucket(m), GROUP=group,
        **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def check(label: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Within 2^-7 of the largest output: bf16's rounding (2^-9) and the FP8 MMA's truncated sums (2^-13 a 32-input
    step), with room; a wrong tile, mask or split is far off."""
    err = (got.float() - want.float()).abs().max().item()
    bound = 2 ** -7 * want.float().abs().max().item()
    if not err <= bound:
        raise SystemExit(f"{label}: max error {err:.4g} over the bound {bound:.4g}")


def bench_shape(name: str, n: int, k: int, group: int) -> None:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    wq, ws_rows = quantize_fp8_groups_weight(w, group, torch.bfloat16)
    ws_cols = column_major(ws_rows)
    for m in ROWS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        xq, xs = quantize_fp8_groups(x, group)
        want = gg.fp8_group_gemm_ref(xq, xs, wq, ws_rows, group, torch.bfloat16)
        for scales in (ws_rows, ws_cols):
            check(f"{name} {m} rows", gg.fp8_group_gemm(xq, xs, wq, scales, group, torch.bfloat16), want)
        times = {"bf16": graph_us(lambda: F.linear(x, w)), "quant": graph_us(lambda: quantize_fp8_groups(x, group))}
        for label, scales in (("row-major", ws_rows), ("column-major", ws_cols)):
            times[label] = graph_us(lambda: gg.fp8_group_gemm(xq, xs, wq, scales, group, torch.bfloat16))
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        if m <= gg.GEMV_ROWS:
            default = gg.gemv_split(n, -(-k // group), num_sms(0))
            for parts in (1, 2, 4, 8, 16):
                got = gg.fp8_group_gemm(xq, xs, wq, ws_cols, group, torch.bfloat16, gemv_parts=parts)
                check(f"{name} {m} rows, GEMV in {parts} parts", got, want)
                label = f"gemv/{parts}" + (" [default]" if parts == default else "")
                times[label] = graph_us(lambda: gg.fp8_group_gemm(xq, xs, wq, ws_cols, group, torch.bfloat16,
                                                                  gemv_parts=parts))
        else:
            for config in gg._CONFIGS:
                call = forced_tile(config, xq, xs, wq, ws_cols, group, y)
                call()
                check(f"{name} {m} rows, tile {config}", y, want)
                kw = config.kwargs
                times[f"{kw['BLOCK_M']}x{kw['BLOCK_N']}/{config.num_warps}/{config.num_stages}"] = graph_us(call)
        print(f"{name} {m}x{n}x{k}: " + ", ".join(f"{key} {us:.1f}" for key, us in times.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, group {args.group}, us a call (CUDA graph replay)")
    for name, n, k in LLAMA3_8B:
        bench_shape(name, n, k, args.group)


if __name__ == "__main__":
    main()
