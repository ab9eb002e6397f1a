"""Time each Triton kernel against its torch reference on Llama-3-8B shapes: `python -m kiln.kernels.bench_kernels`.

hidden 4096, 32 heads, 8 KV heads, head_size 128, intermediate 14336; decode batch 32 at context 2048.
GB/s counts the bytes a kernel must move at least (inputs read once, outputs written once), so it
can be set against the GPU's memory bandwidth; prefill attention is compute-bound and reports TFLOP/s.
"""

from __future__ import annotations

import torch

from kiln.kernels import triton_available
from kiln.kernels.activation import silu_and_mul, silu_and_mul_ref
from kiln.kernels.gemv import gemv, gemv_ref, time_gemv_and_cublas
from kiln.kernels.paged_attention import (paged_decode_attention, paged_decode_attention_ref,
                                          varlen_prefill_attention, varlen_prefill_attention_ref)
from kiln.kernels.rmsnorm import rms_norm, rms_norm_ref
from kiln.kernels.rotary import apply_rotary, apply_rotary_ref

HIDDEN, HEADS, KV_HEADS, HEAD_SIZE, INTER = 4096, 32, 8, 128, 14336
DTYPE = torch.bfloat16


def time_ms(fn, iters: int = 20) -> float:
    """Mean milliseconds per call over `iters` calls after warm-up (compilation, caches)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def report(name: str, kernel, reference, nbytes: float = 0.0, flops: float = 0.0, ref_iters: int = 20):
    k_ms, r_ms = time_ms(kernel), time_ms(reference, ref_iters)
    rate = f"{nbytes / k_ms / 1e6:8.0f} GB/s" if nbytes else f"{flops / k_ms / 1e9:8.1f} TFLOP/s"
    print(f"{name:<44} kernel {k_ms * 1e3:9.1f} us  reference {r_ms * 1e3:10.1f} us  "
          f"x{r_ms / k_ms:6.1f}  {rate}")


def bench_pointwise(tokens: int):
    x, res = (torch.randn(tokens, HIDDEN, device="cuda", dtype=DTYPE) for _ in range(2))
    w = torch.randn(HIDDEN, device="cuda", dtype=DTYPE)
    report(f"rms_norm+residual [{tokens}, {HIDDEN}]", lambda: rms_norm(x, w, 1e-5, res),
           lambda: rms_norm_ref(x, w, 1e-5, res), nbytes=(4 * x.numel() + w.numel()) * 2)
    q = torch.randn(tokens, HEADS, HEAD_SIZE, device="cuda", dtype=DTYPE)
    k = torch.randn(tokens, KV_HEADS, HEAD_SIZE, device="cuda", dtype=DTYPE)
    pos = torch.randint(0, 8192, (tokens,), device="cuda")
    freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_SIZE, 2, device="cuda").float() / HEAD_SIZE)
    report(f"apply_rotary [{tokens}, {HEADS}+{KV_HEADS}, {HEAD_SIZE}]", lambda: apply_rotary(q, k, pos, freq),
           lambda: apply_rotary_ref(q, k, pos, freq), nbytes=2 * (q.numel() + k.numel()) * 2)
    fc_gate = torch.randn(tokens, 2 * INTER, device="cuda", dtype=DTYPE)
    report(f"silu_and_mul [{tokens}, 2*{INTER}]", lambda: silu_and_mul(fc_gate), lambda: silu_and_mul_ref(fc_gate),
           nbytes=fc_gate.numel() * 2 * 3 // 2)


def bench_decode(batch: int = 32, context: int = 2048, block_size: int = 16):
    blocks_per_seq = context // block_size
    num_blocks = batch * blocks_per_seq
    k_cache, v_cache = (torch.randn(num_blocks, block_size, KV_HEADS, HEAD_SIZE, device="cuda", dtype=DTYPE)
                        for _ in range(2))
    tables = torch.randperm(num_blocks, device="cuda").int().view(batch, blocks_per_seq)  # scattered pages
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HEADS, HEAD_SIZE, device="cuda", dtype=DTYPE)
    args = (q, k_cache, v_cache, tables, lens, HEAD_SIZE ** -0.5)
    err = (paged_decode_attention(*args) - paged_decode_attention_ref(*args)).abs().max().item()
    report(f"paged_decode b{batch} ctx{context} (max err {err:.2g})", lambda: paged_decode_attention(*args),
           lambda: paged_decode_attention_ref(*args), nbytes=2 * k_cache.numel() * 2, ref_iters=3)


def bench_gemv(rows: int = 1):
    """Batch-1 linear layers of Llama-3-8B (qkv, o, fc_gate, down, lm_head): the Triton GEMV against cuBLAS, timed
    as the engine's load-time choice times them (back to back in a CUDA graph, weights streamed from memory)."""
    for n, k in ((6144, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER), (128256, HIDDEN)):
        x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
        w = torch.randn(n, k, device="cuda", dtype=DTYPE) / k ** 0.5
        err = (gemv(x, w) - gemv_ref(x, w)).abs().max().item()
        ms = time_gemv_and_cublas(x, w)
        tb = w.numel() * 2 / 1e9
        print(f"gemv {rows}x{n}x{k} (max err {err:.2g}): Triton {ms['GEMV'] * 1e3:7.1f} us "
              f"{tb / ms['GEMV']:5.2f} TB/s, cuBLAS {ms['cuBLAS'] * 1e3:7.1f} us {tb / ms['cuBLAS']:5.2f} TB/s")


def bench_prefill(seqs: int = 4, seq_len: int = 2048):
    tokens = seqs * seq_len
    q = torch.randn(tokens, HEADS, HEAD_SIZE, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(tokens, KV_HEADS, HEAD_SIZE, device="cuda", dtype=DTYPE) for _ in range(2))
    cu = torch.arange(0, tokens + 1, seq_len, dtype=torch.int32, device="cuda")
    args = (q, k, v, cu, seq_len, HEAD_SIZE ** -0.5)
    err = (varlen_prefill_attention(*args) - varlen_prefill_attention_ref(*args)).abs().max().item()
    flops = 4 * seqs * seq_len * seq_len / 2 * HEADS * HEAD_SIZE  # QK^T and PV, causal half
    report(f"varlen_prefill {seqs}x{seq_len} (max err {err:.2g})", lambda: varlen_prefill_attention(*args),
           lambda: varlen_prefill_attention_ref(*args), flops=flops, ref_iters=3)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731 - torch's own flash kernel
        q.view(seqs, seq_len, HEADS, HEAD_SIZE).transpose(1, 2), k.view(seqs, seq_len, KV_HEADS, HEAD_SIZE)
        .transpose(1, 2), v.view(seqs, seq_len, KV_HEADS, HEAD_SIZE).transpose(1, 2), is_causal=True, enable_gqa=True)
    print(f"{'  torch SDPA (flash), same shapes':<44} {time_ms(sdpa) * 1e3:16.1f} us  "
          f"{flops / time_ms(sdpa) / 1e9:8.1f} TFLOP/s")


def main():
    if not triton_available():
        raise SystemExit("bench_kernels needs an NVIDIA GPU with Triton")
    print(f"device: {torch.cuda.get_device_name()}, dtype {DTYPE}")
    for tokens in (32, 4096):
        bench_pointwise(tokens)
    bench_decode()
    bench_gemv()
    bench_prefill()


if __name__ == "__main__":
    main()
