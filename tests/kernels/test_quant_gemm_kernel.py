"""Weight-only matmuls: the references against the formats' float math written out (CPU), the plan entry, and
the Triton kernels (GEMV and GEMM, every int4 variant, odd shapes) against the references (GPU)."""

import pytest
import torch

from kiln.kernels import choices
from kiln.kernels import quant_gemm as qg
from kiln.kernels import triton_available
from kiln.quantization.weight_only import dequantize_int4, quantize_int4_groups, quantize_int8_per_channel
from tests.quantization.reference import dequantize

needs_gpu = pytest.mark.skipif(not triton_available(),
                               reason="needs an NVIDIA GPU with Triton: the kernel path only exists there")


def ulp_bound(x: torch.Tensor, w: torch.Tensor, ulps: float) -> torch.Tensor:
    """`ulps` units in the last place of x's dtype on sum_k |x_k| |w_k|, the size every rounding scales with."""
    unit = torch.finfo(x.dtype).eps / 2
    return ulps * unit * (x.double().abs() @ w.double().abs().T) + torch.finfo(x.dtype).tiny


@pytest.mark.parametrize("group,zero_point", [(32, True), (64, False), (128, True), (128, False)])
def test_w4a16_reference_is_the_format_math(group, zero_point):
    g = torch.Generator().manual_seed(group + zero_point)
    w, x = torch.randn(24, 200, generator=g), torch.randn(3, 200, generator=g)
    packed, scale, zero = quantize_int4_groups(w, group, zero_point, torch.float32)
    tensors = {"weight": packed, "weights_scaling_factor": scale, **({"zero_point": zero} if zero_point else {})}
    expected = x.double() @ dequantize(tensors, group).double().T
    # float32 throughout: the dequantized weight is exact, the matmul rounds each of its sums.
    torch.testing.assert_close(qg.w4a16_matmul_ref(x, packed, scale, zero, group).double(), expected,
                               rtol=0, atol=float(ulp_bound(x, dequantize(tensors, group), 200).max()))


def test_w8a16_reference_is_the_format_math():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(24, 100, generator=g), torch.randn(3, 100, generator=g)
    q, scale = quantize_int8_per_channel(w, torch.float32)
    full = dequantize({"weight": q, "weights_scaling_factor": scale})
    torch.testing.assert_close(qg.w8a16_matmul_ref(x, q, scale).double(), x.double() @ full.double().T,
                               rtol=0, atol=float(ulp_bound(x, full, 100).max()))


def test_plan_names_the_kernels_of_each_weight_algorithm():
    from kiln.config import WEIGHT_ALGOS

    assert {a.value for a in WEIGHT_ALGOS} == set(qg.KERNEL_FOR_ALGO)
    assert qg.linear_plan("W4A16_AWQ")["quantized_linear"]["cuda"] == "triton_w4a16_gemv_gemm"
    assert qg.linear_plan("W8A16")["quantized_linear"]["cuda"] == "triton_w8a16_gemv_gemm"
    assert qg.linear_plan("W4A16")["quantized_linear"]["gated_mlp_silu"] == "gemv_epilogue"
    assert qg.linear_plan("W4A16")["quantized_linear"]["qkv_rotary_and_cache_write"] == "gemv_epilogue"
    assert "gated_mlp_silu" not in qg.linear_plan("W4A8_AWQ")["quantized_linear"]  # (its row scale comes first)
    assert "fp8_group_gemm" in qg.linear_plan("W4A8_AWQ")["quantized_linear"]["cuda"]
    assert qg.linear_plan("FP8")["quantized_linear"]["other"] == "emulated_gemm_on_codes"
    assert "int8_gemm" in qg.linear_plan("W8A8_SQ_PER_CHANNEL")["quantized_linear"]["cuda"]
    assert qg.linear_plan(None) == {}
    assert qg.linear_plan(None) == {}


