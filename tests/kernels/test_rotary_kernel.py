"""apply_rotary: the reference against rotation written with complex numbers, the kernel against the reference.

The head-norm tests run on CUDA, or on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1 PYTHONPATH=<site with triton> pytest tests/kernels/test_rotary_kernel.py`)."""

import importlib.util
import os

import pytest
import torch

from kiln.kernels import triton_available
from kiln.kernels.rmsnorm import rms_norm_ref
from kiln.kernels.rotary import (HeadNorms, apply_rotary, apply_rotary_and_write_cache,
                                 apply_rotary_and_write_cache_ref, apply_rotary_ref)

needs_gpu = pytest.mark.skipif(not triton_available(),
                               reason="needs an NVIDIA GPU with Triton: the kernel path only exists there")
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if triton_available() else "cpu"
needs_kernel = pytest.mark.skipif(not (triton_available() or INTERPRETER),
                                  reason="needs an NVIDIA GPU with Triton, or TRITON_INTERPRET=1 with Triton")


def _inv_freq(head_size: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)


def test_reference_rotates_each_half_pair_by_position_times_frequency():
    g = torch.Generator().manual_seed(0)
    tokens, d = 9, 32
    q, k = torch.randn(tokens, 4, d, generator=g), torch.randn(tokens, 2, d, generator=g)
    positions = torch.randint(0, 500, (tokens,), generator=g)
    freqs = _inv_freq(d)
    angle = positions.double()[:, None, None] * freqs.double()  # [tokens, 1, d/2]
    expected = []
    for x in (q, k):
        z = torch.complex(x[..., :d // 2].double(), x[..., d // 2:].double()) * torch.exp(1j * angle)
        expected.append(torch.cat([z.real, z.imag], dim=-1).float())
    q_out, k_out = apply_rotary_ref(q.clone(), k.clone(), positions, freqs)
    torch.testing.assert_close(q_out, expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k_out, expected[1], rtol=1e-4, atol=1e-4)


def test_reference_rotates_in_place():
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    before = q.clone()
    q_out, k_out = apply_rotary_ref(q, k, torch.tensor([0, 1, 2]), _inv_freq(8))
    assert q_out is q and k_out is k
    torch.testing.assert_close(q[0], before[0])  # position 0 is the identity
    assert not torch.allclose(q[1:], before[1:])


def test_reference_with_cache_writes_the_rotated_keys_and_the_values_at_their_slots():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(3, 4, 8, generator=g), torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    k_cache, v_cache = torch.randn(10, 2, 8, generator=g), torch.randn(10, 2, 8, generator=g)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    positions, slots = torch.tensor([4, 5, 6]), torch.tensor([7, 2, 9])
    want_q, want_k = apply_rotary_ref(q.clone(), k.clone(), positions, _inv_freq(8))
    apply_rotary_and_write_cache_ref(q, k, v, positions, _inv_freq(8), k_cache, v_cache, slots)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(k_cache[slots], want_k) and torch.equal(v_cache[slots], v)
    others = torch.tensor([i for i in range(10) if i not in slots.tolist()])
    assert torch.equal(k_cache[others], k_before[others]) and torch.equal(v_cache[others], v_before[others])


@pytest.mark.parametrize("code_dtype", [torch.int8, torch.float8_e4m3fn])
def test_reference_with_a_quantized_cache_writes_the_codes(code_dtype):
    from kiln.quantization.kv_cache import quantize

    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 4, 8, generator=g), torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    k_cache, v_cache = (torch.zeros(10, 2, 8, dtype=code_dtype) for _ in range(2))
    scale = torch.tensor([0.02, 0.03])
    slots, positions = torch.tensor([7, 2, 9]), torch.tensor([4, 5, 6])
    apply_rotary_and_write_cache_ref(q, k, v, positions, _inv_freq(8), k_cache, v_cache, slots, scale)
    for cache, x, s in ((k_cache, k, scale[0]), (v_cache, v, scale[1])):  # k: rotated in place
        assert torch.equal(cache[slots].view(torch.uint8), quantize(x, s, code_dtype).view(torch.uint8))
    assert (k_cache[slots].float() != 0).any()


def test_reference_norms_each_head_before_rotating():
    """Qwen3's order: q_norm and k_norm over each head (RMSNorm's math), then the rotation."""
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(3, 4, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    norms = HeadNorms(1 + 0.1 * torch.randn(8, generator=g), 1 + 0.1 * torch.randn(8, generator=g), 1e-6)
    positions = torch.tensor([3, 9, 40])
    want = apply_rotary_ref(rms_norm_ref(q, norms.q_weight, 1e-6), rms_norm_ref(k, norms.k_weight, 1e-6),
                            positions, _inv_freq(8))
    got = apply_rotary_ref(q, k, positions, _inv_freq(8), norms)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def _qkv_views(tokens, heads, kv_heads, head_size, dtype, fused_qkv, g):
    """q, k, v and the QKV output they view: strided slices of it (fused), or contiguous copies."""
    width = (heads + 2 * kv_heads) * head_size
    qkv = torch.randn(tokens, width, generator=g).to(dtype).to(DEVICE)
    bounds = (0, heads * head_size, (heads + kv_heads) * head_size, width)
    parts = [qkv[:, a:b].view(tokens, -1, head_size) for a, b in zip(bounds[:-1], bounds[1:])]
    return (parts if fused_qkv else [p.contiguous() for p in parts]), qkv


# cos/sin from libdevice vs torch may differ in float32's last bit and round apart in 16 bits:
# one ulp of cos (2**-8 in bf16) times |x| (up to ~4) bounds the difference.
ROTARY_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
# Up to HEAD_PER_PROGRAM_MAX_TOKENS tokens each program rotates one head; beyond, BLOCK_H heads (several
# programs for q's heads, the last one partly masked where BLOCK_H does not divide them).
@pytest.mark.parametrize("tokens,heads,kv_heads,head_size", [(1, 32, 8, 128), (3, 12, 4, 64), (17, 12, 4, 64),
                                                             (64, 8, 1, 80), (300, 32, 8, 128), (40, 2, 1, 256)])
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_kernel_with_cache_write_matches_reference(dtype, tokens, heads, kv_heads, head_size, fused_qkv):
    g = torch.Generator().manual_seed(tokens * heads + head_size + 1)
    (q, k, v), _ = _qkv_views(tokens, heads, kv_heads, head_size, dtype, fused_qkv, g)
    num_slots = 4 * tokens + 8
    k_cache = torch.randn(num_slots, kv_heads, head_size, generator=g).to(dtype).cuda()
    v_cache = torch.randn(num_slots, kv_heads, head_size, generator=g).to(dtype).cuda()
    slots = torch.randperm(num_slots, generator=g)[:tokens].cuda()
    positions = torch.randint(0, 8192, (tokens,), generator=g).cuda()
    freqs = _inv_freq(head_size, 500000.0).cuda()
    want = [t.clone() for t in (q, k, k_cache, v_cache)]
    apply_rotary_and_write_cache_ref(want[0], want[1], v, positions, freqs, want[2], want[3], slots)
    apply_rotary_and_write_cache(q, k, v, positions, freqs, k_cache, v_cache, slots)
    tol = ROTARY_TOL[dtype]
    for got, expected in zip((q, k, k_cache), want[:3]):
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert torch.equal(v_cache, want[3])  # values are copied bit for bit, other slots untouched
    unwritten = torch.ones(num_slots, dtype=torch.bool, device="cuda")
    unwritten[slots] = False
    assert torch.equal(k_cache[unwritten], want[2][unwritten])


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("code_dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_size", [(1, 32, 8, 128), (17, 12, 4, 64), (300, 32, 8, 128)])
@pytest.mark.parametrize("head_norms", [False, True])
def test_kernel_writes_the_codes_of_a_quantized_cache(dtype, code_dtype, tokens, heads, kv_heads, head_size,
                                                      head_norms):
    """The codes are kv_cache.quantize of the kernel's own rotated keys (normed first, with head norms) and of the
    values, bit for bit; a small scale makes some of them saturate."""
    from kiln.quantization.kv_cache import QMAX, quantize

    if code_dtype == torch.float8_e4m3fn and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("an FP8 cache needs compute capability 8.9+")
    g = torch.Generator().manual_seed(tokens * heads + head_size + 2)
    (q, k, v), _ = _qkv_views(tokens, heads, kv_heads, head_size, dtype, True, g)
    num_slots = 4 * tokens + 8
    k_cache, v_cache = (torch.zeros(num_slots, kv_heads, head_size, dtype=code_dtype, device="cuda")
                        for _ in range(2))
    scale = (torch.tensor([3.0, 2.5]) / QMAX[code_dtype]).to(dtype).cuda()  # |x| > 3 saturates
    slots = torch.randperm(num_slots, generator=g)[:tokens].cuda()
    positions = torch.randint(0, 8192, (tokens,), generator=g).cuda()
    norms = None
    if head_norms:  # Qwen3's q_norm and k_norm, weights of random size
        weights = (2 + 0.3 * torch.randn(2, head_size, generator=g)).to(dtype).cuda()  # (RMS 2: some saturate)
        norms = HeadNorms(weights[0], weights[1], 1e-6)
    apply_rotary_and_write_cache(q, k, v, positions, _inv_freq(head_size, 500000.0).cuda(), k_cache, v_cache,
                                 slots, scale, norms)
    for cache, x, s in ((k_cache, k, scale[0]), (v_cache, v, scale[1])):  # (float8 indexed through its bytes)
        assert torch.equal(cache.view(torch.uint8)[slots], quantize(x, s, code_dtype).view(torch.uint8))
    written = k_cache.view(torch.uint8)[slots].view(code_dtype)
    assert (written.float().abs() == QMAX[code_dtype]).any()  # saturation was exercised


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_size", [(1, 32, 8, 128), (17, 12, 4, 64), (64, 8, 1, 80)])
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_kernel_matches_reference(dtype, tokens, heads, kv_heads, head_size, fused_qkv):
    g = torch.Generator().manual_seed(tokens * heads + head_size)
    width = (heads + 2 * kv_heads) * head_size
    qkv = torch.randn(tokens, width, generator=g).to(dtype).cuda()
    if fused_qkv:  # strided views into the QKV matmul's output, as the runtime passes them
        q = qkv[:, :heads * head_size].view(tokens, heads, head_size)
        k = qkv[:, heads * head_size:(heads + kv_heads) * head_size].view(tokens, kv_heads, head_size)
    else:
        q = qkv[:, :heads * head_size].reshape(tokens, heads, head_size).contiguous()
        k = qkv[:, -kv_heads * head_size:].reshape(tokens, kv_heads, head_size).contiguous()
    positions = torch.randint(0, 8192, (tokens,), generator=g).cuda()
    freqs = _inv_freq(head_size, 500000.0).cuda()
    want_q, want_k = apply_rotary_ref(q.clone(), k.clone(), positions, freqs)
    v_before = qkv[:, (heads + kv_heads) * head_size:].clone()
    got_q, got_k = apply_rotary(q, k, positions, freqs)
    assert got_q.data_ptr() == q.data_ptr()
    assert torch.equal(qkv[:, (heads + kv_heads) * head_size:], v_before) or not fused_qkv  # v untouched
    tol = ROTARY_TOL[dtype]
    err = max((got_q - want_q).abs().max().item(), (got_k - want_k).abs().max().item())
    print(f"apply_rotary {dtype} {(tokens, heads, kv_heads, head_size)} fused={fused_qkv}: max err {err:.3g}")
    torch.testing.assert_close(got_q, want_q, rtol=tol, atol=tol)
    torch.testing.assert_close(got_k, want_k, rtol=tol, atol=tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unit_offset", [False, True])  # Qwen3's RMSNorm, Gemma 3's 1 + w
# Qwen3-30B-A3B's decode step (one head a program), and past HEAD_PER_PROGRAM_MAX_TOKENS (BLOCK_H heads a program,
# the last partly masked), Gemma 3's 256-wide heads among them
@pytest.mark.parametrize("tokens,heads,kv_heads,head_size", [(1, 32, 4, 128), (3, 6, 2, 64), (20, 12, 4, 64),
                                                             (18, 4, 2, 256)])
def test_kernel_norms_heads_as_the_reference(dtype, unit_offset, tokens, heads, kv_heads, head_size):
    """The rotary launch norms each head of q and k (weights of random size, not ones) before rotating and caching
    them, as q_norm and k_norm followed by the rotation do."""
    g = torch.Generator().manual_seed(tokens * heads + head_size + unit_offset)
    (q, k, v), _ = _qkv_views(tokens, heads, kv_heads, head_size, dtype, True, g)
    q.mul_(3)  # heads of different scales: the norm has work to do
    spread = 0.3 * torch.randn(2, head_size, generator=g)
    weights = (spread if unit_offset else 1 + spread).to(dtype).to(DEVICE)
    norms = HeadNorms(weights[0], weights[1], 1e-6, unit_offset)
    num_slots = 2 * tokens + 4
    k_cache, v_cache = (torch.randn(num_slots, kv_heads, head_size, generator=g).to(dtype).to(DEVICE)
                        for _ in range(2))
    slots = torch.randperm(num_slots, generator=g)[:tokens].to(DEVICE)
    positions = torch.randint(0, 8192, (tokens,), generator=g).to(DEVICE)
    freqs = _inv_freq(head_size, 1000000.0).to(DEVICE)
    want = [t.clone() for t in (q, k, k_cache, v_cache)]
    apply_rotary_and_write_cache_ref(*want[:2], v, positions, freqs, *want[2:], slots, norms=norms)
    apply_rotary_and_write_cache(q, k, v, positions, freqs, k_cache, v_cache, slots, norms=norms)
    tol = ROTARY_TOL[dtype]
    for got, expected in zip((q, k, k_cache), want[:3]):
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert torch.equal(v_cache, want[3])  # values unnormed, copied bit for bit
    q2, k2 = (torch.randn(tokens, n, head_size, generator=g).to(dtype).to(DEVICE) for n in (heads, kv_heads))
    want_q, want_k = apply_rotary_ref(q2.clone(), k2.clone(), positions, freqs, norms)
    apply_rotary(q2, k2, positions, freqs, norms)  # without the cache write
    torch.testing.assert_close(q2, want_q, rtol=tol, atol=tol)
    torch.testing.assert_close(k2, want_k, rtol=tol, atol=tol)
