#!/usr/bin/env bash
# One device call: the GPU tests of the kernels changed in the sixth session (PDL launches, the swapped int4 GEMM),
# the runtime's GPU tests (PDL inside CUDA graphs), W4A16 against bf16 at batch 64, and the int4 GEMMs per shape.
# Usage: scripts/gpu_check_s6.sh OUT_DIR
set -uo pipefail
out=${1:?usage: scripts/gpu_check_s6.sh OUT_DIR}
export PYTHONPATH=$PWD
if ! python -c "import xdist" 2>/dev/null; then
  python -m pip install -q --no-index --no-deps --target /tmp/kiln-site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/kiln-site
fi
rm -rf /tmp/kiln-bench-* "${HOME}/.cache/kiln"
pytest="python -m pytest -q -p no:cacheprovider -o addopts="
KILN_AUTOTUNE=0 timeout 150 $pytest -n 8 tests/kernels/test_quant_gemm_kernel.py tests/kernels/test_gemv_kernel.py \
  tests/kernels/test_rmsnorm_kernel.py tests/kernels/test_rotary_kernel.py tests/kernels/test_activation_kernel.py 2>&1 | tail -4
timeout 230 python -m kiln bench --synthetic llama-3-8b --dtype bfloat16 --baseline none --quant-algo W4A16 \
  --workloads offline-64 --output-json "$out/offline64-w4a16.json" 2>&1 | grep -v -i warn | tail -6
KILN_AUTOTUNE=0 timeout 120 $pytest -x tests/runtime/test_gpu_runtime.py 2>&1 | tail -3
timeout 90 python -m kiln.kernels.bench_quant_gemm 2>&1 | grep -v -i warn | tee "$out/bench-quant-gemm.txt" | grep -v "^  \(w4a16\|w8a16\)" | tail -40
