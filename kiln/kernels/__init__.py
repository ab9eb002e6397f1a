"""Fused GPU kernels of the fast runtime, each a Triton kernel beside its torch reference.

| module | kernel (Triton, CUDA only) | reference (torch, any device) | what it fuses |
| --- | --- | --- | --- |
| `rmsnorm` | `rms_norm` | `rms_norm_ref` | residual add + RMSNorm, one read and one write of the row (e4m3 for an FP8 linear) |
| `rotary` | `apply_rotary` | `apply_rotary_ref` | cos/sin from positions + rotate-half on q and k, in place |
| `activation` | `silu_and_mul` | `silu_and_mul_ref` | SiLU of the fc half times the gate half (e4m3 for an FP8 linear) |
| `gated_gemm` | `silu_and_mul_gemm` | `silu_and_mul_gemm_ref` | the 16-bit fc_gate GEMM of prompt rows with SiLU-and-mul as its epilogue (TMA; `KILN_GATED_GEMM=1`) |
| `fp8_quant` | `quantize_fp8_rows` | `quantize_fp8_rows_ref` | activations to e4m3, per-token or static scale |
| `paged_attention` | `paged_decode_attention` | `paged_decode_attention_ref` | decode attention over a paged KV cache (split-K; int8 / fp8 codes with `kv_scale`) |
| `paged_attention` | `varlen_prefill_attention` | `varlen_prefill_attention_ref` | causal flash attention over packed sequences |
| `moe` | `fused_moe` | `fused_moe_ref` | MoE experts: sort by expert, two grouped GEMMs (gated act fused), no host sync; decode's few tokens one GEMV a (token, expert) pair, int4 and int8 experts on words of codes |
| `gemv` | `gemv`, `scaled_gemv` | `gemv_ref`, `fp8_gemm_emulated` (quantization.fp8) | decode's one or two rows: one read of the weights (e4m3 as codes, as int64 words of codes or on the tensor cores, the fastest) |
| `gemv` | `fp8_silu_and_mul_gemv` | the GEMV, `silu_and_mul_ref`, `InputQuant.quantize` | the FP8 fc_gate GEMV on words with SiLU-and-mul and the down projection's e4m3 input as its epilogue (1-2 rows) |
| `quant_gemm` | `fp8_qkv_rotary_matmul` | the GEMV, `apply_rotary_and_write_cache_ref` | the FP8 fused QKV GEMV on words with rotary and the KV-cache write as its epilogue (1-2 rows) |
| `quant_gemm` | `w4a16_matmul` | `w4a16_matmul_ref` | int4 group dequantization into the matmul (GEMV / GEMM; the GEMV's sums by integer dot products, dp2a) |
| `quant_gemm` | `w4a16_silu_and_mul_matmul` | `w4a16_silu_and_mul_matmul_ref` | the gated MLP's fc_gate GEMV with SiLU-and-mul as its epilogue (1-2 rows) |
| `quant_gemm` | `w4a16_qkv_rotary_matmul` | `w4a16_qkv_rotary_matmul_ref` | the fused QKV GEMV with rotary and the KV-cache write as its epilogue (1-2 rows) |
| `quant_gemm` | `w4a16_dequantize` | `dequantize_int4` (quantization.weight_only) | int4 codes to 16-bit weights (prefill-sized matmuls) |
| `quant_gemm` | `w8a16_matmul` | `w8a16_matmul_ref` | int8 per-channel dequantization into the matmul (GEMV / GEMM) |
| `quant_gemm` | `w8a16_silu_and_mul_matmul`, `w8a16_qkv_rotary_matmul` | the GEMV, `silu_and_mul_ref`, `apply_rotary_and_write_cache_ref` | the int8 GEMV on words with the int4 one's two epilogues (1-2 rows) |
| `int8_gemm` | `quantize_int8_rows` | `quantize_int8_rows_ref` | SmoothQuant's activations to int8, per-token scale, the prequant scale multiplied in |
| `int8_gemm` | `int8_gemm` | `int8_gemm_ref` | SmoothQuant's int8 GEMM, int32 sums, both scales in the epilogue (or `torch._int_mm`, timed) |

Every kernel takes the same arguments as its reference and returns the same result up to
floating-point rounding; tests/kernels compares them on random inputs. Callers pick the kernel when
`triton_available()` and the tensors are on CUDA, else the reference: that is how CPU runs (and CI)
exercise every layer. Importing this package never imports Triton's GPU machinery eagerly, and works
with no Triton installed. On Hopper the kernels of a decode step launch with programmatic dependent launch
(`pdl`): each one's programs start while the kernel before it ends.
"""

from __future__ import annotations

import functools


@functools.cache
def triton_available() -> bool:
    """True when Triton imports and a CUDA GPU is visible: the only place the kernels can run."""
    import importlib.util

    import torch

    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


@functools.cache
def num_sms(device_index: int) -> int:
    """The streaming multiprocessors of CUDA device `device_index` (asked once)."""
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def divide_exactly(x, constant: float):
    """x / constant, correctly rounded on every device. CUDA divides a tensor by a Python number as a multiply by
    its reciprocal, which can differ in the last bit; the Triton kernels divide with IEEE rounding (div_rn), and a
    reference or a checkpoint must not depend on the device it ran on."""
    import torch

    return x / torch.full_like(x, constant)


def rows_view(t):
    """[..., hidden] as [rows, hidden] with unit stride along hidden (a view for activations), as the
    row-wise kernels take it."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


ROW_PROGRAM_MAX = 65536  # elements of one row a program holds in registers (every LLM hidden size fits)


def row_program(width: int, what: str) -> tuple[int, int]:
    """(BLOCK, warps) of a kernel whose programs each hold one row of `width` elements in registers: BLOCK the next
    power of two, a warp per 1024 of it (1 to 16)."""
    block = 1 << max(width - 1, 0).bit_length()
    assert block <= ROW_PROGRAM_MAX, f"{what}: a row of {width} is over the kernel's {ROW_PROGRAM_MAX}"
    return block, min(max(block // 1024, 1), 16)
