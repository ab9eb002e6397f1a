"""Model.quantize: a source model -> a quantized kiln checkpoint (every rank), optionally with a quality report.

Each checkpoint tensor is a pure function of (source tensor, QuantConfig, calibration): `QuantizedSource.get`
gives the unsharded (TP=1) tensor, and each rank's shard rules cut its slice, the same rules convert and
build use. Every algorithm reads, quantizes and writes one linear at a time; those that need calibration
(CALIBRATORS: AWQ's scale search, SmoothQuant's smoothing scales, the static activation scales of FP8 and
W4A8_AWQ, GPTQ's rounding, which gives the linears' tensors themselves) first stream the calibration text
through the float model layer by layer; with QuantConfig.keep_sensitive_layers the decoder layers whose
quantization costs most on that text then stay in full precision (kiln.quantization.sensitivity). Everything is
validated before anything is written, and the output dir is written atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.checkpoint.atomic import atomic_dir, write_json_atomic
from kiln.config import QuantAlgo, QuantConfig, resolve_device
from kiln.errors import ConfigError
from kiln.mapping import Mapping
from kiln.quantization import (act_stats, awq, calib_text, calibration, evaluate, gptq, kv_cache, sensitivity,
                                smoothquant)
from kiln.quantization.fp8 import static_activation_scale
from kiln.quantization.methods import check_lm_head, is_excluded, quantized_linears, supported_names
from kiln.quantization.weight_only import pack_int4

log = logging.getLogger("kiln")


class QuantizedSource:
    """Checkpoint name -> full (TP=1) tensor of the quantized model, read lazily from a float source model."""

    def __init__(self, source, reference, input_scales: dict | None = None, norm_scales: dict | None = None,
                 kv_scales: dict | None = None, act_absmax: dict | None = None, device="cpu",
                 weight_clips: dict | None = None, rounded: dict | None = None):
        self.source = source  # the float model at TP=1, lazy weights
        self.linears = quantized_linears(reference)  # the quantized model at TP=1, on the meta device
        self.input_scales, self.norm_scales = input_scales or {}, norm_scales or {}
        self.act_absmax = act_absmax or {}  # linear -> calibrated max |x| per input channel (FP8, W4A8_AWQ)
        self.weight_clips = weight_clips or {}  # linear -> bound on |W s| per (output, group) (AWQ)
        # module -> its checkpoint tensors made during calibration: GPTQ's linears, AWQ's experts and the router
        # its scale folds into
        self.rounded = rounded or {}
        self.device = device  # where each weight is quantized (one linear at a time); the results come back to CPU
        self.kv_scales = kv_scales or {}  # checkpoint name -> kv_cache_scaling_factor (kiln.quantization.kv_cache)
        self.dtype = reference.config.torch_dtype
        self._last: tuple[str, dict] | None = None  # one linear's tensors: its leaves are read back to back

    def get(self, name: str) -> torch.Tensor:
        if name in self.kv_scales:
            return self.kv_scales[name]
        module, _, leaf = name.rpartition(".")
        if module in self.rounded and module not in self.linears and leaf in self.rounded[module]:
            return self.rounded[module][leaf]  # a float module calibration rewrote (a router; its bias stays)
        if module in self.linears and leaf != "bias":
            if self._last is None or self._last[0] != module:
                self._last = (module, self._quantize(module))
            return self._last[1][leaf]
        tensor = self.source.read_weight(name)
        if module in self.norm_scales:
            return awq.fold_into_norm(leaf, tensor, self.norm_scales[module], self.source.config)
        return tensor

    def _quantize(self, module: str) -> dict[str, torch.Tensor]:
        return self.rounded[module] if module in self.rounded else self.linear_tensors(module)

    def linear_tensors(self, module: str, weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The linear's checkpoint tensors as its method's quantize gives them (round to nearest), on the CPU; from
        `weight` where the caller holds the source weight already, else read."""

        def on_device(t):
            return None if t is None else t.to(self.device)
        if weight is None:
            weight = self.source.read_weight(module + ".weight")  # lm_head of a tied model: the embedding
        weight = on_device(weight)
        if module in self.weight_clips:
            group_size = self.linears[module].quant_method.group_size
            weight = awq.clip_weight(weight, on_device(self.weight_clips[module]),
                                     on_device(self.input_scales.get(module)), group_size)
        extra = {"act_absmax": on_device(self.act_absmax[module])} if module in self.act_absmax else {}
        tensors = self.linears[module].quant_method.quantize(weight, self.dtype,
                                                             on_device(self.input_scales.get(module)), **extra)
        return {leaf: t.cpu() for leaf, t in tensors.items()}


