"""GPU checks of Quantization II: the FP8 (torch._scaled_mm) and INT8 (Triton, torch._int_mm) GEMMs against their
emulated paths and float64 math on the same codes, a quantized checkpoint calibrated and quantized on the GPU, and
(run as a script: `python tests/quantization/test_gpu_quant2.py`) a microbenchmark against bfloat16 F.linear.

Bounds: both paths sum exact products (e4m3 x e4m3, int8 x int8) in float32 or int32, so they differ from the
float64 sum by at most K * 2^-24 * sum|terms| (float32 summation), plus the bfloat16 rounding of the output
(2^-8 of |y|). Hopper's FP8 tensor cores keep only about 14 mantissa bits in the accumulator between promotions
to float32 (DeepSeek-V3 technical report, section 3.3.2), so the summation term is at least 2^-13 * sum|terms|:
measured on the H100, K = 576 exceeded K * 2^-24 by 1.5e-5 while the K = 4096 shapes were within it."""

import sys
import time

import torch

try:
    import pytest

    requires_fp8_gpu = pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
        reason="needs a CUDA GPU of compute capability >= 8.9 (FP8 tensor cores)")
except ImportError:  # run as a plain script on a GPU machine without pytest
    def requires_fp8_gpu(f):
        return f

from kiln.quantization.fp8 import (
    fp8_gemm,
    fp8_gemm_emulated,
    quantize_fp8_per_token,
    quantize_fp8_static,
    quantize_fp8_weight,
)
from kiln.kernels import int8_gemm as ig
from kiln.kernels.int8_gemm import int8_gemm, int8_gemm_ref, quantize_int8_rows_ref
from kiln.quantization.weight_only import quantize_int8_per_channel

SHAPES = [(1, 4096, 4096), (4096, 4096, 4096), (1, 14336, 4096), (4096, 14336, 4096), (5, 960, 576)]


def _bound(xq, x_scale, wq, w_scale, ref):
    k = xq.shape[1]
    terms = (xq.double().abs() @ wq.double().abs().T) * x_scale.double() * w_scale.double()[None, :]
    return max(k * 2.0 ** -24, 2.0 ** -13) * terms + 2.0 ** -8 * ref.abs() + 1e-30


def _check(name, gemm, emulated, xq, x_scale, wq, w_scale):
    ref = (xq.double() @ wq.double().T) * x_scale.double() * w_scale.double()[None, :]
    bound = _bound(xq, x_scale, wq, w_scale, ref)
    for label, y in (("gpu", gemm(xq, x_scale, wq, w_scale, torch.bfloat16)),
                     ("emulated", emulated(xq, x_scale, wq, w_scale, torch.bfloat16))):
        excess = ((y.double() - ref).abs() - bound).max().item()
        assert excess <= 0, f"{name} {label}: exceeds the bound by {excess}"
    return (gemm(xq, x_scale, wq, w_scale, torch.bfloat16).double() - ref).abs().max().item()


