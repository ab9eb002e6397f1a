"""Decode by pair's GEMV tiles on an NVIDIA GPU, Qwen3-30B-A3B's experts at batch 1 (128 experts of 768, top 8,
hidden 2048): fc_gate (gated, 2,048 inputs) and proj (weighted by the routing, 768 inputs), in bf16, W8A16 (int8
codes, a scale a row), W4A16 (int4, group 128) and FP8 (e4m3 codes, a scale a row), every tile of TILES beside
kiln.kernels.moe.pair_tile's, the tile kiln runs; for W4A16, W8A16 and FP8 also the GEMV on words of codes, which
kiln runs in the engine's fused fc_gate layout (FP8 only where KILN_MOE_WORDS names e4m3: this times it to
decide), every tile of WORD_TILES. Also the whole MoE (both GEMVs and the slots' sum) by pair, the words taken for
all three, and by the grouped GEMMs.

Timed as the engine's tuners time kernels (CUDA-graph replay, kiln.kernels.gemv.graph_ms_per_call), each call
routed to its own 8 experts of 16 random choices, so the weights stream from memory as in a decode step; us per
call and the routed experts' bytes over it. Each tile's output is checked against kiln's (float32 sums in
another order: within a 16-bit ulp).

    PYTHONPATH=. python scripts/bench_moe_pair_gemv.py
"""

from __future__ import annotations

import functools

import torch

from kiln.kernels import moe
from kiln.kernels.gemv import candidate_ms, graph_ms_per_call
from kiln.quantization.weight_only import quantize_int4_groups, quantize_int8_per_channel

EXPERTS, TOP_K, HIDDEN, INTER, GROUP, ROUTINGS = 128, 8, 2048, 768, 128, 16
# (outputs a program, inputs a step, warps); a grouped format's step reads a group at a time
TILES = [(16, 128, 4), (8, 128, 4), (32, 128, 4), (64, 128, 4), (16, 256, 4), (32, 256, 8), (16, 64, 2),
         (32, 64, 4), (8, 256, 2), (16, 128, 8), (64, 64, 8), (8, 128, 8), (4, 128, 4), (8, 64, 4),
         (8, 256, 4), (8, 512, 4), (16, 256, 8), (16, 512, 8), (4, 512, 4), (8, 1024, 8)]

# int4 and int8 experts on words: (outputs a program, int64 words a step, warps); fc's rows are 128 words of int4
# codes (256 of int8), proj's 48 (96)
WORD_FORMATS = {"W4A16": "int4", "W8A16": "int8", "FP8": "e4m3"}
WORD_TILES = [(4, 128, 4), (2, 128, 4), (8, 128, 4), (8, 128, 8), (4, 64, 4), (8, 64, 4), (16, 64, 4), (4, 64, 2),
              (8, 32, 4), (16, 32, 4), (16, 16, 4), (32, 16, 4)]


def expert_codes(w: torch.Tensor, fmt: str):
    """[experts, out, in] bf16 weights as the format's experts (a float weight, or ExpertCodes)."""
    if fmt == "bf16":
        return w
    if fmt == "W8A16":
        parts = [quantize_int8_per_channel(w[e].float(), torch.bfloat16) for e in range(w.shape[0])]
        return moe.ExpertCodes(torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])[..., None])
    if fmt == "FP8":  # e4m3 codes, a scale a row (what FP8_PER_CHANNEL_PER_TOKEN's experts hold)
        scale = w.float().abs().amax(-1, keepdim=True) / 448
        return moe.ExpertCodes((w.float() / scale).to(torch.float8_e4m3fn), scale.to(torch.bfloat16))
    parts = [quantize_int4_groups(w[e].float(), GROUP, False, torch.bfloat16) for e in range(w.shape[0])]
    return moe.ExpertCodes(torch.stack([q for q, _, _ in parts]), torch.stack([s for _, s, _ in parts]), None, GROUP)


def fused_halves(fc, gate):
    """fc and gate as the engine holds them: the two halves (views) of one fused fc_gate."""
    if isinstance(fc, torch.Tensor):
        return torch.cat([fc, gate], dim=1).chunk(2, dim=1)
    codes = torch.cat([fc.codes.view(torch.uint8), gate.codes.view(torch.uint8)], 1).view(fc.codes.dtype)
    return moe.ExpertCodes(codes, torch.cat([fc.scale, gate.scale], 1), None, fc.group).halves()


def weight_bytes(w, rows: int) -> int:
    """Bytes of `rows` outputs of TOP_K experts (codes and scales)."""
    if isinstance(w, torch.Tensor):
        return TOP_K * rows * w.shape[2] * w.element_size()
    per_expert = sum(t[0].numel() * t.element_size() for t in (w.codes, w.scale) if t is not None)
    return TOP_K * per_expert * rows // w.codes.shape[1]


