"""Can a mixed step's decode attention (memory-bound) hide under a prompt GEMM (compute-bound) if the GEMM leaves it
some SMs? On an NVIDIA GPU:

    python scripts/bench_attention_gemm_overlap.py

prefill-1000's profile (docs/performance.md, eighteenth session) shows decode attention beside the prompts'
attention on a second stream sharing the SMs by time, not adding to them: the pair took about as long as back to
back. cuBLAS's persistent GEMMs hold every SM until they end, so a kernel beside one only runs on SMs the GEMM
leaves free. torch's SM carve-out (`torch._C._set_sm_carveout_experimental(n)`: cuBLAS targets n SMs fewer) makes
that room. This times, for each carve-out, Llama-3-8B's fc_gate GEMM over a mixed step's prompt rows and a
decode-attention call over its decoders:
- the GEMM alone (what the carve-out costs it), then both on one stream (today's order), then the GEMM on the main
  stream with decode attention on a high-priority side stream started together (what overlap buys).
If some carve-out makes the concurrent pair clearly shorter than the serial one at carve-out 0, splitting a mixed
step's rows (prompt rows' O-projection and MLP beside the decoders' attention) is worth building.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench_prefill_gemm import ms_per_call

from kiln.kernels import paged_attention as pa

HEADS, KV_HEADS, HEAD_SIZE, PAGE = 32, 8, 128, 32
HIDDEN, INTER = 4096, 14336
PROMPT_ROWS, DECODERS, CONTEXT = 7700, 488, 2176  # a prefill-1000 mixed step: 8192 tokens, ~488 of them decoding
CARVEOUTS = (None, 8, 16, 24, 32, 48, 64)


def decode_inputs():
    blocks = CONTEXT // PAGE
    tables = torch.randperm(DECODERS * blocks, device="cuda").int().view(DECODERS, blocks)  # scattered pages
    lens = torch.randint(CONTEXT - 128, CONTEXT + 1, (DECODERS,), dtype=torch.int32, device="cuda")
    k, v = (torch.randn(DECODERS * blocks, PAGE, KV_HEADS, HEAD_SIZE, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    q = torch.randn(DECODERS, HEADS, HEAD_SIZE, device="cuda", dtype=torch.bfloat16)
    return (q, k, v, tables, lens, HEAD_SIZE ** -0.5), 2 * int(lens.sum()) * KV_HEADS * HEAD_SIZE * 2


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(PROMPT_ROWS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2 * INTER, HIDDEN, device="cuda", dtype=torch.bfloat16) / HIDDEN ** 0.5
    args, kv_bytes = decode_inputs()
    err = (pa.paged_decode_attention(*args).float() - pa.paged_decode_attention_ref(*args).float()).abs().max()
    side = torch.cuda.Stream(priority=-1)

    def gemm():
        F.linear(x, w)

    def decode():
        pa.paged_decode_attention(*args)

    def serial():
        gemm()
        decode()

    def concurrent():
        side.wait_stream(torch.cuda.current_stream())
        gemm()  # first: it takes the SMs the carve-out leaves it, the decode programs the rest
        with torch.cuda.stream(side):
            decode()
        torch.cuda.current_stream().wait_stream(side)

    flops = 2 * PROMPT_ROWS * HIDDEN * 2 * INTER
    print(f"# {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).multi_processor_count} SMs, "
          f"torch {torch.__version__}; decode attention error {err:.2g}")
    alone = ms_per_call(decode)
    print(f"decode attention alone: {alone:.3f} ms ({kv_bytes / alone / 1e9:.2f} TB/s), {DECODERS} sequences "
          f"of ~{CONTEXT} tokens")
    base = None
    for carve in CARVEOUTS:
        torch._C._set_sm_carveout_experimental(carve)
        g, s, c = ms_per_call(gemm), ms_per_call(serial), ms_per_call(concurrent)
        base = base or s
        print(f"carve-out {carve or 0:>2} SMs: GEMM {g:.3f} ms ({flops / g / 1e9:.0f} TFLOP/s) | serial {s:.3f} ms "
              f"| concurrent {c:.3f} ms ({100 * (c / base - 1):+.1f}% against serial at 0)", flush=True)
    torch._C._set_sm_carveout_experimental(None)


if __name__ == "__main__":
    main()
