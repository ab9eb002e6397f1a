"""Which LinearMethod each linear layer of a model holds, from the model's QuantConfig.

The decoder's linear layers (QKV, attention output, MLP fc/gate/proj, shared experts) are quantized unless a
pattern of `exclude_modules` names them; so are a mixture of experts' stacked weights (`mlp.experts.fc`, `.gate`,
`.proj`) by the algorithms in EXPERT_METHODS (W8A16, W4A16, W4A16_AWQ and W4A16_GPTQ, and FP8,
FP8_PER_CHANNEL_PER_TOKEN and FP8_BLOCK_SCALES as e4m3 weights with 16-bit inputs; under the others they stay in
full precision, as do embeddings and MoE routers). A pattern matches a module's full name or any dotted suffix of
it (fnmatch syntax): "lm_head", "mlp.proj", "transformer.layers.0.*".

lm_head is excluded by default (QuantConfig.exclude_modules = ("lm_head",), as TensorRT-LLM and ModelOpt do);
a config that drops "lm_head" from the list quantizes it too, with LM_HEAD_METHODS: methods that need no
calibration of lm_head's input (the calibrations stream the decoder layers only): int4 round to nearest for
the AWQ algorithm too (no scale search), FP8 with per-channel weight and per-token activation scales. A tied
model's embedding stays in full precision, lm_head is quantized from that matrix and stored as its own tensors.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from kiln.config import QuantAlgo, QuantConfig
from kiln.errors import ConfigError
from kiln.layers.embedding import LMHead
from kiln.layers.linear import ColumnLinear, Linear, LinearMethod, QKVLinear, RowLinear
from kiln.layers.moe import ExpertLinear
from kiln.quantization.fp8 import Fp8ExpertMethod, Fp8Method
from kiln.quantization.fp8_block import Fp8BlockMethod, Fp8GroupExpertMethod
from kiln.quantization.w4a8 import W4A8AwqMethod
from kiln.quantization.w8a8 import Int8W8A8Method
from kiln.quantization.weight_only import Int4ExpertMethod, Int4GroupMethod, Int8ExpertMethod, Int8WeightOnlyMethod

# quant_algo -> (QuantConfig, layer) -> the layer's method. AWQ's and SmoothQuant's per-input-channel scales fold
# into the norm before a column-parallel layer (QKV, fc/gate); a row-parallel layer (attention output, mlp.proj)
# follows no norm, so it keeps the scale itself (`prequant`).
METHODS = {
    QuantAlgo.W8A16: lambda qc, layer: Int8WeightOnlyMethod(),
    QuantAlgo.W4A16: lambda qc, layer: Int4GroupMethod(qc.group_size, qc.has_zero_point),
    QuantAlgo.W4A16_AWQ: lambda qc, layer: Int4GroupMethod(qc.group_size, qc.has_zero_point,
                                                           prequant=layer.input_sharded),
    QuantAlgo.W4A16_GPTQ: lambda qc, layer: Int4GroupMethod(qc.group_size, qc.has_zero_point, act_order=True),
    QuantAlgo.W4A8_AWQ: lambda qc, layer: W4A8AwqMethod(qc.group_size, qc.has_zero_point,
                                                        prequant=layer.input_sharded),
    QuantAlgo.W8A8_SQ_PER_CHANNEL: lambda qc, layer: Int8W8A8Method(prequant=layer.input_sharded),
    QuantAlgo.FP8: lambda qc, layer: Fp8Method(static=True),
    QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN: lambda qc, layer: Fp8Method(static=False),
    QuantAlgo.FP8_BLOCK_SCALES: lambda qc, layer: Fp8BlockMethod(qc.group_size),
}
# quant_algo -> QuantConfig -> lm_head's method, when exclude_modules does not keep lm_head in full precision.
# None of them needs lm_head's input statistics: no calibration streams the final norm's output.
LM_HEAD_METHODS = {
    QuantAlgo.W8A16: lambda qc: Int8WeightOnlyMethod(),
    QuantAlgo.W4A16: lambda qc: Int4GroupMethod(qc.group_size, qc.has_zero_point),
    QuantAlgo.W4A16_AWQ: lambda qc: Int4GroupMethod(qc.group_size, qc.has_zero_point),  # round to nearest
    QuantAlgo.W4A16_GPTQ: lambda qc: Int4GroupMethod(qc.group_size, qc.has_zero_point, act_order=True),  # RTN
    QuantAlgo.FP8: lambda qc: Fp8Method(static=False),  # no static activation scale to calibrate
    QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN: lambda qc: Fp8Method(static=False),
    QuantAlgo.FP8_BLOCK_SCALES: lambda qc: Fp8Method(static=False),  # (a vocabulary need not split into groups)
}
# quant_algo -> QuantConfig -> the method of a mixture of experts' stacked weights (kiln.layers.moe.ExpertLinear).
# The others keep experts in full precision: their kernels are per-linear.
EXPERT_METHODS = {
    QuantAlgo.W8A16: lambda qc: Int8ExpertMethod(),
    QuantAlgo.W4A16: lambda qc: Int4ExpertMethod(qc.group_size, qc.has_zero_point),
    # GPTQ's experts: W4A16's format in input order (no act order: the grouped GEMM reads no permutation), codes
    # from kiln.quantization.gptq.gptq_experts_int4
    QuantAlgo.W4A16_GPTQ: lambda qc: Int4ExpertMethod(qc.group_size, qc.has_zero_point),
    # AWQ's experts: W4A16's format, their scales folded into the norm and each expert's gate rows
    # (kiln.quantization.awq._search_experts)
    QuantAlgo.W4A16_AWQ: lambda qc: Int4ExpertMethod(qc.group_size, qc.has_zero_point),
    QuantAlgo.FP8: lambda qc: Fp8ExpertMethod(),  # (weight-only: experts take 16-bit inputs)
    QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN: lambda qc: Fp8ExpertMethod(),
    QuantAlgo.FP8_BLOCK_SCALES: lambda qc: Fp8GroupExpertMethod(qc.group_size),  # (weight-only too)
}
SUPPORTED_ALGOS = tuple(METHODS)  # every weight algorithm (tests/quantization check the list)
QUANTIZABLE = (ColumnLinear, RowLinear, QKVLinear)


def quantizes_lm_head(qc: QuantConfig) -> bool:
    return qc.quant_algo is not None and not is_excluded("lm_head", qc.exclude_modules)


def check_lm_head(qc: QuantConfig) -> None:
    """Refuse a config that quantizes lm_head with an algorithm that has no method for it."""
    if quantizes_lm_head(qc) and qc.quant_algo not in LM_HEAD_METHODS:
        able = [a.value for a in LM_HEAD_METHODS]
        raise ConfigError(f"QuantConfig.exclude_modules must include 'lm_head' for {qc.quant_algo.value}: its "
                          f"activation scales need calibration of lm_head's input, which kiln does not do; lm_head "
                          f"can be quantized with one of {able}. Keep 'lm_head' in exclude_modules (the default; "
                          f"on the CLI, drop --quantize-lm-head)")


# The expert formats a pre-quantized checkpoint imports into (each expert's tensors converted as a dense layer's
# and stacked): AWQ, GPTQ without desc_act and compressed-tensors int4 (W4A16), compressed-tensors int8 (W8A16)
# (kiln.quantization.hf_import), and per-tensor or per-channel FP8 (kiln.quantization.fp8_import; the experts'
# activation scales are not read: kiln's FP8 experts are weight-only), block-wise FP8 too (each block's scale on its
# rows' groups, FP8_BLOCK_SCALES).
IMPORTED_EXPERT_ALGOS = (QuantAlgo.W4A16, QuantAlgo.W8A16, QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN,
                         QuantAlgo.FP8_BLOCK_SCALES)


def check_experts_importable(config, where: str) -> None:
    """Refuse a pre-quantized mixture of experts whose experts kiln does not import: their source tensors are
    codes that only an import of that format reads."""
    algo = config.quantization.quant_algo
    if config.moe_num_experts and algo is not None and algo not in IMPORTED_EXPERT_ALGOS:
        raise ConfigError(f"{where}: a mixture of experts quantized as {algo.value} cannot be imported; kiln imports "
                          f"quantized experts from AWQ, GPTQ without desc_act, compressed-tensors int4 or int8 "
                          f"without act order, and per-tensor, per-channel or block-wise FP8. Convert the float "
                          f"model and use `kiln quantize --quant-algo W4A16` (or W8A16, FP8)")


def supported_names() -> list[str]:
    return [a.value for a in SUPPORTED_ALGOS]


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
    if qc.quant_algo is None or not isinstance(layer, (*QUANTIZABLE, LMHead, ExpertLinear)) or \
            is_excluded(module_name, qc.exclude_modules):
        return None
    if isinstance(layer, ExpertLinear):
        return EXPERT_METHODS[qc.quant_algo](qc) if qc.quant_algo in EXPERT_METHODS else None
    if isinstance(layer, LMHead):
        check_lm_head(qc)
        return LM_HEAD_METHODS[qc.quant_algo](qc)
    return METHODS[qc.quant_algo](qc, layer)


def apply_quant_config(model: nn.Module, qc: QuantConfig) -> None:
    """Give every quantized linear layer of `model` its method (new tensors on the current default device)."""
    if qc.quant_algo is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, (Linear, ExpertLinear)):
            method = quant_method_for(name, module, qc)
            if method is not None:
                try:
                    module.set_quant_method(method)
                except ConfigError as e:  # (the method cannot know the layer's name)
                    raise ConfigError(f"{name}: {e}") from None


def quantized_linears(model: nn.Module) -> dict[str, Linear | ExpertLinear]:
    """Module name -> linear layer (or stacked experts), for every layer holding a quantized method."""
    return {name: m for name, m in model.named_modules()
            if (isinstance(m, Linear) and m.quant_method.name != "none")
            or (isinstance(m, ExpertLinear) and m.quant_method is not None)}