# Odd shapes (no multiple of any tile; short last groups), one whose rows are whole tiles of the int4 GEMV (its
# unmasked path) and one whose rows are not whole int64 words (the GEMVs hand it on); rows through
# the GEMV (1, 2), the GEMM (3, 37) and, for int4, dequantize + cuBLAS (DEQUANT_MIN_ROWS + 3).
SHAPES = [(77, 208), (131, 464), (96, 576), (50, 1008), (40, 2048), (33, 204)]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,zero_point", [(32, True), (64, False), (128, True), (128, False)])
def test_w4a16_dequantize_kernel_is_bit_equal_to_the_reference(dtype, group, zero_point):
    torch.manual_seed(group)
    for n, k in SHAPES:
        packed, scale, zero = quantize_int4_groups(torch.randn(n, k, device="cuda"), group, zero_point, dtype)
        assert torch.equal(qg.w4a16_dequantize(packed, scale, zero, group, dtype),
                           dequantize_int4(packed, scale, zero, group, dtype)), f"[{n}, {k}]"


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 37, qg.DEQUANT_MIN_ROWS + 3])
@pytest.mark.parametrize("group,zero_point", [(32, True), (64, False), (128, True), (128, False)])
def test_w4a16_kernel_matches_reference(dtype, rows, group, zero_point):
    torch.manual_seed(rows * group + zero_point)
    for n, k in SHAPES:
        x = torch.randn(rows, k, device="cuda", dtype=dtype)
        packed, scale, zero = quantize_int4_groups(torch.randn(n, k, device="cuda"), group, zero_point, dtype)
        ref = qg.w4a16_matmul_ref(x, packed, scale, zero, group)
        w = dequantize_int4(packed, scale, zero, group, dtype)
        # The reference rounds w to x's dtype (half an ulp), both round y (half each), the sums differ in order.
        err = (qg.w4a16_matmul(x, packed, scale, zero, group).double() - ref.double()).abs()
        assert (err <= ulp_bound(x, w, 3)).all(), f"[{n}, {k}] max error {err.max().item()}"


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 37, qg.DEQUANT_MIN_ROWS + 3])
def test_w4a16_kernels_take_fractional_zeros(dtype, rows):
    """GGUF's Q4_1 and Q4_K kept as W4A16 have zeros that are not whole numbers (kiln.quantization.gguf_import):
    the GEMV takes them as they are and, with integer_zeros False, the rows it does not take go through the
    dequantized weight; either way within the same bound of the reference as whole zeros."""
    torch.manual_seed(rows)
    for n, k in SHAPES:
        x = torch.randn(rows, k, device="cuda", dtype=dtype)
        packed, scale, zero = quantize_int4_groups(torch.randn(n, k, device="cuda"), 32, True, dtype)
        zero = (zero.float() + torch.rand_like(zero.float()) - 0.5).to(dtype)
        assert not torch.equal(zero, zero.round())
        ref = qg.w4a16_matmul_ref(x, packed, scale, zero, 32)
        w = dequantize_int4(packed, scale, zero, 32, dtype)
        err = (qg.w4a16_matmul(x, packed, scale, zero, 32, integer_zeros=False).double() - ref.double()).abs()
        assert (err <= ulp_bound(x, w, 3)).all(), f"[{n}, {k}] max error {err.max().item()}"


def every_tile(rows: int) -> list:
    """(tile, run) of each candidate of the kernel that `rows` rows of x take: the GEMV's or the GEMM's."""
    if rows <= qg.GEMV_MAX_ROWS:
        return [(t, lambda x, p, s, z, g, y, t=t: qg._run_w4_gemv(x, p.view(qg.WORD_DTYPE), s, z, g, y, t))
                for t in qg.W4_GEMV_TILES]
    return [(t, lambda x, p, s, z, g, y, t=t: qg._run_w4_gemm(x, p, s, z, g, y, t))
            for t in qg._w4_gemm_tiles(qg.rows_bucket(rows))]


def assert_every_tile_matches_reference(x, packed, scale, zero, group: int) -> None:
    """Each of every_tile's kernels within 3 ulps of F.linear on the dequantized weight, the same bits again."""
    w = dequantize_int4(packed, scale, zero, group, x.dtype)
    ref = torch.nn.functional.linear(x, w)
    for tile, run in every_tile(x.shape[0]):
        y = torch.full_like(ref, float("nan"))
        run(x, packed, scale, zero, group, y)
        err = (y.double() - ref.double()).abs()
        assert (err <= ulp_bound(x, w, 3)).all(), f"{list(w.shape)} tile {tile}: max error {err.max().item()}"
        again = torch.empty_like(y)
        run(x, packed, scale, zero, group, again)
        assert torch.equal(again, y), f"tile {tile}: the same call must give the same bits"


