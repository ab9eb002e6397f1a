"""y = x W^T for one or two rows of x (batch-1 decode), a Triton GEMV, used where it measures faster than cuBLAS.

At batch 1 a linear layer's time is the time to stream its weight, so the best kernel reads the weight once at
full memory bandwidth. cuBLAS does that for most decode shapes of an 8B model, but not for all: on the H100 it
ran Llama-3-8B's 4096 x 4096 attention output projection at 1.6 TB/s (20.8 us) against 3.0 TB/s of copy
bandwidth, and split the K dim of others into a GEMM plus a reduction kernel. Which kernel wins depends on the
shape and the GPU, so `use_gemv` times both once per (shape, dtype, rows) on the GPU at hand, as a decode step
runs them, and remembers the faster; the engine makes every choice at load (kiln.layers.linear
.choose_linear_kernels), never inside a CUDA-graph capture.

Each program owns BLOCK_N output rows and streams them along the whole input dim in BLOCK_K columns, with
float32 partial sums per column summed once at the end; programs of the same output rows but another row of x
are adjacent in the launch order, so the second row reads the weights from L2.

FP8's e4m3 weights times e4m3 codes of x have three kernels, timed per shape (`_fp8_kernel_choice`): that one on
the CUDA cores, one on the tensor cores (`_fp8_dot_gemv_kernel`), and one that reads the codes as int64 words as
W8A16's GEMV does (`_fp8_words_gemv_kernel`, thirty-ninth session, not yet timed on a GPU). Where the word kernel
wins the gated MLP's fc_gate, it also runs SiLU-and-mul and writes the down projection's e4m3 input
(`fp8_silu_and_mul_gemv`): one launch where there were two; where it wins the fused QKV projection, rotary and the
cache write (kiln.kernels.quant_gemm.fp8_qkv_rotary_matmul).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: F.linear is the reference and the only path
    triton = None

from kiln.kernels import rows_view
from kiln.kernels.choices import KernelChoices
from kiln.kernels.fp8_quant import Fp8Rows
from kiln.kernels.pdl import pdl_args

if triton is not None:
    from kiln.kernels.pdl import allow_dependents, wait_for_inputs
    from kiln.kernels.epilogue import silu_times
    from kiln.kernels.fp8_quant import to_e4m3
    from kiln.kernels.words import byte_word_steps, gemv_program

log = logging.getLogger("kiln")

GEMV_MAX_ROWS = 2  # more rows of x: cuBLAS's GEMMs reuse each weight tile across rows, this kernel does not
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TIMING_BYTES = 256 * 2**20  # weight bytes streamed per timed pass: five times the H100's L2 cache
_faster = KernelChoices("gemv_or_cublas")  # (n, k, dtype, rows, device index) -> the GEMV measured faster
# The CPU interpreter cannot time configs; KILN_AUTOTUNE=0 takes each kernel's first config (fast test runs:
# tuning every shape and row bucket a test touches takes minutes, and it checks only the config it picks).
AUTOTUNE = os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("KILN_AUTOTUNE", "1") != "0"
FP8_DOT_MIN_CAPABILITY = (8, 9)  # e4m3 MMA: Ada and Hopper


def gemv_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def gemv(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Triton version of `gemv_ref`: x [..., k] with at most GEMV_MAX_ROWS rows, weight [n, k]; CUDA tensors. The
    output in x's dtype, or out_dtype (float32: the float32 sums as they are)."""
    rows = rows_view(x)
    y = _launch(rows, weight, None, None, out_dtype or x.dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


def scaled_gemv(xq: torch.Tensor, x_scale: torch.Tensor | None, wq: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """(xq [m, k] @ wq [n, k]^T) * x_scale [m, 1] * w_scale [n] -> [m, n] in out_dtype, m <= GEMV_MAX_ROWS; no
    row scale when x_scale is None. The FP8 GEMM of kiln.quantization.fp8 at decode batch sizes (and W8A16's,
    x as it is): codes convert to float32 exactly, the sum is in float32 and the scales come after it, as in
    `fp8_gemm_emulated`."""
    x_scale = None if x_scale is None else x_scale.reshape(-1).float().contiguous()
    return _launch(rows_view(xq), wq, x_scale, w_scale, out_dtype)


def static_fp8_gemv(x: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """scaled_gemv of x quantized with the static per-tensor scale x_scale [1], quantized by the GEMV itself as
    it reads x (no separate kernel and no x_q in memory): the same numbers, bit for bit, as
    scaled_gemv(*kiln.quantization.fp8.quantize_fp8_static(x, x_scale), wq, w_scale, out_dtype)."""
    return _launch(rows_view(x), wq, x_scale.reshape(1), w_scale, out_dtype, quantize_x=True)


def epilogues_enabled() -> bool:
    """KILN_GEMV_EPILOGUES=0 turns off the GEMVs' epilogue variants (the int4 and int8 GEMVs' SiLU-and-mul and
    rotary, the e4m3 word GEMV's SiLU-and-mul and rotary): to compare, or to rule them out."""
    return os.environ.get("KILN_GEMV_EPILOGUES", "1") != "0"


def fp8_silu_and_mul_gemv(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                          out_scale: torch.Tensor, act_dtype: torch.dtype):
    """silu(fc) * gate of the FP8 fc_gate GEMV in one launch: wq [2I, K] = [fc; gate] in e4m3, xq [m, K] e4m3
    codes of x with x_scale [m, 1], m <= GEMV_MAX_ROWS; fc and gate rounded to act_dtype (as the GEMV's output),
    and the product written as e4m3 codes over the static out_scale [1], the down projection's input: Fp8Rows
    [m, I]. The word kernel's gated epilogue, where timing picked the word kernel for the plain fc_gate GEMV (then
    with its tile); else None, and the caller runs the GEMV, then silu_and_mul."""
    rows, x_scale = rows_view(xq), x_scale.reshape(-1).float().contiguous()
    tile = fp8_word_tile(rows, x_scale, wq, w_scale, act_dtype)
    return None if tile is None else run_fp8_silu_and_mul(rows, x_scale, wq, w_scale, out_scale, act_dtype, tile)


def fp8_word_tile(rows: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                  out_dtype: torch.dtype) -> tuple | None:
    """The word tile the plain FP8 GEMV of these operands runs (timed the first time, as scaled_gemv times it),
    or None where it runs another kernel: the epilogue variants ride on the word kernel's choice."""
    tile = _FP8_PICKED.get(_fp8_key(rows, wq, out_dtype), _NOT_TIMED)
    if tile is _NOT_TIMED:  # (only then an output for the timing: decode steps allocate nothing here)
        plain = (rows, wq, torch.empty(rows.shape[0], wq.shape[0], dtype=out_dtype, device=rows.device), x_scale,
                 w_scale, False)  # (the plain GEMV's arguments)
        tile = _fp8_kernel_choice(plain) if _fp8_codes_with_scales(*plain) else None
    return tile if tile is not None and tile[0] == "words" else None


def run_fp8_silu_and_mul(rows: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                         out_scale: torch.Tensor, act_dtype: torch.dtype, tile: tuple) -> Fp8Rows:
    """fp8_silu_and_mul_gemv's launch, for the plain GEMV's word `tile` (x_scale [m] float32): each program sums
    half the tile's outputs of fc and as many of gate, so it streams the plain tile's bytes with about its registers
    (the whole tile's pairs took 178 registers a thread against 96 in the sm_90 code: two programs an SM, not five).
    Each output's sum is the plain tile's, step for step."""
    _, block_n, block_kw, warps, by_bits = tile
    block_n = max(block_n // 2, 1)
    inter = wq.shape[0] // 2
    out = Fp8Rows(torch.empty(rows.shape[0], inter, dtype=torch.float8_e4m3fn, device=rows.device),
                  torch.empty(rows.shape[0], 1, dtype=torch.float32, device=rows.device))
    _fp8_words_gemv_kernel[(rows.shape[0], triton.cdiv(inter, block_n), 1)](
        rows, wq.view(torch.int64), out.q, x_scale, w_scale, out_scale, out.scale, inter, wq.shape[1],
        rows.stride(0), EVEN_N=inter % block_n == 0, BLOCK_N=block_n, BLOCK_KW=block_kw, BY_BITS=by_bits,
        GATED=True, FP8_OUT=True, ACT_DTYPE=TL_DTYPES[act_dtype], num_warps=warps, **pdl_args(rows.device))
    return out


def _launch(rows, weight, x_scale, w_scale, out_dtype, quantize_x: bool = False) -> torch.Tensor:
    assert weight.stride(-1) == 1 and rows.shape[0] <= GEMV_MAX_ROWS
    y = torch.empty(rows.shape[0], weight.shape[0], dtype=out_dtype, device=rows.device)
    args = (rows, weight, y, x_scale, w_scale, quantize_x)
    _run_gemv(args, _fp8_kernel_choice(args) if _fp8_codes_with_scales(*args) else None)
    return y


def _run_gemv(args, tile) -> None:
    """One GEMV: the CUDA-core kernel (`tile` None, its tile autotuned by Triton), the e4m3 word kernel (`tile` =
    ("words", BLOCK_N, BLOCK_KW, warps, BY_BITS)), or the e4m3 MMA kernel with `tile` = (BLOCK_N, BLOCK_K, SPLIT,
    warps, stages)."""
    rows, weight, y, x_scale, w_scale, quantize_x = args
    n, k = weight.shape
    scales = (y if x_scale is None else x_scale, y if w_scale is None else w_scale)
    if tile is not None and tile[0] == "words":
        _, block_n, block_kw, warps, by_bits = tile
        _fp8_words_gemv_kernel[(rows.shape[0], triton.cdiv(n, block_n), 1)](
            rows, weight.view(torch.int64), y, x_scale, w_scale, y, y, n, k, rows.stride(0), EVEN_N=n % block_n == 0,
            BLOCK_N=block_n, BLOCK_KW=block_kw, BY_BITS=by_bits, num_warps=warps, **pdl_args(rows.device))
        return
    if tile is None:
        grid = lambda meta: gemv_grid(rows.shape[0], n, meta["BLOCK_N"])  # noqa: E731
        _gemv_kernel[grid](rows, weight, y, *scales, n, k, rows.stride(0), weight.stride(0), rows.shape[0],
                           HAS_X_SCALE=x_scale is not None and not quantize_x, HAS_W_SCALE=w_scale is not None,
                           QUANTIZE_X=quantize_x, **pdl_args(rows.device))
        return
    block_n, block_k, split, warps, stages = tile
    out = y if split == 1 else torch.empty(split, *y.shape, dtype=torch.float32, device=y.device)
    _fp8_dot_gemv_kernel[(triton.cdiv(n, block_n), split)](
        rows, weight, out, x_scale, w_scale, rows.shape[0], n, k, rows.stride(0), weight.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split, num_warps=warps, num_stages=stages, **pdl_args(rows.device))
    if split > 1:
        sum_splits(out, y)


def gemv_grid(rows: int, n: int, block_n: int) -> tuple[int]:
    """_gemv_kernel's launch grid: one dim, rows fastest (a weight tile's rows meet in L2). Outputs / BLOCK_N in a
    second dim would pass its 65,535 limit at Qwen's 151,936-word lm_head and BLOCK_N 2."""
    return (rows * triton.cdiv(n, block_n),)


def sum_splits(partials: torch.Tensor, y: torch.Tensor) -> None:
    """y = partials [SPLIT, *y.shape] (float32) summed over the splits in a fixed order, rounded once to y's dtype."""
    size = y.numel()
    _sum_splits_kernel[(triton.cdiv(size, SUM_BLOCK),)](partials, y, size, SPLIT=partials.shape[0], BLOCK=SUM_BLOCK)


def _fp8_codes_with_scales(rows, weight, y, x_scale, w_scale, quantize_x) -> bool:
    """e4m3 weights and e4m3 codes of x, with both scales: the tensor cores can do it. Not for x quantized by the
    GEMV itself (static_fp8_gemv): an MMA kernel that did so quantized the 16 padded rows with an IEEE division
    each, and timed 28.5 us on Llama-3-8B's o_proj on an H200 against the CUDA-core kernel's 8.6. Nor for W8A16's
    int8 weights: the MMA kernel converting them to bf16 in registers took 1.6-2.0x the CUDA-core kernel's time on
    every Llama-3-8B shape on an H200 (12.8 us against 7.9 on o_proj; docs/performance.md, twenty-fifth session)."""
    return (weight.dtype == rows.dtype == torch.float8_e4m3fn and not quantize_x and x_scale is not None
            and w_scale is not None and has_fp8_mma(rows.device.index))


@functools.cache
def has_fp8_mma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= FP8_DOT_MIN_CAPABILITY


# The kernel each FP8 GEMV key runs (None: the CUDA-core kernel), chosen by timing the first time the key is seen;
# until then (tuning off, or a capture, which cannot time) the CUDA-core kernel.
_FP8_PICKED = KernelChoices("fp8_gemv")
_NOT_TIMED = object()


def _fp8_key(rows: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> tuple:
    return (*weight.shape, rows.shape[0], out_dtype, rows.device.index)


def _fp8_kernel_choice(args):
    rows, weight, y, x_scale, w_scale, _ = args  # (x given as codes: see _fp8_codes_with_scales)
    key = _fp8_key(rows, weight, y.dtype)
    if key not in _FP8_PICKED and AUTOTUNE and not torch.cuda.is_current_stream_capturing():
        copies = weight_copies(weight, w_scale)
        ms = candidate_ms([None, *fp8_word_tiles(weight), *FP8_DOT_TILES], lambda tile: [
            functools.partial(_run_gemv, (rows, w, y, x_scale, s, False), tile) for w, s in copies])
        _FP8_PICKED[key] = min(ms, key=ms.get)
        log.info("FP8 GEMV %s x %s: %s; runs %s", tuple(rows.shape), tuple(weight.shape), "; ".join(
            f"{kind} {ms[t] * 1e3:.1f} us" + (f" (tile {t})" if t else "") for kind, t in _best_of_each_kind(ms)),
            _fp8_kernel_kind(_FP8_PICKED[key]))
    return _FP8_PICKED.get(key)


def _fp8_kernel_kind(tile) -> str:
    return "CUDA cores" if tile is None else "e4m3 words" if tile[0] == "words" else "e4m3 MMA"


def _best_of_each_kind(ms: dict) -> list[tuple[str, tuple | None]]:
    """(kind, its fastest tile) of each kernel kind timed, for the tuner's log line."""
    best = {}
    for tile in sorted(ms, key=ms.get, reverse=True):
        best[_fp8_kernel_kind(tile)] = tile
    return list(best.items())


def fp8_word_tiles(weight: torch.Tensor) -> tuple:
    """The e4m3 word kernel's tiles where it can read the weight as int64 words (whole, aligned words a row)."""
    words = weight.is_contiguous() and weight.shape[1] % 8 == 0 and weight.data_ptr() % 8 == 0
    return FP8_WORD_TILES if words else ()


def candidate_ms(candidates: list, calls_of) -> dict:
    """Milliseconds per call of each candidate (a tile, a kernel) that compiles for this GPU, its calls
    (`calls_of(candidate)`: one per weight copy) replayed from a CUDA graph as the engine's decode graphs run them.
    Timed one call at a time after an L2 flush (do_bench), the host's launch costs counted too and hid split-K's
    gain: on an H200 the int4 GEMM's tuner kept a 24.4 us tile for a 64-row o_proj that has a 12.1 us one."""
    ms = {}
    for candidate in candidates:
        calls = calls_of(candidate)
        try:
            calls[0]()  # compiles (and lets Triton's own autotuner run) outside the capture
        except triton.runtime.errors.OutOfResources:  # too much shared memory for this GPU: not a candidate
            continue
        ms[candidate] = graph_ms_per_call(calls)
    return ms


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight), by the GEMV where `use_gemv` measured it faster."""
    return gemv(x, weight) if x.is_cuda and use_gemv(x, weight) else F.linear(x, weight)


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` runs this product faster than cuBLAS on this GPU (timed on the first call per shape)."""
    rows = x.numel() // x.shape[-1]
    if triton is None or not (x.is_cuda and rows <= GEMV_MAX_ROWS and x.dtype in KERNEL_DTYPES
                              and weight.dtype == x.dtype):
        return False
    key = (*weight.shape, x.dtype, rows, x.device.index)
    if key not in _faster:
        if torch.cuda.is_current_stream_capturing():
            return False  # no timing inside a capture; the warm-up before it decides
        _faster[key] = _time(x, weight)
    return _faster[key]


def _time(x: torch.Tensor, weight: torch.Tensor) -> bool:
    ms = time_gemv_and_cublas(x, weight)
    nbytes = weight.numel() * weight.element_size()
    log.info("linear %s x %s %s: Triton GEMV %.1f us (%.2f TB/s, %s), cuBLAS %.1f us (%.2f TB/s)",
             tuple(x.shape), tuple(weight.shape), str(x.dtype).removeprefix("torch."), ms["GEMV"] * 1e3,
             nbytes / ms["GEMV"] / 1e9, _gemv_kernel.best_config, ms["cuBLAS"] * 1e3, nbytes / ms["cuBLAS"] / 1e9)
    return ms["GEMV"] < ms["cuBLAS"]


def time_gemv_and_cublas(x: torch.Tensor, weight: torch.Tensor) -> dict[str, float]:
    """Milliseconds per call of each, timed as a decode step runs them: back to back in a CUDA graph, over copies
    of the weight that together overflow the L2 cache, so every call streams its weight from memory (timing one
    call after an L2 flush measured launch gaps too, and picked the wrong kernel for some shapes)."""
    sample = torch.randn_like(x)
    gemv(sample, weight)  # autotunes the tile shape, outside the graph
    copies = [w for w, in weight_copies(weight)]
    ms = {}
    for name, fn in (("GEMV", gemv), ("cuBLAS", F.linear)):
        stream = torch.cuda.Stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):  # cuBLAS makes its handle and workspace here, never inside the capture
            fn(sample, weight)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        ms[name] = graph_ms_per_call([functools.partial(fn, sample, w) for w in copies])
    return ms


def weight_copies(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """`tensors` (one weight's parts) and clones of them, together over TIMING_BYTES (at most 16 in all): timed
    over the copies, every call streams its weight from memory, as in a decode step, never from the L2 cache."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    count = min(-(-TIMING_BYTES // nbytes), 16)
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(count - 1)]


def graph_ms_per_call(calls: list) -> float:
    """Milliseconds per call of `calls` (already compiled, each over its own weight copy), replayed back to back from
    one CUDA graph as a decode step runs kernels: no host launch gaps, weights from memory (weight_copies)."""
    repeat = max(64 // len(calls), 1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            for call in calls:
                call()
    graph.replay()  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (3 * repeat * len(calls))


def rows_bucket(m: int) -> int:
    """The tuning key for the number of rows: the next power of two (decode batches vary step to step)."""
    return 1 << max(m - 1, 0).bit_length()


def quick_bench(kernel_call, quantiles):
    """The autotuners' timer, shorter than Triton's default (25 + 100 ms a config): tuning runs at engine load,
    where a second counts. Tuned configs are cached on disk (cache_results), so a warm start does not retune."""
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=5, rep=10, quantiles=quantiles)


if triton is not None:
    # The last three load as many bytes per step from 1-byte weights (int8, e4m3) as the others from bf16.
    _TILES = ((4, 512, 4, 3), (8, 512, 4, 3), (8, 256, 4, 4), (16, 256, 8, 3), (2, 1024, 4, 3), (4, 1024, 8, 2),
              (16, 512, 8, 2), (32, 128, 4, 4), (4, 2048, 8, 2), (8, 1024, 8, 3), (2, 2048, 4, 3))
    # int8 weights are tuned both ways of turning a code into a float (_int8_to_float); other dtypes have one.
    _CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": kb, "INT8_BY_BITS": bits}, num_warps=w, num_stages=s)
                for n, kb, w, s in _TILES for bits in (False, True)]

    def _prune_configs(configs, named_args, **kwargs):
        int8 = named_args["w_ptr"].dtype == torch.int8
        return [c for c in configs if int8 or not c.kwargs["INT8_BY_BITS"]]

    @triton.jit
    def _int8_to_float(w):
        """int8 codes to exact float32 with integer ops and one add: 0x4B400000 is the float 2^23 + 2^22, so
        adding a code q to its bits gives the float 2^23 + 2^22 + q (|q| < 2^22 keeps the exponent). The GPU's
        int-to-float conversion runs at a quarter of the FMA rate and can bound a GEMV of int8 weights."""
        return (w.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0

    @triton.jit
    def _load_w_tile(w_ptr, rows, row_ok, k0, K: tl.constexpr, stride_wn, BLOCK_K: tl.constexpr):
        cols = k0 + tl.arange(0, BLOCK_K)
        return tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :],
                       mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)

    @triton.jit
    def _gemv_step(acc, w, x_ptr, k0, K: tl.constexpr, x_scale, QUANTIZE_X: tl.constexpr, BLOCK_K: tl.constexpr,
                   INT8_BY_BITS: tl.constexpr):
        """acc + this step's weights times x's columns k0 .. k0 + BLOCK_K (x_ptr at x's row)."""
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        if QUANTIZE_X:
            x = tl.clamp(tl.math.div_rn(x, x_scale), -448.0, 448.0).to(tl.float8e4nv).to(tl.float32)
        if INT8_BY_BITS:
            return acc + _int8_to_float(w) * x[None, :]
        return acc + w.to(tl.float32) * x[None, :]

    @triton.autotune(configs=_CONFIGS, key=["N", "K", "M"], prune_configs_by={"early_config_prune": _prune_configs},
                     do_bench=quick_bench, cache_results=True)
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, N, K: tl.constexpr, stride_xm, stride_wn, M,
                     HAS_X_SCALE: tl.constexpr, HAS_W_SCALE: tl.constexpr, QUANTIZE_X: tl.constexpr,
                     USE_PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT8_BY_BITS: tl.constexpr):
        """y[m] = (x[m] @ w^T) (* x's row scale) (* w's column scale). With QUANTIZE_X, x is the activation and
        xs_ptr its static FP8 scale [1]: each element is quantized to e4m3 as it is read, as
        kiln.kernels.fp8_quant does, and the scale multiplies the sum. The first step's weights are requested
        before the wait for x (kiln.kernels.pdl), so they stream while the kernel before this one ends."""
        allow_dependents(USE_PDL)
        m = (tl.program_id(0) % M).to(tl.int64)
        rows = tl.program_id(0) // M * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        w_first = _load_w_tile(w_ptr, rows, row_ok, 0, K, stride_wn, BLOCK_K)
        wait_for_inputs(USE_PDL)
        x_row = x_ptr + m * stride_xm
        x_scale = 1.0
        if HAS_X_SCALE:
            x_scale = tl.load(xs_ptr + m)
        if QUANTIZE_X:
            x_scale = tl.load(xs_ptr).to(tl.float32)
        acc = _gemv_step(tl.zeros([BLOCK_N, BLOCK_K], tl.float32), w_first, x_row, 0, K, x_scale, QUANTIZE_X,
                         BLOCK_K, INT8_BY_BITS)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            w = _load_w_tile(w_ptr, rows, row_ok, k0, K, stride_wn, BLOCK_K)
            acc = _gemv_step(acc, w, x_row, k0, K, x_scale, QUANTIZE_X, BLOCK_K, INT8_BY_BITS)
        y = tl.sum(acc, axis=1)
        if HAS_X_SCALE or QUANTIZE_X:  # (sum * x's row scale) * w's column scale, in float32, as the emulated
            y = y * x_scale  # FP8 GEMM
        if HAS_W_SCALE:
            y = y * tl.load(ws_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * N + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _sum_splits_kernel(part_ptr, y_ptr, size, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < size
        total = tl.load(part_ptr + i, mask=ok, other=0.0)
        for s in tl.static_range(1, SPLIT):
            total += tl.load(part_ptr + s * size + i, mask=ok, other=0.0)
        tl.store(y_ptr + i, total.to(y_ptr.dtype.element_ty), mask=ok)

    # (BLOCK_N, BLOCK_K, SPLIT, warps, stages) of _fp8_dot_gemv_kernel. BLOCK_N is the MMA's M side, 64 or more
    # for Hopper's wgmma (a 16-row tile compiles to fp16 HMMAs and converts every byte); with 4096 outputs that is
    # 64 programs, half an H100's SMs, so the input dim is also split (SPLIT programs sum their parts).
    FP8_DOT_TILES = ((64, 256, 1, 4, 4), (64, 256, 2, 4, 4), (64, 256, 4, 4, 4), (64, 512, 2, 4, 3),
                     (128, 256, 1, 4, 3), (128, 128, 2, 4, 4), (64, 128, 4, 4, 6), (128, 256, 2, 8, 3))
    SUM_BLOCK = 1024
    TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
    # ("words", BLOCK_N, BLOCK_KW, warps, BY_BITS) of _fp8_words_gemv_kernel: the int8 GEMV's tiles
    # (kiln.kernels.quant_gemm.W8_GEMV_TILES), each code made a float by the hardware's conversion, and one tile by
    # bit operations instead (the interpreter's way; timed beside it so that the GPU says which is faster).
    FP8_WORD_TILES = (("words", 8, 256, 4, False), ("words", 4, 256, 4, False), ("words", 8, 512, 4, False),
                      ("words", 2, 256, 4, False), ("words", 8, 256, 4, True))
    # e4m3 magnitudes moved to float32 bits 20..26 read as 2^-120 times their value (E4M3_BITS_EXP); x is
    # prescaled by 2^64 so that every product stays a normal float (|w x| >= 2^-18), the sum scaled back at the end.
    E4M3_BITS_EXP = tl.constexpr(120)
    X_PRESCALE_EXP = tl.constexpr(64)
    SIGN_BIT = tl.constexpr(-0x80000000)
    MAGNITUDE_BITS = tl.constexpr(0x07F00000)

    @triton.jit
    def _e4m3_floats(half, BY_BITS: tl.constexpr):
        """The 4 e4m3 codes of int32 words (code j in bits 8j..8j+7) as 4 float32 tensors: their values (the
        hardware's conversion, two codes an instruction to float16, then float32), or BY_BITS their values times
        2^-E4M3_BITS_EXP (each code's sign to bit 31 and its 7 other bits to bits 20..26 of a float, which makes
        e4m3's subnormals float32 subnormals; no inline assembly, so the interpreter runs it)."""
        if BY_BITS:
            f0 = ((half << 24) & SIGN_BIT) | ((half << 20) & MAGNITUDE_BITS)
            f1 = ((half << 16) & SIGN_BIT) | ((half << 12) & MAGNITUDE_BITS)
            f2 = ((half << 8) & SIGN_BIT) | ((half << 4) & MAGNITUDE_BITS)
            f3 = (half & SIGN_BIT) | ((half >> 4) & MAGNITUDE_BITS)
            return (f0.to(tl.float32, bitcast=True), f1.to(tl.float32, bitcast=True),
                    f2.to(tl.float32, bitcast=True), f3.to(tl.float32, bitcast=True))
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi, a, b, c, d; .reg .b32 p, q; mov.b32 {lo, hi}, $4; cvt.rn.f16x2.e4m3x2 p, lo; "
            "cvt.rn.f16x2.e4m3x2 q, hi; mov.b32 {a, b}, p; mov.b32 {c, d}, q; cvt.f32.f16 $0, a; "
            "cvt.f32.f16 $1, b; cvt.f32.f16 $2, c; cvt.f32.f16 $3, d; }",
            "=r,=r,=r,=r,r", [half], dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)

    @triton.jit
    def _e4m3_half_sums(acc, half, x0, x1, x2, x3, BY_BITS: tl.constexpr):
        """acc [k, n] plus each int32 half's sum_j w_j x_j: half [k, n] holds 4 e4m3 codes, x0..x3 [k] the columns
        of x they multiply."""
        w0, w1, w2, w3 = _e4m3_floats(half, BY_BITS)
        acc += w0 * x0[:, None]
        acc += w1 * x1[:, None]
        acc += w2 * x2[:, None]
        acc += w3 * x3[:, None]
        return acc

    @triton.jit
    def _fp8_words_gemv_kernel(x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, os_ptr, rs_ptr, N, K: tl.constexpr, stride_xm,
                               USE_PDL: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_KW: tl.constexpr, BY_BITS: tl.constexpr, GATED: tl.constexpr = False,
                               FP8_OUT: tl.constexpr = False, ACT_DTYPE: tl.constexpr = tl.bfloat16):
        """_gemv_kernel's y for e4m3 weights and e4m3 codes of x (y = sum * x's row scale * w's column scale, in
        float32), the weights read as int64 words of 8 codes by the int8 GEMV's loop
        (kiln.kernels.words.byte_word_steps): each thread holds one word of each of its BLOCK_N outputs and
        the 8 columns of x it multiplies, so no value crosses threads until the final sum. The CUDA-core kernel
        above broadcasts its step's x through shared memory, a barrier a step (sm_90 code, scripts/kernel_sass.py
        "gemv fp8"). Products of e4m3 values are exact in float32 either way; only the order of the sum differs
        from the emulated GEMM's. The first step's weights are requested before the wait for x
        (kiln.kernels.pdl).
        GATED: the weight rows are the gated MLP's [fc; gate] (2N of them) and y is silu(fc) * gate, fc and gate
        each rounded to ACT_DTYPE first as the fc_gate GEMV's output is: each program sums BLOCK_N fc rows and the
        gate rows N further on. FP8_OUT: y is written as e4m3 codes over the static scale at os_ptr [1], the next
        linear's input (kiln.kernels.input_quant.FP8_STATIC), that scale on its row at rs_ptr [M]."""
        allow_dependents(USE_PDL)
        m, n0, outs = gemv_program(N, BLOCK_N, EVEN_N)
        y, gate = fp8_word_row_sums(x_ptr + m * stride_xm, xs_ptr + m, w_ptr + n0.to(tl.int64) * (K // 8),
                                    ws_ptr + n0, outs, tl.cast(N, tl.int64), GATED, K, BLOCK_KW, BY_BITS, USE_PDL)
        if GATED:
            y = silu_times(y.to(ACT_DTYPE), gate.to(ACT_DTYPE))
        out = n0 + tl.arange(0, BLOCK_N)
        if FP8_OUT:
            s = tl.load(os_ptr).to(tl.float32)
            tl.store(y_ptr + m * N + out, to_e4m3(y.to(tl.float32), s), mask=out < N)
            if tl.program_id(1) == 0:
                tl.store(rs_ptr + m, s)
        else:
            tl.store(y_ptr + m * N + out, y.to(y_ptr.dtype.element_ty), mask=out < N)

    @triton.jit
    def fp8_word_row_sums(x_row, x_scale_ptr, w_row, ws_row, outs, pair_offset, PAIRED: tl.constexpr,
                          K: tl.constexpr, BLOCK_KW: tl.constexpr, BY_BITS: tl.constexpr, USE_PDL: tl.constexpr):
        """(y, y_pair) [BLOCK_N] of x's row (e4m3 codes at x_row, its scale at x_scale_ptr; with x_scale_ptr None,
        16-bit values) times weight rows w_row + outs (int64 words of 8 e4m3 codes, column scales at ws_row + outs),
        in float32: sum * x's scale * w's scale. With PAIRED also the rows pair_offset further on (y_pair; else
        y_pair is y): the gated MLP's gate rows, or the second half of a rotary head. The loop is the int8 GEMV's
        (kiln.kernels.words.byte_word_steps), with e4m3's products (_e4m3_word_sums) and x prescaled for BY_BITS.
        Requests the first step's weights, then waits for x (kiln.kernels.pdl)."""
        x_prescale = 1.0
        if BY_BITS:
            x_prescale = 2.0 ** X_PRESCALE_EXP
        acc, acc_pair, _ = byte_word_steps(x_row, w_row, outs, pair_offset,
                                           _e4m3_bits_word_sums if BY_BITS else _e4m3_word_sums, PAIRED, K,
                                           (K // 8) % BLOCK_KW == 0, BLOCK_KW, USE_PDL, x_prescale)
        x_scale = 1.0  # (x_scale_ptr None: x as it is, 16-bit activations of e4m3 weights alone)
        if x_scale_ptr is not None:
            x_scale = tl.load(x_scale_ptr)
        y = _scaled_sums(acc, x_scale, ws_row + outs, BY_BITS)
        y_pair = y
        if PAIRED:
            y_pair = _scaled_sums(acc_pair, x_scale, ws_row + pair_offset + outs, BY_BITS)
        return y, y_pair

    @triton.jit
    def _e4m3_word_sums(acc, w, xs, BY_BITS: tl.constexpr = False):
        """acc plus a step's products (kiln.kernels.words.byte_word_steps' word_sums): w [k, n] int64 words of 8
        codes, xs the 8 columns of x (split8)."""
        acc = _e4m3_half_sums(acc, w.to(tl.int32), xs[0], xs[1], xs[2], xs[3], BY_BITS)  # (the low half)
        return _e4m3_half_sums(acc, (w >> 32).to(tl.int32), xs[4], xs[5], xs[6], xs[7], BY_BITS)

    @triton.jit
    def _e4m3_bits_word_sums(acc, w, xs):
        """_e4m3_word_sums with each code made a float by bit operations (BY_BITS)."""
        return _e4m3_word_sums(acc, w, xs, True)

    @triton.jit
    def _scaled_sums(acc, x_scale, ws_ptrs, BY_BITS: tl.constexpr):
        """The outputs' sums (acc summed over its steps) times x's row scale, then w's column scales, in float32."""
        y = tl.sum(acc, axis=0)
        if BY_BITS:
            y = y * 2.0 ** (E4M3_BITS_EXP - X_PRESCALE_EXP)
        return y * x_scale * tl.load(ws_ptrs).to(tl.float32)

    @triton.jit
    def _fp8_dot_gemv_kernel(x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, M, N, K: tl.constexpr, stride_xm, stride_wn,
                             USE_PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             SPLIT: tl.constexpr):
        """_gemv_kernel's y for e4m3 weights and e4m3 codes of x, on the tensor cores: y^T = W x^T with x's rows
        padded with zeros to 16, the weights the MMA's M side. The CUDA-core kernel spends two conversions and an
        FMA on each weight byte (it streamed e4m3 at 2.0-2.8 TB/s where bf16 reached 3.0 on the H100); here the
        loop issues under one instruction per byte (scripts/kernel_sass.py "fp8 dot"), the weights going to shared
        memory by cp.async. Products of e4m3 codes are exact in float32, as in the emulated GEMM; only the order of
        the sum differs: y = sum * x's row scale (xs_ptr [M]) * w's column scale (ws_ptr [N]), in float32.
        Program (i, s) owns outputs i*BLOCK_N.. over the s-th of SPLIT parts of the input dim; with SPLIT > 1 it
        writes its scaled part in float32 to y_ptr [SPLIT, M, N] for sum_splits. No weight is read before the
        PDL wait: a first tile loaded early lands in registers, and the loop then compiled to register shuffles
        (PRMT) instead of cp.async."""
        allow_dependents(USE_PDL)
        x_rows = tl.arange(0, 16)
        cols = tl.arange(0, BLOCK_K)
        outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        out_ok = outs < N
        steps: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
        per_split: tl.constexpr = (steps + SPLIT - 1) // SPLIT
        k_begin = tl.program_id(1) * per_split * BLOCK_K
        k_end = tl.minimum(k_begin + per_split * BLOCK_K, K)
        w_ptrs = w_ptr + outs[:, None].to(tl.int64) * stride_wn + cols[None, :]
        x_ptrs = x_ptr + x_rows[:, None] * stride_xm + cols[None, :]
        wait_for_inputs(USE_PDL)
        acc = tl.zeros([BLOCK_N, 16], tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            w = tl.load(w_ptrs + k0, mask=out_ok[:, None] & (k0 + cols < K)[None, :], other=0.0)
            x = tl.load(x_ptrs + k0, mask=(x_rows < M)[:, None] & (k0 + cols < K)[None, :], other=0.0)
            acc = tl.dot(w, tl.trans(x), acc)
        acc = acc * tl.load(xs_ptr + x_rows, mask=x_rows < M, other=0.0)[None, :]
        y = acc * tl.load(ws_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[:, None]
        y_ptrs = y_ptr + tl.program_id(1).to(tl.int64) * M * N + x_rows[None, :] * N + outs[:, None]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(x_rows < M)[None, :] & out_ok[:, None])
