"""quantize_fp8_rows: the Triton kernel against kiln.quantization.fp8's torch math (run on the CPU), bit for bit."""

import pytest
import torch

from kiln.kernels import triton_available
from kiln.kernels.fp8_quant import quantize_fp8_rows
from kiln.quantization.fp8 import quantize_fp8_per_token, quantize_fp8_static

needs_gpu = pytest.mark.skipif(not triton_available(),
                               reason="needs an NVIDIA GPU with Triton: the kernel path only exists there")


def _activations(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows of very different magnitudes (as LLM activations have), one outlier column, and (with several rows)
    one all-zero row, which per-token scaling must survive."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, m)[:, None]
    x[:, k // 3] *= 50.0
    if m > 1:
        x[m // 2] = 0.0
    return x.to(dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 4096), (7, 14336), (64, 1000), (3, 96)])
@pytest.mark.parametrize("static", [False, True])
def test_kernel_equals_the_torch_math(dtype, m, k, static):
    x = _activations(m, k, dtype, seed=m * k)
    # A static scale from a smaller calibration max: the largest rows saturate at +-448.
    a = torch.tensor([x.float().abs().max().item() / 448.0 / 4], dtype=dtype)
    want_q, want_s = quantize_fp8_static(x, a) if static else quantize_fp8_per_token(x)  # CPU: torch math
    got_q, got_s = quantize_fp8_rows(x.cuda(), a.cuda() if static else None)
    assert got_q.dtype == torch.float8_e4m3fn and got_s.shape == (m, 1) and got_s.dtype == torch.float32
    assert torch.equal(got_s.cpu(), want_s)
    assert torch.equal(got_q.cpu().view(torch.uint8), want_q.view(torch.uint8))
    assert (got_q.float().abs() == 448).any() or not static  # saturation was exercised