def _operands(m, n, k, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    x[:, 7] *= 20  # an outlier channel, as real activations have
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    return x, w


@requires_fp8_gpu
def test_scaled_mm_equals_emulation_and_float64():
    for m, n, k in SHAPES:
        x, w = _operands(m, n, k)
        wq, ws = quantize_fp8_weight(w, torch.bfloat16, per_channel=True)
        xq, xs = quantize_fp8_per_token(x)
        _check(f"fp8 per-token {m}x{n}x{k}", fp8_gemm, fp8_gemm_emulated, xq, xs, wq, ws)
        wq, ws = quantize_fp8_weight(w, torch.bfloat16, per_channel=False)
        xq, xs = quantize_fp8_static(x, (x.abs().amax().float() / 448).reshape(1))
        _check(f"fp8 static {m}x{n}x{k}", fp8_gemm, fp8_gemm_emulated, xq, xs, wq, ws)


@requires_fp8_gpu
def test_int8_gemm_equals_emulation_and_float64():
    """SmoothQuant's GEMM as the engine runs it (the GEMV at 1-2 rows, else the timed choice), and every candidate
    on its own: each Triton tile (scales in the epilogue) and torch._int_mm, which sum in int32 and must agree bit
    for bit; plus 37 rows and 1000 outputs, which no tile divides."""
    for m, n, k in SHAPES + [(37, 1000, 4096)]:
        x, w = _operands(m, n, k)
        wq, ws = quantize_int8_per_channel(w, torch.bfloat16)
        wq[:, ::7] = -128  # kiln's codes stop at -127; imported ones (compressed-tensors) reach -128
        xq, xs = quantize_int8_rows_ref(x)
        _check(f"int8 {m}x{n}x{k}", int8_gemm, int8_gemm_ref, xq, xs, wq, ws)
        if m <= ig.GEMV_MAX_ROWS:
            continue
        outputs = {}
        for tile in ig._tiles(ig.rows_bucket(m)) + [ig.INT_MM]:
            y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            outputs[tile] = ig._run(xq, xs.reshape(m), wq, ws, y, tile)
            _check(f"int8 {m}x{n}x{k} {tile}", lambda *a: outputs[tile], int8_gemm_ref, xq, xs, wq, ws)
        first = outputs[ig.INT_MM]
        assert all(torch.equal(y, first) for y in outputs.values()), f"int8 {m}x{n}x{k}: the candidates differ"


@requires_fp8_gpu
def test_int8_quantization_kernel_is_bit_equal_to_its_reference():
    """One pass a row against the torch math, with and without SmoothQuant's prequant scale, on bf16 rows with an
    outlier channel, and on a row of exact ties (scale 1), which must round to even."""
    for m, k in ((1, 4096), (64, 14336), (5, 576)):
        x, _ = _operands(m, 8, k)
        x[0] = 0
        x[0, :6] = torch.tensor([127, 0.5, 1.5, 2.5, -0.5, -126.5])
        prequant = (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16)
        for p in (None, prequant):
            (q, s), (q_ref, s_ref) = ig.quantize_int8_rows(x, p), quantize_int8_rows_ref(x, p)
            assert torch.equal(s, s_ref) and torch.equal(q, q_ref), f"int8 rows {m}x{k} prequant={p is not None}"


@requires_fp8_gpu
def test_quantize_on_gpu_writes_the_cpu_checkpoint(tmp_path):
    """quantize_checkpoint(device="cuda") writes FP8_PER_CHANNEL_PER_TOKEN as on the CPU (the same float ops per
    weight, up to ties the two casts round apart, and rows whose searched scales tie); FP8's and SmoothQuant's
    calibrated scales agree to float32 forward-pass rounding."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from conftest import make_hf_model
    from safetensors.torch import load_file

    from kiln.config import QuantConfig
    from kiln.quantization.workflow import quantize_checkpoint

    make_hf_model(tmp_path / "hf", hidden_size=128, intermediate_size=256)
    for algo in ("FP8_PER_CHANNEL_PER_TOKEN", "FP8", "W8A8_SQ_PER_CHANNEL"):
        ckpts = [load_file(quantize_checkpoint(tmp_path / "hf", tmp_path / f"{algo}-{d}", QuantConfig(quant_algo=algo),
                                               calib_size=4, calib_max_seq_len=64, device=d) / "rank0.safetensors")
                 for d in ("cpu", "cuda")]
        for name, cpu in ckpts[0].items():
            gpu = ckpts[1][name]
            if algo == "FP8_PER_CHANNEL_PER_TOKEN" and name.endswith("weights_scaling_factor"):
                # Each row's scale is searched (kiln.quantization.fp8.search_scales): two candidates whose squared
                # errors tie to float32 summation order may be picked apart on the two devices, rarely.
                assert (cpu == gpu).float().mean() >= 0.99, name
            elif algo == "FP8_PER_CHANNEL_PER_TOKEN" and cpu.dtype == torch.float8_e4m3fn:
                # torch's CPU and CUDA casts to e4m3 may round a quotient that sits on a rounding tie apart (seen:
                # 1 weight of 32768, 120 vs 112): codes may differ by one step, rarely, never more. Rows whose
                # searched scales differ (above) are left out.
                scale = name.removesuffix("weight") + "weights_scaling_factor"
                rows = ckpts[0][scale] == ckpts[1][scale]
                codes_cpu, codes_gpu = cpu[rows].view(torch.uint8).int(), gpu[rows].view(torch.uint8).int()
                differ = codes_cpu != codes_gpu
                assert (codes_cpu - codes_gpu).abs().max() <= 1 and differ.float().mean() < 1e-3, (
                    f"{name}: {int(differ.sum())} of {differ.numel()} differ")
            elif algo == "FP8_PER_CHANNEL_PER_TOKEN":
                # amax / 448 divides element by element on both devices (kiln.quantization.fp8._over_fp8_max):
                # CUDA would run a division by a Python number as a multiply by its reciprocal, 1 ulp apart at times.
                assert torch.equal(cpu, gpu), name
            elif name.endswith(("activation_scaling_factor", "prequant_scaling_factor", "layernorm.weight")):
                assert torch.allclose(cpu, gpu, rtol=1e-4), name  # from two float32 forwards of the calibration text


@requires_fp8_gpu
def test_gptq_on_the_gpu_rounds_as_well_as_on_the_cpu(tmp_path):
    """GPTQ calibrated and rounded on the GPU (Hessians, Cholesky factors, the column loop), for int4 and for e4m3
    codes: every linear's weight error against the source within 5% of the CPU run's, either way. The two sum the
    Hessians in other orders, so near-equal diagonals may sort apart and codes at rounding ties differ; a broken GPU
    path is far off. So is round-to-nearest: its weight error is 25-40% below GPTQ's on this model (GPTQ trades weight
    error for output error), so a GPU run falling back to it fails too."""
    for qc in (dict(quant_algo="W4A16_GPTQ", group_size=32),
               dict(quant_algo="FP8_BLOCK_SCALES", group_size=32, weight_rounding="gptq")):
        cpu, gpu = (gptq_weight_errors(tmp_path / qc["quant_algo"], device, qc) for device in ("cpu", "cuda"))
        for name, err in cpu.items():
            assert abs(gpu[name] - err) <= 0.05 * err, f"{qc} {name}: GPU error {gpu[name]:.4g}, the CPU's {err:.4g}"


def gptq_weight_errors(tmp_path, device: str, qc: dict) -> dict[str, float]:
    """{linear: |dequantized weight - source weight|} of a tiny model quantized by GPTQ (QuantConfig qc) on
    `device`."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from conftest import make_hf_model

    from kiln.config import QuantConfig
    from kiln.models.base import PretrainedModel
    from kiln.quantization.methods import quantized_linears
    from kiln.quantization.workflow import quantize_checkpoint

    hf = make_hf_model(tmp_path / f"hf-{device}", hidden_size=128, intermediate_size=256)  # (seeded: the same)
    ckpt = quantize_checkpoint(tmp_path / f"hf-{device}", tmp_path / device, QuantConfig(**qc), calib_size=4,
                               calib_max_seq_len=64, device=device)
    state = {k: v.float() for k, v in hf.state_dict().items()}
    hf_names = {"attention.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                "attention.dense": ["self_attn.o_proj"], "mlp.fc": ["mlp.gate_proj"], "mlp.gate": ["mlp.up_proj"],
                "mlp.proj": ["mlp.down_proj"]}
    errors = {}
    for name, layer in quantized_linears(PretrainedModel.from_checkpoint(ckpt).materialize()).items():
        i, part = name.split(".")[2], name.split(".", 3)[3]
        source = torch.cat([state[f"model.layers.{i}.{h}.weight"] for h in hf_names[part]])
        errors[name] = (layer.quant_method.dequantize(layer, torch.float32) - source).norm().item()
    return errors


