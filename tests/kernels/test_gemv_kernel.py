"""gemv: the Triton GEMV against F.linear on random shapes, and its choice against cuBLAS (GPU only)."""

import pytest
import torch

from kiln.kernels import triton_available
from kiln.kernels.gemv import gemv, gemv_ref, use_gemv

needs_gpu = pytest.mark.skipif(not triton_available(),
                               reason="needs an NVIDIA GPU with Triton: the kernel path only exists there")
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
# (2, 151936, 256): Qwen's lm_head outputs, past 65,535 programs of BLOCK_N 2 (a grid's second dim's limit)
@pytest.mark.parametrize("rows,n,k", [(1, 4096, 4096), (2, 6144, 4096), (1, 1000, 1234), (2, 7, 4100), (1, 3, 64),
                                      (2, 151936, 256)])
@pytest.mark.parametrize("strided", [False, True])
def test_kernel_matches_reference(dtype, rows, n, k, strided):
    g = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, 2 * k if strided else k, generator=g).to(dtype).cuda()
    x = x[:, :k] if strided else x  # a row stride past k, as a slice of a wider activation
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).cuda()
    got, want = gemv(x, w), gemv_ref(x, w)
    # Both sum in float32 in different orders, then round once: the sums differ by at most k float32 ulps of
    # sum |x||w|, and the results by those plus one ulp of the output's dtype.
    magnitude = (x.float().abs() @ w.float().abs().T)
    bound = k * 2.0 ** -23 * magnitude + 2.0 ** -MANTISSA_BITS[dtype] * want.float().abs() + 1e-30
    err = (got.float() - want.float()).abs()
    print(f"gemv {dtype} {rows}x{n}x{k}: max err {err.max().item():.3g}, worst err / bound {(err / bound).max():.3g}")
    assert got.shape == want.shape and got.dtype == dtype
    assert (err <= bound).all()


@needs_gpu
def test_choice_is_never_timed_inside_a_cuda_graph_capture():
    x = torch.randn(1, 512, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(333, 512, dtype=torch.bfloat16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        assert use_gemv(x, w) is False  # an unseen shape inside a capture: cuBLAS, and nothing recorded
    decided = use_gemv(x, w)  # outside: timed once, then remembered
    assert use_gemv(x, w) is decided
    assert use_gemv(torch.randn(3, 512, dtype=torch.bfloat16, device="cuda"), w) is False  # over GEMV_MAX_ROWS


needs_fp8_gpu = pytest.mark.skipif(not triton_available() or torch.cuda.get_device_capability() < (8, 9),
                                   reason="needs an NVIDIA GPU with FP8 (compute capability 8.9+) and Triton")


@needs_fp8_gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k", [(1, 4096, 4096), (2, 6144, 4096), (1, 1000, 1234), (2, 7, 4100)])
def test_scaled_gemv_matches_the_emulated_fp8_gemm(out_dtype, rows, n, k):
    from kiln.kernels.gemv import scaled_gemv
    from kiln.quantization.fp8 import fp8_gemm, fp8_gemm_emulated, quantize_fp8_per_token, quantize_fp8_weight

    g = torch.Generator().manual_seed(rows * n + k + 7)
    x = torch.randn(rows, k, generator=g).to(out_dtype).cuda()
    wq, ws = quantize_fp8_weight(torch.randn(n, k, generator=g).cuda(), out_dtype, per_channel=True)
    xq, xs = quantize_fp8_per_token(x)
    got, want = scaled_gemv(xq, xs, wq, ws, out_dtype), fp8_gemm_emulated(xq, xs, wq, ws, out_dtype)
    assert torch.equal(fp8_gemm(xq, xs, wq, ws, out_dtype), got)  # the FP8 method runs this kernel at decode
    # e4m3 products are exact in float32; the sums differ by order only: k float32 ulps of sum |terms|, scaled,
    # plus one rounding to the output dtype.
    terms = (xq.float().abs() @ wq.float().abs().T) * xs * ws.float()[None, :]
    bound = k * 2.0 ** -23 * terms + 2.0 ** -MANTISSA_BITS[out_dtype] * want.float().abs() + 1e-30
    err = (got.float() - want.float()).abs()
    print(f"scaled_gemv {out_dtype} {rows}x{n}x{k}: worst err / bound {(err / bound).max():.3g}")
    assert got.dtype == out_dtype and (err <= bound).all()


def _gemv_one_tile(x, w, y, xs, ws, **flags):
    """_gemv_kernel with one tile config (the autotuner may take another per variant, another summation order),
    launched as the engine launches it (with PDL on a Hopper GPU)."""
    from kiln.kernels.gemv import _gemv_kernel, gemv_grid
    from kiln.kernels.pdl import pdl_args

    rows, n, k = x.shape[0], w.shape[0], w.shape[1]
    flags = {**dict(HAS_X_SCALE=False, HAS_W_SCALE=True, QUANTIZE_X=False, INT8_BY_BITS=False), **flags}
    _gemv_kernel.fn[gemv_grid(rows, n, 4)](x, w, y, y if xs is None else xs, ws, n, k, x.stride(0),
                                           w.stride(0), rows, BLOCK_N=4, BLOCK_K=1024, num_warps=8,
                                           **flags, **pdl_args(x.device))
    return y


@needs_gpu
@pytest.mark.parametrize("rows,n,k", [(1, 4096, 4096), (2, 1000, 1234)])
def test_int8_codes_by_bits_equal_the_conversion(rows, n, k):
    """The autotuner may take either way of turning int8 codes into floats (_int8_to_float or the GPU's
    conversion): both give the same sums, bit for bit, and the float64 product within float32 rounding."""
    g = torch.Generator().manual_seed(rows + n + k)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16).cuda()
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g).cuda()  # imported codes reach -128
    scale = (torch.rand(n, generator=g) * 0.01 + 1e-3).to(torch.bfloat16).cuda()
    outs = [_gemv_one_tile(x, w, torch.empty(rows, n, dtype=torch.float32, device="cuda"), None, scale,
                           INT8_BY_BITS=bits) for bits in (False, True)]
    assert torch.equal(outs[0], outs[1])
    want = x.double() @ (w.double() * scale.double()[:, None]).T
    terms = x.double().abs() @ (w.double().abs() * scale.double()[:, None]).T
    assert ((outs[1].double() - want).abs() <= k * 2.0 ** -23 * terms + 1e-30).all()


