#!/usr/bin/env bash
# The benchmarks of docs/performance.md, on one GPU: bf16 Llama-3-8B shapes on every named workload
# beside transformers, then each quantized engine beside bf16 on batch-1 decode and offline 3000 x 128/128, and
# the INT8 KV cache's capacity; "w4" alone: the int4 GEMM per tile side and row count, then W4A16 beside bf16 at
# batch 1 and 64 (issue 4's two speed lines); "ahead" alone: bf16 at batch 1, 64 and 512 with the run-ahead off,
# then on; "epilogues" alone: W4A16 beside bf16 at batch 1 and 64 with the int4 GEMV's epilogues on, then W4A16
# at batch 1 with them off; "trtllm" alone: FP8 weights with the FP8 KV cache on the three workloads of
# TensorRT-LLM's published Llama-3.1-8B FP8 figures (issue 5's absolute lines).
# A command may need more than the device tool's 10 minutes: run the parts apart.
# Usage: scripts/gpu_bench.sh OUT_DIR [bf16|quant|w4|ahead|epilogues|trtllm|all]
set -euo pipefail
out=${1:?usage: scripts/gpu_bench.sh OUT_DIR [bf16|quant|w4|ahead|epilogues|trtllm|all]}
what=${2:-all}
mkdir -p "$out"
kiln="python -m kiln"
fresh_caches() {
  # Each run starts cold: no engine, no kernel choices, and no compiled Triton kernels. Triton's cache outlives
  # kiln's: a run after another one with the same kernels skipped their compiles, which made a first open look
  # tens of seconds shorter (the fifteenth session's epilogues-off run, 18.9 s: the on run had compiled its GEMMs).
  rm -rf /tmp/kiln-bench-* "${HOME}/.cache/kiln"
  TRITON_CACHE_DIR=$(mktemp -d /tmp/triton-cache-XXXX)
  export TRITON_CACHE_DIR
}
if [[ $what == bf16 || $what == all ]]; then
  fresh_caches
  $kiln bench --synthetic llama-3-8b --dtype bfloat16 \
    --workloads decode-1,offline-3000,prefill-1000,ttft-2048,prefix-64 \
    --output-json "$out/llama-3-8b-bf16.json" 2>&1 | grep -v Warning | tee "$out/llama-3-8b-bf16.txt"
fi
if [[ $what == quant || $what == all ]]; then
  # One quantized system per call: each needs the 16 GB source, its checkpoint and its engine on disk at once.
  for algo in FP8 W4A16 W8A16; do
    fresh_caches
    kv=$([[ $algo == FP8 ]] && echo "--kv-cache-quant-algo none,FP8" || true)  # FP8 with either KV cache
    $kiln bench --synthetic llama-3-8b --dtype bfloat16 --baseline none --quant-algo $algo $kv \
      --workloads decode-1,offline-3000 --output-json "$out/llama-3-8b-$algo.json" 2>&1 | grep -v Warning \
      | tee "$out/llama-3-8b-$algo.txt"
  done
  fresh_caches  # the same engines with lm_head quantized too (opt-in)
  $kiln bench --synthetic llama-3-8b --dtype bfloat16 --baseline none --quant-algo W4A16,W8A16,FP8 --quantize-lm-head \
    --workloads decode-1 --output-json "$out/llama-3-8b-quant-lm-head.json" 2>&1 | grep -v Warning \
    | tee "$out/llama-3-8b-quant-lm-head.txt"
  fresh_caches
  $kiln bench --synthetic llama-3-8b --dtype bfloat16 --baseline none --skip-unquantized --kv-cache-quant-algo INT8 \
    --workloads decode-1 --output-json "$out/llama-3-8b-kv-int8.json" 2>&1 | grep -v Warning \
    | tee "$out/llama-3-8b-kv-int8.txt"
fi
if [[ $what == w4 ]]; then
  python -m kiln.kernels.bench_quant_gemm 2>&1 | grep -v Warning | tee "$out/bench-quant-gemm.txt"
  fresh_caches
  $kiln bench --synthetic llama-3-8b --dtype bfloat16 --baseline none --quant-algo W4A16 \
    --workloads decode-1,offline-64 --output-json "$out/llama-3-8b-w4a16.json" 2>&1 | grep -v Warning \
    | tee "$out/llama-3-8b-w4a16.txt"
fi
if [[ $what == epilogues ]]; then
  # W4A16's int4 GEMV with SiLU-and-mul and rotary as its epilogues (on by default) beside bf16, then W4A16
  # alone without them at batch 1 (the epilogues only run at 1-2 rows, so batch 64 is the same either way).
  for epilogues in 1 0; do
    fresh_caches
    which=$([[ $epilogues == 1 ]] && echo "--workloads decode-1,offline-64" \
            || echo "--workloads decode-1 --skip-unquantized")
    KILN_GEMV_EPILOGUES=$epilogues $kiln bench --synthetic llama-3-8b --dtype bfloat16 --baseline none \
      --quant-algo W4A16 $which --output-json "$out/llama-3-8b-w4a16-epilogues-$epilogues.json" 2>&1 \
      | grep -v Warning | tee "$out/llama-3-8b-w4a16-epilogues-$epilogues.txt"
  done
fi
if [[ $what == trtllm ]]; then
  fresh_caches
  $kiln bench --synthetic llama-3-8b --dtype bfloat16 --baseline none --skip-unquantized --quant-algo FP8 \
    --kv-cache-quant-algo FP8 --workloads offline-3000,prefill-1000,long-1000 \
    --output-json "$out/llama-3-8b-fp8-trtllm-workloads.json" 2>&1 | grep -v Warning \
    | tee "$out/llama-3-8b-fp8-trtllm-workloads.txt"
fi
if [[ $what == ahead ]]; then
  for run_ahead in 0 1; do
    fresh_caches
    KILN_DECODE_RUN_AHEAD=$run_ahead $kiln bench --synthetic llama-3-8b --dtype bfloat16 --baseline none \
      --workloads decode-1,offline-64,offline-3000 --output-json "$out/llama-3-8b-run-ahead-$run_ahead.json" 2>&1 \
      | grep -v Warning | tee "$out/llama-3-8b-run-ahead-$run_ahead.txt"
  done
fi