# ---- calibration of the weight algorithms: quant_algo -> (source, tokens, QuantConfig, reference, device,
# mapping) -> WeightCalibration ----

@dataclass
class WeightCalibration:
    input_scales: dict = field(default_factory=dict)  # linear -> s: its weight becomes W * s (AWQ, SmoothQuant)
    norm_scales: dict = field(default_factory=dict)  # norm -> s folded in as 1 / s
    act_absmax: dict = field(default_factory=dict)  # linear -> max |x| per input channel (static activation scales)
    awq_errors: dict = field(default_factory=dict)  # linear -> (awq, rtn) mse, for the quality report
    weight_clips: dict = field(default_factory=dict)  # linear -> AWQ's bound on |W s| per (output, group)
    rounded: dict = field(default_factory=dict)  # linear -> its checkpoint tensors (GPTQ rounds during calibration)


def _calibrate_awq(source, tokens, qc, reference, device, mapping) -> WeightCalibration:
    return _awq_gptq_rounded(_awq_scales(source, tokens, qc, device), source, tokens, qc, reference, device, mapping)


def _calibrate_w4a8(source, tokens, qc, reference, device, mapping) -> WeightCalibration:
    calibrated = _awq_scales(source, tokens, qc, device)
    calibrated.act_absmax = act_stats.calibrate_absmax(source, tokens, qc, device)
    return _awq_gptq_rounded(calibrated, source, tokens, qc, reference, device, mapping)


def _awq_scales(source, tokens, qc, device) -> WeightCalibration:
    input_scales, norm_scales, errors, clips, experts = awq.calibrate(source, tokens, qc, device)
    return WeightCalibration(input_scales, norm_scales, awq_errors=errors, weight_clips=clips, rounded=experts)


def _awq_gptq_rounded(calibrated: WeightCalibration, source, tokens, qc, reference, device,
                      mapping) -> WeightCalibration:
    """With --weight-rounding gptq, AWQ's linears get their int4 codes from GPTQ, on the scales and zero points
    round to nearest gives the smoothed, clipped weight (the checkpoint's own), the smoothed unclipped weight W * s
    its target and x / s its input; every other tensor as round to nearest writes it."""
    if qc.weight_rounding != "gptq":
        return calibrated
    nearest = QuantizedSource(source, reference, calibrated.input_scales, calibrated.norm_scales,
                              act_absmax=calibrated.act_absmax, device=device, weight_clips=calibrated.weight_clips)

    def rounder(name: str, weight: torch.Tensor, hessian: torch.Tensor, chunks: int) -> dict[str, torch.Tensor]:
        tensors = nearest.linear_tensors(name, weight)  # (the walk's weight: no second read)
        s = calibrated.input_scales[name].to(weight.device)
        codes = gptq.gptq_int4_on_scales(weight.float() * s, gptq.smoothed_hessian(hessian, s),
                                         tensors["weights_scaling_factor"], tensors.get("zero_point"), qc.group_size)
        return {**tensors, "weight": pack_int4(codes).cpu()}

    calibrated.rounded.update(gptq.calibrate(source, tokens, qc, mapping.tp_size, device, rounder))
    return calibrated