@needs_gpu
@pytest.mark.parametrize("rows", [1, 2, 5, 64, 100])
def test_w4a16_kernels_match_reference_with_every_tile(rows):
    """Each candidate tile of the int4 GEMV (1 or 2 rows) and GEMM (split-K, either operand side, x split by a copy
    or in the kernel) is a tuning choice, so each must be right alone, and give the same bits again (split-K sums
    in a fixed order). The shapes leave outputs past the last tile, and rows that end inside a GEMV step (464 and
    3584 columns are 29 and 224 int64 words)."""
    torch.manual_seed(rows)
    for n, k, group, zero_point in ((131, 464, 64, False), (96, 1152, 128, True), (300, 3584, 128, False)):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        packed, scale, zero = quantize_int4_groups(torch.randn(n, k, device="cuda"), group, zero_point, x.dtype)
        assert_every_tile_matches_reference(x, packed, scale, zero, group)


@needs_gpu
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("zero_point", [False, True, "fractional"])
def test_w4a16_gemv_integer_dot_products_match_reference_with_every_tile(rows, zero_point):
    """The GEMV's integer dot products (kiln.kernels.words._word_int_sums: x as 16-bit fixed point a word, dp2a on
    the codes) on every tile, within 3 ulps of the reference, for x of ordinary, large and small size, a word's
    columns of very different sizes (the small ones lose low bits to the large one's scale), zero rows, and zeros
    that are not whole numbers; the same bits again."""
    torch.manual_seed(rows + 80)
    for n, k, group in ((131, 464, 64), (96, 1152, 128), (300, 3584, 32)):
        x = torch.randn(rows, k, device="cuda")
        x[0, : k // 4] *= 1000.0
        x[0, k // 4: k // 2] *= 1e-3
        x[-1, ::16] *= 300.0
        x[-1, k - 64:] = 0.0
        x = x.to(torch.bfloat16)
        packed, scale, zero = quantize_int4_groups(torch.randn(n, k, device="cuda"), group, bool(zero_point), x.dtype)
        if zero_point == "fractional":
            zero = (zero.float() + torch.rand_like(zero.float()) - 0.5).to(x.dtype)
        assert_every_tile_matches_reference(x, packed, scale, zero, group)


@needs_gpu
@pytest.mark.parametrize("rows", [1, 2])
def test_w4a16_gemv_with_the_silu_epilogue_equals_the_gemv_then_silu_and_mul(rows):
    """The gated MLP's fc_gate GEMV with the activation as its epilogue, on each of its tiles: the same bits as the same
    tile's GEMV followed by silu_and_mul (each output's sum is the same; only the store changes). Intermediate
    sizes leave activated outputs past the last tile (131) and rows that end inside a step (3584 columns)."""
    from kiln.kernels.activation import silu_and_mul

    torch.manual_seed(rows + 40)
    for inter, k, group, zero_point in ((131, 464, 64, False), (96, 1152, 128, True), (300, 3584, 128, False)):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        packed, scale, zero = quantize_int4_groups(torch.randn(2 * inter, k, device="cuda"), group, zero_point,
                                                   x.dtype)
        words = packed.view(qg.WORD_DTYPE)
        for tile in qg.W4_EPILOGUE_TILES:
            fc_gate = torch.empty(rows, 2 * inter, device="cuda", dtype=x.dtype)
            qg._run_w4_gemv(x, words, scale, zero, group, fc_gate, tile)
            fused = torch.full((rows, inter), float("nan"), device="cuda", dtype=x.dtype)
            qg._run_w4_gemv(x, words, scale, zero, group, fused, tile, gated=True)
            assert torch.equal(fused, silu_and_mul(fc_gate)), f"[{inter}, {k}] tile {tile}"
    assert qg.w4a16_silu_and_mul_matmul(torch.randn(3, k, device="cuda", dtype=x.dtype), packed, scale, zero,
                                        group) is None  # more rows than the GEMV takes: the caller's two steps


@needs_gpu
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8, torch.float8_e4m3fn])
def test_w4a16_gemv_with_the_rotary_epilogue_equals_the_gemv_then_rotary(rows, cache_dtype):
    """The fused QKV GEMV with rotary and the cache write as its epilogue, on each of its tiles that divides half a
    head: the same bits, in the projection and in both caches, as the same tile's GEMV followed by
    apply_rotary_and_write_cache (a quantized cache holds the same codes)."""
    from kiln.kernels.rotary import apply_rotary_and_write_cache

    torch.manual_seed(rows + 60)
    kv_scale = None if cache_dtype == torch.bfloat16 else torch.tensor([0.05, 0.04], device="cuda")
    for heads, kv_heads, head_size, k in ((32, 8, 128, 1024), (6, 2, 64, 464)):
        n = (heads + 2 * kv_heads) * head_size
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        packed, scale, zero = quantize_int4_groups(torch.randn(n, k, device="cuda"), 64, True, x.dtype)
        words, slots = packed.view(qg.WORD_DTYPE), torch.randperm(8 * rows, device="cuda")[:rows]
        positions = torch.randint(0, 8192, (rows,), device="cuda")
        inv_freq = 500000.0 ** -(torch.arange(0, head_size, 2, device="cuda").float() / head_size)
        for tile in [t for t in qg.W4_EPILOGUE_TILES if (head_size // 2) % t[0] == 0]:
            caches = torch.randn(4, 8 * rows, kv_heads, head_size, device="cuda").to(cache_dtype)
            want = torch.empty(rows, n, device="cuda", dtype=x.dtype)
            qg._run_w4_gemv(x, words, scale, zero, 64, want, tile)
            q, kk, v = (t.unflatten(-1, (-1, head_size)) for t in
                        want.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1))
            apply_rotary_and_write_cache(q, kk, v, positions, inv_freq, caches[0], caches[1], slots, kv_scale)
            got = torch.full_like(want, float("nan"))
            qg._run_w4_qkv_rotary(x, words, scale, zero, 64, got, tile, (heads, kv_heads, head_size, positions,
                                                                         inv_freq, caches[2], caches[3], slots,
                                                                         kv_scale))
            assert torch.equal(got, want), f"{heads}/{kv_heads} heads, tile {tile}: projection"
            for mine, theirs, name in ((caches[2], caches[0], "keys"), (caches[3], caches[1], "values")):
                same = torch.equal(mine.view(torch.uint8)[slots], theirs.view(torch.uint8)[slots])
                assert same, f"{heads}/{kv_heads} heads, tile {tile}: {name}"
    assert qg.w4a16_qkv_rotary_matmul(torch.randn(3, k, device="cuda", dtype=x.dtype), packed, scale, zero, 64, heads,
                                      kv_heads, head_size, positions, inv_freq, *caches[:2], slots, kv_scale) is None


def test_w4a16_gemv_carries_no_norm_of_a_float16_stream():
    """In float16 the stream times the norm's weight, not yet normalized, can overflow where the norm's output does
    not (a residual of 1000 times a weight of 100): the GEMV declines, and the norm kernel runs."""
    packed, scale, zero = quantize_int4_groups(torch.randn(64, 64), 32, False, torch.float16)
    x, residual = torch.randn(1, 64).half(), torch.full((1, 64), 1000.0).half()
    assert qg.w4a16_add_norm_matmul(x, packed, scale, zero, 32, residual, torch.full((64,), 100.0).half()) is None
    assert qg.gemv_takes(x, packed)  # (the GEMV itself would take these rows)


@needs_gpu
@pytest.mark.parametrize("rows", [1, 2])
def test_w4a16_pending_norm_between_two_gemvs_equals_the_norm_kernel(rows):
    """An RMSNorm carried by the int4 GEMVs on either side (kiln.layers.normalization.PendingNorm). The first GEMV,
    on each of its tiles (1000 outputs: the last program runs past the end), writes the residual stream and the
    norm's weighted input bit for bit as the GEMV then torch's add and multiply, and its programs' sums of squares
    add up to the stream's. The GEMVs that read the norm's output (the SiLU and the rotary epilogue) apply its
    1/rms: within 2^-6 of the largest output of the norm kernel then the same GEMV (one rounding moves; without
    the 1/rms the outputs are about 4 times too large)."""
    from kiln.kernels.rmsnorm import rms_norm

    torch.manual_seed(rows + 80)
    k, n, eps, heads, kv_heads, d = 1024, 1024, 1e-5, 6, 2, 64
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    residual = (torch.randn(rows, n, device="cuda") * 4).to(x.dtype)
    norm_weight = (torch.rand(n, device="cuda") + 0.5).to(x.dtype)
    odd = 1000  # outputs of the tile loop: the last program runs past the end
    packed, scale, zero = quantize_int4_groups(torch.randn(odd, k, device="cuda"), 128, True, x.dtype)
    for tile in qg.W4_GEMV_TILES:
        out, h, weighted = (torch.full((rows, odd), float("nan"), device="cuda", dtype=x.dtype) for _ in range(3))
        squares = torch.full((rows * odd,), float("nan"), device="cuda")
        qg._run_w4_gemv(x, packed.view(qg.WORD_DTYPE), scale, zero, 128, out, tile)
        qg._run_w4_gemv(x, packed.view(qg.WORD_DTYPE), scale, zero, 128, h, tile,
                        add_norm=(residual[:, :odd].contiguous(), norm_weight[:odd], weighted, squares))
        assert torch.equal(h, out + residual[:, :odd]), f"tile {tile}: the stream"
        assert torch.equal(weighted, h * norm_weight[:odd]), f"tile {tile}: the weighted input"
        parts = squares[:rows * -(-odd // tile[0])].view(rows, -1)
        torch.testing.assert_close(parts.sum(1), h.float().pow(2).sum(1), rtol=1e-5, atol=0)
    # the next GEMVs read whole words of inputs: a stream of 1024
    packed, scale, zero = quantize_int4_groups(torch.randn(n, k, device="cuda"), 128, True, x.dtype)
    h, weighted, parts = qg.w4a16_add_norm_matmul(x, packed, scale, zero, 128, residual, norm_weight)
    normed = rms_norm(h, norm_weight, eps)
    gate_up, g_scale, g_zero = quantize_int4_groups(torch.randn(2 * 300, n, device="cuda"), 128, False, x.dtype)
    got = qg.w4a16_silu_and_mul_matmul(weighted, gate_up, g_scale, None, 128, norm_in=(parts, eps))
    want = qg.w4a16_silu_and_mul_matmul(normed, gate_up, g_scale, None, 128)
    assert (got - want).abs().max() <= 2 ** -6 * want.abs().max()
    qkv, q_scale, q_zero = quantize_int4_groups(torch.randn((heads + 2 * kv_heads) * d, n, device="cuda"), 128,
                                                True, x.dtype)
    slots, positions = torch.randperm(4 * rows, device="cuda")[:rows], torch.randint(0, 8192, (rows,), device="cuda")
    inv_freq = 500000.0 ** -(torch.arange(0, d, 2, device="cuda").float() / d)
    caches = torch.zeros(4, 4 * rows, kv_heads, d, device="cuda", dtype=x.dtype)
    got = qg.w4a16_qkv_rotary_matmul(weighted, qkv, q_scale, q_zero, 128, heads, kv_heads, d, positions, inv_freq,
                                     caches[0], caches[1], slots, None, norm_in=(parts, eps))
    want = qg.w4a16_qkv_rotary_matmul(normed, qkv, q_scale, q_zero, 128, heads, kv_heads, d, positions, inv_freq,
                                      caches[2], caches[3], slots, None)
    assert (got - want).abs().max() <= 2 ** -6 * want.abs().max()
    assert (caches[:2] - caches[2:]).abs().max() <= 2 ** -6 * caches[2:].abs().max()


@needs_gpu
def test_w4a16_gemv_tuner_keeps_one_tile(monkeypatch):
    """With tuning on, the first one-row call of a shape times the GEMV's tiles and keeps one; later calls reuse it."""
    monkeypatch.setattr(qg, "AUTOTUNE", True)
    monkeypatch.setattr(qg, "_PICKED", {})
    torch.manual_seed(8)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    packed, scale, zero = quantize_int4_groups(torch.randn(300, 2048, device="cuda"), 128, True, x.dtype)
    w = dequantize_int4(packed, scale, zero, 128, x.dtype)
    y = qg.w4a16_matmul(x, packed, scale, zero, 128)
    (key, tile), = qg._PICKED.items()
    assert tile in qg.W4_GEMV_TILES
    err = (y.double() - torch.nn.functional.linear(x, w).double()).abs()
    assert (err <= ulp_bound(x, w, 3)).all(), f"tuned tile {tile}: max error {err.max().item()}"
    assert torch.equal(qg.w4a16_matmul(x, packed, scale, zero, 128), y) and qg._PICKED == {key: tile}


@needs_gpu
def test_w4a16_tiles_tuned_once_are_read_from_disk_after_a_restart(monkeypatch, tmp_path):
    """The tiles a first open timed are on disk (kiln.kernels.choices): once the process's memory of them is
    dropped, as a restarted server starts, the same shapes run the same tiles without timing anything."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KILN_AUTOTUNE", "1")
    monkeypatch.setattr(qg, "AUTOTUNE", True)
    choices.forget_all()
    torch.manual_seed(9)
    packed, scale, zero = quantize_int4_groups(torch.randn(328, 2304, device="cuda"), 128, False, torch.bfloat16)
    xs = [torch.randn(rows, 2304, device="cuda", dtype=torch.bfloat16) for rows in (1, 40)]  # the GEMV, the GEMM
    first = [qg.w4a16_matmul(x, packed, scale, zero, 128) for x in xs]
    picked = dict(qg._PICKED.items())
    choices.forget_all()
    monkeypatch.setattr(qg, "candidate_ms", lambda *args: pytest.fail("timed again after a restart"))
    again = [qg.w4a16_matmul(x, packed, scale, zero, 128) for x in xs]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert dict(qg._PICKED.items()) == picked and len(picked) == 2


@needs_gpu
@pytest.mark.parametrize("zero_point", [False, True])
def test_w4a16_gemm_tuner_times_the_tiles_in_a_graph_and_keeps_one(monkeypatch, zero_point):
    """With tuning on (the GPU tests otherwise run with it off), the first call of a shape times every tile from
    a CUDA graph over weight copies, keeps one of them, and its result is the reference's; later calls reuse it."""
    monkeypatch.setattr(qg, "AUTOTUNE", True)
    monkeypatch.setattr(qg, "_PICKED", {})
    torch.manual_seed(7)
    rows, n, k, group = 40, 300, 2048, 128
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    packed, scale, zero = quantize_int4_groups(torch.randn(n, k, device="cuda"), group, zero_point, x.dtype)
    w = dequantize_int4(packed, scale, zero, group, x.dtype)
    y = torch.full((rows, n), float("nan"), device="cuda", dtype=x.dtype)
    qg._w4_gemm(x, packed, scale, zero, group, y)
    (key, tile), = qg._PICKED.items()
    assert tile in qg._w4_gemm_tiles(qg.rows_bucket(rows))
    err = (y.double() - torch.nn.functional.linear(x, w).double()).abs()
    assert (err <= ulp_bound(x, w, 3)).all(), f"tuned tile {tile}: max error {err.max().item()}"
    again = torch.empty_like(y)
    qg._w4_gemm(x, packed, scale, zero, group, again)
    assert torch.equal(again, y) and qg._PICKED == {key: tile}


def full_range(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kiln's codes stop at -127; imported ones (compressed-tensors) reach -128: put some in every row."""
    q = q.clone()
    q[:, ::7] = -128
    return q, scale


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 37])
def test_w8a16_kernel_matches_reference(dtype, rows):
    torch.manual_seed(rows)
    for n, k in SHAPES:
        x = torch.randn(rows, k, device="cuda", dtype=dtype)
        q, scale = full_range(*quantize_int8_per_channel(torch.randn(n, k, device="cuda"), dtype))
        ref = qg.w8a16_matmul_ref(x, q, scale)
        err = (qg.w8a16_matmul(x, q, scale).double() - ref.double()).abs()
        assert (err <= ulp_bound(x, q.double() * scale.double()[:, None], 3)).all(), f"[{n}, {k}]"


@needs_gpu
@pytest.mark.parametrize("rows", [1, 2])
def test_w8a16_gemv_matches_reference_with_every_tile(rows):
    """The int8 GEMV on words of codes, each tile its tuner may take, on shapes no tile divides (N) or steps through
    evenly (K), within the same 3 ulps of the reference as the tuned path. (Rows of codes that are not whole
    words take the full-precision GEMV: test_w8a16_kernel_matches_reference.)"""
    torch.manual_seed(20 + rows)
    for n, k in [(n, k) for n, k in SHAPES if k % 8 == 0]:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        q, scale = full_range(*quantize_int8_per_channel(torch.randn(n, k, device="cuda"), x.dtype))
        ref = qg.w8a16_matmul_ref(x, q, scale)
        for tile in qg.W8_GEMV_TILES:
            y = torch.full((rows, n), float("nan"), device="cuda", dtype=x.dtype)
            qg._run_w8_gemv(x, q.view(qg.WORD_DTYPE), scale, y, tile)
            err = (y.double() - ref.double()).abs()
            assert (err <= ulp_bound(x, q.double() * scale.double()[:, None], 3)).all(), f"[{n}, {k}] {tile}"


@needs_gpu
@pytest.mark.parametrize("rows", [1, 2])
def test_w8a16_gemv_with_the_silu_epilogue_equals_the_gemv_then_silu_and_mul(rows):
    """The int8 fc_gate GEMV with the activation as its epilogue, on each of its tiles: the same bits as the same
    tile's GEMV followed by silu_and_mul. Intermediate sizes no tile divides and rows that end inside a step."""
    from kiln.kernels.activation import silu_and_mul

    torch.manual_seed(rows + 80)
    for inter, k in ((131, 464), (96, 1152), (300, 3584)):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        q, scale = quantize_int8_per_channel(torch.randn(2 * inter, k, device="cuda"), x.dtype)
        words = q.view(qg.WORD_DTYPE)
        for tile in qg.W8_GEMV_TILES:
            fc_gate = torch.empty(rows, 2 * inter, device="cuda", dtype=x.dtype)
            qg._run_w8_gemv(x, words, scale, fc_gate, tile)
            fused = torch.full((rows, inter), float("nan"), device="cuda", dtype=x.dtype)
            qg._run_w8_gemv(x, words, scale, fused, tile, gated=True)
            assert torch.equal(fused, silu_and_mul(fc_gate)), f"[{inter}, {k}] tile {tile}"
    assert qg.w8a16_silu_and_mul_matmul(torch.randn(3, k, device="cuda", dtype=x.dtype), q, scale) is None


@needs_gpu
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8, torch.float8_e4m3fn])
def test_w8a16_gemv_with_the_rotary_epilogue_equals_the_gemv_then_rotary(rows, cache_dtype):
    """The int8 fused QKV GEMV with rotary and the cache write as its epilogue, on each tile: the same bits, in the
    projection and in both caches, as the same tile's GEMV followed by apply_rotary_and_write_cache."""
    from kiln.kernels.rotary import apply_rotary_and_write_cache

    torch.manual_seed(rows + 90)
    kv_scale = None if cache_dtype == torch.bfloat16 else torch.tensor([0.05, 0.04], device="cuda")
    for heads, kv_heads, head_size, k in ((32, 8, 128, 1024), (6, 2, 64, 464)):
        n = (heads + 2 * kv_heads) * head_size
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        q_codes, scale = quantize_int8_per_channel(torch.randn(n, k, device="cuda"), x.dtype)
        words, slots = q_codes.view(qg.WORD_DTYPE), torch.randperm(8 * rows, device="cuda")[:rows]
        positions = torch.randint(0, 8192, (rows,), device="cuda")
        inv_freq = 500000.0 ** -(torch.arange(0, head_size, 2, device="cuda").float() / head_size)
        for tile in qg.W8_GEMV_TILES:
            caches = torch.randn(4, 8 * rows, kv_heads, head_size, device="cuda").to(cache_dtype)
            want = torch.empty(rows, n, device="cuda", dtype=x.dtype)
            qg._run_w8_gemv(x, words, scale, want, tile)
            q, kk, v = (t.unflatten(-1, (-1, head_size)) for t in
                        want.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1))
            apply_rotary_and_write_cache(q, kk, v, positions, inv_freq, caches[0], caches[1], slots, kv_scale)
            got = torch.full_like(want, float("nan"))
            qg._run_w8_qkv_rotary(x, words, scale, got, tile, (heads, kv_heads, head_size, positions, inv_freq,
                                                                caches[2], caches[3], slots, kv_scale))
            assert torch.equal(got, want), f"{heads}/{kv_heads} heads, tile {tile}: projection"
            for mine, theirs, name in ((caches[2], caches[0], "keys"), (caches[3], caches[1], "values")):
                same = torch.equal(mine.view(torch.uint8)[slots], theirs.view(torch.uint8)[slots])
                assert same, f"{heads}/{kv_heads} heads, tile {tile}: {name}"
    assert qg.w8a16_qkv_rotary_matmul(torch.randn(3, k, device="cuda", dtype=x.dtype), q_codes, scale, heads,
                                      kv_heads, head_size, positions, inv_freq, *caches[:2], slots, kv_scale) is None


