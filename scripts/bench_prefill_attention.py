"""The prefill attention kernels on each candidate tile config, on an NVIDIA GPU: Llama-3-8B's heads (32 query heads,
8 KV heads, head size 128, bf16) on the two kinds of prompt work a prefill-heavy step holds, each candidate checked
against the torch reference first.

    python scripts/bench_prefill_attention.py [--quick | --codes]

First the fresh prompts on the defaults and on torch's FlashAttention-2 (KILN_PREFILL_ATTENTION=flash); --quick
stops there, --codes goes on to the quantized cache's codes alone (the last part below).

- fresh: 4 new prompts of 2048 tokens packed back to back (varlen_prefill_attention), as a step of prefill-1000
  with its 8192-token budget;
- continuing: 4 chunks of 1024 tokens after 1024 cached ones (paged_prefill_attention over a 32-token-page cache),
  as a long prompt's later chunks.

Each candidate tile in turn runs both plain kernels (as PREFILL_CONFIG and PAGED_PREFILL_CONFIG of
kiln.kernels.paged_attention, TMA off), then the current tiles with lazy rescaling (PREFILL_LAZY_RESCALE). Then the
fresh prompts' kernel with TMA loads (PREFILL_TMA_CONFIG) on each of its tiles, with and without lazy rescaling.
Last, fresh prompts over a quantized cache's codes (e4m3 and int8, bf16 queries, as a step with an FP8 or INT8 KV
cache reads them back from their slots): the plain kernel, then the TMA one on each tile over the codes and over
them widened to 16 bits (KILN_PREFILL_CODES tma and widened; the widening's pass is inside the time).
Prints each config's ms and TFLOP/s (causal FLOPs: 4 x heads x head size per query-key pair).
"""

from __future__ import annotations

import os
import sys

import torch

from kiln.kernels import paged_attention as pa
from kiln.kernels.gemv import graph_ms_per_call

HEADS, KV_HEADS, D, PAGE = 32, 8, 128, 32
# each on HGMMA for sm_90; only 128 x 128 spills (3 stores, fresh prompts)
CANDIDATES = [pa.PREFILL_CONFIG, pa.PAGED_PREFILL_CONFIG] + [
    dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
    for m, n, w, s in ((64, 64, 4, 4), (64, 32, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 3),
                       (128, 128, 8, 2))]
# Tiles for the fresh prompts' TMA kernel (pa.PREFILL_TMA_CONFIG): in sm_90 code 64 x 64 on 4 warps holds 164
# registers; 128-row tiles need 8 warps (on 4 they spill: scripts/kernel_sass.py "varlen prefill tma").
TMA_CANDIDATES = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
                  for m, n, w, s in ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
                                     (128, 128, 8, 2), (128, 128, 8, 3))]


