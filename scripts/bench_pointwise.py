"""RMSNorm (with its residual add) and SiLU-and-mul alone, per output format (the model dtype, or the e4m3 codes an
FP8 linear reads) and row count, over each kernel's program shape: `PYTHONPATH=. python scripts/bench_pointwise.py`
(a GPU; about 120 compiles, 1-2 minutes).

Why: rotary's program shape, set by a formula, ran 4-5x slower than the best shape of a sweep once its cache held
codes (docs/performance.md, twenty-fourth session). These two kernels' shapes are formulas too. In the FP8
batch-512 decode step (H200, PDL off) RMSNorm took 5.8 us a call and SiLU-and-mul 11.8 us: about 2.5 and 3.1 TB/s
of the bytes each must move, against 4.2 TB/s of copy bandwidth. Llama-3-8B sizes (hidden 4096, intermediate
14336), bf16, CUDA-graph replay. GB/s counts those bytes: RMSNorm reads x and the residual and writes the new
residual and the normed rows; SiLU-and-mul reads [fc | gate] and writes the product. Each case is first checked
against the reference (largest difference printed; codes compared as the values they stand for).

The calls of a timed graph take turns over clones of their inputs, together over 256 MB, so each reads its inputs
from memory as in a decode step, not from the 50 MB L2 cache. The twenty-fifth session's first sweep reran one
input: it found 16 warps 29% faster for RMSNorm at 512 rows of e4m3, but the engine's batch-512 step showed no
change at all (5.8 us a call with either shape), so the L2-hot numbers did not carry over.
"""

from __future__ import annotations

import itertools

import torch

from kiln.kernels import activation, rmsnorm
from kiln.kernels.fp8_quant import quantize_fp8_rows_ref
from kiln.kernels.gemv import weight_copies
from shape_sweep import report, time_shapes

HIDDEN, INTER = 4096, 14336
ROWS = (1, 16, 64, 256, 512, 2048, 8192)
FP8_SCALE = 0.02  # a static activation scale: |x| up to about 9 fits e4m3's 448
NORM_SHAPES = [None] + [(4096, w) for w in (1, 2, 4, 8, 16, 32)]  # (BLOCK: the whole row, warps); None: the default
SILU_SHAPES = [None] + [(b, w) for b in (256, 512, 1024, 2048, 4096) for w in (1, 2, 4, 8)]


def as_values(out) -> torch.Tensor:
    """A kernel's or reference's output as float values: codes times their row scales, or the rows as they are."""
    return out.q.float() * out.scale if hasattr(out, "scale") else out.float()


def taking_turns(kernel, *inputs):
    """A call of `kernel` on the next of a cycle of identical input clones (weight_copies: over 256 MB in all)."""
    turns = itertools.cycle(weight_copies(*inputs))
    return lambda: kernel(*next(turns))


def norm_case(rows: int, fp8: bool, device: str = "cuda", dtype=torch.bfloat16):
    """(run, largest difference from the reference, bytes moved) of RMSNorm with the residual add."""
    x, residual = (torch.randn(rows, HIDDEN, device=device, dtype=dtype) for _ in range(2))
    weight = torch.randn(HIDDEN, device=device, dtype=dtype)
    scale = torch.tensor([FP8_SCALE], device=device) if fp8 else None
    run = taking_turns(lambda x, residual: rmsnorm.rms_norm(x, weight, 1e-5, residual, scale), x, residual)
    normed, summed = rmsnorm.rms_norm_ref(x, weight, 1e-5, residual)
    want = quantize_fp8_rows_ref(normed, scale) if fp8 else normed

    def difference() -> float:
        out, new_residual = run()
        return max((as_values(out) - as_values(want)).abs().max().item(),
                   (new_residual.float() - summed.float()).abs().max().item())

    moved = rows * HIDDEN * (2 + 2 + 2 + (1 if fp8 else 2))
    return run, difference, moved


def silu_case(rows: int, fp8: bool, device: str = "cuda", dtype=torch.bfloat16):
    """(run, largest difference from the reference, bytes moved) of SiLU-and-mul."""
    fc_gate = torch.randn(rows, 2 * INTER, device=device, dtype=dtype)
    scale = torch.tensor([FP8_SCALE], device=device) if fp8 else None
    run = taking_turns(lambda fc_gate: activation.silu_and_mul(fc_gate, scale), fc_gate)
    product = activation.silu_and_mul_ref(fc_gate)
    want = quantize_fp8_rows_ref(product, scale) if fp8 else product
    moved = rows * INTER * (2 * 2 + (1 if fp8 else 2))
    return run, lambda: (as_values(run()) - as_values(want)).abs().max().item(), moved


def sweep(label: str, module, shapes, case, width: int):
    """For each output format and row count, every shape checked and timed (shape_sweep)."""
    for fp8 in (False, True):
        for rows in ROWS:
            run, difference, moved = case(rows, fp8)
            timed, errors = time_shapes(module, shapes, (rows, width), run, difference)
            report(f"{label} {'fp8' if fp8 else 'bf16'} {rows} rows", moved, timed, errors)


def main():
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    torch.manual_seed(0)
    sweep("rms_norm", rmsnorm, NORM_SHAPES, norm_case, HIDDEN)
    sweep("silu_and_mul", activation, SILU_SHAPES, silu_case, INTER)


if __name__ == "__main__":
    main()
