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

Scales are converted to the model dtype; they come in float16, so a float16 or float32 model keeps them exactly.
"""

from __future__ import annotations

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
            out.append(Src(src.name[: -len("weight")] + source_leaf, convert))
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
