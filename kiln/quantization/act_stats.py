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
from kiln.layers.attention import AttentionBatch
from kiln.layers.linear import Linear
from kiln.quantization import streaming

log = logging.getLogger("kiln")


def calibrate_absmax(model, tokens: torch.Tensor, qc: QuantConfig, device="cpu") -> dict[str, torch.Tensor]:
    """{linear name: max |x| over the calibration tokens, per input channel, float32 [in] on the CPU} for every
    linear of a TP=1 source model (lazy weights) that `qc` quantizes; tokens is [n, t]."""
    from kiln.quantization.methods import quant_method_for

    config = model.config
    n, t = tokens.shape
    positions = torch.arange(t, device=device).repeat(n)
    batch = AttentionBatch.uncached(n, t)
    x = streaming.embed(model, tokens, positions, device)
    absmax: dict[str, torch.Tensor] = {}
    for i in model.mapping.pp_layers(config.num_hidden_layers):
        prefix = f"transformer.layers.{i}."
        layer = streaming.load_layer(model, i, device)
        hooks = [m.register_forward_pre_hook(_observer(absmax, prefix + name))
                 for name, m in layer.named_modules()
                 if isinstance(m, Linear) and quant_method_for(prefix + name, m, qc) is not None]
        with torch.no_grad():
            x = layer.full_output(x, positions, batch)
        for h in hooks:
            h.remove()
        del layer
        log.debug("activation stats: layer %d done", i)
    return {name: a.cpu() for name, a in absmax.items()}


def _observer(absmax: dict, name: str):
    def observe(module, args):  # returns None: the input goes on unchanged
        x = args[0].detach()
        a = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        absmax[name] = a if name not in absmax else torch.maximum(absmax[name], a)
    return observe
