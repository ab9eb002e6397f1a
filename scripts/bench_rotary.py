"""Rotary with the paged-cache write (kiln.kernels.rotary.apply_rotary_and_write_cache) alone, per cache format
(bf16, FP8 and INT8 codes) and token count, with a sweep of the heads each program rotates and its warps:
`PYTHONPATH=. python scripts/bench_rotary.py` (a GPU; about 60 compiles, 1-2 minutes).

Why: in the batch-512 decode step of an engine with an FP8 cache the kernel took 23.2 us a layer on an H200 with
PDL off (docs/performance.md, twenty-third session), where its bytes take about 3 us at the copy bandwidth; at
prefill's thousands of tokens a step it moves about 2.7 TB/s. Timed outside the engine, the cache format, the token
count and the program's shape can be told apart (at 32 heads a program the FP8 variant holds 161 registers a thread
on 4 warps, 74 on 8: scripts/kernel_sass.py). Llama-3-8B heads (32 query, 8 KV, head_size 128) as slices of one
fused QKV output, as the engine passes them; slots scattered over the cache; CUDA-graph replay. GB/s counts the
bytes the kernel must move: q and k read and written, v read, the new keys and values written to the cache.
Each case is first checked against the reference (largest difference printed).
"""

from __future__ import annotations

import torch

from kiln.kernels import rotary
from shape_sweep import report, time_shapes

HEADS, KV_HEADS, HEAD_SIZE = 32, 8, 128
TOKENS = (1, 16, 64, 256, 512, 2048, 8192)
FORMATS = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}
SHAPES = [None] + [(h, w) for h in (1, 2, 4, 8, 16, 32) for w in (2, 4, 8)]  # (BLOCK_H, warps); None: the default


def inputs(tokens: int, fmt: str, device: str = "cuda"):
    """The kernel's arguments: q, k, v as the fused QKV output's slices, positions, inv_freq, the caches, the
    slots and the codes' scales (None for bf16)."""
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_SIZE, device=device, dtype=torch.bfloat16)
    q, k, v = qkv.view(tokens, -1, HEAD_SIZE).split([HEADS, KV_HEADS, KV_HEADS], dim=1)
    positions = torch.randint(0, 4096, (tokens,), device=device)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_SIZE, 2, device=device).float() / HEAD_SIZE)
    slots_total = max(4 * tokens, 4096)
    k_cache, v_cache = (torch.zeros(slots_total, KV_HEADS, HEAD_SIZE, device=device, dtype=FORMATS[fmt])
                        for _ in range(2))
    slots = torch.randperm(slots_total, device=device)[:tokens]
    kv_scale = None if fmt == "bf16" else torch.tensor([0.05, 0.04], device=device)
    return q, k, v, positions, inv_freq, k_cache, v_cache, slots, kv_scale


def largest_difference(args) -> float:
    """The kernel against the reference on copies of the same inputs: q, k and the two caches (codes as floats)."""
    copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    rotary.apply_rotary_and_write_cache(*args)
    rotary.apply_rotary_and_write_cache_ref(*copies)
    pairs = ((args[0], copies[0]), (args[1], copies[1]), (args[5], copies[5]), (args[6], copies[6]))
    return max((a.float() - b.float()).abs().max().item() for a, b in pairs)


def moved_bytes(tokens: int, fmt: str) -> int:
    q, kv = tokens * HEADS * HEAD_SIZE, tokens * KV_HEADS * HEAD_SIZE
    return 2 * (2 * q + 2 * kv + kv) + 2 * kv * FORMATS[fmt].itemsize


def main():
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    torch.manual_seed(0)
    for fmt in FORMATS:
        for tokens in TOKENS:
            args = inputs(tokens, fmt)
            timed, errors = time_shapes(rotary, SHAPES, (tokens, HEADS, KV_HEADS, HEAD_SIZE // 2),
                                        lambda: rotary.apply_rotary_and_write_cache(*args),
                                        lambda: largest_difference(args))
            report(f"{fmt} {tokens} tokens", moved_bytes(tokens, fmt), timed, errors)


if __name__ == "__main__":
    main()
