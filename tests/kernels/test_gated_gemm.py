"""The fc_gate GEMM with SiLU-and-mul as its epilogue (kiln.kernels.gated_gemm) against its reference, and the
16-bit linear layer's switch to it (KILN_GATED_GEMM)."""

import pytest
import torch
import torch.nn.functional as F

from kiln.kernels import gated_gemm, triton_available
from kiln.kernels.gated_gemm import silu_and_mul_gemm, silu_and_mul_gemm_ref

needs_gpu = pytest.mark.skipif(not triton_available(),
                               reason="needs an NVIDIA GPU with Triton: the kernel path only exists there")
needs_tma = pytest.mark.skipif(not triton_available() or torch.cuda.get_device_capability()[0] < 9,
                               reason="needs a GPU with TMA (Hopper or later): the kernel loads by TMA")

# fc and gate are each rounded to 16 bits after float32 sums whose order differs from cuBLAS's: each may land one
# ulp apart, and the product's rounding adds half an ulp: four ulps (2**-8 relative in bf16, 2**-11 in fp16)
ULP4 = {torch.float16: 2 ** -8, torch.bfloat16: 2 ** -5}


def _case(rows, inter, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = (torch.randn(2 * inter, k, generator=g) / k ** 0.5).to(dtype)
    return x, w


def test_reference_rounds_each_half_then_takes_silu_of_fc_times_gate():
    x, w = _case(5, 24, 32, torch.bfloat16, 0)
    fc, gate = F.linear(x, w).float().chunk(2, dim=-1)
    want = (fc / (1 + torch.exp(-fc)) * gate).to(torch.bfloat16)
    torch.testing.assert_close(silu_and_mul_gemm_ref(x, w), want, rtol=0, atol=0)
    swapped = (gate / (1 + torch.exp(-gate)) * fc).to(torch.bfloat16)
    assert not torch.equal(silu_and_mul_gemm_ref(x, w), swapped)  # the first half is fc


@pytest.mark.skipif(gated_gemm.TensorDescriptor is None, reason="needs Triton 3.4 or later (host TMA descriptors)")
def test_kernel_declines_what_its_descriptors_cannot_read():
    x, w = _case(8, 24, 32, torch.bfloat16, 1)
    assert gated_gemm.can_run(x, w)  # (on the CPU: for the interpreter)
    assert not gated_gemm.can_run(x.float(), w.float())  # 32-bit
    assert not gated_gemm.can_run(x, w.half())  # mixed dtypes
    assert not gated_gemm.can_run(x[:, :30], w[:, :30].contiguous())  # rows of 60 bytes: not 16-byte multiples
    assert not gated_gemm.can_run(x, w.t().contiguous().t())  # weight columns not contiguous
    assert not gated_gemm.can_run(x, torch.cat([w.flatten()[:1], w.flatten()])[1:].view_as(w))  # 2-byte aligned


@needs_tma
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,inter,k", [(300, 200, 136), (1000, 1792, 4096), (4096, 14336, 4096), (257, 96, 64)])
@pytest.mark.parametrize("config", range(len(gated_gemm.GATED_GEMM_CONFIGS)))
def test_kernel_matches_reference(dtype, rows, inter, k, config):
    """Ragged edges on every side (rows, I and K that no tile divides) and Llama-3-8B's fc_gate; each candidate tile."""
    x, w = (t.cuda() for t in _case(rows, inter, k, dtype, rows + inter))
    got = silu_and_mul_gemm(x, w, gated_gemm.GATED_GEMM_CONFIGS[config]).float()
    want = silu_and_mul_gemm_ref(x, w).float()
    torch.testing.assert_close(got, want, rtol=ULP4[dtype], atol=ULP4[dtype] * want.abs().max().item())


@needs_tma
def test_linear_layer_takes_the_fused_gemm_only_when_switched_on_for_prompt_rows(monkeypatch):
    from kiln.layers.linear import ColumnLinear
    from kiln.mapping import Mapping

    layer = ColumnLinear(128, 2 * 96, False, Mapping()).cuda()
    x, w = (t.cuda() for t in _case(gated_gemm.MIN_ROWS, 96, 128, torch.bfloat16, 7))
    layer.weight.data = w
    method = layer.quant_method
    monkeypatch.delenv("KILN_GATED_GEMM", raising=False)
    assert method.silu_and_mul_matmul(layer, x) is None  # off by default
    monkeypatch.setenv("KILN_GATED_GEMM", "1")
    assert method.silu_and_mul_matmul(layer, x[:-1]) is None  # fewer rows than MIN_ROWS: cuBLAS
    got = method.silu_and_mul_matmul(layer, x).float()
    want = silu_and_mul_gemm_ref(x, w).float()
    tol = ULP4[torch.bfloat16]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
