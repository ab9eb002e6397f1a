"""The input a quantized linear wants, described once, so the kernel before the linear can write it.

A linear whose GEMM reads quantized activations (the FP8 formats, SmoothQuant, W4A8_AWQ) quantizes its input in a
pass of its own: one read of x, one write of codes and scales. Where the kernel that computes x (RMSNorm,
SiLU-and-mul, decode attention's merge) writes the codes itself, that pass goes away and no bit changes.
`InputQuant` is the one description of that input: the linear's method gives it (LinearMethod.input_quant), the
layers keep it (`out_quant`, set once when the engine loads: kiln.models.base.DecoderLayer.fuse_input_quantization)
and hand it to their kernel, and `InputQuant.quantize` is the torch reference every such kernel matches.

Kinds, by what gets written:
- FP8_STATIC: e4m3 codes over FP8's calibrated per-tensor scale, `scale` [1] (Fp8Rows, the scale on every row).
- FP8_ROWS: e4m3 codes with a scale per token (FP8_PER_CHANNEL_PER_TOKEN; Fp8Rows).
- FP8_GROUPS: e4m3 codes with a scale per token and group of `group` inputs (FP8_BLOCK_SCALES; Fp8Rows).
- INT8_ROWS: int8 codes with a scale per token (SmoothQuant; Int8Rows).
`prequant` [in], where given, multiplies the input first: the scale of a linear that follows no norm to fold its
smoothing into (SmoothQuant's with INT8_ROWS, AWQ's with W4A8_AWQ's FP8_STATIC).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.kernels.fp8_quant import Fp8Rows, quantize_activation, quantize_activation_groups
from kiln.kernels.int8_gemm import Int8Rows, quantize_int8_activation

FP8_STATIC, FP8_ROWS, FP8_GROUPS, INT8_ROWS = "fp8_static", "fp8_rows", "fp8_groups", "int8_rows"

# kind -> (code dtype, rows type, the torch pass the linear would run on x [M, K] itself)
KINDS = {
    FP8_STATIC: (torch.float8_e4m3fn, Fp8Rows, lambda spec, x: quantize_activation(spec.premultiplied(x), spec.scale)),
    FP8_ROWS: (torch.float8_e4m3fn, Fp8Rows, lambda spec, x: quantize_activation(spec.premultiplied(x))),
    FP8_GROUPS: (torch.float8_e4m3fn, Fp8Rows,
                 lambda spec, x: quantize_activation_groups(spec.premultiplied(x), spec.group)),
    # (the int8 pass multiplies as it reads: the same rounding, one launch)
    INT8_ROWS: (torch.int8, Int8Rows, lambda spec, x: Int8Rows(*quantize_int8_activation(x, spec.prequant))),
}
WHOLE_ROW = (FP8_ROWS, INT8_ROWS)  # a scale per token: the program that writes a row needs all of it (its max)


@dataclass(frozen=True, eq=False)
class InputQuant:
    kind: str
    scale: torch.Tensor | None = None  # FP8_STATIC: the static scale [1]
    group: int = 0  # FP8_GROUPS: inputs per scale
    prequant: torch.Tensor | None = None  # the input's multiplier [in] (SmoothQuant's, AWQ's), if any

    def quantize(self, x: torch.Tensor) -> Fp8Rows | Int8Rows:
        """x [M, K] quantized as the linear's own pass would: the reference for the kernels that write it."""
        return KINDS[self.kind][2](self, x)

    def premultiplied(self, x: torch.Tensor) -> torch.Tensor:
        """x times the prequant scale in x's dtype (rounded as the kernels round it), or x."""
        return x if self.prequant is None else x * self.prequant

    def empty(self, rows: int, k: int, device: torch.device) -> Fp8Rows | Int8Rows:
        """Unwritten codes [rows, k] and scales [rows, scales a row], for a kernel to fill."""
        codes, rows_type, _ = KINDS[self.kind]
        scales = -(-k // self.group) if self.kind == FP8_GROUPS else 1
        return rows_type(torch.empty(rows, k, dtype=codes, device=device),
                         torch.empty(rows, scales, dtype=torch.float32, device=device))

    def kernel_flags(self, block: int) -> dict:
        """The constexprs of the kernels that write it (RMSNorm, SiLU-and-mul; the merge kernel takes the FP8 two),
        for a program of `block` inputs. A scale per token is one group as wide as the program, which then holds
        the whole row (WHOLE_ROW)."""
        group = {FP8_GROUPS: self.group, FP8_ROWS: block}.get(self.kind, 0)
        return dict(FP8_OUT=self.kind == FP8_STATIC, INT8_OUT=self.kind == INT8_ROWS, FP8_GROUP=group)


NO_QUANT_FLAGS = dict(FP8_OUT=False, INT8_OUT=False, FP8_GROUP=0)  # the kernels' flags for a 16-bit output
