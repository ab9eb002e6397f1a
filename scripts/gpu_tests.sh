#!/usr/bin/env bash
# Every GPU-only test (kernels against their torch references, the runtime against the reference path and
# transformers), on a machine with an NVIDIA GPU. pytest may come from wheels in .whl/ (no registry there).
set -euo pipefail
if ! python -c "import pytest" 2>/dev/null; then
  python -m pip install -q --no-index --no-deps --target /tmp/kiln-site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/kiln-site
fi
# Quantized GEMMs run their first tile config: autotuning every shape the tests touch takes minutes.
export KILN_AUTOTUNE=${KILN_AUTOTUNE:-0}
python -m pytest -q -p no:cacheprovider -o addopts="" "$@" \
  tests/kernels tests/runtime/test_gpu_runtime.py tests/runtime/test_paged_batch.py \
  tests/quantization/test_kv_cache_quant.py tests/quantization/test_gpu_quant2.py
