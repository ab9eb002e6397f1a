"""KV-cache quantization: INT8 or FP8 (e4m3) keys and values with one scale per layer for each of k and v.

The cache holds round-to-nearest codes q = clamp(round(x / s)) of each key and value after rotary; every read
dequantizes x ~ q * s. Per layer the scale is calibrated from the absmax of that layer's keys (and, apart,
values) on calibration text: s = amax / 127 for int8 (symmetric), s = amax / 448 for e4m3 (its largest finite
value). Keys and values get separate scales (`kv_cache_scaling_factor` = [s_k, s_v] under the attention
module) because keys carry a few outlier channels that values do not: one shared scale would waste most of
the values' range. One scale per tensor, not per head, keeps the scale a replicated 2-element tensor that any
tensor-parallel split shares and the kernels load once.

Calibration streams layer by layer, as AWQ does (kiln.quantization.awq): one float decoder layer in memory at a
time, each fed by the float layers before it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kiln.config import QuantAlgo
from kiln.errors import ConfigError

log = logging.getLogger("kiln")

SCALE_NAME = "kv_cache_scaling_factor"


@dataclass(frozen=True)
class KVFormat:
    dtype: torch.dtype  # of the cache tensors
    qmax: float  # largest code magnitude: amax maps onto it


KV_FORMATS = {QuantAlgo.INT8: KVFormat(torch.int8, 127.0), QuantAlgo.FP8: KVFormat(torch.float8_e4m3fn, 448.0)}
QMAX = {f.dtype: f.qmax for f in KV_FORMATS.values()}  # cache dtype -> largest code


def kv_format(algo: QuantAlgo) -> KVFormat:
    if algo not in KV_FORMATS:
        raise ConfigError(f"QuantConfig.kv_cache_quant_algo must be one of {[a.value for a in KV_FORMATS]} "
                          f"or None, got {algo!r}")
    return KV_FORMATS[algo]


def cache_dtype(quant_config, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type: the model's dtype, or the 1-byte code type of a quantized cache."""
    algo = quant_config.kv_cache_quant_algo
    return model_dtype if algo is None else kv_format(algo).dtype


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / scale rounded to the nearest code of `dtype` (int8 or float8_e4m3fn), clamped to its range."""
    y = (x.float() / scale.float()).clamp(-QMAX[dtype], QMAX[dtype])
    return y.round().to(dtype) if dtype == torch.int8 else y.to(dtype)  # float8: the cast rounds to nearest


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a read of x back from a `dtype` cache gives: quantize, then dequantize to x's dtype."""
    return dequantize(quantize(x, scale, dtype), scale, x.dtype)


def scale_from_amax(amax: torch.Tensor, algo: QuantAlgo, dtype: torch.dtype) -> torch.Tensor:
    """amax / qmax, stored in the checkpoint's `dtype`, rounded up there so that amax still maps inside the
    codes' range (no clamping of the calibration maximum)."""
    exact = amax.float().clamp(min=1e-8) / kv_format(algo).qmax
    stored = exact.to(dtype)
    return torch.where(stored.float() < exact, torch.nextafter(stored, torch.full_like(stored, float("inf"))),
                       stored)


class _AmaxBatch:
    """An uncached attention batch that records the absmax of each layer's keys and values on the way."""

    def __init__(self, batch):
        self.batch, self.query_lens, self.amax = batch, batch.query_lens, {}

    @property
    def max_seq_len(self) -> int:
        return self.batch.max_seq_len

    def cache_slots(self, layer) -> None:
        return None  # uncached: the keys and values reach `attend`

    def attend(self, layer, q, k, v, kv_written=False):
        self.amax[layer.layer_idx] = torch.stack([k.detach().abs().amax().float(), v.detach().abs().amax().float()])
        return self.batch.attend(layer, q, k, v)


def calibrate(model, tokens: torch.Tensor, algo: QuantAlgo, device="cpu") -> dict[str, torch.Tensor]:
    """{"transformer.layers.{i}.attention.kv_cache_scaling_factor": [s_k, s_v]} of a TP=1 float source model
    (lazy weights), from the absmax of each layer's keys and values over `tokens` [n, seq]."""
    from kiln.layers.attention import AttentionBatch
    from kiln.quantization import streaming

    config = model.config
    n, t = tokens.shape
    positions = torch.arange(t, device=device).repeat(n)
    batch = _AmaxBatch(AttentionBatch.uncached(n, t))
    x = streaming.embed(model, tokens, positions, device)
    scales = {}
    for i in model.mapping.pp_layers(config.num_hidden_layers):
        prefix = f"transformer.layers.{i}."
        layer = streaming.load_layer(model, i, device)
        with torch.no_grad():
            x = layer.full_output(x, positions, batch)
        amax = batch.amax[i]
        scales[prefix + "attention." + SCALE_NAME] = scale_from_amax(amax, algo, config.torch_dtype).cpu()
        log.debug("KV cache layer %d: |k|max %.3g |v|max %.3g", i, *amax.tolist())
        del layer
    return scales