def main() -> None:
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(1, HIDDEN, device=dev, dtype=bf16)
    routings = [torch.randperm(EXPERTS, device=dev)[:TOP_K][None] for _ in range(ROUTINGS)]
    weights = torch.softmax(torch.randn(1, TOP_K, device=dev), -1).to(bf16)
    raw = {name: torch.randn(EXPERTS, n, k, device=dev, dtype=bf16) / k ** 0.5
           for name, n, k in (("fc", INTER, HIDDEN), ("gate", INTER, HIDDEN), ("proj", HIDDEN, INTER))}
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; us per call (TB/s of the routed weights)")
    moe.PAIR_WORDS = frozenset(WORD_FORMATS.values())  # (e4m3 too: its words are what this times first)
    for fmt in ("bf16", "W8A16", "W4A16", "FP8"):
        fc, gate, proj = (expert_codes(raw[n], fmt) for n in ("fc", "gate", "proj"))
        fc, gate = fused_halves(fc, gate)
        h = torch.randn(TOP_K, INTER, device=dev, dtype=bf16)
        out_h, out_y = torch.empty(TOP_K, INTER, device=dev, dtype=bf16), torch.empty(TOP_K, HIDDEN, device=dev,
                                                                                         dtype=bf16)
        cases = {  # name -> (call of tile and routing, its output, its bytes)
            "fc_gate": (lambda tile, r: moe._pair_gemv(x, fc, gate, out_h, None, r.reshape(-1), 0, TOP_K, 0, tile),
                        out_h, 2 * weight_bytes(fc, INTER)),
            "proj": (lambda tile, r: moe._pair_gemv(h, proj, None, out_y, weights.reshape(-1), r.reshape(-1), 0, 1,
                                                    -1, tile), out_y, weight_bytes(proj, HIDDEN))}
        for name, (run, out, nbytes) in cases.items():
            kilns = moe.pair_tile(name == "fc_gate", {"bf16": 0, "W8A16": 1, "W4A16": 2, "FP8": 1}[fmt])
            run(kilns, routings[0])
            want = out.clone()
            ms = candidate_ms(TILES, lambda tile: [functools.partial(run, tile, r) for r in routings])
            for tile, t in sorted(ms.items(), key=lambda item: item[1]):
                run(tile, routings[0])
                ok = torch.allclose(out.float(), want.float(), rtol=2 ** -7, atol=1e-3)
                mark = " (kiln's)" if tile == kilns else ""
                print(f"{fmt:6} {name:8} tile {tile}{mark}: {t * 1e3:6.1f} us ({nbytes / t / 1e9:.2f} TB/s)"
                      f"{'' if ok else '  OUTPUT DIFFERS'}")
            if fmt in WORD_FORMATS:
                words_sweep(fmt, name, run, out, want, nbytes, routings)
        for by_pair in (True, False):
            calls = [functools.partial(moe.fused_moe, x, fc, gate, proj, r, weights, 0, "silu", by_pair)
                     for r in routings]
            calls[0]()
            t = graph_ms_per_call(calls)
            print(f"{fmt:6} whole MoE {'by pair' if by_pair else 'grouped'}: {t * 1e3:6.1f} us")


def words_sweep(fmt: str, name: str, run, out, want, nbytes: int, routings) -> None:
    """int4 or int8 experts on words of codes (kiln.kernels.moe._pair_words_kernel, what kiln runs where the layout
    allows): each tile of WORD_TILES as PAIR_WORD_TILE's, against the tile kernel's output `want`."""
    key = ("gated" if name == "fc_gate" else "plain", WORD_FORMATS[fmt])
    kilns = moe.PAIR_WORD_TILE[key]

    def run_words(tile, r):
        moe.PAIR_WORD_TILE[key] = tile
        run(None, r)

    ms = candidate_ms(WORD_TILES, lambda tile: [functools.partial(run_words, tile, r) for r in routings])
    for tile, t in sorted(ms.items(), key=lambda item: item[1]):
        run_words(tile, routings[0])
        # the words never round a weight to bf16 as the tile kernel does: outputs a bf16 ulp or two apart, so the
        # bound is tests/kernels/test_moe_kernel.py's, 2 ulps of the largest output
        err = (out.float() - want.float()).abs().max().item()
        ok = err <= 2 * 2 ** -7 * want.float().abs().max().item()
        mark = " (kiln's)" if tile == kilns else ""
        print(f"{fmt:6} {name:8} words {tile}{mark}: {t * 1e3:6.1f} us ({nbytes / t / 1e9:.2f} TB/s), max diff "
              f"{err:.2g}{'' if ok else '  OUTPUT DIFFERS'}")
    moe.PAIR_WORD_TILE[key] = kilns


if __name__ == "__main__":
    main()
