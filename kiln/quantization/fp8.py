"""FP8 (e4m3) weights and activations: `FP8` (one weight scale per tensor, one static activation scale per layer
from calibration) and `FP8_PER_CHANNEL_PER_TOKEN` (one weight scale per output channel, one activation scale per
token computed at run time).

Checkpoint tensors of a quantized linear `<linear>`:

- `weight` float8_e4m3fn [out, in]; the effective weight is w = weight * weights_scaling_factor[:, None].
- `weights_scaling_factor` [out] (model dtype). FP8's per-tensor scale is stored once per output row (the same
  value on every row of one source tensor), so the fused QKV and fc_gate, an imported checkpoint's separate
  q/k/v scales and every TP rule treat it like a bias: split with the output dim, whole on a row-parallel rank.
- `activation_scaling_factor` [1] (FP8 only): x is quantized as saturate(x / a); replicated on every rank. It is
  max |x| / 448 over the calibration tokens (fc and gate see the same input, so the engine keeps fc's).

The GEMM is y = (x_q @ weight^T) * a_row * s_col, accumulated in float32 (`fp8_gemm`). On CUDA with compute
capability >= 8.9, one or two rows (decode) run kiln's Triton GEMV on the codes (kiln.kernels.gemv.scaled_gemv;
with torch._scaled_mm there, FP8 batch-1 decode measured 0.94x the bf16 engine on the H100, for half the weight
bytes; with FP8's static scale the GEMV also quantizes x as it reads it, `static_fp8_gemv`; per shape, the GEMV on
the CUDA cores or an e4m3 MMA GEMV on the tensor cores, whichever measured faster at load), more rows of a
bfloat16 model one torch._scaled_mm with row-wise scales; anywhere else the emulation multiplies the same e4m3
values in float32 and applies the same scales, so both give the same numbers up to float32 summation order. A
CUDA GPU below sm_89 is refused rather than emulated: the emulated GEMM there would be slower than the bfloat16
model it replaces.

Weight scales: FP8's puts max |w| at 448; FP8_PER_CHANNEL_PER_TOKEN's, one a row, is searched for the least
squared error (`search_scales`). Scales are rounded to the model dtype before the weight is divided by them, so
dequantizing the checkpoint gives the quantizer's reconstruction exactly (an e4m3 value times a bf16/fp16 scale is
exact in float32).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from kiln.errors import ConfigError
from kiln.kernels import divide_exactly, triton_available
from kiln.kernels.fp8_quant import FP8_MAX, MIN_SCALE, Fp8Rows, quantize_activation
from kiln.kernels.gemv import (
    GEMV_MAX_ROWS,
    epilogues_enabled,
    fp8_silu_and_mul_gemv,
    scaled_gemv,
    static_fp8_gemv,
)
from kiln.kernels.input_quant import FP8_ROWS, FP8_STATIC, InputQuant
from kiln.layers.linear import Linear, LinearMethod
from kiln.mapping import replicate
from kiln.quantization.weight_only import RowScaledExpertMethod

FP8 = torch.float8_e4m3fn
FP8_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with FP8 tensor cores
SCALED_MM_ALIGN = 16  # torch._scaled_mm needs K and N multiples of 16


# ---- the math: pure functions of (tensor, format) ------------------------------------------------------

def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Saturating cast (values beyond +-448 clamp instead of becoming NaN)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_fp8_weight(weight: torch.Tensor, dtype: torch.dtype, per_channel: bool):
    """[out, in] -> (q float8_e4m3fn [out, in], scale [out] in `dtype`): per channel, each row's scale searched
    (search_scales); per tensor, max |w| maps to 448, the scale repeated on every row (a search gains nothing for
    one scale: docs/quantization.md)."""
    if per_channel:
        return search_scales(weight.float(), dtype)
    w = weight.float()
    scale = _over_fp8_max(w.abs().amax().expand(w.shape[0])).clamp(min=MIN_SCALE).to(dtype)
    return to_fp8(w / scale.float()[:, None]), scale


# A searched scale is the candidate of least squared error among max|w| / 448 times 2^(j / 16), j = 0..15. The
# e4m3 grid repeats at every power of two, so these cover its placements without clipping (j = 0 puts the largest
# weight on 448). On SmolLM2 the search takes 40% off the weights' KL with a scale per 64 inputs of a row and 29%
# with one a row (docs/quantization.md). Float32 tensors times float32 tensors: the same bits on any device.
SCALE_SEARCH_FACTORS = torch.tensor([2.0 ** (j / 16) for j in range(16)], dtype=torch.float32)


def search_scales(groups: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [..., n] -> (codes e4m3 [..., n], scale [...] in `dtype`): one searched scale per group of the last
    dim. Each candidate is rounded to `dtype` before the division, so dequantizing gives this reconstruction
    exactly; ties keep the smaller scale."""
    amax_scale = _over_fp8_max(groups.abs().amax(dim=-1))
    best = None
    for factor in SCALE_SEARCH_FACTORS.to(groups.device):
        scale = (amax_scale * factor).clamp(min=MIN_SCALE).to(dtype)
        q = to_fp8(groups / scale.float()[..., None])
        err = (q.float() * scale.float()[..., None] - groups).square().sum(dim=-1)
        codes = q.view(torch.uint8)  # (torch.where has no float8 kernel on every device)
        if best is None:
            best = [codes, scale, err]
        else:
            better = err < best[2]
            best = [torch.where(better[..., None], codes, best[0]), torch.where(better, scale, best[1]),
                    torch.minimum(err, best[2])]
    return best[0].view(FP8), best[1]


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def static_activation_scale(absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The calibrated max |x| (any shape) -> activation_scaling_factor [1] in `dtype`."""
    return _over_fp8_max(absmax.float().max()).clamp(min=MIN_SCALE).reshape(1).to(dtype)


def _over_fp8_max(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448, correctly rounded on every device (the checkpoint must not depend on where it was made)."""
    return divide_exactly(amax, FP8_MAX)


def quantize_fp8_per_token(x: torch.Tensor) -> Fp8Rows:
    """[M, K] -> (x_q float8 [M, K], scale float32 [M, 1]) with each row's max |x| at 448."""
    return quantize_activation(x)


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> Fp8Rows:
    """[M, K] with a per-tensor scale [1] -> (x_q float8 [M, K], scale float32 [M, 1])."""
    return quantize_activation(x, scale)


def fp8_backend(device: torch.device) -> str:
    """"scaled_mm" on CUDA GPUs with FP8 tensor cores, "emulated" off CUDA; anything else is refused."""
    if device.type != "cuda":
        return "emulated"
    check_fp8_capability(_capability(device.index if device.index is not None else torch.cuda.current_device()))
    return "scaled_mm"


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def check_fp8_capability(capability: tuple[int, int]) -> None:
    if tuple(capability) < FP8_CAPABILITY:
        need = f"sm_{FP8_CAPABILITY[0]}{FP8_CAPABILITY[1]}"
        raise ConfigError(f"FP8 GEMMs need an NVIDIA GPU of compute capability {need} or newer (Ada, Hopper); this "
                          f"GPU is sm_{capability[0]}{capability[1]}. Quantize with W8A8_SQ_PER_CHANNEL or W8A16 "
                          f"for it, or run the FP8 checkpoint on the CPU (emulated)")


def fp8_gemm_emulated(xq, x_scale, wq, w_scale, out_dtype) -> torch.Tensor:
    """The reference: e4m3 products summed in float32, then the row and column scales."""
    acc = xq.float() @ wq.float().T
    return (acc * x_scale * w_scale.float()[None, :]).to(out_dtype)


def _runs_gemv(x: torch.Tensor) -> bool:
    """Decode rows on a CUDA GPU: kiln's Triton GEMV, not a GEMM."""
    return x.shape[0] <= GEMV_MAX_ROWS and x.is_cuda and triton_available()


def fp8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
             out_dtype: torch.dtype) -> torch.Tensor:
    """(x_q [M, K] @ w_q [N, K]^T) * x_scale [M, 1] * w_scale [N] -> [M, N] in out_dtype."""
    k, n = xq.shape[1], wq.shape[0]
    if _runs_gemv(xq):
        fp8_backend(xq.device)  # refuses GPUs without FP8
        return scaled_gemv(xq, x_scale, wq, w_scale, out_dtype)  # decode: one read of the weights, no padding
    if (fp8_backend(xq.device) == "scaled_mm" and out_dtype == torch.bfloat16  # row-wise scales: bf16 out only
            and k % SCALED_MM_ALIGN == 0 and n % SCALED_MM_ALIGN == 0):
        return torch._scaled_mm(xq, wq.T, scale_a=x_scale, scale_b=w_scale.float()[None, :], out_dtype=out_dtype)
    return fp8_gemm_emulated(xq, x_scale, wq, w_scale, out_dtype)


