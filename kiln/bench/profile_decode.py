"""Where a decode step's time goes, on a GPU: the CUDA graph replayed alone against the whole engine step,
and the kernels of one replay by total time (the numbers behind docs/performance.md's breakdown). At batch 1
by default; --batch 512 profiles the decode steps of the offline workload; --quant-algo profiles the engine of
the same weights quantized (as `kiln bench --quant-algo` builds it); a comma-separated list profiles each in turn
on the same weights ("none": unquantized).

    python -m kiln.bench.profile_decode --synthetic llama-3-8b [--steps 256] [--batch 1] \
        [--quant-algo none,W8A16 [--quantize-lm-head]] [--kv-cache-quant-algo FP8]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kiln.bench.offline import describe_device, scratch_dirs, sync, synthetic_hf_model
from kiln.bench.shapes import FAMILY_SHAPES, LLAMA_SHAPES


def replay_ms(graph, device: torch.device, repeats: int = 100) -> float:
    graph.replay()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    sync(device)
    return (time.perf_counter() - start) / repeats * 1000


def quantized(source: str, algo: str, lm_head: bool, kv: str | None, scratch: list) -> str:
    """A checkpoint of `source` quantized with `algo` ("none": weights as they are; lm_head too if asked) and
    its KV cache with `kv` (None: the model dtype), in a temporary dir put on `scratch`."""
    from kiln.config import QuantConfig, exclusions
    from kiln.quantization.workflow import quantize_checkpoint

    work = tempfile.mkdtemp(prefix="kiln-profile-quant-")
    scratch.append(work)
    ckpt = work + "/ckpt"
    qc = QuantConfig(quant_algo=None if algo == "none" else algo, kv_cache_quant_algo=kv,
                     exclude_modules=exclusions(lm_head))
    return str(quantize_checkpoint(source, ckpt, qc, dtype="bfloat16", device="cuda"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", default="llama-3-8b", choices=sorted({**LLAMA_SHAPES, **FAMILY_SHAPES}))
    parser.add_argument("--steps", type=int, default=256, help="output tokens of the end-to-end run")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoding together (128-token prompts)")
    parser.add_argument("--quant-algo", default="none", help="profile the engine quantized with these algorithms")
    parser.add_argument("--quantize-lm-head", action="store_true", help="with --quant-algo: lm_head too")
    parser.add_argument("--kv-cache-quant-algo", default=None, type=str.upper, choices=["INT8", "FP8"],
                        help="every engine profiled with this KV cache format")
    args = parser.parse_args()
    device = torch.device("cuda")
    with scratch_dirs() as scratch:  # random weights and their engines: deleted however the run ends
        source = tempfile.mkdtemp(prefix="kiln-profile-")
        scratch.append(source)
        hf = synthetic_hf_model(args.synthetic, torch.bfloat16, device)
        hf.save_pretrained(source)
        del hf
        torch.cuda.empty_cache()
        for algo in args.quant_algo.split(","):
            plain = algo == "none" and args.kv_cache_quant_algo is None
            ckpt = source if plain else quantized(source, algo, args.quantize_lm_head, args.kv_cache_quant_algo,
                                                  scratch)
            engine_dir = profile(ckpt, algo, args, device, scratch)
            gc.collect()  # the engine's weights and KV cache go back to the GPU before the next one loads
            torch.cuda.empty_cache()
            # each checkpoint and engine is 5-16 GB: one of each on disk at a time (only this run's own engine
            # leaves the engine cache; the user's engines and kernel choices stay)
            for path in ([] if plain else [Path(ckpt).parent]) + [engine_dir]:
                shutil.rmtree(path, ignore_errors=True)


def profile(source: str, algo: str, args, device: torch.device, scratch: list) -> Path:
    """Print the profile of one engine of `source`; returns its engine dir (also put on `scratch`)."""
    from kiln.config import BuildConfig
    from kiln.llmapi.llm import LLM
    from kiln.llmapi.sampling_params import SamplingParams

    # Room past the run: each replay advances the graph's own inputs by a token (kiln.runtime.cuda_graphs).
    llm = LLM(source, dtype="bfloat16", device="cuda",
              build_config=BuildConfig(max_batch_size=args.batch, max_seq_len=128 + args.steps + 512))
    scratch.append(llm.engine_dir)
    prompts = torch.randint(0, llm.engine.config.vocab_size, (args.batch, 128)).tolist()
    params = SamplingParams(max_tokens=args.steps, temperature=0, ignore_eos=True)
    llm.generate([p[::-1] for p in prompts], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
    sync(device)
    start = time.perf_counter()
    llm.generate(prompts, params)
    sync(device)
    per_token = (time.perf_counter() - start) / args.steps * 1000
    graph = llm.runner.graphs.graphs[args.batch]
    print(f"# {describe_device(device)}, {args.synthetic} bf16, {algo}"
          f"{' (lm_head too)' if algo != 'none' and args.quantize_lm_head else ''}, KV cache "
          f"{args.kv_cache_quant_algo or 'bf16'}, batch {args.batch}")
    print(f"end to end: {per_token:.3f} ms per decode step (prefill included)")
    print(f"graph replay alone: {replay_ms(graph, device):.3f} ms per decode step")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        sync(device)
    print("kernels of 3 replays:")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=25))
    llm.shutdown()
    return llm.engine_dir


if __name__ == "__main__":
    main()
