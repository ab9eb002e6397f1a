"""GGUF's 4-bit block formats kept as kiln's W4A16 (`kiln convert --keep-quantization`): a linear stored in Q4_0,
Q4_1 or Q4_K becomes int4 codes with a scale and a zero point per group of 32 inputs, the file's own codes, instead
of being dequantized to floats. The model stays at its file's size, and GPUs run it on the int4 kernels.

Layouts (llama.cpp's ggml-common.h; each row of a weight is a run of blocks along the input dim):

- Q4_0, 32 weights a block: d (float16), then 16 bytes of codes, byte j holding weight j in its low nibble and
  weight j + 16 in its high one. w = (q - 8) d: kiln's symmetric grid with scale d.
- Q4_1: d and m (float16), codes as Q4_0. w = q d + m = (q - z) d with z = -m / d.
- Q4_K, 256 weights a super-block of 8 groups of 32: d and dmin (float16), 12 bytes of 6-bit group scales sc and
  mins mn (get_scale_min below), then 128 bytes of codes: bytes 32c..32c+31 hold weights 64c..64c+31 in their low
  nibbles and 64c+32..64c+63 in their high ones. Group i: w = q (d sc_i) - dmin mn_i = (q - z) s with s = d sc_i and
  z = dmin mn_i / s.

So z is a float, which kiln's int4 kernels take as it is (they compute s (sum u x - z sum x)). A group whose scale is
0 holds one value, -m (or -dmin mn): it becomes codes 0, scale 1 and zero m. Scales and zeros are stored in the
model dtype: a float32 model reproduces the file's weights within float32 rounding, a float16 one keeps the
float16 scales exactly and rounds z to float16.
"""

from __future__ import annotations

import numpy as np
import torch

from kiln.checkpoint.name_map import NameMap, Src
from kiln.config import QuantAlgo, QuantConfig
from kiln.errors import ConfigError
from kiln.quantization.methods import quantized_linears
from kiln.quantization.weight_only import pack_int4

GROUP = 32  # inputs per scale in every 4-bit GGUF format kept here
GGUF_INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # gguf.GGMLQuantizationType names
# What --dtype auto gives a kept model: the int4 kernels take 16-bit activations, and the files' scales are float16
# (Q4_0's and Q4_1's exactly; bfloat16 would round them, and costs more quality: docs/quantization.md).
KEPT_DTYPE = "float16"


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of each block [blocks, bytes], as float32 [blocks, 1]."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(codes: np.ndarray, run: int) -> np.ndarray:
    """Code bytes [blocks, k * run] -> [blocks, 2 * k * run] codes: each run of `run` bytes holds `run` weights in
    its low nibbles, then the next `run` in its high ones."""
    b = codes.reshape(codes.shape[0], -1, 1, run)
    return np.concatenate([b & 0x0F, b >> 4], axis=2).reshape(codes.shape[0], -1)


def get_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes [blocks, 12] -> its 8 group scales and 8 mins, 6 bits each: bytes 0-3 hold scales 0-3 in their
    low 6 bits, bytes 4-7 mins 0-3; scales and mins 4-7 take their low 4 bits from bytes 8-11 (scale low nibble,
    min high nibble) and their top 2 from the top 2 bits of bytes 0-3 (scales) and 4-7 (mins)."""
    lo_s, lo_m, hi = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([lo_s & 0x3F, (hi & 0x0F) | ((lo_s >> 6) << 4)], axis=1)
    mins = np.concatenate([lo_m & 0x3F, (hi >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _q4_0(blocks: np.ndarray):
    d = _f16(blocks, 0)
    return _nibbles(blocks[:, 2:], 16), d, np.full_like(d, 8.0), -8.0 * d


def _q4_1(blocks: np.ndarray):
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    return _nibbles(blocks[:, 4:], 16), d, None, m


def _q4_k(blocks: np.ndarray):
    sc, mn = get_scale_min(blocks[:, 4:16])
    return _nibbles(blocks[:, 16:], 32), _f16(blocks, 0) * sc, None, _f16(blocks, 2) * -mn


# type name -> (bytes a block, weights a block, blocks -> (codes [blocks, weights], scale [blocks, groups], zero
# [blocks, groups] or None, offset [blocks, groups]: the weight of code 0, -z s))
BLOCK_FORMATS = {"Q4_0": (18, 32, _q4_0), "Q4_1": (20, 32, _q4_1), "Q4_K": (144, 256, _q4_k)}


def int4_groups(raw: np.ndarray, type_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight's GGUF bytes [..., out, bytes a row] in a 4-bit format (stacked experts have a leading dim) ->
    (codes uint8 [..., out, in], scale float32 [..., out, in / 32], zero float32 [..., out, in / 32]) with
    w = (codes - zero) * scale."""
    size, _, unpack = BLOCK_FORMATS[type_name]
    rows = raw.shape[:-1]
    codes, scale, zero, offset = unpack(np.ascontiguousarray(raw).reshape(-1, size))
    codes, scale, offset = codes.reshape(-1, GROUP), scale.reshape(-1, 1), offset.reshape(-1, 1)  # a group a row
    empty = scale == 0  # one value, the offset: codes 0, scale 1, zero -offset
    if zero is None:
        zero = -offset / np.where(empty, 1.0, scale)
    zero = np.where(empty, -offset, zero.reshape(-1, 1))
    codes = np.where(empty, 0, codes)
    scale = np.where(empty, 1.0, scale)
    return (torch.from_numpy(codes.astype(np.uint8).reshape(*rows, -1)),
            torch.from_numpy(scale.astype(np.float32).reshape(*rows, -1)),
            torch.from_numpy(zero.astype(np.float32).reshape(*rows, -1)))