def fresh_case(lens: list[int]) -> tuple:
    """Arguments of varlen_prefill_attention for prompts of `lens` tokens, and their causal FLOPs."""
    q = torch.randn(sum(lens), HEADS, D, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(sum(lens), KV_HEADS, D, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    flops = sum(4 * HEADS * D * n * (n + 1) / 2 for n in lens)
    return (q, k, v, cu, max(lens), D ** -0.5), flops


def fresh_codes_case(lens: list[int], code: torch.dtype) -> tuple:
    """fresh_case with the keys and values as a quantized cache's codes and their scales [s_k, s_v]."""
    (q, k, v, cu, max_len, scale), flops = fresh_case(lens)
    qmax = 127.0 if code == torch.int8 else 448.0
    kv_scale = torch.tensor([k.abs().max() / qmax, v.abs().max() / qmax], dtype=torch.bfloat16, device="cuda")
    k, v = ((x.float() / s.float()).clamp(-qmax, qmax) for x, s in zip((k, v), kv_scale))
    k, v = (x.round().to(code) if code == torch.int8 else x.to(code) for x in (k, v))
    return (q, k, v, cu, max_len, scale, None, kv_scale), flops


def continuing_case(chunks: list[tuple[int, int]]) -> tuple:
    """Arguments of paged_prefill_attention for (cached tokens, new tokens) per sequence, the new ones' keys
    already in the cache, and their FLOPs."""
    blocks_per_seq = max(-(-(c + n) // PAGE) for c, n in chunks)
    k_cache, v_cache = (torch.randn(len(chunks) * blocks_per_seq, PAGE, KV_HEADS, D, dtype=torch.bfloat16,
                                    device="cuda") for _ in range(2))
    tables = torch.randperm(len(chunks) * blocks_per_seq, device="cuda").int().view(len(chunks), blocks_per_seq)
    new = [n for _, n in chunks]
    q = torch.randn(sum(new), HEADS, D, dtype=torch.bfloat16, device="cuda")
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    ctx = torch.tensor([c for c, _ in chunks], dtype=torch.int32, device="cuda")
    flops = sum(4 * HEADS * D * sum(c + i + 1 for i in range(n)) for c, n in chunks)
    return (q, k_cache, v_cache, tables, cu, ctx, D ** -0.5, None, None, max(new)), flops


def checked(kernel, reference, args) -> bool:
    """The kernel against its torch reference (float32 softmax) on `args`: within bf16's rounding of the output."""
    got, want = kernel(*args).float(), reference(*args).float()
    return bool(((got - want).abs() <= 2e-2 * want.abs().max()).all())


def main() -> None:
    print(f"# {torch.cuda.get_device_name()}; heads {HEADS}/{KV_HEADS}, head size {D}, bf16")
    torch.manual_seed(0)
    small_fresh, _ = fresh_case([100, 37, 250])
    small_continuing, _ = continuing_case([(40, 70), (300, 5), (0, 33)])
    cases = {"fresh 4 x 2048": (pa.varlen_prefill_attention, fresh_case([2048] * 4)),
             "continuing 4 x 1024 after 1024": (pa.paged_prefill_attention, continuing_case([(1024, 1024)] * 4))}
    current = pa.PREFILL_CONFIG, pa.PAGED_PREFILL_CONFIG, pa.PREFILL_TMA_CONFIG

    def run(label: str, names) -> None:
        """Check the kernels under the module's settings now, then time the named cases; a failure is printed."""
        try:
            ok = (checked(pa.varlen_prefill_attention, pa.varlen_prefill_attention_ref, small_fresh)
                  and checked(pa.paged_prefill_attention, pa.paged_prefill_attention_ref, small_continuing))
            cells = []
            for name in names:
                kernel, (args, flops) = cases[name]
                kernel(*args)  # compiled outside the graph's capture
                ms = graph_ms_per_call([lambda kernel=kernel, args=args: kernel(*args)])
                cells.append(f"{name}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s")
            print(f"{label} ok={ok} | " + " | ".join(cells), flush=True)
        except Exception as error:  # a tile that does not compile or fit: say so and go on
            print(f"{label} failed: {type(error).__name__}: {str(error)[:200]}", flush=True)

    run(f"defaults, TMA {current[2]}", ["fresh 4 x 2048"])
    os.environ["KILN_PREFILL_ATTENTION"] = "flash"  # torch's FlashAttention-2 (pa.flash_varlen_prefill_attention)
    try:
        run("torch flash (KILN_PREFILL_ATTENTION=flash)", ["fresh 4 x 2048"])
    finally:
        del os.environ["KILN_PREFILL_ATTENTION"]
    if "--quick" in sys.argv:
        return
    if "--codes" in sys.argv:
        return time_codes(current[2])
    try:
        pa.PREFILL_TMA_CONFIG = None
        for config in CANDIDATES:
            pa.PREFILL_CONFIG = pa.PAGED_PREFILL_CONFIG = config
            run(str(config), cases)
        pa.PREFILL_CONFIG, pa.PAGED_PREFILL_CONFIG = current[:2]
        pa.PREFILL_LAZY_RESCALE = True  # the current tiles with lazy rescaling (_lazy_softmax_step)
        run(f"lazy rescaling {current[:2]}", cases)
        for config in TMA_CANDIDATES:  # the fresh prompts' kernel with TMA loads, against the plain one above
            pa.PREFILL_TMA_CONFIG = config
            for lazy in (False, True):
                pa.PREFILL_LAZY_RESCALE = lazy
                run(f"TMA{' lazy' if lazy else ''} {config}", ["fresh 4 x 2048"])
        pa.PREFILL_TMA_CONFIG, pa.PREFILL_LAZY_RESCALE = current[2], False
        time_codes(current[2])
    finally:
        (pa.PREFILL_CONFIG, pa.PAGED_PREFILL_CONFIG, pa.PREFILL_TMA_CONFIG), pa.PREFILL_LAZY_RESCALE = current, False


def time_codes(tma_config: dict) -> None:
    """Fresh prompts over e4m3 and int8 codes: the plain kernel, then each TMA tile over the codes and over them
    widened (KILN_PREFILL_CODES)."""
    try:
        for code in (torch.float8_e4m3fn, torch.int8):
            name = f"fresh 4 x 2048, {str(code)[6:]} codes"
            small = fresh_codes_case([100, 37, 250], code)[0]
            args, flops = fresh_codes_case([2048] * 4, code)
            for setting, config in [("plain", tma_config), *((s, c) for s in ("tma", "widened")
                                                              for c in TMA_CANDIDATES)]:
                os.environ["KILN_PREFILL_CODES"], pa.PREFILL_TMA_CONFIG = setting, config
                ok = checked(pa.varlen_prefill_attention, pa.varlen_prefill_attention_ref, small)
                pa.varlen_prefill_attention(*args)  # compiled outside the graph's capture
                ms = graph_ms_per_call([lambda: pa.varlen_prefill_attention(*args)])
                label = f"{setting} {config}" if setting != "plain" else "plain"
                print(f"{name} {label} ok={ok} | {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
    finally:
        pa.PREFILL_TMA_CONFIG = tma_config
        os.environ.pop("KILN_PREFILL_CODES", None)


if __name__ == "__main__":
    main()
