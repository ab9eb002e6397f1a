"""SmoothQuant (Xiao et al. 2022, arXiv:2211.10438): the smoothing scales of W8A8_SQ_PER_CHANNEL.

A few input channels carry activations far larger than the rest, which per-token int8 cannot hold without
crushing the small ones; the weights are easy to quantize. Dividing input channel j by s_j and multiplying
weight column j by s_j leaves the float product unchanged and moves the difficulty from the activations into
the weights, with s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) (the paper's eq. 4; `alpha` is the migration
strength, QuantConfig.smoothquant_alpha, 0.5 by default). max|W_j| is over every linear that shares the input.

Where the input is a norm's output (QKV after input_layernorm; fc and gate after post_layernorm, one s for both)
1/s folds into the norm's weight; the attention output and mlp.proj follow no norm, so they keep 1/s as
`prequant_scaling_factor` (kiln.quantization.w8a8). The scales use the same convention as AWQ's
(input_scales: W -> W * s; norm_scales: norm -> norm / s), so the quantize workflow folds both alike.
"""

from __future__ import annotations

import torch

from kiln.errors import ConfigError
from kiln.quantization.awq import NORM_BEFORE

MIN_VALUE = 1e-5  # a channel that never fired (or an all-zero weight column) must not make s zero or infinite


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
    groups: dict[str, list[str]] = {}  # one scale per shared input: fc and gate together
    for name in act_absmax:
        owner, rel = _split_layer_name(name)
        if rel not in NORM_BEFORE and name not in prequant:
            raise ConfigError(f"W8A8_SQ_PER_CHANNEL: no norm to fold the smoothing scale of {name} into; exclude "
                              "it with exclude_modules or use FP8_PER_CHANNEL_PER_TOKEN")
        groups.setdefault(owner + NORM_BEFORE.get(rel, rel), []).append(name)
    input_scales, norm_scales = {}, {}
    for key, names in groups.items():
        weights = [model.read_weight(n + ".weight") for n in names]
        s = smoothing_scale(act_absmax[names[0]], weights, alpha)
        input_scales.update({n: s for n in names})
        if key.rsplit(".", 1)[-1] in ("input_layernorm", "post_layernorm"):
            norm_scales[key] = s
    return input_scales, norm_scales


def _split_layer_name(name: str) -> tuple[str, str]:
    """"transformer.layers.3.mlp.fc" -> ("transformer.layers.3.", "mlp.fc")."""
    head, _, rest = name.partition(".layers.")
    index, _, rel = rest.partition(".")
    return f"{head}.layers.{index}.", rel
