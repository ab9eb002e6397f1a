"""The int4 GEMV's epilogue variants against the two launches they replace, on an NVIDIA GPU, one row, Llama-3-8B's
fc_gate and qkv shapes (group 128, symmetric and with zero points): every tile of W4_GEMV_TILES for

- fc_gate: the GEMV with SiLU-and-mul as its epilogue (`gated`), against the plain GEMV of [fc; gate] followed by
  silu_and_mul;
- qkv: the GEMV with rotary and the cache write as its epilogue, against the plain GEMV followed by
  apply_rotary_and_write_cache.

Timed as the engine's tuner times them (CUDA-graph replay over weight copies that overflow L2), us per call; each
fused tile is checked bit-equal to its two-launch twin, as the kernel tests check the epilogue tiles.

    PYTHONPATH=. python scripts/bench_w4_epilogue_tiles.py
"""

from __future__ import annotations

import functools

import torch

from kiln.kernels import quant_gemm as qg
from kiln.kernels.activation import silu_and_mul
from kiln.kernels.gemv import candidate_ms
from kiln.kernels.rotary import apply_rotary_and_write_cache
from kiln.quantization.weight_only import quantize_int4_groups

GROUP, K, INTER, HEADS, KV_HEADS, HEAD = 128, 4096, 14336, 32, 8, 128
TILES = list(dict.fromkeys(qg.W4_GEMV_TILES + qg.W4_EPILOGUE_TILES))


def us_per_call(run_of, copies) -> dict:
    """{tile: us} of run_of(tile, words, scale, zero) over every weight copy."""
    ms = candidate_ms(TILES, lambda tile: [functools.partial(run_of, tile, *w) for w in copies])
    return {tile: t * 1000 for tile, t in ms.items()}


def gated_case(x, zero_point):
    packed, scale, zero = quantize_int4_groups(torch.randn(2 * INTER, K, device="cuda"), GROUP, zero_point, x.dtype)
    copies = qg._int4_weight_copies(packed.view(qg.WORD_DTYPE), scale, zero)
    both = torch.empty(1, 2 * INTER, device="cuda", dtype=x.dtype)
    fused = torch.empty(1, INTER, device="cuda", dtype=x.dtype)

    def two_launches(tile, w, s, z):
        qg._run_w4_gemv(x, w, s, z, GROUP, both, tile)
        return silu_and_mul(both)

    def one_launch(tile, w, s, z):
        qg._run_w4_gemv(x, w, s, z, GROUP, fused, tile, gated=True)
        return fused

    return two_launches, one_launch, copies


def rotary_case(x, zero_point):
    n = (HEADS + 2 * KV_HEADS) * HEAD
    packed, scale, zero = quantize_int4_groups(torch.randn(n, K, device="cuda"), GROUP, zero_point, x.dtype)
    copies = qg._int4_weight_copies(packed.view(qg.WORD_DTYPE), scale, zero)
    positions, slots = torch.tensor([300], device="cuda"), torch.tensor([5], device="cuda")
    inv_freq = 500000.0 ** -(torch.arange(0, HEAD, 2, device="cuda").float() / HEAD)
    caches = torch.randn(4, 64, KV_HEADS, HEAD, device="cuda").to(x.dtype)
    y_two, y_one = (torch.empty(1, n, device="cuda", dtype=x.dtype) for _ in range(2))

    def two_launches(tile, w, s, z):
        qg._run_w4_gemv(x, w, s, z, GROUP, y_two, tile)
        q, k, v = (t.unflatten(-1, (-1, HEAD)) for t in y_two.split([HEADS * HEAD, KV_HEADS * HEAD,
                                                                     KV_HEADS * HEAD], dim=-1))
        apply_rotary_and_write_cache(q, k, v, positions, inv_freq, caches[0], caches[1], slots, None)
        return y_two

    def one_launch(tile, w, s, z):
        qg._run_w4_qkv_rotary(x, w, s, z, GROUP, y_one, tile, (HEADS, KV_HEADS, HEAD, positions, inv_freq,
                                                                caches[2], caches[3], slots, None))
        return y_one

    return two_launches, one_launch, copies


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    print(f"# {torch.cuda.get_device_name()}, one row, group {GROUP}; us per call of each tile")
    for name, case in (("fc_gate + SiLU", gated_case), ("qkv + rotary", rotary_case)):
        for zero_point in (False, True):
            two, one, copies = case(x, zero_point)
            same = all(torch.equal(two(tile, *copies[0]).clone(), one(tile, *copies[0])) for tile in TILES)
            t_two, t_one = us_per_call(two, copies), us_per_call(one, copies)
            print(f"{name} zero={zero_point} (fused bit-equal on every tile: {same})")
            for tile in TILES:
                print(f"    {tile}: two launches {t_two[tile]:.1f}  fused {t_one[tile]:.1f}")
            best_two, best_one = min(t_two, key=t_two.get), min(t_one, key=t_one.get)
            tuned = [t for t in qg.W4_EPILOGUE_TILES if t in t_one]
            best_epi = min(tuned, key=t_one.get)
            print(f"  best: two launches {t_two[best_two]:.1f} {best_two} | fused {t_one[best_one]:.1f} {best_one}"
                  f" | fused among W4_EPILOGUE_TILES {t_one[best_epi]:.1f} {best_epi}")


if __name__ == "__main__":
    main()
