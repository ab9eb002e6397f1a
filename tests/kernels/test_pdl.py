"""Programmatic dependent launch (kiln.kernels.pdl): a chain of decode kernels launched with PDL, captured in a
CUDA graph and replayed on fresh inputs, gives bit for bit what the same kernels give launched plainly. A kernel
that read its input before the previous kernel had written it would read the last replay's values instead."""

import pytest
import torch

from kiln.kernels import triton_available
from kiln.kernels.pdl import pdl_enabled

needs_hopper = pytest.mark.skipif(
    not (triton_available() and torch.cuda.get_device_capability() >= (9, 0)),
    reason="needs an NVIDIA GPU of compute capability 9.0 or later (Hopper) with Triton: PDL exists only there")


def test_pdl_is_off_without_a_gpu():
    assert pdl_enabled(torch.device("cpu")) is False


@needs_hopper
def test_pdl_is_on_on_hopper_unless_kiln_pdl_is_0(monkeypatch):
    assert pdl_enabled(torch.device("cuda")) is True
    monkeypatch.setenv("KILN_PDL", "0")
    assert pdl_enabled(torch.device("cuda")) is False


def _decode_chain(x, residual, weights):
    """One decoder layer's MLP half at batch 1, as the engine launches it: residual add + RMSNorm, a bf16 GEMV,
    SiLU-and-mul, an int8 GEMV, then an int4 GEMV and a last RMSNorm."""
    from kiln.kernels.activation import silu_and_mul
    from kiln.kernels.gemv import gemv
    from kiln.kernels.quant_gemm import w4a16_matmul, w8a16_matmul
    from kiln.kernels.rmsnorm import rms_norm

    norm_w, fc_gate, down_q, down_s, w4, w4_s = weights
    h, residual = rms_norm(x, norm_w, 1e-5, residual)
    h = silu_and_mul(gemv(h, fc_gate))
    h = w8a16_matmul(h, down_q, down_s)
    h = w4a16_matmul(h, w4, w4_s, None, 128)
    return rms_norm(h, norm_w[: h.shape[-1]], 1e-5)


@needs_hopper
def test_decode_chain_in_a_cuda_graph_with_pdl_equals_plain_launches(monkeypatch):
    from kiln.quantization.weight_only import quantize_int4_groups, quantize_int8_per_channel

    torch.manual_seed(0)
    hidden, inter = 1024, 2816
    dev, bf16 = "cuda", torch.bfloat16
    down_q, down_s = quantize_int8_per_channel(torch.randn(hidden, inter, device=dev) * 0.02, bf16)
    w4, w4_s, _ = quantize_int4_groups(torch.randn(hidden, hidden, device=dev) * 0.02, 128, False, bf16)
    weights = (torch.randn(hidden, device=dev, dtype=bf16), (torch.randn(2 * inter, hidden, device=dev) * 0.02).to(bf16),
               down_q, down_s, w4, w4_s)
    assert_replays_equal_plain_launches(_decode_chain, weights, hidden, monkeypatch)


def assert_replays_equal_plain_launches(chain, weights, hidden: int, monkeypatch) -> None:
    """chain(x, residual, weights) captured with PDL in a CUDA graph and replayed on 8 fresh inputs gives, bit for
    bit, what it gives launched plainly (KILN_PDL=0)."""
    dev, bf16 = "cuda", torch.bfloat16
    x, residual = (torch.empty(1, hidden, device=dev, dtype=bf16) for _ in range(2))
    inputs = [(torch.randn(1, hidden, device=dev, dtype=bf16), torch.randn(1, hidden, device=dev, dtype=bf16))
              for _ in range(8)]
    x.copy_(inputs[0][0]), residual.copy_(inputs[0][1])
    chain(x, residual, weights)  # compiles and autotunes every kernel outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = chain(x, residual, weights)
    got = []
    for xi, ri in inputs:
        x.copy_(xi), residual.copy_(ri)
        graph.replay()
        got.append(out.clone())
    monkeypatch.setenv("KILN_PDL", "0")
    for (xi, ri), y in zip(inputs, got):
        assert torch.equal(y, chain(xi.clone(), ri.clone(), weights))


def _moe_decode_chain(x, residual, weights):
    """An MoE layer's expert half at batch 1, as the engine launches it: residual add + RMSNorm, the router's GEMV,
    the routing kernel, the two pair GEMVs (decode by pair), the slots' sum, and the next RMSNorm."""
    from kiln.kernels.gemv import gemv
    from kiln.kernels.moe import Router, fused_moe, route
    from kiln.kernels.rmsnorm import rms_norm

    norm_w, router, fc, gate, proj = weights
    h, residual = rms_norm(x, norm_w, 1e-5, residual)
    expert_weights, experts = route(gemv(h, router), Router(4, True), h.dtype)
    y = fused_moe(h, fc, gate, proj, experts, expert_weights, 0, "silu", by_pair=True)
    return rms_norm(y, norm_w, 1e-5, residual)[0]


@needs_hopper
def test_moe_decode_chain_in_a_cuda_graph_with_pdl_equals_plain_launches(monkeypatch):
    """The routing kernel and the pair GEMVs wait for their inputs: a replay on fresh inputs, routed to other
    experts, gives the plain launches' bits."""
    torch.manual_seed(0)
    hidden, inter, experts = 512, 256, 16
    dev, bf16 = "cuda", torch.bfloat16
    weights = (torch.randn(hidden, device=dev, dtype=bf16), torch.randn(experts, hidden, device=dev, dtype=bf16),
               *(torch.randn(experts, n, k, device=dev, dtype=bf16) / k ** 0.5
                 for n, k in ((inter, hidden), (inter, hidden), (hidden, inter))))
    assert_replays_equal_plain_launches(_moe_decode_chain, weights, hidden, monkeypatch)
