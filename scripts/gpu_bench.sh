#!/usr/bin/env bash
# The benchmarks of docs/performance.md, on one GPU: bf16 Llama-3-8B shapes on every named workload
# beside transformers, then the weight-only and FP8 engines on batch-1 decode and a 64-request batch.
# Usage: scripts/gpu_bench.sh OUT_DIR [bf16|quant|all]
set -euo pipefail
out=${1:?usage: scripts/gpu_bench.sh OUT_DIR [bf16|quant|all]}
what=${2:-all}
mkdir -p "$out"
kiln="python -m kiln"
if [[ $what == bf16 || $what == all ]]; then
  $kiln bench --synthetic llama-3-8b --dtype bfloat16 \
    --workloads decode-1,offline-3000,prefill-1000,ttft-2048,prefix-64 \
    --output-json "$out/llama-3-8b-bf16.json" 2>&1 | grep -v Warning | tee "$out/llama-3-8b-bf16.txt"
fi
if [[ $what == quant || $what == all ]]; then
  $kiln bench --synthetic llama-3-8b --dtype bfloat16 --no-baseline --quant-algo W8A16,W4A16,FP8 \
    --workloads decode-1,offline-64 --output-json "$out/llama-3-8b-quant.json" 2>&1 | grep -v Warning \
    | tee "$out/llama-3-8b-quant.txt"
fi
