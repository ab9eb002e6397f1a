"""The int4 GEMV of several versions of kiln/kernels/quant_gemm.py side by side in one run, on an NVIDIA GPU: each
tile of each version's W4_GEMV_TILES on Llama-3-8B's four linear shapes at one row (group 128, symmetric and with
zero points), timed as the engine's tuner times them (CUDA-graph replay over weight copies that overflow L2), and
checked against F.linear of the dequantized weight (3 units of bf16 in the last place of sum |x||w|).

    python scripts/bench_w4_gemv_versions.py [OLD_QUANT_GEMM.py ...]

The working tree's kernel is always the first column; each file named is imported as its own module, so an old
version (say, `git show REV:kiln/kernels/quant_gemm.py > /tmp/old.py`) runs beside it in the same process.

    python scripts/bench_w4_gemv_versions.py --sweep

times the tree's best tile (symmetric codes), the FP8 GEMV as an FP8 engine's decode runs it (e4m3 codes of x
and of the weights, the tuner's kernel) and the Triton 16-bit GEMV of bf16 weights (kiln.kernels.gemv) at 4096
columns and 1024 .. 57344 outputs, and fits time = fixed + bytes / rate to each: whether a quantized GEMV loses
its time in a cost per call or in a streaming rate below the bandwidth.
"""

from __future__ import annotations

import functools
import importlib.util
import sys

import torch
import torch.nn.functional as F

from kiln.kernels import quant_gemm
from kiln.kernels.bench_quant_gemm import LLAMA3_8B
from kiln.kernels.gemv import candidate_ms, weight_copies
from kiln.quantization.fp8 import quantize_fp8_per_token, quantize_fp8_weight
from kiln.quantization.weight_only import dequantize_int4, quantize_int4_groups

GROUP = 128


def load_version(path: str):
    spec = importlib.util.spec_from_file_location(f"quant_gemm_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tile_us(module, x, packed, scale, zero) -> dict:
    """Microseconds per call of each tile, and whether every tile's result is within the bound."""
    words = packed.view(getattr(module, "WORD_DTYPE", torch.int32))  # (int32 words of 8 codes before 2026-12-04)
    y = torch.empty(1, packed.shape[0], dtype=x.dtype, device=x.device)
    copies = module._int4_weight_copies(words, scale, zero)
    ms = candidate_ms(list(module.W4_GEMV_TILES), lambda tile: [
        lambda w=w, tile=tile: module._run_w4_gemv(x, w[0], w[1], w[2], GROUP, y, tile) for w in copies])
    weight = dequantize_int4(packed, scale, zero, GROUP, x.dtype)
    want = F.linear(x.float(), weight.float())
    bound = 3 * 2.0 ** -8 * (x.float().abs() @ weight.float().abs().T)
    ok = True
    for tile in module.W4_GEMV_TILES:
        module._run_w4_gemv(x, words, scale, zero, GROUP, y, tile)
        ok &= bool(((y.float() - want).abs() <= bound).all())
    return {tile: t * 1000 for tile, t in ms.items()}, ok


def main() -> None:
    versions = [("tree", quant_gemm)] + [(path, load_version(path)) for path in sys.argv[1:]]
    print(f"# {torch.cuda.get_device_name()}, one row, group {GROUP}; best tile's us per call (all tiles ok)")
    torch.manual_seed(0)
    totals = {(name, zero): 0.0 for name, _ in versions for zero in (False, True)}
    for zero in (False, True):
        for shape, n, k in LLAMA3_8B:
            x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
            packed, scale, z = quantize_int4_groups(torch.randn(n, k, device="cuda"), GROUP, zero, torch.bfloat16)
            cells = []
            for name, module in versions:
                us, ok = tile_us(module, x, packed, scale, z)
                best = min(us, key=us.get)
                totals[name, zero] += us[best]
                cells.append(f"{name}: {us[best]:.1f} {best} ok={ok}")
                print(f"    {name} zero={zero} {shape}: " + "  ".join(f"{t}:{v:.1f}" for t, v in us.items()))
            print(f"zero={zero!s:<5} {shape:<8} " + " | ".join(cells), flush=True)
    for (name, zero), total in totals.items():
        print(f"layer total zero={zero} {name}: {total:.1f} us")


def fp8_us(xq, x_scale, weight) -> tuple[float, object, int]:
    """Microseconds per call of the FP8 GEMV as an FP8 engine's decode runs it (x as e4m3 codes with its row scale:
    the tuner's choice of the CUDA-core kernel or an e4m3 MMA tile), that choice, and the bytes it reads."""
    from kiln.kernels.gemv import FP8_DOT_TILES, _run_gemv  # (the tiles exist where Triton does)

    wq, w_scale = quantize_fp8_weight(weight, torch.bfloat16, per_channel=True)
    w_scale = w_scale.float()  # as the FP8 linear keeps them for its GEMMs (Fp8Method.prepare)
    y = torch.empty(1, wq.shape[0], dtype=torch.bfloat16, device=wq.device)
    x_scale = x_scale.reshape(-1).float().contiguous()
    ms = candidate_ms([None, *FP8_DOT_TILES], lambda tile: [
        functools.partial(_run_gemv, (xq, w, y, x_scale, s, False), tile) for w, s in weight_copies(wq, w_scale)])
    best = min(ms, key=ms.get)
    return 1000 * ms[best], best, wq.numel() + w_scale.numel() * w_scale.element_size()


def sweep() -> None:
    """The fit of the module docstring, by least squares over the output counts."""
    from kiln.kernels.gemv import gemv

    print(f"# {torch.cuda.get_device_name()}, one row, 4096 columns; us per call (best tile), then the fit")
    torch.manual_seed(0)
    x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    xq, x_scale = quantize_fp8_per_token(x)
    points = {"int4": [], "fp8": [], "bf16": []}
    for n in (1024, 2048, 4096, 8192, 16384, 28672, 57344):
        packed, scale, _ = quantize_int4_groups(torch.randn(n, 4096, device="cuda"), GROUP, False, torch.bfloat16)
        us, _ = tile_us(quant_gemm, x, packed, scale, None)
        weight = torch.randn(n, 4096, dtype=torch.bfloat16, device="cuda")
        fp8, fp8_tile, fp8_bytes = fp8_us(xq, x_scale, weight)
        copies = [w for w, in weight_copies(weight)]  # more than L2 holds, as tile_us's copies
        bf16_us = 1000 * candidate_ms(["gemv"], lambda _: [lambda w=w: gemv(x, w) for w in copies])["gemv"]
        points["int4"].append((packed.numel() + scale.numel() * 2, min(us.values())))
        points["fp8"].append((fp8_bytes, fp8))
        points["bf16"].append((weight.numel() * 2, bf16_us))
        print(f"n={n:<6} int4 {min(us.values()):7.1f} us ({min(us, key=us.get)})   fp8 {fp8:7.1f} us ({fp8_tile})   "
              f"bf16 {bf16_us:7.1f} us", flush=True)
    for name, pts in points.items():
        bytes_, us = torch.tensor(pts, dtype=torch.float64).T
        slope, fixed = torch.linalg.lstsq(torch.stack([bytes_, torch.ones_like(bytes_)], 1), us[:, None]).solution[:, 0]
        print(f"{name}: fixed {fixed:.2f} us a call, streaming at {1e-6 / slope:.2f} TB/s")


if __name__ == "__main__":
    sweep() if sys.argv[1:] == ["--sweep"] else main()
