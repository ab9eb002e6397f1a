"""Import of pre-quantized Hugging Face checkpoints (AutoAWQ GEMM, GPTQ) into kiln's W4A16 format with a zero point,
with no re-quantization: the int4 codes, zeros and scales are unpacked from the source's int32 packing, turned from
its [in, out] layout into kiln's [out, in], and repacked (kiln/quantization/weight_only.py describes kiln's layout).
Both formats dequantize as w = (q - z) * s with one scale and zero per group of `group_size` inputs, which is
kiln's W4A16 with `has_zero_point`; GPTQ's symmetric checkpoints carry their zero (8) like any other. A GPTQ
checkpoint with `lm_head: true` has lm_head packed the same way: it is imported quantized (exclude_modules
empty), from untied checkpoints only (kiln.models.base refuses a tied one).

- AWQ (AutoAWQ `version: "gemm"`): `qweight` int32 [in, out / 8], `qzeros` int32 [in / group, out / 8], `scales`
  [in / group, out]. Eight codes per int32 along the output dim, nibble i (bits 4i..4i+3) holding output column
  8c + AWQ_ORDER[i] (AutoAWQ's GEMM order, chosen for its kernel's dequantization).
- GPTQ (AutoGPTQ / GPTQModel, `desc_act: false`): `qweight` int32 [in / 8, out], eight codes along the input dim
  in plain order; `qzeros` int32 [in / group, out / 8] along the output dim in plain order; `scales` as AWQ. The
  original format (`checkpoint_format` "gptq", the default) stores each zero minus one, a historical quirk that
  GPTQModel's "gptq_v2" drops.
- GPTQ with `desc_act: true` (act-order): the same tensors, but input channel c belongs to group `g_idx[c]`, so
  a group's channels are scattered. Sorting the channels by group (a stable sort of g_idx) makes every group a
  run of `group_size` columns, which is kiln's layout exactly; the sort is kept as `input_permutation` and the
  model becomes W4A16_GPTQ (kiln/quantization/weight_only.py). Layers that share their input (q, k, v; gate
  and up) must share g_idx, as GPTQ's act-order gives them (it sorts by the same input statistics).

- compressed-tensors (llm-compressor) with integer weights, one config group for every Linear:
  - `pack-quantized` int4, strategy "group" (32, 64 or 128): `weight_packed` int32 [out, in / 8], eight codes along
    the input dim in plain order, each stored as q + 8 (q in [-8, 7]); `weight_scale` [out, in / group], already
    kiln's layout; asymmetric, `weight_zero_point` int32 [out / 8, in / group], packed the same way down the
    output dim. w = (q - zq) * s = (u - uz) * s in stored codes, so the codes are kiln's W4A16 as they are, with
    a zero point when the source has one (else kiln's symmetric zero, 8). `actorder: "group"` (older
    llm-compressor GPTQ) adds `weight_g_idx`, GPTQ's g_idx by another name, and imports as act-order GPTQ does.
  - int8, strategy "channel", symmetric, stored as int8 `weight` (`int-quantized`) or four to an int32 as q + 128
    (`pack-quantized`), `weight_scale` [out, 1]: W8A16 when activations stay in float, W8A8_SQ_PER_CHANNEL when
    they are int8 with a dynamic scale per token (llm-compressor's W8A8, SmoothQuant's smoothing already in
    the weights). kiln's W8A8 gives its row-parallel layers a prequant scale for the smoothing no norm absorbs;
    the source folded that into the weights too, so it imports as 1.

Scales are converted to the model dtype; they come in float16, so a float16 or float32 model keeps them exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kiln.checkpoint.name_map import NameMap, Src
from kiln.config import GROUP_SIZES, QuantAlgo, QuantConfig, exclusions
from kiln.errors import CheckpointError, ConfigError
from kiln.quantization.weight_only import pack_int4, unpack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ GEMM int32 holds column 8c + AWQ_ORDER[i]
PLAIN_ORDER = tuple(range(8))
GPTQ_FORMAT_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}
# compressed-tensors' actorder -> whether the checkpoint keeps its columns in act order (weight_g_idx); "static" and
# "dynamic" are the package's aliases of "weight" and "group"
CT_ACTORDERS = {None: False, "weight": False, "static": False, "group": True, "dynamic": True}


# ---- the math: pure functions of the source tensors ----------------------------------------------------

def unpack_int32(packed: torch.Tensor, order=PLAIN_ORDER) -> torch.Tensor:
    """int32 [..., n] -> int64 codes [..., 8n] in [0, 15]: nibble i of packed[..., c] is code 8c + order[i]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (packed.to(torch.int64)[..., None] >> shifts) & 0xF  # [..., n, 8], nibble i at index i
    codes = torch.empty_like(nibbles)
    codes[..., list(order)] = nibbles
    return codes.flatten(-2)


