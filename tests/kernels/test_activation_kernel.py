"""silu_and_mul: the reference against the formula, and the Triton kernel against the reference."""

import pytest
import torch

from kiln.kernels import triton_available
from kiln.kernels.activation import silu_and_mul, silu_and_mul_ref

needs_gpu = pytest.mark.skipif(not triton_available(),
                               reason="needs an NVIDIA GPU with Triton: the kernel path only exists there")

# Triton's exp is not libm's, so silu, rounded to 16 bits, can land one ulp (relative 2**-10 in fp16,
# 2**-7 in bf16) apart; the multiply by the gate and its rounding add up to half an ulp more.
ULP2 = {torch.float32: 1e-5, torch.float16: 2 ** -9, torch.bfloat16: 2 ** -6}  # two ulps


def test_reference_is_silu_of_the_first_half_times_the_second():
    x = torch.randn(6, 2 * 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fc, gate = x[:, :40], x[:, 40:]
    expected = fc / (1 + torch.exp(-fc)) * gate
    torch.testing.assert_close(silu_and_mul_ref(x), expected)
    assert not torch.allclose(silu_and_mul_ref(x), gate / (1 + torch.exp(-gate)) * fc)  # the order matters


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 2 * 14336), (5, 2 * 11008), (33, 2 * 1000), (2, 3, 2 * 96)])
def test_kernel_matches_reference(dtype, shape):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1])) * 4).to(dtype).cuda()
    got, want = silu_and_mul(x), silu_and_mul_ref(x)
    print(f"silu_and_mul {dtype} {shape}: max err {(got - want).abs().max().item():.3g}")
    torch.testing.assert_close(got, want, rtol=ULP2[dtype], atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 37])
def test_fp8_output_is_the_product_quantized(dtype, rows):
    """With FP8's static scale the kernel writes the e4m3 codes of the product it would have stored: bit for bit
    quantize_fp8_rows of its own unquantized output (the separate pass it replaces for an FP8 proj)."""
    from kiln.kernels.fp8_quant import quantize_fp8_rows
    from kiln.kernels.input_quant import FP8_STATIC, InputQuant

    x = (torch.randn(rows, 2 * 14336, generator=torch.Generator().manual_seed(rows)) * 4).to(dtype).cuda()
    plain = silu_and_mul(x)
    scale = (plain.float().abs().max() / 448 * 0.75).reshape(1).to(dtype)  # the largest values saturate
    got, want = silu_and_mul(x, InputQuant(FP8_STATIC, scale)), quantize_fp8_rows(plain, scale)
    assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))
    assert torch.equal(got.scale, want.scale) and (got.q.float().abs() == 448).any()


@needs_gpu
@pytest.mark.parametrize("inter", [14336, 1500])
def test_per_token_fp8_output_is_the_product_quantized(inter):
    """FP8_ROWS (FP8_PER_CHANNEL_PER_TOKEN's input): one program takes a whole row, whose max sets its scale; the
    codes and scales bit for bit quantize_fp8_rows of the kernel's own 16-bit product."""
    from kiln.kernels.fp8_quant import quantize_fp8_rows
    from kiln.kernels.input_quant import FP8_ROWS, InputQuant

    x = (torch.randn(5, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 4).bfloat16().cuda()
    got, want = silu_and_mul(x, InputQuant(FP8_ROWS)), quantize_fp8_rows(silu_and_mul(x))
    assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))
    assert torch.equal(got.scale, want.scale) and got.scale.unique().numel() > 1  # (per row)