# ---- a model read from GGUF with its 4-bit linears kept ------------------------------------------------------

def keep_int4(cls, config, gguf, name_map: NameMap, dtype: str):
    """(config, name map) of `cls` read from `gguf` with every linear whose GGUF tensors are all in a 4-bit format
    kept as W4A16 (group 32, zero points); the others (lm_head, and a linear with any tensor in another type, e.g.
    Q4_K_M's Q6_K) stay in full precision, dequantized, and are named in exclude_modules. `dtype` "auto" becomes
    KEPT_DTYPE."""
    quant = QuantConfig(quant_algo=QuantAlgo.W4A16, group_size=GROUP, has_zero_point=True)
    candidates = quantized_linears(cls.empty(config.replace(quantization=quant)))
    types = {m: {gguf.type_name(s.name) for s in name_map.sources(m + ".weight")} for m in candidates}
    kept = [m for m in candidates if types[m] <= set(GGUF_INT4_TYPES)]
    if not kept:
        found = sorted(set().union(*types.values()))
        raise ConfigError(f"{gguf.path}: --keep-quantization keeps linears stored in {list(GGUF_INT4_TYPES)}, and "
                          f"this file's are {found}; convert it without --keep-quantization (dequantized)")
    excluded = tuple(m for m in candidates if m not in kept)
    quant = QuantConfig(quant_algo=QuantAlgo.W4A16, group_size=GROUP, has_zero_point=True,
                        exclude_modules=quant.exclude_modules + excluded)
    config = config.replace(quantization=quant, dtype=KEPT_DTYPE if dtype == "auto" else config.dtype)
    return config, Int4GGUFNameMap(name_map, kept)


class Int4GGUFNameMap(NameMap):
    """A family's GGUF name map with each kept linear's W4A16 leaves read from its 4-bit blocks (int4_groups), the
    source's row transform (llama's q/k rotary order) applied to codes, scales and zeros alike."""

    LEAVES = ("weight", "weights_scaling_factor", "zero_point")

    def __init__(self, base: NameMap, kept_modules):
        self.base, self.kept = base, set(kept_modules)
        self._last: tuple[str, dict] | None = None  # one linear's leaves are read back to back

    def sources(self, kiln_name: str) -> tuple[Src, ...]:
        module, _, leaf = kiln_name.rpartition(".")
        return self.base.sources(module + ".weight" if self._kept(module, leaf) else kiln_name)

    def load(self, kiln_name: str, source, config) -> torch.Tensor:
        module, _, leaf = kiln_name.rpartition(".")
        if not self._kept(module, leaf):
            return self.base.load(kiln_name, source, config)
        if self._last is None or self._last[0] != module:
            self._last = (module, self._read(module, source, config))
        return self._last[1][leaf]

    def _kept(self, module: str, leaf: str) -> bool:
        return module in self.kept and leaf in self.LEAVES

    def _read(self, module: str, source, config) -> dict[str, torch.Tensor]:
        parts = {leaf: [] for leaf in self.LEAVES}
        for src in self.base.sources(module + ".weight"):
            codes, scale, zero = int4_groups(source.raw(src.name), source.type_name(src.name))
            for leaf, t in zip(self.LEAVES, (codes, scale, zero)):
                parts[leaf].append(src.transform(t, config) if src.transform else t)
        out = {leaf: torch.cat(ts) for leaf, ts in parts.items()}
        out["weight"] = pack_int4(out["weight"])
        return out
