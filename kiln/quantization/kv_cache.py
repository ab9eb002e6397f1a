"""KV-cache quantization: INT8 or FP8 (e4m3) keys and values with one scale per layer for each of k and v.

The cache holds round-to-nearest codes q = clamp(round(x / s)) of each key and value after rotary; every read
dequantizes x ~ q * s. Per layer the scale is calibrated on the keys (and, apart, the values) of calibration
text. e4m3: s = amax / 448 (its largest finite value); a float grid's steps scale with the value, so clipping the
rare large ones buys the others nothing. int8 (symmetric): of s = r amax / 127 for the clip ratios r in
INT8_CLIP_RATIOS, the one with the least squared error of the calibration values read back. Its steps are even, so
clipping a few outliers refines them for every other value: on SmolLM2 with 32 calibration windows the search took
the cache's mean KL from 0.0038 (r = 1, the maximum) to 0.0026 (docs/quantization.md). Keys and values get
separate scales (`kv_cache_scaling_factor` = [s_k, s_v] under the attention module) because keys carry a few
outlier channels that values do not: one shared scale would waste most of the values' range. One scale per
tensor, not per head, keeps the scale a replicated 2-element tensor that any tensor-parallel split shares and the
kernels load once. Latent attention (kiln.layers.mla) caches one row a token that is both its key and its value:
its layers' keys and values are the same numbers, so their two scales are one, as the cache's one tensor needs.

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


# The clip ratios the int8 scale search tries, largest first (ties keep the larger scale): 1.0 is the maximum.
INT8_CLIP_RATIOS = torch.linspace(1.0, 0.5, 26)


def calibrated_scale(x: torch.Tensor, algo: QuantAlgo, dtype: torch.dtype) -> torch.Tensor:
    """The scale of one layer's keys or values x (any shape) in `dtype` (see the module docstring)."""
    amax = x.abs().amax().float()
    if algo is not QuantAlgo.INT8:
        return scale_from_amax(amax, algo, dtype)
    best = None
    for ratio in INT8_CLIP_RATIOS:
        scale = scale_from_amax(amax * ratio, algo, dtype)
        err = (fake_quantize(x.float(), scale, torch.int8) - x.float()).square().sum()
        if best is None or err < best[0]:
            best = (err, scale)
    return best[1]


class _KVRecorder:
    """An uncached attention batch that keeps the keys and values of the layer it last ran, on the way."""

    def __init__(self, batch):
        self.batch, self.query_lens, self.kv = batch, batch.query_lens, None

    @property
    def max_seq_len(self) -> int:
        return self.batch.max_seq_len

    def cache_slots(self, layer) -> None:
        return None  # uncached: the keys and values reach `attend`

    def attend(self, layer, q, k, v, kv_written=False):
        self.kv = (k.detach(), v.detach())
        return self.batch.attend(layer, q, k, v)


def calibrate(model, tokens: torch.Tensor, algo: QuantAlgo, device="cpu") -> dict[str, torch.Tensor]:
    """{"transformer.layers.{i}.attention.kv_cache_scaling_factor": [s_k, s_v]} of a TP=1 float source model
    (lazy weights), from each layer's keys and values over `tokens` [n, seq] (calibrated_scale)."""
    from kiln.layers.attention import AttentionBatch
    from kiln.quantization import streaming

    recorder = _KVRecorder(AttentionBatch.uncached(*tokens.shape))
    scales = {}
    for prefix, _, run in streaming.walk_layers(model, tokens, device, batch=recorder):
        run()
        scale = torch.stack([calibrated_scale(t, algo, model.config.torch_dtype) for t in recorder.kv])
        scales[prefix + "attention." + SCALE_NAME] = scale.cpu()
        log.debug("KV cache %s: s_k %.3g s_v %.3g", prefix, *scale.float().tolist())
    return scales
