"""Reading MXFP4 checkpoints (OpenAI's gpt-oss release): experts stored as OCP microscaling FP4, read back as the
model dtype.

A packed parameter `<name>` is stored as `<name>_blocks`, uint8 [..., out, groups, 16] (32 e2m1 codes a group of
inputs, two a byte, the low nibble first), and `<name>_scales`, uint8 [..., out, groups] (E8M0: the group's scale
is 2^(s - 127)). e2m1 codes are the values {0, 0.5, 1, 1.5, 2, 3, 4, 6} and their negatives; each value times its
power of two is exact in bfloat16 and float32, so the float model this gives is the checkpoint's, bit for bit.
Kiln holds these experts in the model dtype (no MXFP4 kernels yet): 2 bytes a weight where the release spends
about half of one.
"""

from __future__ import annotations

import torch

from kiln.checkpoint.name_map import NameMap, Src
from kiln.config import QuantConfig

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


class Mxfp4Format:
    """quantization_config.quant_method "mxfp4": a float model (QuantConfig()) whose packed expert parameters the
    name map reads through dequantize_mxfp4."""

    quant_config = QuantConfig()

    def name_map(self, base: NameMap, quantized_modules) -> NameMap:
        return Mxfp4NameMap(base)


def _packed(name: str) -> bool:
    return name.rpartition(".")[2] in PACKED


class Mxfp4NameMap(NameMap):
    """A family's float name map whose packed sources are read from their blocks and scales, dequantized and
    transposed to the float checkpoint's layout ([experts, in, out], transformers' own), then through the family's
    transform as a float source would be. fc and gate both read gate_up_proj: the last one read is kept."""

    def __init__(self, base: NameMap):
        self.base = base
        self._last: tuple[str, torch.Tensor] | None = None

    def sources(self, kiln_name: str) -> tuple[Src, ...]:
        return tuple(part for s in self.base.sources(kiln_name)
                     for part in ((Src(s.name + "_blocks"), Src(s.name + "_scales")) if _packed(s.name) else (s,)))

    def load(self, kiln_name: str, source, config) -> torch.Tensor:
        sources = self.base.sources(kiln_name)
        if not any(_packed(s.name) for s in sources):
            return self.base.load(kiln_name, source, config)
        (src,) = sources
        if self._last is None or self._last[0] != src.name:
            values = dequantize_mxfp4(source.get(src.name + "_blocks"), source.get(src.name + "_scales"),
                                      config.torch_dtype)
            self._last = (src.name, values.transpose(1, 2))
        tensor = self._last[1]
        return src.transform(tensor, config) if src.transform else tensor
