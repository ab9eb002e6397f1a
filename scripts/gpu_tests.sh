#!/usr/bin/env bash
# Every GPU-only test (kernels against their torch references, the runtime against the reference path and
# transformers), on a machine with an NVIDIA GPU. pytest may come from wheels in .whl/ (no registry there; the
# folder is git-ignored, so a device call names it in `carry`).
set -euo pipefail
if ! python -c "import pytest" 2>/dev/null; then
  python -m pip install -q --no-index --no-deps --target /tmp/kiln-site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/kiln-site
fi
# Quantized GEMMs run their first tile config: autotuning every shape the tests touch takes minutes.
export KILN_AUTOTUNE=${KILN_AUTOTUNE:-0}
# With pytest-xdist (also in .whl/) the kernel tests run in 8 processes: they share the GPU, and compiles
# overlap. The runtime tests run one at a time: each engine sizes its KV cache from the GPU's free memory.
workers=$(python -c "import xdist" 2>/dev/null && echo "-n 8" || true)
pytest="python -m pytest -q -p no:cacheprovider -o addopts="
status=0
$pytest $workers "$@" tests/kernels tests/quantization/test_gpu_quant2.py || status=$?
$pytest "$@" tests/runtime/test_gpu_runtime.py tests/runtime/test_paged_batch.py tests/runtime/test_host_tensors.py \
  tests/quantization/test_kv_cache_quant.py tests/quantization/test_quantize_lm_head.py \
  tests/quantization/test_moe_weight_only.py || status=$?
exit $status