def _calibrate_fp8(source, tokens, qc, reference, device, mapping) -> WeightCalibration:
    absmax = act_stats.calibrate_absmax(source, tokens, qc, device)
    if qc.weight_rounding == "nearest":
        return WeightCalibration(act_absmax=absmax)
    rounded = gptq.calibrate(source, tokens, qc, mapping.tp_size, device)
    for name, tensors in rounded.items():
        if name in absmax:  # (the dense linears: FP8's experts are weight-only, with no activation scale)
            tensors["activation_scaling_factor"] = static_activation_scale(absmax[name], source.config.torch_dtype)
    return WeightCalibration(act_absmax=absmax, rounded=rounded)


def _calibrate_smoothquant(source, tokens, qc, reference, device, mapping) -> WeightCalibration:
    absmax = act_stats.calibrate_absmax(source, tokens, qc, device)
    prequant = {name for name, m in quantized_linears(reference).items() if m.quant_method.prequant}
    if qc.smoothquant_alpha != "auto":
        input_scales, norm_scales = smoothquant.smoothing_scales(source, absmax, qc.smoothquant_alpha, prequant)
        return WeightCalibration(input_scales, norm_scales)
    input_scales, norm_scales, alphas = smoothquant.searched_smoothing_scales(source, tokens, qc, absmax, prequant,
                                                                               device)
    log.info("SmoothQuant alpha searched per input: %s", ", ".join(f"{k} {a:.2f}" for k, a in alphas.items()))
    return WeightCalibration(input_scales, norm_scales)


def _calibrate_gptq(source, tokens, qc, reference, device, mapping) -> WeightCalibration:
    return WeightCalibration(rounded=gptq.calibrate(source, tokens, qc, mapping.tp_size, device))


CALIBRATORS = {QuantAlgo.W4A16_AWQ: _calibrate_awq, QuantAlgo.W4A8_AWQ: _calibrate_w4a8,
               QuantAlgo.FP8: _calibrate_fp8, QuantAlgo.W8A8_SQ_PER_CHANNEL: _calibrate_smoothquant,
               QuantAlgo.W4A16_GPTQ: _calibrate_gptq}


def calibrator_for(qc: QuantConfig):
    """The algorithm's calibration; GPTQ's rounding (--weight-rounding gptq) for a format that otherwise has none."""
    if qc.weight_rounding == "gptq" and qc.quant_algo not in CALIBRATORS:
        return _calibrate_gptq
    return CALIBRATORS.get(qc.quant_algo)


# The formats --weight-rounding gptq rounds: the FP8 ones (gptq.ROUNDERS) and AWQ's, on their own scales.
GPTQ_ROUNDED = (*gptq.FP8_WEIGHT_SCALES, QuantAlgo.W4A16_AWQ, QuantAlgo.W4A8_AWQ)

# Structures an algorithm cannot handle yet (mixtures of experts, which SmoothQuant's and W4A8_AWQ's scales cannot
# fold into).
MODEL_CHECKS = {QuantAlgo.W4A8_AWQ: awq.check_w4a8_awq_supported,
                QuantAlgo.W8A8_SQ_PER_CHANNEL: smoothquant.check_smoothquant_supported}


def _rank_model(cls, config, source: QuantizedSource):
    model = cls.empty(config)

    def load(name):
        return model.shard_rule(name)(source.get(name), model.mapping)
    model.set_lazy_weights({name: functools.partial(load, name) for name in model.weight_specs()})
    return model


