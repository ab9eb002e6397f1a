"""rms_norm: the reference against the formula written out, and the Triton kernel against the reference."""

import pytest
import torch

from kiln.kernels import triton_available
from kiln.kernels.rmsnorm import rms_norm, rms_norm_ref

needs_gpu = pytest.mark.skipif(not triton_available(),
                               reason="needs an NVIDIA GPU with Triton: the kernel path only exists there")

# The kernel and torch sum the squares in different orders, so rstd differs in float32's last bits
# and the normalised value, rounded to 16 bits, can land one ulp (relative 2**-10 in fp16, 2**-7 in
# bf16) apart; the multiply by the weight and its rounding add up to half an ulp more (seen: 1.03 ulp).
ULP2 = {torch.float32: 1e-5, torch.float16: 2 ** -9, torch.bfloat16: 2 ** -6}  # two ulps


def test_reference_is_the_formula():
    g = torch.Generator().manual_seed(0)
    x, res = (torch.randn(5, 48, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(48, generator=g, dtype=torch.float64)
    eps = 1e-5
    h = x + res
    expected = torch.stack([w * row / (row.pow(2).sum() / row.numel() + eps).sqrt() for row in h])
    normed, new_res = rms_norm_ref(x.float(), w.float(), eps, res.float())
    torch.testing.assert_close(new_res, h.float())
    torch.testing.assert_close(normed, expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rms_norm_ref(h.float(), w.float(), eps), expected.float(), rtol=1e-5, atol=1e-6)


def test_reference_normalises_the_rounded_sum():
    """The sum is rounded to x's dtype before the norm, as an unfused add (and transformers) would round it."""
    g = torch.Generator().manual_seed(1)
    x, res = (torch.randn(3, 64, generator=g).bfloat16() for _ in range(2))
    w = torch.randn(64, generator=g).bfloat16()
    normed, new_res = rms_norm_ref(x, w, 1e-6, res)
    h = (x.float() + res.float()).bfloat16()
    assert new_res.dtype == torch.bfloat16 and torch.equal(new_res, h)
    assert torch.equal(normed, rms_norm_ref(h, w, 1e-6))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 128), (7, 4096), (33, 5120), (2, 3, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_kernel_matches_reference(dtype, shape, with_residual):
    g = torch.Generator().manual_seed(hash((shape, with_residual)) % 2 ** 31)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).cuda()
    w = torch.randn(shape[-1], generator=g).to(dtype).cuda()
    res = torch.randn(shape, generator=g).to(dtype).cuda() if with_residual else None
    got, want = rms_norm(x, w, 1e-6, res), rms_norm_ref(x, w, 1e-6, res)
    if with_residual:
        assert torch.equal(got[1], want[1])  # the same float32 add, rounded once
        got, want = got[0], want[0]
    print(f"rms_norm {dtype} {shape} residual={with_residual}: max err {(got - want).abs().max().item():.3g}")
    torch.testing.assert_close(got, want, rtol=ULP2[dtype], atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fp8_output_is_the_normed_row_quantized(dtype, with_residual):
    """With FP8's static scale the kernel writes the e4m3 codes of the row it would have stored: bit for bit
    quantize_fp8_rows of its own unquantized output (the separate pass it replaces for an FP8 linear)."""
    from kiln.kernels.fp8_quant import quantize_fp8_rows
    from kiln.kernels.input_quant import FP8_STATIC, InputQuant

    g = torch.Generator().manual_seed(7 + with_residual)
    x = (torch.randn(37, 4096, generator=g) * 3).to(dtype).cuda()
    w = torch.randn(4096, generator=g).to(dtype).cuda()
    res = torch.randn(37, 4096, generator=g).to(dtype).cuda() if with_residual else None
    plain = rms_norm(x, w, 1e-6, res)
    normed = plain[0] if with_residual else plain
    scale = (normed.float().abs().max() / 448 * 0.75).reshape(1).to(dtype)  # the largest values saturate
    got = rms_norm(x, w, 1e-6, res, InputQuant(FP8_STATIC, scale))
    if with_residual:
        assert torch.equal(got[1], plain[1])
        got = got[0]
    want = quantize_fp8_rows(normed, scale)
    assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))
    assert torch.equal(got.scale, want.scale) and (got.q.float().abs() == 448).any()


@needs_gpu
@pytest.mark.parametrize("hidden", [4096, 2880])
def test_per_token_fp8_output_is_the_normed_row_quantized(hidden):
    """FP8_ROWS (FP8_PER_CHANNEL_PER_TOKEN's input): the codes and each row's own scale, bit for bit
    quantize_fp8_rows of the kernel's own 16-bit output; a hidden size no power of two too."""
    from kiln.kernels.fp8_quant import quantize_fp8_rows
    from kiln.kernels.input_quant import FP8_ROWS, InputQuant

    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(37, hidden, generator=g) * 3).bfloat16().cuda()
    w = torch.randn(hidden, generator=g).bfloat16().cuda()
    got, want = rms_norm(x, w, 1e-6, None, InputQuant(FP8_ROWS)), quantize_fp8_rows(rms_norm(x, w, 1e-6))
    assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))
    assert torch.equal(got.scale, want.scale) and got.scale.unique().numel() > 1  # (per row: bf16 maxima may tie)
