#!/usr/bin/env bash
# The first GPU call for the kernels written without a GPU (twenty-ninth and thirtieth sessions): their tests, then
# their speed beside the paths they replace, each in one `kiln bench` run. About 12 minutes on an H200.
#
#   bash scripts/gpu_first_run.sh OUT_DIR
#
# 1. tests: FP8_BLOCK_SCALES' group quantization, GEMM and GEMV; SmoothQuant's int8 pass and GEMM (every tile and
#    torch._int_mm, bit for bit); W4A8_AWQ's FP8 path from 256 rows; both new engines against their CPU emulation.
# 2. FP8_BLOCK_SCALES and W8A8_SQ_PER_CHANNEL beside FP8 and bf16: batch-1 decode and offline-3000.
# 3. W4A8_AWQ (prompt matmuls on FP8 tensor cores) beside W4A16 (dequantized to bf16 for cuBLAS) on one 2048-token
#    prompt and batch-1 decode. AWQ's scale search on 8B shapes has never been timed: the run is capped at 5 minutes.
# 4. FP8 with its lm_head in FP8 too (--quantize-lm-head), batch-1 decode: issue 5's 1.7x needs the lm_head's bytes
#    halved (docs/quantization.md); last measured in the fifth session, before the e4m3 MMA GEMV.
# Outputs: OUT_DIR/{tests,block-sq,w4a8,fp8-lm-head}.txt and the bench JSONs. pytest may come from wheels in .whl/.
set -uo pipefail
out=${1:?usage: bash scripts/gpu_first_run.sh OUT_DIR}
mkdir -p "$out"
if ! python -c "import pytest" 2>/dev/null; then
  python -m pip install -q --no-index --no-deps --target /tmp/kiln-site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/kiln-site
fi
bench="python -m kiln bench --synthetic llama-3-8b --dtype bfloat16 --baseline none"
KILN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -o addopts= tests/quantization/test_gpu_quant2.py \
  -k "group or block or int8 or w4a8" 2>&1 | tee "$out/tests.txt"
$bench --quant-algo FP8,FP8_BLOCK_SCALES,W8A8_SQ_PER_CHANNEL --workloads decode-1,offline-3000 \
  --output-json "$out/block-sq.json" 2>&1 | tee "$out/block-sq.txt"
timeout 300 $bench --skip-unquantized --quant-algo W4A16,W4A8_AWQ --workloads ttft-2048,decode-1 \
  --output-json "$out/w4a8.json" 2>&1 | tee "$out/w4a8.txt"
$bench --quant-algo FP8 --quantize-lm-head --workloads decode-1 --output-json "$out/fp8-lm-head.json" 2>&1 |
  tee "$out/fp8-lm-head.txt"
