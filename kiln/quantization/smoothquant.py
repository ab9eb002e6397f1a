"""SmoothQuant (Xiao et al. 2022, arXiv:2211.10438): the smoothing scales of W8A8_SQ_PER_CHANNEL.

A few input channels carry activations far larger than the rest, which per-token int8 cannot hold without
crushing the small ones; the weights are easy to quantize. Dividing input channel j by s_j and multiplying
weight column j by s_j leaves the float product unchanged and moves the difficulty from the activations into
the weights, with s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) (the paper's eq. 4; `alpha` is the migration
strength, QuantConfig.smoothquant_alpha, 0.5 by default). max|W_j| is over every linear that shares the input.

With `smoothquant_alpha="auto"` (`--smoothquant-alpha auto`) each shared input gets its own alpha, searched over
0, 0.05, ..., 1 on the calibration inputs for the least squared error of its linears' outputs, both sides quantized
as the engine does (x / s per token, W s per output channel), as later SmoothQuant work does per layer; streamed
layer by layer as AWQ's search is. alpha = 0.5 is on the grid, so on those inputs it never does worse.

Where the input is a norm's output (QKV after input_layernorm; fc and gate after post_layernorm, one s for both)
1/s folds into the norm's weight; the attention output and mlp.proj follow no norm, so they keep 1/s as
`prequant_scaling_factor` (kiln.quantization.w8a8). The scales use the same convention as AWQ's
(input_scales: W -> W * s; norm_scales: norm -> norm / s), so the quantize workflow folds both alike.
"""

from __future__ import annotations

import torch

from kiln.errors import ConfigError
from kiln.kernels.int8_gemm import quantize_int8_rows_ref
from kiln.quantization import streaming
from kiln.quantization.awq import NORM_BEFORE
from kiln.quantization.weight_only import quantize_int8_per_channel

MIN_VALUE = 1e-5  # a channel that never fired (or an all-zero weight column) must not make s zero or infinite
ALPHA_CANDIDATES = tuple(i / 20 for i in range(21))  # the "auto" search's grid: 0, 0.05, ..., 1


def check_smoothquant_supported(config) -> None:
    if config.moe_num_experts:
        raise ConfigError("QuantConfig.quant_algo W8A8_SQ_PER_CHANNEL does not support mixture-of-experts models yet "
                          "(its scale would fold into the norm the unquantized experts share); use W8A16 or FP8")


def smoothing_scale(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] (float32) for the linears `weights` [out_j, in] sharing an input with per-channel max |x| act_absmax."""
    w_absmax = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    a, w = act_absmax.float().clamp(min=MIN_VALUE), w_absmax.clamp(min=MIN_VALUE)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=MIN_VALUE)


def smoothing_scales(model, act_absmax: dict[str, torch.Tensor], alpha: float,
                     prequant: set[str]) -> tuple[dict, dict]:
    """(input_scales {linear: s}, norm_scales {norm: s}) for every calibrated linear of the source `model`,
    reading the weights one group at a time. `prequant` names the linears that hold a prequant_scaling_factor;
    every other one must follow a norm."""
    check_smoothquant_supported(model.config)
    input_scales, norm_scales = {}, {}
    for key, names in _input_groups(act_absmax, prequant).items():
        weights = [model.read_weight(n + ".weight") for n in names]
        _record(key, names, smoothing_scale(act_absmax[names[0]], weights, alpha), input_scales, norm_scales)
    return input_scales, norm_scales


def searched_smoothing_scales(model, tokens: torch.Tensor, qc, act_absmax: dict[str, torch.Tensor],
                              prequant: set[str], device="cpu") -> tuple[dict, dict, dict]:
    """smoothing_scales with each shared input's alpha searched (smoothquant_alpha "auto"): (input_scales,
    norm_scales, alphas {norm or linear: alpha}), streaming the calibration tokens [n, t] layer by layer."""
    check_smoothquant_supported(model.config)
    groups = _input_groups(act_absmax, prequant)
    input_scales, norm_scales, alphas = {}, {}, {}
    for prefix, layer, inputs in streaming.layer_inputs(model, tokens, qc, device):
        for key, names in groups.items():
            if key.startswith(prefix):
                weights = [layer.get_submodule(n[len(prefix):]).weight.detach() for n in names]
                alpha, s = search_alpha(inputs[names[0][len(prefix):]], weights, act_absmax[names[0]].to(device))
                _record(key, names, s.cpu(), input_scales, norm_scales)
                alphas[key] = alpha
    return input_scales, norm_scales, alphas


def search_alpha(x: torch.Tensor, weights: list[torch.Tensor], act_absmax: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(alpha, s) of ALPHA_CANDIDATES whose smoothing gives the least int8_output_error on inputs x [N, in]."""
    x, weights = x.float(), [w.float() for w in weights]
    refs = [x @ w.T for w in weights]  # the float outputs, the same for every alpha
    best = None
    for alpha in ALPHA_CANDIDATES:
        s = smoothing_scale(act_absmax, weights, alpha)
        err = int8_output_error(x, weights, refs, s)
        if best is None or err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2]


def int8_output_error(x: torch.Tensor, weights: list[torch.Tensor], refs: list[torch.Tensor], s: torch.Tensor) -> float:
    """Mean squared error of x W^T (refs, one per weight) for each of `weights` when x / s is int8 per token and W s
    int8 per output channel, as W8A8_SQ_PER_CHANNEL runs them (float32)."""
    xq, x_scale = quantize_int8_rows_ref(x / s)
    xd = xq.float() * x_scale
    err, count = 0.0, 0
    for w, ref in zip(weights, refs):
        wq, w_scale = quantize_int8_per_channel(w * s, torch.float32)
        err += (xd @ (wq.float() * w_scale[:, None]).T - ref).pow(2).sum().item()
        count += x.shape[0] * w.shape[0]
    return err / count


def _input_groups(names, prequant: set[str]) -> dict[str, list[str]]:
    """{shared input (a norm, or the linear itself): the linears reading it}: fc and gate together."""
    groups: dict[str, list[str]] = {}
    for name in names:
        owner, rel = _split_layer_name(name)
        if rel not in NORM_BEFORE and name not in prequant:
            raise ConfigError(f"W8A8_SQ_PER_CHANNEL: no norm to fold the smoothing scale of {name} into; exclude "
                              "it with exclude_modules or use FP8_PER_CHANNEL_PER_TOKEN")
        groups.setdefault(owner + NORM_BEFORE.get(rel, rel), []).append(name)
    return groups


def _record(key: str, names: list[str], s: torch.Tensor, input_scales: dict, norm_scales: dict) -> None:
    input_scales.update({n: s for n in names})
    if key.rsplit(".", 1)[-1] in ("input_layernorm", "post_layernorm"):
        norm_scales[key] = s


def _split_layer_name(name: str) -> tuple[str, str]:
    """"transformer.layers.3.mlp.fc" -> ("transformer.layers.3.", "mlp.fc")."""
    head, _, rest = name.partition(".layers.")
    index, _, rel = rest.partition(".")
    return f"{head}.layers.{index}.", rel
