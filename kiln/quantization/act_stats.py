"""Activation statistics for calibration: max |x| per input channel of every quantized linear's input.

FP8 and W4A8_AWQ take their static activation scale from it, SmoothQuant its smoothing scales. Calibration
streams layer by layer as AWQ's does (kiln.quantization.awq): only one decoder layer's weights and the
calibration batch's hidden states live in memory at a time, and each layer's input comes from the float layers
before it. The hooks reduce each input to its per-channel maximum as it passes, so no activations are kept.
"""

from __future__ import annotations

import logging

import torch

from kiln.config import QuantConfig
from kiln.quantization import streaming

log = logging.getLogger("kiln")


def calibrate_absmax(model, tokens: torch.Tensor, qc: QuantConfig, device="cpu") -> dict[str, torch.Tensor]:
    """{linear name: max |x| over the calibration tokens, per input channel, float32 [in] on the CPU} for every
    linear of a TP=1 source model (lazy weights) that `qc` quantizes; tokens is [n, t]."""
    absmax: dict[str, torch.Tensor] = {}
    for prefix, layer, run in streaming.walk_layers(model, tokens, device):
        run({m: _observer(absmax, prefix + name) for name, m in streaming.quantized_linears(layer, prefix, qc).items()})
        log.debug("activation stats: %s done", prefix)
    return {name: a.cpu() for name, a in absmax.items()}


def _observer(absmax: dict, name: str):
    def observe(module, args):  # returns None: the input goes on unchanged
        x = args[0].detach()
        a = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        absmax[name] = a if name not in absmax else torch.maximum(absmax[name], a)
    return observe
