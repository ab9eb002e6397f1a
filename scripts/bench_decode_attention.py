"""Paged decode attention per KV-cache format (bf16, FP8, INT8 codes) at the offline workload's shapes, with a
sweep of the kernel's tile configs (and, for the pairs kernel, caps on its registers and the next tile's words
requested a step ahead: PAIRS_MAX_REGISTERS, PAIRS_PREFETCH):
`PYTHONPATH=. python scripts/bench_decode_attention.py` (a GPU).

Llama-3-8B heads (32 query, 8 KV, head_size 128), one layer, CUDA-graph replay (the engine decodes from graphs);
last, the default tile (decode_block_n's), alone and with FUSED_MERGE (the split programs merge their parts; no
merge kernel) for each format; GB/s counts the cache bytes read (keys and values of every context token), so it
can be set against the copy bandwidth. Each format's result is first checked against the reference (max error
printed).
"""

from __future__ import annotations

import torch

from kiln.kernels import paged_attention as pa
from kiln.kernels.bench_quant_gemm import graph_us

HEADS, KV_HEADS, HEAD_SIZE, PAGE = 32, 8, 128, 32
FORMATS = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "fp8 pairs": torch.float8_e4m3fn, "int8": torch.int8,
           "int8 pairs": torch.int8}  # "pairs": the 1-byte codes read as 16-bit words of two (CODES_AS_PAIRS)
# (batch, context): offline 128/128 at batch 512 (contexts 128-256), longer contexts up to 2048 (where the pairs
# kernel changes tile: PAIRS_LONG_CONTEXT), and batch-1 decode (decode-1: 128 in, 256 out), where every sequence
# splits and FUSED_MERGE matters
SHAPES = ((512, 192), (256, 512), (128, 1024), (64, 2048), (1, 384))
# BLOCK_N, warps, stages, and for the pairs kernel a cap on its registers (PAIRS_MAX_REGISTERS; None: the
# compiler's) and whether it requests the next tile's words a step ahead (PAIRS_PREFETCH)
CONFIGS = ((128, 4, 2, None, False), (128, 4, 2, 128, False), (128, 4, 2, None, True), (64, 4, 2, None, False),
           (64, 4, 2, 96, False), (64, 4, 2, None, True), (64, 4, 2, 128, True), (64, 4, 3, None, False),
           (128, 8, 2, None, False), (256, 8, 2, None, False), (32, 4, 3, None, False))


def cache(num_blocks: int, fmt: str) -> torch.Tensor:
    x = torch.randn(num_blocks, PAGE, KV_HEADS, HEAD_SIZE, device="cuda")
    if fmt.startswith("int8"):
        return (x * 40).clamp(-127, 127).round().to(torch.int8)
    return (x * 100).clamp(-448, 448).to(FORMATS[fmt]) if fmt.startswith("fp8") else x.to(FORMATS[fmt])


def main():
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    torch.manual_seed(0)
    default, default_pairs, default_long = dict(pa.DECODE_CONFIG), pa.CODES_AS_PAIRS, pa.PAIRS_LONG_BLOCK_N
    default_caps, default_prefetch = dict(pa.PAIRS_MAX_REGISTERS), pa.PAIRS_PREFETCH
    for batch, context in SHAPES:
        blocks = context // PAGE
        tables = torch.randperm(batch * blocks, device="cuda").int().view(batch, blocks)  # scattered pages
        lens = torch.randint(context // 2, context + 1, (batch,), dtype=torch.int32, device="cuda")
        q = torch.randn(batch, HEADS, HEAD_SIZE, device="cuda", dtype=torch.bfloat16)
        read = 2 * int(lens.sum()) * KV_HEADS * HEAD_SIZE
        for fmt in FORMATS:
            k, v = cache(batch * blocks, fmt), cache(batch * blocks, fmt)
            kv_scale = None if fmt == "bf16" else torch.tensor([0.01, 0.02], device="cuda")
            args = (q, k, v, tables, lens, HEAD_SIZE ** -0.5, None, kv_scale)
            pa.DECODE_CONFIG.update(default)
            pa.CODES_AS_PAIRS = fmt.endswith("pairs")
            err = (pa.paged_decode_attention(*args).float() - pa.paged_decode_attention_ref(*args).float()).abs()
            line = []
            for block_n, warps, stages, cap, prefetch in CONFIGS:  # (every context: the long-context tile too)
                if (cap or prefetch) and not pa.CODES_AS_PAIRS:  # (both are the pairs kernel's)
                    continue
                pa.DECODE_CONFIG.update(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
                pa.PAIRS_LONG_BLOCK_N, pa.PAIRS_MAX_REGISTERS = block_n, {block_n: cap} if cap else {}
                pa.PAIRS_PREFETCH = prefetch
                got = pa.paged_decode_attention(*args).float()
                got_err = (got - pa.paged_decode_attention_ref(*args).float()).abs().max().item()
                us = graph_us(lambda: pa.paged_decode_attention(*args), iters=20)
                gbs = read * FORMATS[fmt].itemsize / us / 1e3
                variant = (f" r{cap}" if cap else "") + (" prefetch" if prefetch else "")
                label = f"{block_n}/{warps}/{stages}" + (f"{variant} (err {got_err:.2g})" if variant else "")
                line.append(f"{label} {us:6.1f}us {gbs:5.0f}GB/s")
            pa.DECODE_CONFIG.update(default)  # the default tiles again (decode_block_n)
            pa.PAIRS_LONG_BLOCK_N, pa.PAIRS_MAX_REGISTERS = default_long, default_caps
            pa.PAIRS_PREFETCH = default_prefetch
            us = graph_us(lambda: pa.paged_decode_attention(*args), iters=20)
            line.append(f"| default ({pa.decode_block_n(pa.CODES_AS_PAIRS, context)} keys) {us:6.1f}us")
            pa.FUSED_MERGE = True  # and with its split programs merging
            fused_err = (pa.paged_decode_attention(*args).float() - pa.paged_decode_attention_ref(*args).float())
            us = graph_us(lambda: pa.paged_decode_attention(*args), iters=20)
            pa.FUSED_MERGE = False
            line.append(f"| fused merge {us:6.1f}us (err {fused_err.abs().max().item():.2g})")
            print(f"b{batch} ctx~{context} {fmt:<9} (err {err.max().item():.2g}): " + "  ".join(line), flush=True)
    pa.DECODE_CONFIG.update(default)
    pa.CODES_AS_PAIRS, pa.PAIRS_LONG_BLOCK_N, pa.PAIRS_MAX_REGISTERS = default_pairs, default_long, default_caps


if __name__ == "__main__":
    main()
