"""Reading MXFP4 checkpoints (OpenAI's gpt-oss release): experts stored as OCP microscaling FP4, read back as the
model dtype.

A packed parameter `<name>` is stored as `<name>_blocks`, uint8 [..., out, groups, 16] (32 e2m1 codes a group of
inputs, two a byte, the low nibble first), and `<name>_scales`, uint8 [..., out, groups] (E8M0: the group's scale
is 2^(s - 127)). e2m1 codes are the values {0, 0.5, 1, 1.5, 2, 3, 4, 6} and their negatives; each value times its
power of two is exact in bfloat16 and float32, so the float model this gives is the checkpoint's, bit for bit,
at 2 bytes a weight where the release spends about half of one (kiln has no MXFP4 kernels yet).

With keep_quantization the experts stay codes: e2m1 values are exact in e4m3 too, and the group's power of two is
FP8_BLOCK_SCALES' scale at group 32, so they become that format's weight-only experts (1 byte a weight, still
exact); the other linears (attention) stay in the model dtype.
"""

from __future__ import annotations

import torch

from kiln.checkpoint.name_map import NameMap, Src
from kiln.config import QuantAlgo, QuantConfig
from kiln.quantization.fp8 import FP8

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# transformers' stacked expert parameters that an MXFP4 checkpoint packs (gpt-oss's)
PACKED = ("gate_up_proj", "down_proj")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., groups, 16] codes and [..., groups] exponents -> [..., groups x 32] values in `dtype`, one leading
    index (an expert) at a time to bound the float32 intermediates."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    out = torch.empty(*scales.shape[:-1], scales.shape[-1] * 32, dtype=dtype)
    for i in range(blocks.shape[0]):
        codes = torch.stack([blocks[i] & 0x0F, blocks[i] >> 4], dim=-1).flatten(-2).long()  # [..., groups, 32]
        values = lut[codes] * torch.exp2(scales[i].float() - 127)[..., None]
        out[i] = values.flatten(-2).to(dtype)
    return out


GROUP = 32  # inputs an MXFP4 scale covers
KEPT = QuantConfig(quant_algo=QuantAlgo.FP8_BLOCK_SCALES, group_size=GROUP, exclude_modules=("lm_head", "attention.*"))


class Mxfp4Format:
    """quantization_config.quant_method "mxfp4": a float model (QuantConfig()) whose packed expert parameters the
    name map reads through dequantize_mxfp4; with `keep`, FP8_BLOCK_SCALES experts (KEPT) of the same values."""

    def __init__(self, keep: bool = False):
        self.keep = keep
        self.quant_config = KEPT if keep else QuantConfig()

    def name_map(self, base: NameMap, quantized_modules) -> NameMap:
        return Mxfp4NameMap(base, self.keep)


def _packed(name: str) -> bool:
    return name.rpartition(".")[2] in PACKED


class Mxfp4NameMap(NameMap):
    """A family's float name map whose packed sources are read from their blocks and scales, dequantized and
    transposed to the float checkpoint's layout ([experts, in, out], transformers' own), then through the family's
    transform as a float source would be. fc and gate both read gate_up_proj: the last one read is kept. With
    `keep`, an expert's `weights_scaling_factor` is its groups' powers of two, through the same transform (on
    [experts, groups, out]), and its `weight` the e4m3 codes of the values over them."""

    def __init__(self, base: NameMap, keep: bool = False):
        self.base, self.keep = base, keep
        self._last: tuple[str, torch.Tensor, torch.Tensor] | None = None

    def _float_sources(self, kiln_name: str) -> tuple[Src, ...]:
        module, _, leaf = kiln_name.rpartition(".")
        return self.base.sources(module + ".weight" if leaf == "weights_scaling_factor" else kiln_name)

    def sources(self, kiln_name: str) -> tuple[Src, ...]:
        return tuple(part for s in self._float_sources(kiln_name)
                     for part in ((Src(s.name + "_blocks"), Src(s.name + "_scales")) if _packed(s.name) else (s,)))

    def load(self, kiln_name: str, source, config) -> torch.Tensor:
        sources = self._float_sources(kiln_name)
        if not any(_packed(s.name) for s in sources):
            return self.base.load(kiln_name, source, config)
        (src,) = sources
        if self._last is None or self._last[0] != src.name:
            blocks, exponents = source.get(src.name + "_blocks"), source.get(src.name + "_scales")
            # (kept: bfloat16 holds every value and its division by a power of two exactly, in half float32's bytes)
            values = dequantize_mxfp4(blocks, exponents, torch.bfloat16 if self.keep else config.torch_dtype)
            scales = torch.exp2(exponents.float() - 127)
            self._last = (src.name, values.transpose(1, 2), scales.transpose(1, 2))
        _, values, scales = self._last
        transform = src.transform or (lambda t, c: t)
        if not self.keep:
            return transform(values, config)
        group_scales = transform(scales, config)  # [experts, out, groups]
        if kiln_name.endswith(".weights_scaling_factor"):
            return group_scales.to(config.torch_dtype)
        steps = group_scales.to(values.dtype).repeat_interleave(GROUP, dim=-1)
        return (transform(values, config) / steps).to(FP8)