def awq_weight(qweight: torch.Tensor, config) -> torch.Tensor:
    """AWQ qweight [in, out / 8] -> kiln packed codes [out, in / 2]."""
    return pack_int4(unpack_int32(qweight, AWQ_ORDER).T.contiguous())


def awq_zeros(qzeros: torch.Tensor, config) -> torch.Tensor:
    """AWQ qzeros [groups, out / 8] -> kiln zero_point [out, groups]."""
    return unpack_int32(qzeros, AWQ_ORDER).T.contiguous().float()


def group_scales(scales: torch.Tensor, config) -> torch.Tensor:
    """scales [groups, out] (AWQ and GPTQ) -> kiln weights_scaling_factor [out, groups]."""
    return scales.T.contiguous()


def gptq_weight(qweight: torch.Tensor, config) -> torch.Tensor:
    """GPTQ qweight [in / 8, out] (packed along the input dim) -> kiln packed codes [out, in / 2]."""
    return pack_int4(unpack_int32(qweight.T.contiguous()).contiguous())


def gptq_zeros(offset: int) -> Callable:
    def convert(qzeros: torch.Tensor, config) -> torch.Tensor:
        """GPTQ qzeros [groups, out / 8] -> kiln zero_point [out, groups], undoing the format's offset."""
        return ((unpack_int32(qzeros) + offset) & 0xF).T.contiguous().float()
    return convert


def ct_int4_weight(packed: torch.Tensor, config) -> torch.Tensor:
    """compressed-tensors weight_packed int32 [out, in / 8] (codes q + 8 along the input dim) -> kiln packed codes."""
    return pack_int4(unpack_int32(packed))


def ct_int4_zeros(packed: torch.Tensor, config) -> torch.Tensor:
    """compressed-tensors weight_zero_point int32 [out / 8, groups] (zq + 8, packed down the output dim) -> kiln
    zero_point [out, groups]."""
    return unpack_int32(packed.T.contiguous()).T.contiguous().float()


def ct_int8_weight(packed: torch.Tensor, config) -> torch.Tensor:
    """compressed-tensors weight_packed int32 [out, in / 4] (bytes q + 128, little-endian) -> int8 q [out, in]."""
    shifts = torch.arange(0, 32, 8, dtype=torch.int64)
    return (((packed.to(torch.int64)[..., None] >> shifts) & 0xFF) - 128).flatten(-2).to(torch.int8)


def row_scales(scale: torch.Tensor, config) -> torch.Tensor:
    """A scale per output row as [out, 1] (compressed-tensors' channel strategy) -> [out]."""
    return scale.reshape(-1)


def unit_prequant(weight: torch.Tensor, config) -> torch.Tensor:
    """A prequant scale of 1 per input of this [out, in] weight: the source folded its smoothing into the weights."""
    return torch.ones(weight.shape[-1])