def check_quant_config(qc: QuantConfig, config) -> None:
    """Whole-configuration checks that need no weights (shapes are checked by building every rank)."""
    if qc.quant_algo is None and qc.kv_cache_quant_algo is None:
        raise ConfigError(f"QuantConfig.quant_algo must be one of {supported_names()}, or "
                          f"kv_cache_quant_algo one of {[a.value for a in kv_cache.KV_FORMATS]}, to quantize")
    check_lm_head(qc)
    if qc.weight_rounding == "gptq" and qc.quant_algo not in GPTQ_ROUNDED:
        able = ", ".join(a.value for a in GPTQ_ROUNDED)
        raise ConfigError(f"QuantConfig.weight_rounding 'gptq' (--weight-rounding gptq) is for {able} (plain int4 "
                          f"weights: --quant-algo W4A16_GPTQ); quant_algo {qc.quant_algo and qc.quant_algo.value} "
                          "rounds to the nearest value: drop --weight-rounding")
    mlps = ("mlp", "mlp.experts") if config.moe_num_experts else ("mlp",)
    for i, mlp in itertools.product(range(config.num_hidden_layers), mlps):
        fc, gate = (f"transformer.layers.{i}.{mlp}.{m}" for m in ("fc", "gate"))
        if config.gated_mlp and is_excluded(fc, qc.exclude_modules) != is_excluded(gate, qc.exclude_modules):
            raise ConfigError(f"QuantConfig.exclude_modules must name both or neither of {fc} and {gate} "
                              "(the engine runs them as one matmul)")
    if qc.quant_algo in MODEL_CHECKS:
        MODEL_CHECKS[qc.quant_algo](config)
    sensitivity.check_keep_count(qc.keep_sensitive_layers, config.num_hidden_layers, qc.quant_algo is not None)


def quantize_checkpoint(src, out_dir, quant_config: QuantConfig, mapping: Mapping | None = None,
                        calib_dataset=None, calib_size: int = 32, calib_max_seq_len: int = 256,
                        dtype: str = "auto", overwrite: bool = False, evaluate_quality: bool = False,
                        device: str | None = None, eval_dataset=None) -> Path:
    from kiln.checkpoint.convert import load_source_model

    device = str(resolve_device(device))
    mapping = mapping or Mapping()
    source = load_source_model(src, dtype, Mapping())
    cls = type(source)
    if source.config.quantization.is_quantized:
        raise ConfigError(f"{src}: is already quantized ({source.config.quantization.quant_algo.value}, imported "
                          f"from its quantization_config); convert it with `kiln convert` instead of quantizing")
    check_quant_config(quant_config, source.config)
    qconfig = source.config.replace(quantization=quant_config)
    reference = cls.empty(qconfig)  # raises on shapes the format cannot hold, before any work
    for rank in range(mapping.world_size):
        cls.empty(qconfig.replace(mapping=mapping.with_rank(rank)))
    texts = calibration.read_texts(calib_dataset)  # a bad file fails here, before anything is written
    eval_texts = calibration.read_texts(eval_dataset, calib_text.HELDOUT, "evaluation dataset") \
        if evaluate_quality else None
    tokenizer = None
    calibrate = calibrator_for(quant_config)
    if calibrate is not None or quant_config.kv_cache_quant_algo or quant_config.keep_sensitive_layers or \
            evaluate_quality:
        tokenizer = calibration.source_tokenizer(source)
    weight_calibration = WeightCalibration()
    if calibrate is not None:
        tokens = calibration.token_batches(texts, tokenizer, qconfig.vocab_size, calib_size, calib_max_seq_len)
        log.info("%s: calibrating on %d x %d tokens, layer by layer", quant_config.quant_algo.value, *tokens.shape)
        weight_calibration = calibrate(source, tokens, quant_config, reference, device, mapping)
    scores = {}
    if quant_config.keep_sensitive_layers:
        tokens = calibration.token_batches(texts, tokenizer, qconfig.vocab_size, calib_size, calib_max_seq_len)
        qconfig, weight_calibration, scores = keep_sensitive_layers(source, cls, qconfig, tokens, weight_calibration,
                                                                    device)
        quant_config, reference = qconfig.quantization, cls.empty(qconfig)
    kv_scales = {}
    if quant_config.kv_cache_quant_algo is not None:
        tokens = calibration.token_batches(texts, tokenizer, qconfig.vocab_size, calib_size, calib_max_seq_len)
        log.info("KV cache %s: calibrating on %d x %d tokens, layer by layer",
                 quant_config.kv_cache_quant_algo.value, *tokens.shape)
        kv_scales = kv_cache.calibrate(source, tokens, quant_config.kv_cache_quant_algo, device)
    quantized = QuantizedSource(source, reference, weight_calibration.input_scales, weight_calibration.norm_scales,
                                kv_scales, act_absmax=weight_calibration.act_absmax, device=device,
                                weight_clips=weight_calibration.weight_clips, rounded=weight_calibration.rounded)
    with atomic_dir(out_dir, overwrite) as tmp:
        for rank in range(mapping.world_size):
            model = _rank_model(cls, qconfig.replace(mapping=mapping.with_rank(rank)), quantized)
            model.write_rank(tmp)
        model.tokenizer_writer = source.tokenizer_writer
        model.write_metadata(tmp)
    if evaluate_quality:  # after the checkpoint is in place: an evaluation that fails loses none of the work
        log.info("wrote %s; evaluating it against the unquantized model", out_dir)
        report = quality_report(source, cls, qconfig, quantized, tokenizer, calib_max_seq_len, device, eval_texts)
        report["eval_text"] = str(eval_dataset) if eval_dataset else "kiln.quantization.calib_text.HELDOUT"
        if scores:
            report["layer_sensitivity_kl"] = {str(i): kl for i, kl in scores.items()}
        if weight_calibration.awq_errors:
            report["awq_layer_mse"] = {k: {"awq": a, "rtn": r}
                                       for k, (a, r) in weight_calibration.awq_errors.items()}
        write_json_atomic(Path(out_dir) / evaluate.REPORT_FILE, report)
        log.info(evaluate.format_report(report))
    return Path(out_dir)