# ---- the method a linear layer holds -------------------------------------------------------------------

def _param(*shape, dtype=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Fp8Method(LinearMethod):
    """FP8 (static=True: calibrated per-tensor activation scale) or FP8_PER_CHANNEL_PER_TOKEN (static=False)."""

    def __init__(self, static: bool):
        self.static = static
        self.name = "FP8" if static else "FP8_PER_CHANNEL_PER_TOKEN"

    def create_weights(self, layer: Linear) -> None:
        layer.weight = _param(layer.out_features, layer.in_features, dtype=FP8)
        layer.weights_scaling_factor = _param(layer.out_features)
        layer.shard_rules.update(weight=layer.weight_rule, weights_scaling_factor=layer.weight_rule)
        if self.static:
            layer.activation_scaling_factor = _param(1)
            layer.shard_rules["activation_scaling_factor"] = replicate

    def dequantize(self, layer: Linear, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8(layer.weight, layer.weights_scaling_factor, dtype)

    def input_quant(self, layer: Linear) -> InputQuant:
        """e4m3 codes over the calibrated scale (FP8), or with a scale per token (FP8_PER_CHANNEL_PER_TOKEN)."""
        return InputQuant(FP8_STATIC, scale=layer.activation_scaling_factor) if self.static else InputQuant(FP8_ROWS)

    def prepare(self, layer: Linear) -> None:
        # The GEMM's column scales in float32, made once: casting them on every call was a kernel per linear,
        # 0.46 ms of a batch-512 Llama-3-8B decode step on the H100 (kiln.bench.profile_decode).
        layer.weights_scale_f32 = layer.weights_scaling_factor.float()

    def apply(self, layer: Linear, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        w_scale = getattr(layer, "weights_scale_f32", layer.weights_scaling_factor)  # (set by prepare)
        if isinstance(x, Fp8Rows):  # already quantized by the kernel before (input_quant)
            return fp8_gemm(x.q, x.scale, layer.weight, w_scale, layer.weights_scaling_factor.dtype)
        x2, out_dtype = x.reshape(-1, x.shape[-1]), x.dtype
        if self.static and _runs_gemv(x2):
            fp8_backend(x2.device)  # refuses GPUs without FP8
            # decode: the GEMV quantizes x as it reads it (the numbers of the two-kernel path below, one launch)
            y = static_fp8_gemv(x2, layer.activation_scaling_factor, layer.weight, w_scale, out_dtype)
        else:
            xq, x_scale = self.input_quant(layer).quantize(x2)
            y = fp8_gemm(xq, x_scale, layer.weight, w_scale, out_dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def silu_and_mul_matmul(self, layer: Linear, x, out_quant: InputQuant | None = None):
        """Decode rows given as e4m3 codes (Fp8Rows) whose down projection takes FP8's static input: one launch,
        the e4m3 word GEMV with SiLU-and-mul and the down projection's quantization as its epilogue, where that
        kernel measured the fastest for the plain fc_gate GEMV (kiln.kernels.gemv.fp8_silu_and_mul_gemv); else
        None."""
        if (not isinstance(x, Fp8Rows) or out_quant is None or out_quant.kind != FP8_STATIC
                or out_quant.prequant is not None or not _runs_gemv(x.q) or not epilogues_enabled()):
            return None
        fp8_backend(x.q.device)  # refuses GPUs without FP8
        w_scale = getattr(layer, "weights_scale_f32", layer.weights_scaling_factor)
        return fp8_silu_and_mul_gemv(x.q, x.scale, layer.weight, w_scale, out_quant.scale,
                                     layer.weights_scaling_factor.dtype)

    def rotary_qkv_matmul(self, layer, x, positions, inv_freq, cache):
        """Decode rows given as e4m3 codes (Fp8Rows): the fused QKV projection with rotary and the cache write as
        the e4m3 word GEMV's epilogue, where that kernel measured the fastest for the plain projection
        (kiln.kernels.quant_gemm.fp8_qkv_rotary_matmul); else None."""
        if not isinstance(x, Fp8Rows) or not _runs_gemv(x.q) or not epilogues_enabled():
            return None
        fp8_backend(x.q.device)  # refuses GPUs without FP8
        from kiln.kernels import quant_gemm  # (imported here: its torch references import the quantization package)

        w_scale = getattr(layer, "weights_scale_f32", layer.weights_scaling_factor)
        return quant_gemm.fp8_qkv_rotary_matmul(x.q, x.scale, layer.weight, w_scale, layer.weights_scaling_factor.dtype,
                                                layer.num_heads, layer.num_kv_heads, layer.head_size, positions,
                                                inv_freq, *cache)

    def quantize(self, weight, dtype, input_scale=None, act_absmax=None):
        q, s = quantize_fp8_weight(weight, dtype, per_channel=not self.static)
        out = {"weight": q, "weights_scaling_factor": s}
        if self.static:
            if act_absmax is None:
                raise ConfigError("FP8 needs the calibrated max |x| of each quantized layer's input "
                                  "(kiln.quantization.act_stats); quantize through quantize_checkpoint")
            out["activation_scaling_factor"] = static_activation_scale(act_absmax, dtype)
        return out


class Fp8ExpertMethod(RowScaledExpertMethod):
    """FP8 and FP8_PER_CHANNEL_PER_TOKEN for a mixture of experts' stacked weights: e4m3 codes with a searched
    scale per expert and output row (search_scales). Experts run weight-only: the grouped GEMM (kiln.kernels.moe)
    converts each tile of codes to the activations' dtype as it loads it and multiplies 16-bit inputs, as the
    reference does. So an expert's input is never quantized (no activation scale per expert to calibrate), and
    decode streams half the experts' bytes."""

    name = "FP8"
    code_dtype = FP8

    def quantize(self, weight, dtype, input_scale=None):
        q, scale = search_scales(weight.float(), dtype)  # a scale per row of each expert
        return {"weight": q, "weights_scaling_factor": scale[..., None]}
