"""Sensitivity-driven mixed precision: keep the decoder layers whose quantization costs the most in full precision.

`QuantConfig.keep_sensitive_layers = N` (`kiln quantize --keep-sensitive-layers N`) scores every decoder layer
on the calibration text (never the held-out text of the quality report) and adds the N highest-scoring layers to
`exclude_modules` as `transformer.layers.<i>.*`, so the checkpoint's config.json (and `kiln inspect`) names them.
A layer's score is the mean per-token KL(p_float || p_i) of the next-token distributions, where model i is the
float model with only layer i's linears quantized (after calibration, with the scales the checkpoint gets).
Ranking layers by the cost of quantizing each alone, and keeping the top ones, is the per-layer greedy choice of
mixed-precision tools (NVIDIA ModelOpt's `auto_quantize` scores each layer's quantization under a budget); it
assumes the layers' costs add up, which the measurement in docs/quantization.md checks.

The scores stream like the calibration (kiln.quantization.streaming): each decoder layer's float and quantized
weights are loaded once, and the float layer carries the float hidden states and one perturbed copy per earlier
layer (layer i quantized, the rest float), so the cost is L(L+1)/2 layer forwards and L + 1 copies of the
calibration batch's hidden states, with no whole model in memory. Every weight algorithm works: the quantized
layer is read through the same QuantizedSource the checkpoint is written from.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from kiln.errors import ConfigError
from kiln.layers.attention import AttentionBatch
from kiln.quantization import streaming

log = logging.getLogger("kiln")


def layer_pattern(index: int) -> str:
    """The exclude_modules pattern that keeps every linear of decoder layer `index` in full precision."""
    return f"transformer.layers.{index}.*"


def check_keep_count(n: int, num_layers: int, has_weight_algo: bool) -> None:
    if n > num_layers:
        raise ConfigError(f"QuantConfig.keep_sensitive_layers must be at most the model's {num_layers} decoder "
                          f"layers, got {n}; pass a smaller --keep-sensitive-layers")
    if n and not has_weight_algo:
        raise ConfigError("QuantConfig.keep_sensitive_layers needs a quant_algo (it keeps layers' linears in full "
                          "precision); pass --quant-algo, or --keep-sensitive-layers 0")


def most_sensitive(scores: dict[int, float], n: int) -> list[int]:
    """The n layers with the highest scores (ties: the lower index), in layer order."""
    ranked = sorted(scores, key=lambda i: (-scores[i], i))
    return sorted(ranked[:n])


def without_layers(calibrated, layers: list[int]):
    """A calibration dataclass whose dicts (module name -> tensor) drop every module of `layers`: an excluded
    layer's linears are not quantized, and its norms take no folded scales (SmoothQuant, AWQ)."""
    prefixes = tuple(f"transformer.layers.{i}." for i in layers)

    def keep(d: dict) -> dict:
        return {k: v for k, v in d.items() if not k.startswith(prefixes)}
    return dataclasses.replace(calibrated, **{f.name: keep(getattr(calibrated, f.name))
                                              for f in dataclasses.fields(calibrated)})


@torch.no_grad()
def layer_scores(source, quantized_model, tokens: torch.Tensor, device="cpu") -> dict[int, float]:
    """{layer index: mean KL(p_float || p with only that layer quantized)} over the calibration tokens [n, t].
    `source` is the float TP=1 model (lazy weights), `quantized_model` the quantized one (lazy, TP=1)."""
    n, t = tokens.shape
    positions = torch.arange(t, device=device).repeat(n)
    batch = AttentionBatch.uncached(n, t)
    x = streaming.embed(source, tokens, positions, device)
    perturbed: dict[int, torch.Tensor] = {}  # layer i -> hidden states with layer i quantized, the others float
    for i in source.mapping.pp_layers(source.config.num_hidden_layers):
        prefix = f"transformer.layers.{i}."
        layer = streaming.load_layer(source, i, device)
        qlayer = streaming.load_module(quantized_model.transformer.layers[str(i)], prefix, quantized_model, device)
        perturbed = {j: layer.full_output(h, positions, batch) for j, h in perturbed.items()}
        perturbed[i] = qlayer.full_output(x, positions, batch)
        x = layer.full_output(x, positions, batch)
        qlayer.to_empty(device="meta")  # back to shapes only, as streaming.embed leaves the embedding
        del layer
        log.debug("sensitivity: layer %d done", i)
    return _mean_kl(source, x, perturbed, t, device)


def _mean_kl(source, x: torch.Tensor, perturbed: dict[int, torch.Tensor], window: int, device) -> dict[int, float]:
    """KL of each perturbed stream's next-token distributions against the float stream's, one window at a time
    (one window's logits in memory, not the batch's)."""
    config = source.config
    norm = streaming.load_module(source.transformer.ln_f, "transformer.ln_f.", source, device)
    head = source.read_weight("lm_head.weight").to(device)  # (a tied model's embedding matrix)

    def log_probs(h: torch.Tensor) -> torch.Tensor:
        logits = (norm(h) @ head.T)[:, : config.vocab_size].float()
        cap = config.final_logit_softcapping
        return (logits if cap is None else torch.tanh(logits / cap) * cap).log_softmax(-1)

    kl = dict.fromkeys(perturbed, 0.0)
    for start in range(0, x.shape[0], window):
        rows = slice(start, start + window)
        lf = log_probs(x[rows])
        for i, h in perturbed.items():
            kl[i] += (lf.exp() * (lf - log_probs(h[rows]))).sum().item()
    norm.to_empty(device="meta")
    return {i: v / x.shape[0] for i, v in kl.items()}