def keep_sensitive_layers(source, cls, qconfig, tokens, weight_calibration: WeightCalibration, device):
    """(config whose exclude_modules add the QuantConfig.keep_sensitive_layers layers that cost the most on the
    calibration tokens, the calibration without those layers, {layer: score}); kiln.quantization.sensitivity."""
    qc = qconfig.quantization
    wc = weight_calibration
    quantized = QuantizedSource(source, cls.empty(qconfig), wc.input_scales, wc.norm_scales, act_absmax=wc.act_absmax,
                                device=device, weight_clips=wc.weight_clips, rounded=wc.rounded)
    log.info("%s: scoring each decoder layer's quantization on %d x %d calibration tokens",
             qc.quant_algo.value, *tokens.shape)
    scores = sensitivity.layer_scores(source, _rank_model(cls, qconfig, quantized), tokens, device)
    keep = sensitivity.most_sensitive(scores, qc.keep_sensitive_layers)
    log.info("keeping decoder layers %s in full precision (mean KL on calibration text when quantized alone: %s)",
             keep, ", ".join(f"{scores[i]:.2e}" for i in keep))
    excluded = qc.exclude_modules + tuple(sensitivity.layer_pattern(i) for i in keep)
    qconfig = qconfig.replace(quantization=dataclasses.replace(qc, exclude_modules=excluded))
    return qconfig, sensitivity.without_layers(wc, keep), scores


def quality_report(source, cls, qconfig, quantized: QuantizedSource, tokenizer, seq_len: int, device,
                   texts: list[str] | None = None) -> dict:
    windows = calibration.heldout_windows(tokenizer, qconfig.vocab_size, seq_len, texts)
    quant_model = _rank_model(cls, qconfig.replace(mapping=Mapping()), quantized)
    metrics = evaluate.compare_streamed(source, quant_model, windows, device)
    return {"quantization": qconfig.quantization.to_dict(), "dtype": qconfig.dtype,
            "tokenizer": tokenizer is not None,
            "seq_len": seq_len, "windows": len(windows), "metrics": metrics}
