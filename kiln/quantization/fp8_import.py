"""Import of FP8 checkpoints published in the Hugging Face ecosystem into kiln's FP8 formats
(kiln/quantization/fp8.py), and the dispatch of every pre-quantized `quantization_config` by its quant_method
(AWQ and GPTQ: kiln/quantization/hf_import.py; MXFP4, read as a float model: kiln/quantization/mxfp4.py).

Formats read (each linear `<proj>` of the decoder holds `<proj>.weight` in float8_e4m3fn plus its scales):

- `quant_method: "fp8"` without `weight_block_size` (AutoFP8, vLLM, llm-compressor's older exports):
  `weight_scale` per tensor ([] or [1]); with `activation_scheme: "static"` also `input_scale` per tensor.
  Static -> kiln FP8, dynamic -> FP8_PER_CHANNEL_PER_TOKEN. Exact: the per-tensor weight scale is stored on
  every row (kiln's [out] layout); the fused QKV keeps each of q, k, v's own scale on its rows, and its static
  activation scale is the largest of the three input scales (one input, one quantization).
- `quant_method: "fp8"` with `weight_block_size` [bo, bi] (transformers' FineGrainedFP8, DeepSeek-V3 and Qwen3
  FP8 style): `weight_scale_inv` [ceil(out / bo), ceil(in / bi)], the multiplier of each block (w = q * s despite
  the name); dynamic activations only. With bi one of 32, 64, 128 (the published ones use [128, 128]) it
  becomes FP8_BLOCK_SCALES with group_size bi, as the source runs it (activations per token and group of bi):
  the codes as they are, each block's scale repeated on its bo rows (kiln/quantization/fp8_block.py). Another bi
  is dequantized and re-quantized per output channel (FP8_PER_CHANNEL_PER_TOKEN): the only lossy import, by at
  most one e4m3 rounding per weight.
- `quant_method: "compressed-tensors"` with one config group of float 8-bit weights (strategy "tensor" or
  "channel": `weight_scale` [1] or [out, 1]) and float 8-bit input activations (static "tensor" with
  `input_scale` -> FP8; dynamic "token" -> FP8_PER_CHANNEL_PER_TOKEN); or strategy "block" (`block_structure`
  [bo, bi], `weight_scale` [ceil(out / bo), ceil(in / bi)], each block's multiplier) with dynamic activations in
  groups of bi, read as `weight_block_size` above. Integer weights: kiln.quantization.hf_import. A
  `kv_cache_scheme` (static per-tensor FP8 or INT8) adds the KV cache's scales, `self_attn.k_scale` and `v_scale`
  of each layer, to whichever weights (or to float ones, with no config groups).

Scales are converted to the model dtype (a bfloat16 model rounds a float32 scale to 8 bits of mantissa, far
below an e4m3 step). An lm_head the source stores in FP8 (no ignore list naming it) is dequantized into kiln's
full-precision lm_head: exact up to the model dtype's rounding. A checkpoint whose config declares FP8 but
lacks a scale tensor is refused up front with the missing names (PretrainedModel.attach_source).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kiln.checkpoint.name_map import NameMap, Src
from kiln.config import GROUP_SIZES, QuantAlgo, QuantConfig
from kiln.errors import CheckpointError, ConfigError
from kiln.quantization import hf_import
from kiln.quantization.fp8 import FP8, quantize_fp8_weight
from kiln.quantization.kv_cache import SCALE_NAME
from kiln.quantization.mxfp4 import Mxfp4Format

LEAVES = ("weight", "weights_scaling_factor", "activation_scaling_factor")


@dataclass(frozen=True)
class Fp8ImportFormat:
    """An FP8 source: the kiln QuantConfig it becomes, its weight-scale tensor and layout, and whether it holds
    static input scales."""

    method: str
    quant_config: QuantConfig
    scale_leaf: str  # "weight_scale" or "weight_scale_inv"
    block: tuple[int, int] | None  # (rows, columns) of a block of the scale tensor; None: per tensor / channel

    @property
    def static(self) -> bool:
        return self.quant_config.quant_algo is QuantAlgo.FP8

    def name_map(self, base: NameMap, quantized_modules) -> NameMap:
        return Fp8NameMap(base, self, quantized_modules)


@dataclass(frozen=True)
class _WrappedFormat:
    """AWQ / GPTQ (kiln.quantization.hf_import) behind the same two members."""

    fmt: hf_import.HFQuantFormat

    @property
    def quant_config(self) -> QuantConfig:
        return self.fmt.quant_config

    def name_map(self, base: NameMap, quantized_modules) -> NameMap:
        return hf_import.PrequantizedNameMap(base, self.fmt, quantized_modules)


def prequantized_format(hf: dict, path: str, keep_quantization: bool = False):
    """The pre-quantized format a Hugging Face config.json declares (with `quant_config` and
    `name_map(base, quantized_modules)`); None for a float checkpoint. keep_quantization: MXFP4 experts stay
    codes."""
    qc = hf.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    readers = {"fp8": _fp8_format, "compressed-tensors": _compressed_tensors_format,
               "mxfp4": lambda qc, where: Mxfp4Format(keep_quantization)}
    if method in readers:
        return readers[method](qc, f"{path}: quantization_config")
    if method not in ("awq", "gptq"):
        raise ConfigError(f"{path}: quantization_config.quant_method {method!r} cannot be imported; this kiln "
                          f"imports {['awq', 'gptq', *readers]}; convert the float model and use `kiln quantize`")
    return _WrappedFormat(hf_import.hf_quant_format(hf, path))


def _fp8_format(qc: dict, where: str) -> Fp8ImportFormat:
    scheme = str(qc.get("activation_scheme", "dynamic")).lower()
    if scheme not in ("static", "dynamic"):
        raise ConfigError(f"{where}.activation_scheme {scheme!r} is not one of ['static', 'dynamic']")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"{where}.fmt {qc.get('fmt')!r}: this kiln imports e4m3 FP8 weights only")
    block = qc.get("weight_block_size")
    if block is not None:
        if scheme != "dynamic" or len(block) != 2:
            raise ConfigError(f"{where}: block-wise FP8 (weight_block_size {block}) is imported with dynamic "
                              f"activations and a [rows, columns] block only; got activation_scheme {scheme!r}")
        scale_leaf, block = "weight_scale_inv", tuple(block)
        quant_config = _block_quant_config(block)
    else:
        quant_config = QuantConfig(quant_algo=QuantAlgo.FP8 if scheme == "static" else
                                   QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN)
        scale_leaf = "weight_scale"
    hf_import.check_ignored(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or [], where)
    return Fp8ImportFormat("fp8", quant_config, scale_leaf, block)


def _compressed_tensors_block(qc: dict, name: str, weights: dict, acts: dict, where: str) -> Fp8ImportFormat:
    """Block-wise FP8 (llm-compressor's FP8_BLOCK): `weight_scale` [ceil(out / bo), ceil(in / bi)], each block's
    multiplier, with activations quantized per token and group of bi at run time, as FP8_BLOCK_SCALES runs them."""
    block = tuple(weights.get("block_structure") or ())
    at = f"{where}.config_groups.{name}"
    if len(block) != 2:
        raise ConfigError(f"{at}.weights.block_structure must be [rows, columns], got {weights.get('block_structure')}")
    if not (acts.get("dynamic") and acts.get("strategy") == "group" and acts.get("group_size") == block[1]):
        raise ConfigError(f"{at}.input_activations: block-wise FP8 weights ({list(block)}) are imported with dynamic "
                          f"activations in groups of the block's width ({block[1]}), as FP8_BLOCK_SCALES runs them; "
                          f"got {acts}")
    hf_import.check_ignored(qc.get("ignore") or [], where)
    return Fp8ImportFormat("compressed-tensors", _block_quant_config(block), "weight_scale", block)


def _block_quant_config(block: tuple[int, int]) -> QuantConfig:
    """FP8_BLOCK_SCALES with the block's width as its group where kiln's groups take it (the codes as they are),
    else FP8_PER_CHANNEL_PER_TOKEN (re-quantized per row, Fp8NameMap._read)."""
    if block[1] in GROUP_SIZES:
        return QuantConfig(quant_algo=QuantAlgo.FP8_BLOCK_SCALES, group_size=block[1])
    return QuantConfig(quant_algo=QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN)


def _compressed_tensors_format(qc: dict, where: str):
    """The weights' format (one config group), with the KV cache's scales where `kv_cache_scheme` is set (alone
    too: a checkpoint that quantizes only its KV cache)."""
    kv_algo = _kv_cache_algo(qc.get("kv_cache_scheme"), f"{where}.kv_cache_scheme")
    if kv_algo is not None and not qc.get("config_groups"):
        return _KVScalesFormat(None, kv_algo)
    weights = _compressed_tensors_weights(qc, where)
    return weights if kv_algo is None else _KVScalesFormat(weights, kv_algo)


# compressed-tensors kv_cache_scheme (type, num_bits) -> kiln's KV cache algorithm
KV_SCHEMES = {("float", 8): QuantAlgo.FP8, ("int", 8): QuantAlgo.INT8}


def _kv_cache_algo(scheme: dict | None, where: str) -> QuantAlgo | None:
    """kiln's KV cache algorithm for compressed-tensors' kv_cache_scheme: one static scale per layer for keys and
    one for values (`self_attn.k_scale`, `v_scale`), as kiln's cache holds them (kiln.quantization.kv_cache)."""
    if not scheme:
        return None
    algo = KV_SCHEMES.get((scheme.get("type"), scheme.get("num_bits")))
    if algo is None or scheme.get("strategy", "tensor") != "tensor" or scheme.get("dynamic") or \
            not scheme.get("symmetric", True):
        raise ConfigError(f"{where}: {scheme} cannot be imported; kiln's KV cache takes static, symmetric, per-tensor "
                          f"scales of 8-bit floats (FP8) or integers (INT8); convert without it and use "
                          f"`kiln quantize --kv-cache-quant-algo` instead")
    return algo


@dataclass(frozen=True)
class _KVScalesFormat:
    """A format (or None: float weights) plus the KV cache's per-layer scales, read from the attention module's
    `k_scale` and `v_scale` (beside its o_proj in the family's name map) into kiln's [s_k, s_v]."""

    weights: object | None
    kv_algo: QuantAlgo

    @property
    def quant_config(self) -> QuantConfig:
        base = self.weights.quant_config if self.weights is not None else QuantConfig()
        return dataclasses.replace(base, kv_cache_quant_algo=self.kv_algo)

    def name_map(self, base: NameMap, quantized_modules) -> NameMap:
        inner = self.weights.name_map(base, quantized_modules) if self.weights is not None else base
        return KVScalesNameMap(inner, base)


class KVScalesNameMap(NameMap):
    def __init__(self, inner: NameMap, base: NameMap):
        self.inner, self.base = inner, base

    def sources(self, kiln_name: str) -> tuple[Src, ...]:
        module, _, leaf = kiln_name.rpartition(".")
        if leaf != SCALE_NAME:
            return self.inner.sources(kiln_name)
        (dense,) = self.base.sources(module + ".dense.weight")
        attention = dense.name.rsplit(".", 2)[0]  # model.layers.{i}.self_attn.o_proj.weight -> ...self_attn
        return Src(attention + ".k_scale", _one), Src(attention + ".v_scale", _one)

    def load(self, kiln_name: str, source, config) -> torch.Tensor:
        if kiln_name.rpartition(".")[2] != SCALE_NAME:
            return self.inner.load(kiln_name, source, config)
        return NameMap.load(self, kiln_name, source, config)


def _one(scale: torch.Tensor, config) -> torch.Tensor:
    """A per-tensor scale stored as [] or [1] -> [1]."""
    return scale.float().reshape(1)


def _compressed_tensors_weights(qc: dict, where: str):
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ConfigError(f"{where}.config_groups holds {len(groups)} groups; this kiln imports one group that "
                          f"targets every Linear")
    (name, group), = groups.items()
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    if weights.get("type") == "int":
        return _WrappedFormat(hf_import.compressed_tensors_int_format(qc, where))
    if (weights.get("type"), weights.get("num_bits"), weights.get("strategy")) not in (
            ("float", 8, "tensor"), ("float", 8, "channel"), ("float", 8, "block")):
        raise ConfigError(f"{where}.config_groups.{name}.weights: this kiln imports float 8-bit weights with "
                          f"strategy 'tensor', 'channel' or 'block' (or integer weights), got {weights}")
    if not acts or acts.get("type") != "float" or acts.get("num_bits") != 8:
        raise ConfigError(f"{where}.config_groups.{name}.input_activations: this kiln imports float 8-bit "
                          f"activations (FP8 W8A8) only, got {acts}")
    if weights["strategy"] == "block":
        return _compressed_tensors_block(qc, name, weights, acts, where)
    kinds = {(False, "tensor"): QuantAlgo.FP8, (True, "token"): QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN}
    algo = kinds.get((bool(acts.get("dynamic")), acts.get("strategy")))
    if algo is None:
        raise ConfigError(f"{where}.config_groups.{name}.input_activations: strategy {acts.get('strategy')!r} with "
                          f"dynamic {acts.get('dynamic')!r} is not imported; this kiln reads static 'tensor' or "
                          f"dynamic 'token' activation scales")
    hf_import.check_ignored(qc.get("ignore") or [], where)
    return Fp8ImportFormat("compressed-tensors", QuantConfig(quant_algo=algo), "weight_scale", None)


# ---- the tensors ---------------------------------------------------------------------------------------

def block_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP8 [out, in] with one multiplier per [bo, bi] block (the last ones may be short) -> float32 [out, in]."""
    out, inp = q.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inp]
    return q.float() * s


class Fp8NameMap(NameMap):
    """A family's float name map, with each quantized linear's leaves read from the FP8 source's tensors."""

    def __init__(self, base: NameMap, fmt: Fp8ImportFormat, quantized_modules):
        self.base, self.fmt, self.quantized = base, fmt, set(quantized_modules)
        self._last: tuple[str, dict] | None = None  # one linear's leaves are read back to back

    def _hf_prefixes(self, module: str) -> list[str]:
        prefixes = []
        for src in self.base.sources(module + ".weight"):
            if src.transform is not None or not src.name.endswith(".weight"):
                raise CheckpointError(f"{src.name}: an FP8 checkpoint of this family needs a row transform of its "
                                      f"weights, which kiln does not implement")
            prefixes.append(src.name[: -len("weight")])
        return prefixes

    def sources(self, kiln_name: str) -> tuple[Src, ...]:
        module, _, leaf = kiln_name.rpartition(".")
        if module not in self.quantized or leaf not in LEAVES:
            return self.base.sources(kiln_name)
        leaves = {"weight": ("weight", self.fmt.scale_leaf), "weights_scaling_factor": ("weight", self.fmt.scale_leaf),
                  "activation_scaling_factor": ("input_scale",)}[leaf]
        return tuple(Src(p + source_leaf) for p in self._hf_prefixes(module) for source_leaf in leaves)

    def load(self, kiln_name: str, source, config) -> torch.Tensor:
        module, _, leaf = kiln_name.rpartition(".")
        if module not in self.quantized or leaf not in LEAVES:
            tensor = self.base.load(kiln_name, source, config)
            return self._dequantized(kiln_name, tensor, source) if tensor.dtype == FP8 else tensor
        if self._last is None or self._last[0] != module:
            self._last = (module, self._read_module(module, source, config))
        return self._last[1][leaf]

    def _read_module(self, module: str, source, config) -> dict[str, torch.Tensor]:
        """A quantized module's leaves: its sources' codes and row scales joined on the output dim (the fused QKV's
        one activation scale the largest of theirs); stacked experts' per expert, with scales [experts, out, 1], or
        [experts, out, groups] from blocks (kiln's FP8 experts are weight-only: the source's activation scales are
        not read)."""
        prefixes = self._hf_prefixes(module)
        if any("{e}" in prefix for prefix in prefixes):
            (prefix,) = prefixes
            parts = [self._read(prefix.replace("{e}", str(e)), source, config.torch_dtype)
                     for e in range(config.moe_num_experts)]
            scales = torch.stack([p["weights_scaling_factor"] for p in parts])
            return {"weight": torch.stack([p["weight"] for p in parts]),
                    "weights_scaling_factor": scales if scales.dim() == 3 else scales[..., None]}
        parts = [self._read(prefix, source, config.torch_dtype) for prefix in prefixes]
        return {k: torch.stack([p[k] for p in parts]).amax(0) if k == "activation_scaling_factor"
                else torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _dequantized(self, kiln_name: str, q: torch.Tensor, source) -> torch.Tensor:
        """A weight kiln holds in full precision (lm_head, unless quantized on kiln's side) that the source stores
        in FP8 all the same: its codes times its scale, in float32. Read as plain floats, codes would be off by
        that scale."""
        (src,) = self.base.sources(kiln_name)
        scale = source.get(src.name[: -len("weight")] + self.fmt.scale_leaf).float()
        if self.fmt.block is not None:
            return block_dequantize(q, scale, self.fmt.block)
        return q.float() * (scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(()))

    def _read(self, prefix: str, source, dtype) -> dict[str, torch.Tensor]:
        """One source linear's codes, row scales and (static) activation scale."""
        q, scale = source.get(prefix + "weight"), source.get(prefix + self.fmt.scale_leaf)
        if q.dtype != FP8:
            raise CheckpointError(f"{prefix}weight: is {q.dtype}, but the config's quantization_config declares "
                                  f"float8_e4m3fn weights")
        if self.fmt.quant_config.quant_algo is QuantAlgo.FP8_BLOCK_SCALES:  # each block's scale on its rows
            rows, cols = self.fmt.block
            if tuple(scale.shape) != (-(-q.shape[0] // rows), -(-q.shape[1] // cols)):
                raise CheckpointError(f"{prefix}{self.fmt.scale_leaf}: shape {tuple(scale.shape)} is not one scale "
                                      f"per [{rows}, {cols}] block of the {tuple(q.shape)} weight")
            row_scale = scale.float().repeat_interleave(rows, 0)[:q.shape[0]]
        elif self.fmt.block is not None:
            q, row_scale = quantize_fp8_weight(block_dequantize(q, scale, self.fmt.block), dtype, per_channel=True)
        else:
            row_scale = scale.float().reshape(-1).expand(q.shape[0]) if scale.numel() == 1 else scale.reshape(-1)
            if row_scale.numel() != q.shape[0]:
                raise CheckpointError(f"{prefix}{self.fmt.scale_leaf}: shape {tuple(scale.shape)} is neither one "
                                      f"scale nor one per output row ({q.shape[0]})")
        out = {"weight": q, "weights_scaling_factor": row_scale.to(dtype)}
        if self.fmt.static:
            out["activation_scaling_factor"] = source.get(prefix + "input_scale").float().reshape(1).to(dtype)
        return out
