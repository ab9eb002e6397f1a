"""Which LinearMethod each linear layer of a model holds, from the model's QuantConfig.

The decoder's linear layers (QKV, attention output, MLP fc/gate/proj, shared experts) are quantized unless a
pattern of `exclude_modules` names them; embeddings, lm_head, MoE routers and stacked expert weights stay in
full precision in this version. A pattern matches a module's full name or any dotted suffix of it (fnmatch
syntax): "lm_head", "mlp.proj", "transformer.layers.0.*".
"""

from __future__ import annotations

import fnmatch

from torch import nn

from kiln.config import QuantAlgo, QuantConfig
from kiln.errors import ConfigError
from kiln.layers.linear import ColumnLinear, Linear, LinearMethod, QKVLinear, RowLinear
from kiln.quantization.weight_only import Int4GroupMethod, Int8WeightOnlyMethod

SUPPORTED_ALGOS = (QuantAlgo.W8A16, QuantAlgo.W4A16, QuantAlgo.W4A16_AWQ)
QUANTIZABLE = (ColumnLinear, RowLinear, QKVLinear)


def check_supported(qc: QuantConfig) -> None:
    if qc.quant_algo is not None and qc.quant_algo not in SUPPORTED_ALGOS:
        raise ConfigError(f"QuantConfig.quant_algo {qc.quant_algo.value} is not implemented yet; this kiln "
                          f"quantizes with one of {[a.value for a in SUPPORTED_ALGOS]}")
    if qc.kv_cache_quant_algo is not None:
        raise ConfigError("QuantConfig.kv_cache_quant_algo is not implemented yet; leave it None")


def is_excluded(module_name: str, patterns) -> bool:
    # The engine fuses mlp.fc and mlp.gate into fc_gate: it follows fc (quantize() checks they agree).
    names = [module_name]
    if module_name.endswith(".fc_gate"):
        names = [module_name[: -len("fc_gate")] + "fc", module_name[: -len("fc_gate")] + "gate"]
    for name in names:
        parts = name.split(".")
        suffixes = [".".join(parts[i:]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(s, p) for p in patterns for s in suffixes):
            return True
    return False


def quant_method_for(module_name: str, layer: nn.Module, qc: QuantConfig) -> LinearMethod | None:
    """The method `layer` holds under `qc`; None keeps it in full precision."""
    if qc.quant_algo is None or not isinstance(layer, QUANTIZABLE) or is_excluded(module_name, qc.exclude_modules):
        return None
    if qc.quant_algo is QuantAlgo.W8A16:
        return Int8WeightOnlyMethod()
    if qc.quant_algo is QuantAlgo.W4A16:
        return Int4GroupMethod(qc.group_size, qc.has_zero_point)
    if qc.quant_algo is QuantAlgo.W4A16_AWQ:
        # AWQ's per-input-channel scale folds into the norm before a column-parallel layer (QKV, fc/gate); a
        # row-parallel layer (attention output, mlp.proj) follows no norm, so it keeps the scale itself.
        return Int4GroupMethod(qc.group_size, qc.has_zero_point, prequant=layer.input_sharded)
    check_supported(qc)
    return None


def apply_quant_config(model: nn.Module, qc: QuantConfig) -> None:
    """Give every quantized linear layer of `model` its method (new tensors on the current default device)."""
    if qc.quant_algo is None:
        return
    check_supported(qc)
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            method = quant_method_for(name, module, qc)
            if method is not None:
                module.set_quant_method(method)


def quantized_linears(model: nn.Module) -> dict[str, Linear]:
    """Module name -> linear layer, for every layer holding a quantized method."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, Linear) and m.quant_method.name != "none"}