@needs_gpu
def test_w8a16_gemv_tuner_times_both_kernels_and_keeps_one(monkeypatch):
    """With tuning on, the first one-row call of a shape times the int8 GEMV's tiles against the full-precision
    GEMV (None), never inside a CUDA-graph capture, and keeps the choice; later calls give the same bits."""
    monkeypatch.setattr(qg, "AUTOTUNE", True)
    monkeypatch.setattr(qg, "_W8_PICKED", {})
    torch.manual_seed(21)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    q, scale = quantize_int8_per_channel(torch.randn(300, 2048, device="cuda"), x.dtype)
    y = torch.empty(1, 300, device="cuda", dtype=x.dtype)
    qg._run_w8_gemv(x, q.view(qg.WORD_DTYPE), scale, y, qg.W8_GEMV_TILES[0])  # compiles the untuned default here
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        qg.w8a16_matmul(x, q, scale)
    assert qg._W8_PICKED == {}
    y = qg.w8a16_matmul(x, q, scale)
    (key, choice), = qg._W8_PICKED.items()
    assert choice is None or choice in qg.W8_GEMV_TILES
    err = (y.double() - qg.w8a16_matmul_ref(x, q, scale).double()).abs()
    assert (err <= ulp_bound(x, q.double() * scale.double()[:, None], 3)).all(), f"choice {choice}"
    assert torch.equal(qg.w8a16_matmul(x, q, scale), y) and qg._W8_PICKED == {key: choice}