@requires_fp8_gpu
def test_fused_input_quantization_is_bit_equal_on_the_gpu(tmp_path):
    """On the GPU, prepare_runtime has the RMSNorm and SiLU-and-mul kernels write the FP8 linears' e4m3 inputs
    (Fp8Rows, over the static scale or with a scale per token; W4A8_AWQ's with proj's prequant scale multiplied in),
    SmoothQuant's int8 codes and row scales (Int8Rows), and FP8_BLOCK_SCALES' group-scaled codes: a prompt's logits
    (the _scaled_mm, int8, int4 and group GEMMs) equal, bit for bit, those of each linear quantizing its own input.
    (At one or two rows the two paths run GEMV variants whose tiles the autotuner picks apart, so their sums may
    differ in order: tests/kernels/test_gemv_kernel.py compares those with one tile.)"""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from conftest import make_hf_model

    import kiln
    from kiln.config import QuantConfig
    from kiln.models.base import PretrainedModel
    from kiln.quantization.workflow import quantize_checkpoint

    make_hf_model(tmp_path / "hf", hidden_size=128, intermediate_size=256)
    ids = torch.tensor([[1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8]])
    for algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W8A8_SQ_PER_CHANNEL", "FP8_BLOCK_SCALES", "W4A8_AWQ"):
        ckpt = quantize_checkpoint(tmp_path / "hf", tmp_path / algo, QuantConfig(quant_algo=algo), dtype="bfloat16",
                                   calib_size=4, calib_max_seq_len=64, device="cuda")

        def logits(fused: bool) -> torch.Tensor:
            model = kiln.build(PretrainedModel.from_checkpoint(ckpt)).runtime_model("cuda")
            if fused:
                model.prepare_runtime()
                norm = model.transformer.layers["0"].input_layernorm
                assert norm.out_quant is not None, algo
            with torch.no_grad():
                return model(ids.cuda())

        assert torch.equal(logits(fused=True), logits(fused=False)), algo


