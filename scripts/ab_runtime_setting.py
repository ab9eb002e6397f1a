"""A prefill-heavy workload on one engine, under each value of a runtime setting read per step (an environment
variable), alternating in one process: the same engine, kernels and KV cache for each, so only the setting
differs. On an NVIDIA GPU:

    python scripts/ab_runtime_setting.py KILN_DECODE_ATTENTION_STREAM off,high [--requests 500] [--rounds 1]
    python scripts/ab_runtime_setting.py KILN_STEP_RUN_AHEAD 0,1
    python scripts/ab_runtime_setting.py KILN_DECODE_ATTENTION_STREAM off,high,first --kv-cache-quant-algo FP8
    python scripts/ab_runtime_setting.py KILN_PREFILL_ATTENTION triton,flash
    python scripts/ab_runtime_setting.py KILN_PREFILL_CODES plain,widened --kv-cache-quant-algo FP8

Llama-3-8B shapes, random bf16 weights, N requests of 2048 prompt and 128 output tokens (prefill-1000's shape,
fewer requests, so that an A/B fits a short device call), with a bf16 KV cache or (--kv-cache-quant-algo) an FP8
or INT8 one calibrated by `kiln quantize`'s workflow. Prints each run's seconds and its share of the compute
floor, as `kiln bench` counts them, with its inter-token latency percentiles and its notes. The settings it takes
are read at every step (KILN_DECODE_ATTENTION_STREAM by the attention of a mixed step, KILN_PREFILL_ATTENTION by the
fresh prompts' attention, KILN_PREFILL_CODES by their attention over a quantized cache's codes,
KILN_STEP_RUN_AHEAD by the executor, which the script re-reads per run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch

from kiln.bench.offline import (copy_bandwidth, describe_device, format_extra, kiln_offline, matmul_flops,
                                open_to_first_token, prefill_flops, synthetic_hf_model)
from kiln.bench.workloads import Workload
from kiln.config import BuildConfig, QuantConfig
from kiln.llmapi.llm import open_engine_dir
from kiln.quantization.workflow import quantize_checkpoint
from kiln.runtime.executor import step_run_ahead_setting as executor_setting


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variable", help="the environment variable, e.g. KILN_STEP_RUN_AHEAD")
    parser.add_argument("values", help="its values, comma-separated, e.g. 0,1")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--kv-cache-quant-algo", choices=["FP8", "INT8"], help="a quantized KV cache")
    parser.add_argument("--device", default="cuda")  # elsewhere every setting runs the torch references
    args = parser.parse_args()
    device = torch.device(args.device)
    flops, bandwidth = matmul_flops(device), copy_bandwidth(device)
    print(f"# {describe_device(device)}; matmul {flops / 1e12:.0f} TFLOP/s, copy {bandwidth / 1e12:.2f} TB/s",
          flush=True)
    scratch = source = tempfile.mkdtemp(prefix="kiln-ab-llama-3-8b-")
    try:
        hf_model = synthetic_hf_model("llama-3-8b", torch.bfloat16, device)
        hf_model.save_pretrained(source)
        del hf_model
        if args.kv_cache_quant_algo:  # the cache's scales calibrated into a kiln checkpoint in the same temp dir
            source = quantize_checkpoint(source, f"{source}/kv-{args.kv_cache_quant_algo}",
                                         QuantConfig(kv_cache_quant_algo=args.kv_cache_quant_algo),
                                         dtype="bfloat16", device=str(device))
        build = BuildConfig(max_batch_size=min(512, args.requests), max_seq_len=2048 + 128, max_input_len=2048,
                            max_num_tokens=8192, decode_steps_per_sync=4)
        engine_dir = open_engine_dir(source, "bfloat16", build)
        llm, _ = open_to_first_token(engine_dir, device)
        floor = prefill_flops(llm.engine.config, 2048) * args.requests / flops
        for round_ in range(args.rounds):
            for value in args.values.split(","):
                # Prompts are seeded by the workload's name: a name per run gives each run prompts of its own, so
                # no run finds an earlier one's in the prefix cache
                workload = Workload(f"prefill-{args.requests}-{value}-{round_}", args.requests, 2048, 128)
                os.environ[args.variable] = value
                executor = llm.generator.executor
                executor.step_run_ahead = executor_setting(executor.runner)  # (read once, at the engine's start)
                r = kiln_offline(llm, workload, f"kiln {args.variable}={value}")
                itl = " / ".join(f"{v * 1000:.1f}" for v in (r.itl_s or {}).values())  # (the 2-step p99: docs)
                print(f"{args.variable}={value}: {r.seconds:.2f} s, {r.output_tokens_per_s:,.1f} output tokens/s, "
                      f"compute floor {floor:.2f} s: {floor / r.seconds:.1%}; ITL ms p50/p90/p99 {itl}; "
                      f"{format_extra(r.extra)}", flush=True)
        llm.shutdown()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