def act_order_permutation(g_idx: list[torch.Tensor], group: int, where: str) -> torch.Tensor:
    """The g_idx of layers sharing one input -> the permutation that sorts their channels into kiln's groups."""
    first = g_idx[0].to(torch.int64)
    if any(not torch.equal(first, g.to(torch.int64)) for g in g_idx[1:]):
        raise CheckpointError(f"{where}: layers that share their input have different g_idx, so one input "
                              f"order cannot serve them; kiln imports act-order checkpoints whose q/k/v and "
                              f"gate/up projections share g_idx (as GPTQ writes them)")
    perm = torch.sort(first, stable=True).indices
    if not torch.equal(first[perm], torch.arange(first.numel()) // group):
        raise CheckpointError(f"{where}: g_idx does not give every group exactly group_size ({group}) input "
                              f"channels, so its groups are not kiln's; this checkpoint cannot be imported exactly")
    return perm


# ---- reading a config.json's quantization_config -------------------------------------------------------

@dataclass(frozen=True)
class HFQuantFormat:
    """A pre-quantized source: the kiln QuantConfig it becomes and, per kiln leaf, (source leaf, converter)."""

    method: str
    quant_config: QuantConfig
    leaves: dict[str, tuple[str, Callable]]
    act_order: bool = False  # GPTQ desc_act: the weight's columns are sorted by g_idx


def hf_quant_format(hf: dict, path: str) -> HFQuantFormat | None:
    """The pre-quantized format a Hugging Face config.json declares; None for a float checkpoint."""
    qc = hf.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    where = f"{path}: quantization_config"
    if method not in ("awq", "gptq"):
        raise ConfigError(f"{where}.quant_method {method!r} cannot be imported; this kiln imports 'awq' (GEMM) "
                          f"and 'gptq' checkpoints; convert the float model and use `kiln quantize` instead")
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size"))
    if bits != 4:
        raise ConfigError(f"{where}.bits is {bits!r}; this kiln imports 4-bit {method.upper()} checkpoints only")
    if group not in GROUP_SIZES:
        raise ConfigError(f"{where}.group_size is {group!r}; kiln's W4A16 holds groups of 32, 64 or 128 inputs")
    # GPTQModel's `lm_head: true` packs lm_head like any other linear (AutoAWQ never quantizes it).
    exclude = exclusions(quantize_lm_head=method == "gptq" and bool(qc.get("lm_head")))
    quant_config = QuantConfig(quant_algo=QuantAlgo.W4A16, group_size=group, has_zero_point=True,
                               exclude_modules=exclude)
    scales = ("scales", group_scales)
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ConfigError(f"{where}.version is {version!r}; this kiln imports AutoAWQ's 'gemm' packing only")
        if qc.get("zero_point", True) is not True:
            raise ConfigError(f"{where}.zero_point is false; this kiln imports AWQ checkpoints with zero points")
        leaves = {"weight": ("qweight", awq_weight), "zero_point": ("qzeros", awq_zeros),
                  "weights_scaling_factor": scales}
        return HFQuantFormat(method, quant_config, leaves)
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in GPTQ_FORMAT_ZERO_OFFSET:
        raise ConfigError(f"{where}.checkpoint_format {fmt!r} is not one of {list(GPTQ_FORMAT_ZERO_OFFSET)}")
    leaves = {"weight": ("qweight", gptq_weight), "zero_point": ("qzeros", gptq_zeros(GPTQ_FORMAT_ZERO_OFFSET[fmt])),
              "weights_scaling_factor": scales}
    if not qc.get("desc_act"):
        return HFQuantFormat(method, quant_config, leaves)
    act_order = QuantConfig(quant_algo=QuantAlgo.W4A16_GPTQ, group_size=group, has_zero_point=True,
                            exclude_modules=exclude)
    return HFQuantFormat(method, act_order, {**leaves, "input_permutation": ("g_idx", None)}, act_order=True)


def compressed_tensors_int_format(qc: dict, where: str) -> HFQuantFormat:
    """The kiln format of a compressed-tensors checkpoint whose one config group has integer weights."""
    (name, group), = (qc.get("config_groups") or {}).items()
    at = f"{where}.config_groups.{name}"
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    packing = group.get("format") or qc.get("format")
    bits, strategy, symmetric = weights.get("num_bits"), weights.get("strategy"), weights.get("symmetric", True)
    check_ignored(qc.get("ignore") or [], where)
    if weights.get("dynamic"):
        raise ConfigError(f"{at}.weights.dynamic is true; kiln imports weights quantized ahead of time")
    if bits == 4 and strategy == "group" and packing == "pack-quantized" and acts is None:
        return _ct_int4_format(weights, at)
    if bits == 8 and strategy == "channel" and symmetric and packing in ("pack-quantized", "int-quantized"):
        weight = ("weight_packed", ct_int8_weight) if packing == "pack-quantized" else ("weight", None)
        leaves = {"weight": weight, "weights_scaling_factor": ("weight_scale", row_scales)}
        if acts is None:
            return HFQuantFormat("compressed-tensors", QuantConfig(quant_algo=QuantAlgo.W8A16), leaves)
        if (acts.get("type"), acts.get("num_bits"), acts.get("strategy"), bool(acts.get("dynamic")),
                acts.get("symmetric", True)) == ("int", 8, "token", True, True):
            leaves["prequant_scaling_factor"] = ("weight", unit_prequant)
            return HFQuantFormat("compressed-tensors", QuantConfig(quant_algo=QuantAlgo.W8A8_SQ_PER_CHANNEL), leaves)
    raise ConfigError(
        f"{at}: integer weights of {bits} bits, strategy {strategy!r}, symmetric {symmetric}, format {packing!r}, "
        f"input_activations {acts} cannot be imported; this kiln imports pack-quantized int4 by group (W4A16), int8 "
        f"by channel (W8A16), and int8 by channel with dynamic per-token int8 activations (W8A8); convert the float "
        f"model and use `kiln quantize` instead")


def _ct_int4_format(weights: dict, at: str) -> HFQuantFormat:
    group = weights.get("group_size")
    if group not in GROUP_SIZES:
        raise ConfigError(f"{at}.weights.group_size is {group!r}; kiln's W4A16 holds groups of 32, 64 or 128 inputs")
    zero = not weights.get("symmetric", True)
    leaves = {"weight": ("weight_packed", ct_int4_weight), "weights_scaling_factor": ("weight_scale", None)}
    if zero:
        leaves["zero_point"] = ("weight_zero_point", ct_int4_zeros)
    actorder = weights.get("actorder")
    if actorder not in CT_ACTORDERS:
        raise ConfigError(f"{at}.weights.actorder {actorder!r} is not one of {list(CT_ACTORDERS)}")
    if not CT_ACTORDERS[actorder]:  # "weight": GPTQ's order was used while quantizing, the columns stay in place
        return HFQuantFormat("compressed-tensors", QuantConfig(quant_algo=QuantAlgo.W4A16, group_size=group,
                                                               has_zero_point=zero), leaves)
    act_order = QuantConfig(quant_algo=QuantAlgo.W4A16_GPTQ, group_size=group, has_zero_point=zero)
    return HFQuantFormat("compressed-tensors", act_order, {**leaves, "input_permutation": ("weight_g_idx", None)},
                         act_order=True)


# Layers kiln never quantizes, which a source may list as ignored: lm_head (excluded by default) and a mixture of
# experts' routers (`mlp.gate`, Mixtral's `block_sparse_moe.gate`, Qwen2-MoE's `shared_expert_gate`), as names or
# compressed-tensors' "re:" patterns.
ALWAYS_FLOAT = re.compile(r"(^|\.|\*)(lm_head|(mlp|block_sparse_moe)\.gate|shared_expert_gate)\$?$")


def check_ignored(ignored: list, where: str) -> None:
    """kiln keeps lm_head and MoE routers in full precision; a source that left a decoder linear unquantized would
    need a per-layer exclude list mapped from HF names, which the importers do not do."""
    others = [m for m in ignored if not ALWAYS_FLOAT.search(m.replace("\\.", "."))]
    if others:
        raise ConfigError(f"{where}: layers kept unquantized {others[:4]} are not supported; this kiln imports "
                          f"checkpoints that quantize every decoder linear (lm_head excepted)")


def _per_expert(convert):
    """A leaf converter for stacked experts: NameMap.load stacks the source's per-expert tensors, so convert each
    expert's slice and stack again. Per-output scales ([out] an expert, W8A16) become [experts, out, 1], as
    kiln.quantization.weight_only.Int8ExpertMethod holds them."""
    def stacked(tensor: torch.Tensor, config) -> torch.Tensor:
        out = torch.stack([t if convert is None else convert(t, config) for t in tensor])
        return out[..., None] if out.dim() == 2 else out
    return stacked


class PrequantizedNameMap(NameMap):
    """A family's float name map, with each quantized linear's leaves read from the source's packed tensors.

    `<linear>.weight` maps to HF `<proj>.weight` in the float map; here its leaves map to `<proj>.qweight`,
    `<proj>.qzeros` and `<proj>.scales`, each converted to kiln's [out, ...] layout before the fused QKV's
    sources are concatenated on dim 0.
    """

    def __init__(self, base: NameMap, fmt: HFQuantFormat, quantized_modules):
        self.base, self.fmt, self.quantized = base, fmt, set(quantized_modules)

    def sources(self, kiln_name: str) -> tuple[Src, ...]:
        module, _, leaf = kiln_name.rpartition(".")
        if module not in self.quantized or leaf not in self.fmt.leaves:
            return self.base.sources(kiln_name)
        source_leaf, convert = self.fmt.leaves[leaf]
        out = []
        for src in self.base.sources(module + ".weight"):
            if src.transform is not None or not src.name.endswith(".weight"):
                raise CheckpointError(f"{src.name}: a {self.fmt.method.upper()} checkpoint of this family needs a "
                                      f"row transform of its packed weights, which kiln does not implement")
            name = src.name[: -len("weight")] + source_leaf
            out.append(Src(name, _per_expert(convert) if "{e}" in name else convert))
        return tuple(out)

    def load(self, kiln_name: str, source, config) -> torch.Tensor:
        """As NameMap.load; for act-order GPTQ the weight's columns are sorted into groups by the permutation
        of g_idx, which is itself the `input_permutation` leaf."""
        module, _, leaf = kiln_name.rpartition(".")
        if not (self.fmt.act_order and module in self.quantized and leaf in ("weight", "input_permutation")):
            return super().load(kiln_name, source, config)
        g_idx = [s.name for m in self._input_sharers(module) for s in self.sources(m + ".input_permutation")]
        perm = act_order_permutation([source.get(n) for n in g_idx], config.quantization.group_size,
                                     ", ".join(g_idx))
        if leaf == "input_permutation":
            return perm.to(torch.int32)
        return pack_int4(unpack_int4(super().load(kiln_name, source, config))[:, perm])

    def _input_sharers(self, module: str) -> list[str]:
        """`module` and the quantized modules the runtime feeds the same input (mlp.fc and mlp.gate, fused
        there into one matmul; QKV's q, k and v are one module already)."""
        parent, _, last = module.rpartition(".")
        sibling = {"fc": "gate", "gate": "fc"}.get(last)
        return [module] + ([f"{parent}.{sibling}"] if sibling and f"{parent}.{sibling}" in self.quantized else [])