@needs_gpu
@pytest.mark.parametrize("act_order", [False, True])
def test_quantized_linear_runs_the_kernel_on_cuda(act_order):
    from kiln.layers.linear import ColumnLinear
    from kiln.mapping import Mapping
    from kiln.quantization.weight_only import Int4GroupMethod

    torch.manual_seed(0)
    layer = ColumnLinear(256, 96, bias=False, mapping=Mapping())
    layer.set_quant_method(Int4GroupMethod(64, zero_point=True))
    for leaf, t in layer.quant_method.quantize(torch.randn(96, 256), torch.bfloat16).items():
        getattr(layer, leaf).data = t
    if act_order:  # the same codes, read as act-order columns: the kernel path must permute x to match
        packed = layer.weight.data
        layer.set_quant_method(Int4GroupMethod(64, zero_point=True, act_order=True))
        layer.weight.data, layer.input_permutation.data = packed, torch.randperm(256).int()
        layer.weights_scaling_factor.data = torch.rand(96, 4, dtype=torch.bfloat16) + 0.5
        layer.zero_point.data = torch.randint(0, 16, (96, 4)).bfloat16()
    layer = layer.cuda()
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    w = layer.quant_method.dequantize(layer, torch.bfloat16)
    err = (layer(x).double() - torch.nn.functional.linear(x, w).double()).abs()
    assert (err <= ulp_bound(x, w, 3)).all()