@needs_gpu
@pytest.mark.parametrize("rows,n,k", [(1, 4096, 4096), (2, 1000, 1234)])
def test_static_fp8_gemv_quantizes_x_as_the_separate_kernel_does(rows, n, k):
    """The GEMV that quantizes x itself with a static scale gives, bit for bit, the GEMV of x quantized first
    (kiln.kernels.fp8_quant), including values that saturate at +-448, with one tile config; the public
    functions agree within float32 rounding (the autotuner picks each one's tile)."""
    from kiln.kernels.gemv import scaled_gemv, static_fp8_gemv
    from kiln.quantization.fp8 import quantize_fp8_static, quantize_fp8_weight

    g = torch.Generator().manual_seed(rows * n + k)
    x = (torch.randn(rows, k, generator=g) * 3).to(torch.bfloat16).cuda()
    wq, ws = quantize_fp8_weight(torch.randn(n, k, generator=g).cuda(), torch.bfloat16, per_channel=True)
    scale = (x.float().abs().amax() / 448 / 2).reshape(1).to(torch.bfloat16)  # half the range: some saturate
    xq, xs = quantize_fp8_static(x, scale)
    fused = _gemv_one_tile(x, wq, torch.empty(rows, n, dtype=torch.bfloat16, device="cuda"), scale, ws,
                           QUANTIZE_X=True)
    separate = _gemv_one_tile(xq, wq, torch.empty(rows, n, dtype=torch.bfloat16, device="cuda"),
                              xs.reshape(-1).contiguous(), ws, HAS_X_SCALE=True)
    assert torch.equal(fused, separate)
    got, want = static_fp8_gemv(x, scale, wq, ws, torch.bfloat16), scaled_gemv(xq, xs, wq, ws, torch.bfloat16)
    terms = (xq.float().abs() * xs) @ (wq.float().abs() * ws.float()[:, None]).T
    bound = k * 2.0 ** -23 * terms + 2.0 ** -7 * want.float().abs() + 1e-30
    assert ((got.float() - want.float()).abs() <= bound).all()


def _fp8_operands(rows, n, k, seed):
    from kiln.quantization.fp8 import quantize_fp8_static, quantize_fp8_weight

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=g) * 3).to(torch.bfloat16).cuda()
    wq, ws = quantize_fp8_weight(torch.randn(n, k, generator=g).cuda(), torch.bfloat16, per_channel=True)
    scale = (x.float().abs().amax() / 448 / 2).reshape(1).to(torch.bfloat16)  # half the range: some saturate
    xq, xs = quantize_fp8_static(x, scale)
    return x, scale, xq, xs, wq, ws.float()


def _fp8_bound(xq, xs, wq, ws, want, k):
    """e4m3 products are exact in float32; the sums differ by order only (k float32 ulps of sum |terms|), plus one
    rounding to bf16."""
    terms = (xq.float().abs() * xs) @ (wq.float().abs() * ws[:, None]).T
    return k * 2.0 ** -23 * terms + 2.0 ** -7 * want.float().abs() + 1e-30


