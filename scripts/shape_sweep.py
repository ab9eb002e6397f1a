"""The program-shape sweep of scripts/bench_rotary.py and scripts/bench_pointwise.py: a kernel module's
`program_shape` set to each candidate in turn, each checked against the reference, then timed."""

from __future__ import annotations

from kiln.kernels.bench_quant_gemm import graph_us


def time_shapes(module, shapes, default_args: tuple, run, difference) -> tuple[dict, dict]:
    """({shape: us a call}, {shape: largest difference from the reference}) of `run` with `module.program_shape`
    returning each of `shapes` (None: the module's own, named by what it returns for `default_args`)."""
    default = module.program_shape
    timed, errors = {}, {}
    try:
        for shape in shapes:
            module.program_shape = default if shape is None else (lambda *_, s=shape: s)
            name = shape or ("default",) + default(*default_args)
            errors[name] = difference()
            timed[name] = graph_us(run, iters=20)
    finally:
        module.program_shape = default
    return timed, errors


def report(label: str, moved_bytes: int, timed: dict, errors: dict) -> None:
    """One line: the fastest shape and its GB/s of `moved_bytes`, the largest difference, every shape by time."""
    best = min(timed, key=timed.get)
    print(f"{label}: best {best} at {moved_bytes / timed[best] / 1e3:.0f} GB/s; largest difference from the "
          f"reference {max(errors.values()):.3g} | "
          + " | ".join(f"{name} {us:.1f}us" for name, us in sorted(timed.items(), key=lambda t: t[1])), flush=True)
