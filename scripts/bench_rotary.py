"""Rotary with the paged-cache write (kiln.kernels.rotary.apply_rotary_and_write_cache) alone, per cache format
(bf16, FP8 and INT8 codes) and token count, with a sweep of the heads each program rotates:
`PYTHONPATH=. python scripts/bench_rotary.py` (a GPU).

Why: in the batch-512 decode step of an engine with an FP8 cache the kernel took 23.2 us a layer on an H200 with
PDL off (docs/performance.md, twenty-third session), where its bytes take about 3 us at the copy bandwidth; at
prefill's thousands of tokens a step it moves about 2.7 TB/s. Timed outside the engine, the cache format, the
token count and the head blocking can be told apart. Llama-3-8B heads (32 query, 8 KV, head_size 128) as slices of
one fused QKV output, as the engine passes them; slots scattered over the cache; CUDA-graph replay. GB/s counts
the bytes the kernel must move: q and k read and written, v read, the new keys and values written to the cache.
Each case is first checked against the reference (largest difference printed).
"""

from __future__ import annotations

import torch

from kiln.kernels import rotary
from kiln.kernels.bench_quant_gemm import graph_us

HEADS, KV_HEADS, HEAD_SIZE = 32, 8, 128
TOKENS = (1, 16, 64, 256, 512, 2048, 8192)
FORMATS = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}
HEAD_BLOCKS = (None, 1, 2, 4, 8, 16, 32)  # None: the kernel's own choice (rotary.head_block)


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
    default = rotary.head_block
    for fmt in FORMATS:
        for tokens in TOKENS:
            args = inputs(tokens, fmt)
            line = []
            for block in HEAD_BLOCKS:
                rotary.head_block = default if block is None else (lambda *_, b=block: b)
                error = largest_difference(args)
                us = graph_us(lambda: rotary.apply_rotary_and_write_cache(*args), iters=20)
                name = f"auto={default(tokens, HEADS, KV_HEADS)}" if block is None else f"{block}"
                line.append(f"{name} {us:6.1f}us {moved_bytes(tokens, fmt) / us / 1e3:5.0f}GB/s err {error:.3g}")
            rotary.head_block = default
            print(f"{fmt:5s} {tokens:5d} tokens | " + " | ".join(line), flush=True)


if __name__ == "__main__":
    main()
