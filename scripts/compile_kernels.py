"""Compile kiln's Triton kernels for an H100 (sm_90) on a machine without a GPU, down to cubin.

The Triton interpreter (TRITON_INTERPRET=1) checks a kernel's arithmetic on the CPU but not that it compiles:
a `return` inside a constexpr `if`, say, runs under the interpreter and fails in the compiler. This script
catches that class of error before device time is spent. It needs triton installed (not a kiln dependency):

    pip install --no-deps --target /tmp/triton_site triton==3.6.0
    PYTHONPATH=/tmp/triton_site:. python scripts/compile_kernels.py

Each entry is (kernel, its signature, one set of constexprs); add one when a kernel or its specializations change.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kiln.kernels import fp8_quant, gemv, rmsnorm, rotary

TARGET = GPUTarget("cuda", 90, 32)


def _rotary_cases():
    sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "pos_ptr": "*i64", "freq_ptr": "*fp32", "q_tok_stride": "i32",
           "q_head_stride": "i32", "k_tok_stride": "i32", "k_head_stride": "i32", "q_heads": "i32", "k_heads": "i32",
           "half": "i32", "v_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16", "slot_ptr": "*i64",
           "v_tok_stride": "i32", "v_head_stride": "i32", "kc_tok_stride": "i32", "kc_head_stride": "i32",
           "vc_tok_stride": "i32", "vc_head_stride": "i32", "kvs_ptr": "*fp32", "WRITE_CACHE": "constexpr",
           "QUANT": "constexpr", "QMAX": "constexpr", "BLOCK_HQ": "constexpr", "BLOCK_HK": "constexpr",
           "BLOCK_D": "constexpr"}
    for write, quant, cache, qmax in ((False, 0, "*bf16", 0.0), (True, 0, "*bf16", 0.0), (True, 1, "*i8", 127.0),
                                      (True, 2, "*fp8e4nv", 448.0)):
        yield (f"rotary write={write} quant={quant}", rotary._rotary_kernel,
               dict(sig, kc_ptr=cache, vc_ptr=cache, kvs_ptr="*bf16" if quant else "*fp32"),
               {"WRITE_CACHE": write, "QUANT": quant, "QMAX": qmax, "BLOCK_HQ": 32, "BLOCK_HK": 8, "BLOCK_D": 64})


def _gemv_cases():
    for scaled, codes in ((False, "*bf16"), (True, "*fp8e4nv")):
        sig = {"x_ptr": codes, "w_ptr": codes, "y_ptr": "*bf16", "xs_ptr": "*fp32" if scaled else "*bf16",
               "ws_ptr": "*bf16", "N": "i32", "K": "constexpr", "stride_xm": "i32", "stride_wn": "i32", "M": "i32",
               "HAS_SCALES": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
        yield (f"gemv scaled={scaled}", gemv._gemv_kernel.fn, sig,
               {"K": 4096, "HAS_SCALES": scaled, "BLOCK_N": 4, "BLOCK_K": 1024})


def _pointwise_cases():
    for static in (False, True):
        sig = {"x_ptr": "*bf16", "static_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "x_stride": "i32",
               "K": "i32", "STATIC": "constexpr", "BLOCK": "constexpr"}
        yield f"fp8 quant static={static}", fp8_quant._quantize_rows_kernel, sig, {"STATIC": static, "BLOCK": 4096}
    for residual in (False, True):
        sig = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_out_ptr": "*bf16",
               "x_stride": "i32", "res_stride": "i32", "n": "i32", "eps": "fp32", "HAS_RESIDUAL": "constexpr",
               "BLOCK": "constexpr"}
        yield f"rms_norm residual={residual}", rmsnorm._rms_norm_kernel, sig, {"HAS_RESIDUAL": residual, "BLOCK": 4096}


def main() -> None:
    failed = 0
    for name, fn, signature, constexprs in (*_rotary_cases(), *_gemv_cases(), *_pointwise_cases()):
        try:
            triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET)
            print(f"ok      {name}")
        except Exception as e:  # a compile error: report it and go on to the next kernel
            failed += 1
            print(f"FAILED  {name}: {type(e).__name__}: {str(e)[-400:]}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
