"""Model.quantize: a source model -> a quantized kiln checkpoint (every rank), optionally with a quality report.

Each checkpoint tensor is a pure function of (source tensor, QuantConfig, AWQ scales): `QuantizedSource.get`
gives the unsharded (TP=1) tensor, and each rank's shard rules cut its slice, the same rules convert and
build use. Weight-only algorithms read, quantize and write one linear at a time; AWQ first calibrates layer
by layer (kiln.quantization.awq). Everything is validated before anything is written, and the output dir
is written atomically.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch

from kiln.checkpoint.atomic import atomic_dir
from kiln.config import QuantAlgo, QuantConfig
from kiln.errors import ConfigError
from kiln.mapping import Mapping
from kiln.quantization import awq, calibration, evaluate
from kiln.quantization.methods import check_supported, is_excluded, quantized_linears

log = logging.getLogger("kiln")


class QuantizedSource:
    """Checkpoint name -> full (TP=1) tensor of the quantized model, read lazily from a float source model."""

    def __init__(self, source, reference, input_scales: dict | None = None, norm_scales: dict | None = None):
        self.source = source  # the float model at TP=1, lazy weights
        self.linears = quantized_linears(reference)  # the quantized model at TP=1, on the meta device
        self.input_scales, self.norm_scales = input_scales or {}, norm_scales or {}
        self.dtype = reference.config.torch_dtype
        self._last: tuple[str, dict] | None = None  # one linear's tensors: its leaves are read back to back

    def get(self, name: str) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        if module in self.linears and leaf != "bias":
            if self._last is None or self._last[0] != module:
                method = self.linears[module].quant_method
                weight = self.source.read_weight(module + ".weight")
                self._last = (module, method.quantize(weight, self.dtype, self.input_scales.get(module)))
            return self._last[1][leaf]
        tensor = self.source.read_weight(name)
        if module in self.norm_scales:
            return awq.fold_into_norm(leaf, tensor, self.norm_scales[module], self.source.config)
        return tensor


def _rank_model(cls, config, source: QuantizedSource):
    model = cls.empty(config)

    def load(name):
        return model.shard_rule(name)(source.get(name), model.mapping)
    model.set_lazy_weights({name: functools.partial(load, name) for name in model.weight_specs()})
    return model


def check_quant_config(qc: QuantConfig, config) -> None:
    """Whole-configuration checks that need no weights (shapes are checked by building every rank)."""
    if qc.quant_algo is None:
        raise ConfigError(f"QuantConfig.quant_algo must be one of "
                          f"{[a.value for a in (QuantAlgo.W8A16, QuantAlgo.W4A16, QuantAlgo.W4A16_AWQ)]} to quantize")
    check_supported(qc)
    if not is_excluded("lm_head", qc.exclude_modules):
        raise ConfigError("QuantConfig.exclude_modules must include 'lm_head': this kiln keeps lm_head and the "
                          "embeddings in full precision")
    for i in range(config.num_hidden_layers):
        fc, gate = (f"transformer.layers.{i}.mlp.{m}" for m in ("fc", "gate"))
        if config.gated_mlp and is_excluded(fc, qc.exclude_modules) != is_excluded(gate, qc.exclude_modules):
            raise ConfigError(f"QuantConfig.exclude_modules must name both or neither of {fc} and {gate} "
                              "(the engine runs them as one matmul)")
    if qc.quant_algo is QuantAlgo.W4A16_AWQ:
        awq.check_awq_supported(config)


def quantize_checkpoint(src, out_dir, quant_config: QuantConfig, mapping: Mapping | None = None,
                        calib_dataset=None, calib_size: int = 32, calib_max_seq_len: int = 256,
                        dtype: str = "auto", overwrite: bool = False, evaluate_quality: bool = False,
                        device: str | None = None) -> Path:
    from kiln.checkpoint.convert import load_source_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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
    tokenizer = None
    if quant_config.quant_algo is QuantAlgo.W4A16_AWQ or evaluate_quality:
        tokenizer = calibration.source_tokenizer(source)
    input_scales, norm_scales, awq_errors = {}, {}, {}
    if quant_config.quant_algo is QuantAlgo.W4A16_AWQ:
        tokens = calibration.token_batches(texts, tokenizer, qconfig.vocab_size, calib_size, calib_max_seq_len)
        log.info("AWQ: calibrating on %d x %d tokens, layer by layer", *tokens.shape)
        input_scales, norm_scales, awq_errors = awq.calibrate(source, tokens, quant_config, device)
    quantized = QuantizedSource(source, reference, input_scales, norm_scales)
    with atomic_dir(out_dir, overwrite) as tmp:
        for rank in range(mapping.world_size):
            model = _rank_model(cls, qconfig.replace(mapping=mapping.with_rank(rank)), quantized)
            model.write_rank(tmp)
        model.tokenizer_writer = source.tokenizer_writer
        model.write_metadata(tmp)
        if evaluate_quality:
            report = quality_report(source, cls, qconfig, quantized, tokenizer, calib_max_seq_len, device)
            if awq_errors:
                report["awq_layer_mse"] = {k: {"awq": a, "rtn": r} for k, (a, r) in awq_errors.items()}
            (tmp / evaluate.REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
            log.info(evaluate.format_report(report))
    return Path(out_dir)


def quality_report(source, cls, qconfig, quantized: QuantizedSource, tokenizer, seq_len: int, device) -> dict:
    windows = calibration.heldout_windows(tokenizer, qconfig.vocab_size, seq_len)
    quant_model = _rank_model(cls, qconfig.replace(mapping=Mapping()), quantized).materialize(device)
    float_model = source.materialize(device)
    metrics = evaluate.compare(float_model, quant_model, windows, device)
    return {"quantization": qconfig.quantization.to_dict(), "dtype": qconfig.dtype,
            "eval_text": "kiln.quantization.calib_text.HELDOUT", "tokenizer": tokenizer is not None,
            "seq_len": seq_len, "windows": len(windows), "metrics": metrics}