@needs_fp8_gpu
@pytest.mark.parametrize("rows,n,k", [(1, 4096, 4096), (2, 6144, 4096), (1, 1000, 1234), (2, 7, 4100)])
def test_fp8_dot_gemv_every_tile_matches_the_emulated_fp8_gemm(rows, n, k):
    """The e4m3 MMA GEMV, each tile the chooser may take (split input dims included), against the emulated FP8
    GEMM, and the same bits when run again (split parts are added in a fixed order)."""
    from kiln.kernels.gemv import FP8_DOT_TILES, _run_gemv
    from kiln.quantization.fp8 import fp8_gemm_emulated

    _, _, xq, xs, wq, ws = _fp8_operands(rows, n, k, rows * n + k + 11)
    want = fp8_gemm_emulated(xq, xs, wq, ws, torch.bfloat16)
    bound = _fp8_bound(xq, xs, wq, ws, want, k)
    x_scale = xs.reshape(-1).float().contiguous()
    for tile in FP8_DOT_TILES:
        y, again = (torch.full((rows, n), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in range(2))
        _run_gemv((xq, wq, y, x_scale, ws, False), tile)
        _run_gemv((xq, wq, again, x_scale, ws, False), tile)
        err = (y.float() - want.float()).abs()
        print(f"fp8 dot gemv {rows}x{n}x{k} tile {tile}: worst err / bound {(err / bound).max():.3g}")
        assert (err <= bound).all(), tile
        assert torch.equal(again, y), tile


@needs_fp8_gpu
@pytest.mark.parametrize("rows,n,k", [(1, 4096, 4096), (2, 6144, 4096), (1, 1000, 1232), (2, 7, 4104)])
def test_fp8_word_gemv_every_tile_matches_the_emulated_fp8_gemm(rows, n, k):
    """The e4m3 GEMV on int64 words of codes, each tile the chooser may take (outputs and input dims not whole
    tiles among the shapes), against the emulated FP8 GEMM; the conversion by bit operations (the interpreter's)
    gives the hardware conversion's bits on the same tile shape (the products are exact and scaled by powers of
    two, so every partial sum is too)."""
    from kiln.kernels.gemv import FP8_WORD_TILES, _run_gemv
    from kiln.quantization.fp8 import fp8_gemm_emulated

    _, _, xq, xs, wq, ws = _fp8_operands(rows, n, k, rows * n + k + 13)
    want = fp8_gemm_emulated(xq, xs, wq, ws, torch.bfloat16)
    bound = _fp8_bound(xq, xs, wq, ws, want, k)
    x_scale = xs.reshape(-1).float().contiguous()
    got = {}
    for tile in FP8_WORD_TILES:
        y = got[tile] = torch.full((rows, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        _run_gemv((xq, wq, y, x_scale, ws, False), tile)
        err = (y.float() - want.float()).abs()
        print(f"fp8 word gemv {rows}x{n}x{k} tile {tile}: worst err / bound {(err / bound).max():.3g}")
        assert (err <= bound).all(), tile
    assert torch.equal(got[("words", 8, 256, 4, True)], got[("words", 8, 256, 4, False)])


@needs_fp8_gpu
@pytest.mark.parametrize("rows,inter,k", [(1, 14336, 4096), (2, 1000, 1232)])
def test_fp8_word_gemv_silu_epilogue_writes_the_codes_of_the_separate_kernels(rows, inter, k):
    """The FP8 fc_gate GEMV with SiLU-and-mul and the down projection's static codes as its epilogue, on each word
    tile: the codes and row scales of the plain word GEMV on the same tile (the same sums, bit for bit), then the
    SiLU-and-mul kernel writing the same static codes (its FP8 output), as the engine runs them unfused."""
    from kiln.kernels.activation import silu_and_mul
    from kiln.kernels.gemv import FP8_WORD_TILES, _run_gemv, run_fp8_silu_and_mul
    from kiln.kernels.input_quant import FP8_STATIC, InputQuant

    _, _, xq, xs, wq, ws = _fp8_operands(rows, 2 * inter, k, rows * inter + k)
    x_scale = xs.reshape(-1).float().contiguous()
    spec = InputQuant(FP8_STATIC, torch.tensor([0.05], dtype=torch.bfloat16, device="cuda"))  # (some saturate)
    for tile in FP8_WORD_TILES:
        plain = torch.empty(rows, 2 * inter, dtype=torch.bfloat16, device="cuda")
        _run_gemv((xq, wq, plain, x_scale, ws, False), tile)
        want = silu_and_mul(plain, spec)
        got = run_fp8_silu_and_mul(xq, x_scale, wq, ws, spec.scale, torch.bfloat16, tile)
        assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8)), tile
        assert torch.equal(got.scale, want.scale), tile
        assert 0 < (got.q.float().abs() == 448).float().mean() < 0.5  # some codes saturate, most do not


@needs_fp8_gpu
@pytest.mark.parametrize("rows,heads,kv_heads,d,k,cache", [(1, 32, 8, 128, 4096, "bf16"), (2, 6, 2, 64, 1032, "fp8")])
def test_fp8_word_gemv_rotary_epilogue_gives_the_separate_kernels_results(rows, heads, kv_heads, d, k, cache):
    """FP8's fused QKV GEMV with rotary and the cache write as the word kernel's epilogue, on each word tile: q, k,
    v and the cache slots of the plain word GEMV on the same tile followed by the rotary kernel, bit for bit where
    the epilogue's half tile still has several outputs; the 2-output tile's halves (one output a program) may sum
    in another order, so those within a bf16 rounding."""
    from kiln.kernels import quant_gemm, rotary
    from kiln.kernels.gemv import FP8_WORD_TILES, _run_gemv

    n = (heads + 2 * kv_heads) * d
    _, _, xq, xs, wq, ws = _fp8_operands(rows, n, k, rows + heads + k)
    x_scale = xs.reshape(-1).float().contiguous()
    g = torch.Generator().manual_seed(k)
    positions = torch.randint(0, 8192, (rows,), generator=g).cuda()
    slots = torch.randperm(4 * rows, generator=g)[:rows].cuda()
    freqs = (500000.0 ** -(torch.arange(0, d, 2).float() / d)).cuda()
    code = torch.float8_e4m3fn if cache == "fp8" else torch.bfloat16
    kv_scale = torch.tensor([0.05, 0.04], dtype=torch.bfloat16, device="cuda") if cache == "fp8" else None
    for tile in FP8_WORD_TILES:
        want, want_caches = (torch.empty(rows, n, dtype=torch.bfloat16, device="cuda"),
                             torch.zeros(2, 4 * rows, kv_heads, d, device="cuda").to(code))
        _run_gemv((xq, wq, want, x_scale, ws, False), tile)
        q, kk, v = (t.view(rows, -1, d) for t in want.split([heads * d, kv_heads * d, kv_heads * d], dim=1))
        rotary.apply_rotary_and_write_cache(q, kk, v, positions, freqs, *want_caches, slots, kv_scale)
        got, caches = torch.empty_like(want), torch.zeros_like(want_caches)
        quant_gemm.run_fp8_qkv_rotary(xq, x_scale, wq, ws, got, tile, (heads, kv_heads, d, positions, freqs,
                                                                      *caches, slots, kv_scale))
        if tile[1] >= 4:
            assert torch.equal(got, want), tile
            assert torch.equal(caches.view(torch.uint8), want_caches.view(torch.uint8)), tile
        else:
            assert (got.float() - want.float()).abs().max() <= 2.0 ** -6 * want.float().abs().max(), tile


@needs_fp8_gpu
def test_fp8_gemv_choice_is_timed_once_outside_a_capture_and_kept(monkeypatch):
    """The FP8 GEMV of e4m3 codes times the CUDA-core kernel against the word and MMA tiles the first time it sees a
    shape (never inside a CUDA-graph capture, which keeps the CUDA-core kernel and records nothing), then keeps the
    choice; x quantized by the GEMV itself always takes the CUDA-core kernel."""
    from kiln.kernels import gemv
    from kiln.quantization.fp8 import fp8_gemm_emulated

    monkeypatch.setattr(gemv, "AUTOTUNE", True)
    monkeypatch.setattr(gemv, "_FP8_PICKED", {})
    x, scale, xq, xs, wq, ws = _fp8_operands(1, 4096, 4096, 5)
    out = torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda")
    gemv._run_gemv((xq, wq, out, xs.reshape(-1).float().contiguous(), ws, False), None)  # Triton tunes its tile here
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemv.scaled_gemv(xq, xs, wq, ws, torch.bfloat16)
    assert gemv._FP8_PICKED == {}
    got = gemv.scaled_gemv(xq, xs, wq, ws, torch.bfloat16)
    (key, choice), = gemv._FP8_PICKED.items()
    assert choice is None or choice in gemv.FP8_DOT_TILES + gemv.FP8_WORD_TILES
    want = fp8_gemm_emulated(xq, xs, wq, ws, torch.bfloat16)
    assert ((got.float() - want.float()).abs() <= _fp8_bound(xq, xs, wq, ws, want, 4096)).all()
    assert torch.equal(gemv.scaled_gemv(xq, xs, wq, ws, torch.bfloat16), got) and len(gemv._FP8_PICKED) == 1
    gemv.static_fp8_gemv(x, scale, wq, ws, torch.bfloat16)
    assert len(gemv._FP8_PICKED) == 1