@requires_fp8_gpu
def test_group_quantization_kernel_is_bit_equal_to_its_reference():
    """FP8_BLOCK_SCALES' activations: the Triton pass writes the codes and group scales of the torch math, bit for
    bit (576 inputs: 4.5 groups of 128, the last one short)."""
    from kiln.kernels.fp8_quant import quantize_fp8_groups, quantize_fp8_groups_ref

    for m, k, group in ((1, 4096, 128), (37, 576, 128), (300, 14336, 64), (5, 96, 32)):
        x, _ = _operands(m, 1, k)
        q, s = quantize_fp8_groups(x, group)
        q_ref, s_ref = quantize_fp8_groups_ref(x, group)
        assert torch.equal(s, s_ref), (m, k, group)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), (m, k, group)


@requires_fp8_gpu
def test_group_gemm_equals_float64_math_for_every_tile():
    """FP8_BLOCK_SCALES' GEMM, each of its tiles, against float64 math on the same codes: the sum over groups of
    each group's products times the two scales. Within the accumulator bound above, per group."""
    from kiln.kernels import fp8_group_gemm as gg
    from kiln.kernels.fp8_quant import quantize_fp8_groups_ref
    from kiln.quantization.fp8_block import quantize_fp8_groups_weight

    for m, n, k, group in ((1, 4096, 4096, 128), (2, 6144, 4096, 128), (64, 4096, 14336, 128), (300, 960, 576, 64),
                           (513, 1536, 576, 128)):
        x, w = _operands(m, n, k)
        xq, xs = quantize_fp8_groups_ref(x, group)
        wq, ws = quantize_fp8_groups_weight(w, group, torch.bfloat16)
        xd, wd = gg.dequantize_groups(xq, xs, group).double(), gg.dequantize_groups(wq, ws, group).double()
        ref = xd @ wd.T
        # Hopper's FP8 wgmma sums 32 inputs a step and keeps about 14 bits of the running sum at each step
        # (DeepSeek-V3 report, 3.3.2): group // 32 steps a group, each truncating to 2^-13 of the sum
        steps = max(1, group // 32)
        bound = max(group * 2.0 ** -24, steps * 2.0 ** -13) * (xd.abs() @ wd.abs().T) + 2.0 ** -8 * ref.abs() + 1e-30
        for config in gg._CONFIGS:
            y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            grid = (triton_cdiv(m, config.kwargs["BLOCK_M"]), triton_cdiv(n, config.kwargs["BLOCK_N"]))
            gg._fp8_group_gemm_kernel[grid](xq, xs, wq, ws, y, m, n, k, xq.stride(0), *xs.stride(), *ws.stride(),
                                            gg.rows_bucket(m), GROUP=group, **config.kwargs, num_warps=config.num_warps,
                                            num_stages=config.num_stages)
            excess = ((y.double() - ref).abs() - bound).max().item()
            assert excess <= 0, f"{m}x{n}x{k} group {group} {config}: exceeds the bound by {excess}"
        y = gg.fp8_group_gemm(xq, xs, wq, ws, group, torch.bfloat16)  # the tuner's pick, or the GEMV's split
        assert ((y.double() - ref).abs() <= bound).all()
        if m <= gg.GEMV_ROWS:  # the weights-left GEMV unsplit and split in 4, whatever the heuristic picks
            for parts in (1, 4):
                y = gg.fp8_group_gemm(xq, xs, wq, ws, group, torch.bfloat16, gemv_parts=parts)
                assert ((y.double() - ref).abs() <= bound).all(), f"gemv {m}x{n}x{k} in {parts} parts"


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@requires_fp8_gpu
def test_fp8_block_scales_and_smoothquant_engines_on_the_gpu_match_their_emulation(tmp_path):
    """A tiny model quantized to FP8_BLOCK_SCALES (group kernels) and to W8A8_SQ_PER_CHANNEL (the int8 pass, GEMV
    and GEMM), on the GPU against the CPU emulation of the same checkpoint in float32.

    SmoothQuant sums int8 products exactly: the logits agree to float32 rounding, and greedy tokens through LLM (CUDA
    graphs) equal the emulation's. FP8_BLOCK_SCALES' e4m3 MMA keeps about 14 bits of each group's running sum
    (test_group_gemm_equals_float64_math_for_every_tile), so each linear is checked on the emulation's own input
    (measured on an H200: within 2e-4 of its output's largest value). Those errors move the next layers' activation
    codes a step where they sit near a rounding tie (measured: the logits 2.3% of their largest value apart), so its
    LLM tokens are checked for being the emulation's argmax to within that much, position by position."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from conftest import make_hf_model

    import kiln
    from kiln.config import QuantConfig
    from kiln.layers.linear import Linear
    from kiln.models.base import PretrainedModel
    from kiln.quantization.workflow import quantize_checkpoint

    make_hf_model(tmp_path / "hf", hidden_size=128, intermediate_size=256)
    ids = torch.tensor([[1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8]])
    prompt = [1, 17, 5, 99, 42]
    params = kiln.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for algo, fields in (("FP8_BLOCK_SCALES", {"group_size": 64}), ("W8A8_SQ_PER_CHANNEL", {})):
        ckpt = quantize_checkpoint(tmp_path / "hf", tmp_path / algo, QuantConfig(quant_algo=algo, **fields),
                                   device="cpu")
        cpu_model = kiln.build(PretrainedModel.from_checkpoint(ckpt)).runtime_model("cpu")
        gpu_model = kiln.build(PretrainedModel.from_checkpoint(ckpt)).runtime_model("cuda")
        inputs = {}
        hooks = [m.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
                 for name, m in cpu_model.named_modules() if isinstance(m, Linear)]
        with torch.no_grad():
            cpu = cpu_model(ids)
            gpu = gpu_model(ids.cuda()).cpu()
            for hook in hooks:
                hook.remove()
            for name, x in inputs.items():  # each GPU linear on the emulation's input
                want = cpu_model.get_submodule(name)(x)
                got = gpu_model.get_submodule(name)(x.cuda()).cpu()
                assert (got - want).abs().max() <= 1e-3 * want.abs().max(), (algo, name)
        with kiln.LLM(ckpt, device="cuda") as llm:
            tokens = llm.generate([prompt], params)[0].outputs[0].token_ids
        if algo == "W8A8_SQ_PER_CHANNEL":  # exact sums: the same logits and tokens
            assert (gpu - cpu).abs().max() <= 1e-3 * cpu.abs().max(), algo
            with kiln.LLM(ckpt, device="cpu") as llm:
                assert tokens == llm.generate([prompt], params)[0].outputs[0].token_ids, algo
        else:  # each token the emulation's argmax, or within the code steps' reach of it
            tolerance = 0.05 * cpu.abs().max()
            assert (gpu - cpu).abs().max() <= tolerance, algo
            with torch.no_grad():
                logits = cpu_model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1]
            chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
            assert (chosen >= logits.max(dim=1).values - tolerance).all(), (algo, tokens)


@requires_fp8_gpu
def test_w4a8_runs_its_e4m3_codes_through_the_int4_and_fp8_kernels(tmp_path):
    """On the GPU a W4A8_AWQ linear multiplies its input's e4m3 codes by W4A16's kernels (the int4 GEMV at 1 row,
    the int4 GEMM at 64) and scales the rows after, and from 256 rows runs FP8 MMAs on the int4 codes less their
    zero point (quant_gemm.w4a8_matmul): within 3 bf16 ulps of sum |x_q| |w| plus the output's rounding of the
    float64 product of the same codes and dequantized weights. The GEMV's SiLU and rotary epilogues are
    declined (the row scale must come first), so the layers take their plain paths."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from conftest import make_hf_model

    import kiln
    from kiln.config import QuantConfig
    from kiln.models.base import PretrainedModel
    from kiln.quantization.workflow import quantize_checkpoint

    make_hf_model(tmp_path / "hf", hidden_size=128, intermediate_size=256)
    ckpt = quantize_checkpoint(tmp_path / "hf", tmp_path / "w4a8", QuantConfig(quant_algo="W4A8_AWQ", group_size=64),
                               dtype="bfloat16", calib_size=4, calib_max_seq_len=64, device="cuda")
    layer0 = kiln.build(PretrainedModel.from_checkpoint(ckpt)).runtime_model("cuda").transformer.layers["0"]
    torch.manual_seed(0)
    for linear in (layer0.attention.qkv, layer0.mlp.fc_gate, layer0.mlp.proj):
        method = linear.quant_method
        for rows in (1, 64, 300):
            x = torch.randn(rows, linear.in_features, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                got = linear(x)
            xin = x * linear.prequant_scaling_factor if method.prequant else x
            xq, scale = quantize_fp8_static(xin, linear.activation_scaling_factor)
            w = method.dequantize(linear, torch.float32).double()
            want = (xq.double() @ w.T) * scale.double()
            bound = 3 * 2.0 ** -8 * (xq.double().abs() @ w.abs().T) * scale.double() + 2.0 ** -8 * want.abs()
            err = (got.double() - want).abs()
            assert (err <= bound).all(), f"{rows} rows: max error {err.max().item():.3g}"
        assert method.silu_and_mul_matmul(linear, x[:1]) is None
        assert method.rotary_qkv_matmul(linear, x[:1], None, None, None) is None


def _time(fn, iters=50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def benchmark() -> None:
    """Microseconds per call: bf16 F.linear vs FP8 (per-token quantize + _scaled_mm, and the GEMM alone) vs INT8."""
    print(f"{'M':>5} {'N':>6} {'K':>5} {'bf16':>9} {'fp8 all':>9} {'fp8 gemm':>9} {'int8 all':>9} {'int8 gemm':>9}")
    for m, n, k in SHAPES[:4]:
        x, w = _operands(m, n, k)
        wb = w.to(torch.bfloat16)
        wq, ws = quantize_fp8_weight(w, torch.bfloat16, per_channel=True)
        iq, iws = quantize_int8_per_channel(w, torch.bfloat16)
        xq, xs = quantize_fp8_per_token(x)
        xi, xis = quantize_int8_rows_ref(x)
        t = [_time(lambda: torch.nn.functional.linear(x, wb)),
             _time(lambda: fp8_gemm(*quantize_fp8_per_token(x), wq, ws, torch.bfloat16)),
             _time(lambda: fp8_gemm(xq, xs, wq, ws, torch.bfloat16)),
             _time(lambda: int8_gemm(*ig.quantize_int8_activation(x), iq, iws, torch.bfloat16)),
             _time(lambda: int8_gemm(xi, xis, iq, iws, torch.bfloat16))]
        print(f"{m:>5} {n:>6} {k:>5} " + " ".join(f"{v:>9.1f}" for v in t))


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())
    for check in (test_scaled_mm_equals_emulation_and_float64, test_int8_gemm_equals_emulation_and_float64):
        try:
            check()
            print(check.__name__, "ok")
        except AssertionError as e:  # still run the benchmark
            print(check.__name__, "FAILED:", e)
    for m, n, k in SHAPES:
        x, w = _operands(m, n, k)
        wq, ws = quantize_fp8_weight(w, torch.bfloat16, per_channel=True)
        xq, xs = quantize_fp8_per_token(x)
        print(f"fp8 {m}x{n}x{k}: max |gpu - float64| {_check('fp8', fp8_gemm, fp8_gemm_emulated, xq, xs, wq, ws):.3e}")
    benchmark()
