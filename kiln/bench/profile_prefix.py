"""Where a shared-prefix follower's time goes, on a GPU: for a few prefixes, the first request and its followers
one at a time (TTFT, wall time of each engine step, prefix-cache hits), then torch.profiler over one follower,
by host time and by GPU time. The follower's step computes only its new tokens, so its GPU time is small;
the rest is host time (docs/performance.md, "Shared prefix").

    python -m kiln.bench.profile_prefix --synthetic llama-3-8b [--prefix-len 1024 --suffix-len 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from kiln.bench.offline import scratch_dirs, sync, synthetic_hf_model
from kiln.bench.shapes import FAMILY_SHAPES, LLAMA_SHAPES
from kiln.config import resolve_device


def prefill_graph_replays(llm) -> int:
    graphs = llm.runner.prefill_graphs
    return 0 if graphs is None else graphs.replays


def main() -> None:
    from kiln.config import BuildConfig
    from kiln.llmapi.llm import LLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", default="llama-3-8b", choices=sorted({**LLAMA_SHAPES, **FAMILY_SHAPES}))
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--suffix-len", type=int, default=32)
    args = parser.parse_args()
    device = resolve_device(None)
    with scratch_dirs() as scratch:  # the random weights and their engine: deleted however the run ends
        source = tempfile.mkdtemp(prefix="kiln-profile-")
        scratch.append(source)
        hf = synthetic_hf_model(args.synthetic, torch.bfloat16, device)
        hf.save_pretrained(source)
        del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
        llm = LLM(source, dtype="bfloat16", device=str(device),
                  build_config=BuildConfig(max_batch_size=64, max_seq_len=args.prefix_len + args.suffix_len + 64))
        scratch.append(llm.engine_dir)
        profile_followers(llm, args, device)


def profile_followers(llm, args, device: torch.device) -> None:
    """Each prefix's first request and two followers, timed step by step; the profile of one follower."""
    from kiln.llmapi.sampling_params import SamplingParams

    engine = llm.generator
    step_seconds = []
    engine_step = engine.step

    def timed_step():  # synchronized on both sides: the step's whole wall time, GPU work included
        sync(device)
        start = time.perf_counter()
        out = engine_step()
        sync(device)
        step_seconds.append(time.perf_counter() - start)
        return out

    engine.step = timed_step
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    vocab = llm.engine.config.vocab_size
    prof = None
    for trial in range(3):  # the first trial compiles kernels; the last profiles its first follower
        prefix = torch.randint(0, vocab, (args.prefix_len,), generator=g).tolist()
        for i in range(3):
            prompt = prefix + torch.randint(0, vocab, (args.suffix_len,), generator=g).tolist()
            step_seconds.clear()
            hits = engine.blocks.prefix_hit_tokens
            replays = prefill_graph_replays(llm)
            if trial == 2 and i == 1:
                activities = [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
                with torch.profiler.profile(activities=activities) as prof:
                    out = llm.generate([prompt], params)[0]
            else:
                out = llm.generate([prompt], params)[0]
            print(f"prefix {trial} {'first' if i == 0 else f'follower {i}'}: cache hit "
                  f"{engine.blocks.prefix_hit_tokens - hits} tokens, prefill graphs replayed "
                  f"{prefill_graph_replays(llm) - replays}, TTFT {out.ttft() * 1e3:.1f} ms, first steps "
                  f"{[round(s * 1e3, 1) for s in step_seconds[:3]]} ms", flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    if device.type == "cuda":
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=15, max_name_column_width=60))
    llm.shutdown()


if __name__ == "__main__":
    main()
