"""W8A16's batch-1 GEMV on Llama-3-8B shapes: the tile Triton's tuner picks for int8 weights against every int8
tile, each timed as a decode step runs it (CUDA-graph replay over weight copies beyond the L2 cache):
`PYTHONPATH=. python scripts/bench_int8_gemv_tiles.py` (an NVIDIA GPU with Triton).

Why: on an H200 the int8 GEMV streamed o_proj at 2.1 TB/s where the same kernel streamed e4m3 weights at 2.9
(docs/performance.md, twenty-fifth session). The tuner times each tile one call at a time after an L2 flush; the
engine replays them back to back from graphs. Each tile is first checked against the float64 product. Then the
same for the GEMV on words of codes (kiln.kernels.quant_gemm._w8_gemv_kernel), which W8A16 takes where it
measures faster: the working tree's, and beside it each older quant_gemm.py named on the command line
(`git show REV:kiln/kernels/quant_gemm.py > /tmp/old.py`, then `... bench_int8_gemv_tiles.py /tmp/old.py`).
"""

from __future__ import annotations

import functools
import sys

import torch

from kiln.kernels import gemv
from kiln.kernels import quant_gemm as qg
from kiln.kernels.bench_quant_gemm import LLAMA3_8B
from kiln.kernels.pdl import pdl_args
from kiln.quantization.weight_only import quantize_int8_per_channel

from bench_w4_gemv_versions import load_version  # (this folder's script: an older quant_gemm.py as a module)


def run_tile(x, q, scale, y, config) -> None:
    """The full-precision GEMV on int8 codes with one of its autotuner's configs, as the engine launches it."""
    n, k = q.shape
    gemv._gemv_kernel.fn[gemv.gemv_grid(1, n, config.kwargs["BLOCK_N"])](
        x, q, y, y, scale, n, k, x.stride(0), q.stride(0), 1, HAS_X_SCALE=False, HAS_W_SCALE=True, QUANTIZE_X=False,
        num_warps=config.num_warps, num_stages=config.num_stages, **config.kwargs, **pdl_args(x.device))


def word_gemv_us(module, x, q, scale, y, want, name) -> dict:
    """Microseconds per call of each of `module`'s int8 word-GEMV tiles, each checked against want."""
    words = q.view(getattr(module, "WORD_DTYPE", getattr(module, "W8_WORD_DTYPE", torch.int32)))  # (older names)
    us = {tile: 1000 * ms for tile, ms in gemv.candidate_ms(list(module.W8_GEMV_TILES), lambda tile: [
        functools.partial(module._run_w8_gemv, x, w, s, y, tile) for w, s in gemv.weight_copies(words, scale)]).items()}
    for tile in module.W8_GEMV_TILES:  # checked after timing: each tile's last output is in y
        module._run_w8_gemv(x, words, scale, y, tile)
        assert ((y.double() - want).abs() <= 2 ** -7 * want.abs() + 1e-2).all(), (name, module.__file__, tile)
    return us


def main() -> None:
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    modules = [qg, *map(load_version, sys.argv[1:])]
    torch.manual_seed(0)
    for name, n, k in LLAMA3_8B:  # (one decoder layer's four linears)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        q, scale = quantize_int8_per_channel(torch.randn(n, k, device="cuda"), torch.bfloat16)
        want = (x.double() @ q.double().T) * scale.double()
        gemv.scaled_gemv(x, None, q, scale, torch.bfloat16)  # the tuner picks its tile here
        picked = gemv._gemv_kernel.best_config
        copies = gemv.weight_copies(q, scale)
        timed = {}
        for config in gemv._CONFIGS:
            y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
            run_tile(x, q, scale, y, config)
            assert ((y.double() - want).abs() <= 2 ** -7 * want.abs() + 1e-2).all(), (name, config)
            timed[str(config)] = 1000 * gemv.graph_ms_per_call(
                [functools.partial(run_tile, x, w, s, y, config) for w, s in copies])
        best = min(timed, key=timed.get)
        kilobytes = (q.numel() + 2 * n) / 1e3  # codes and scales; per us: GB/s
        for module in modules:
            us = word_gemv_us(module, x, q, scale, y, want, name)
            word_best = min(us, key=us.get)
            print(f"{name}: word GEMV of {module.__file__} best tile {word_best} {us[word_best]:.1f} us "
                  f"({kilobytes / us[word_best]:.0f} GB/s); every tile: "
                  + ", ".join(f"{t} {t_us:.1f}" for t, t_us in us.items()), flush=True)
        pick_us = timed[str(picked)]
        print(f"{name} {n}x{k}: tuner's pick {picked} {pick_us:.1f} us ({kilobytes / pick_us:.0f} GB/s); "
              f"best {best} {timed[best]:.1f} us ({kilobytes / timed[best]:.0f} GB/s)", flush=True)
        for config, us in sorted(timed.items(), key=lambda t: t[1])[:5]:
            print(f"    {us:6.1f} us  {config}")


if __name__ == "__main__":
    main()
