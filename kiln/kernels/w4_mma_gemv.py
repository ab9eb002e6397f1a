"""The int4 GEMV on the tensor cores: y [rows, N] = x [rows, K] @ dequantize_int4(codes, scale, zero)^T for 1-2 rows
of x and group-128 codes, in the packed layout every int4 kernel reads (no repack).

Why: the CUDA-core GEMV (quant_gemm._w4_gemv_kernel) spends an AND and an FMA on every weight, plus x's share,
3.1-4.4 instructions a weight in its sm_90 loop, and streams int4 at about 56-60% of an H200's bandwidth. Here a
warp turns 16 output rows x 16 columns into one mma.m16n8k16: each lane unpacks its 8 codes to 16-bit pairs
with a prmt, a shift and lop3s (the magic-number trick of quant_gemm._dequant_nibbles), subtracts the zero
point exactly, and the tensor core does the 256 multiply-adds in float32. About 2 instructions a weight.

Which lane holds what (PTX ISA, mma.m16n8k16 with 16-bit A and B; g = lane // 4, t = lane % 4):
- A, the weights [16 rows, 16 k slots]: a0 = (row g, slots 2t, 2t+1), a1 = (row g + 8, same), a2 = (row g,
  slots 2t + 8, 2t + 9), a3 = (row g + 8, same).
- B, x [16 k slots, 8 columns]: b0 = (slots 2t, 2t+1, column g), b1 = (slots 2t + 8, 2t + 9, column g).
- C and D [16 rows, 8 columns] in float32: c0, c1 = (row g, columns 2t, 2t + 1), c2, c3 = (row g + 8, same).
The sum over k does not care which slot holds which column of x, as long as A and B agree. Lane t takes the
columns 32t .. 32t + 31 of each group of 128: its 4 code words of row g, and of row g + 8, one 16-byte load each.
Step s (0..7) of the group uses half-word s % 2 of word s // 2: columns c .. c + 3 with c = 32t + 4s, codes
n0..n3 in one 16-bit half. prmt puts its two bytes in the two 16-bit halves, so the nibble pairs come out as
(n0, n2) and (n1, n3): slots 2t, 2t+1 hold columns c, c + 2 and slots 2t + 8, 2t + 9 columns c + 1, c + 3, and x's
pairs are shuffled to match by two more prmts. Column g of B is x's row g % rows, so with one row every column of
D is y, and with two rows c0 and c2 are row 0's y, c1 and c3 row 1's.

The mapping only holds if Triton gives the inline assembly's operands the lanes above: a blocked layout with
threads [.., 8, 4, 1] (lane = 4 g + t) and the last dimension in registers. `mma_layout_ok` reads the compiled
kernel's layout and the GPU tests assert it.
"""

from __future__ import annotations

import re

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

from kiln.kernels.pdl import pdl_args
from kiln.quantization.weight_only import INT4_SYMMETRIC_ZERO

if triton is not None:
    from kiln.kernels.activation import silu_times
    from kiln.kernels.pdl import allow_dependents, wait_for_inputs

GROUP = 128  # the only group size this kernel takes: a lane's 32 columns of a group are one 16-byte load
# (warps, groups a warp loads at once) of the kernel; the warps of a program split K (group i goes to warp
# i % warps), so a 4096-output GEMV still has 8 warps an SM in flight.
W4_MMA_TILES = (("mma", 8, 1), ("mma", 4, 1), ("mma", 8, 2), ("mma", 4, 2))


def mma_gemv_takes(n_rows_of_w: int, k: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether the tensor-core GEMV runs these codes: group 128, whole 16-row tiles, 16-bit x."""
    return (group_size == GROUP and k % GROUP == 0 and n_rows_of_w % 16 == 0 and n_rows_of_w * k < 2**34
            and dtype in (torch.float16, torch.bfloat16))  # (int32 word offsets)


def run_w4_mma_gemv(rows: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    y: torch.Tensor, tile: tuple, gated: bool = False):
    """y = rows @ W^T (or silu(fc) * gate of W's two halves with `gated`) by _w4_mma_gemv_kernel; `tile` one of
    W4_MMA_TILES. rows [1-2, K] 16-bit; words the codes as int32 [N, K / 8]. Returns the compiled kernel (its
    layout is checked by mma_layout_ok in the GPU tests)."""
    _, warps, groups_at_once = tile
    n = y.shape[1]
    pairs = rows.contiguous().view(torch.int32)  # x's columns in pairs, as the B fragment holds them
    return _w4_mma_gemv_kernel[(n // 16, 1, 1)](
        pairs, words, scale, zero if zero is not None else scale, y, n, K=rows.shape[1], stride_xm=pairs.stride(0),
        ROWS=rows.shape[0], HAS_ZERO=zero is not None, GATED=gated, BF16=rows.dtype == torch.bfloat16,
        WARPS=warps, AT_ONCE=groups_at_once, num_warps=warps, **pdl_args(rows.device))


def mma_layout_ok(compiled_ttgir: str) -> bool:
    """Whether the compiled kernel (its TTGIR) gives the mma's inline assembly the lanes the fragments assume."""
    asm_layouts = re.findall(r"tt\.elementwise_inline_asm.*?-> tensor<[^,]+, (#\w+)>", compiled_ttgir)
    for name in set(asm_layouts):
        layout = re.search(rf"^{name} = #ttg\.blocked<\{{(.*)\}}>", compiled_ttgir, re.M)
        if layout is None or "sizePerThread = [1, 1, 4]" not in layout.group(1) \
                or "threadsPerWarp = [8, 1, 4]" not in layout.group(1) or "order = [2, 0, 1]" not in layout.group(1):
            return False
    return bool(asm_layouts)


if triton is not None:
    SYMMETRIC_ZERO = tl.constexpr(INT4_SYMMETRIC_ZERO)

    # One group of 128 columns for one lane: 8 mma.m16n8k16 steps (see the module docstring), then
    # acc += scale * sum. Operands, 4 registers each (pack=4): $0-$3 the new acc (c0..c3); $4-$7 row g's code
    # words; $8-$11 row g + 8's; $12-$27 x's pairs, word i's four at $12 + 4i ..; $28-$31 the scales of c0..c3
    # (row g, g, g + 8, g + 8); $32 and $34 MAGIC + zero of rows g and g + 8 in both 16-bit halves; $36-$39 acc.
    # MAGIC + u (u < 16) is exact in 16 bits (2^7 for bf16, 2^10 for fp16), minus MAGIC + z is u - z, exact.
    def _group_asm(magic: str, t: str) -> str:
        lines = ["{", ".reg .b32 w, v, p0, p1, q0, q1, a0, a1, a2, a3, b0, b1;",
                 ".reg .f32 d0, d1, d2, d3;",
                 "mov.f32 d0, 0f00000000;", "mov.f32 d1, 0f00000000;", "mov.f32 d2, 0f00000000;",
                 "mov.f32 d3, 0f00000000;"]
        for step in range(8):
            word, half = step // 2, step % 2
            select = "0x4342" if half else "0x4140"  # the half-word's two bytes, one in each 16-bit half
            x_lo, x_hi = 12 + 4 * word + 2 * half, 12 + 4 * word + 2 * half + 1
            lines += [
                f"prmt.b32 w, ${4 + word}, 0, {select};",
                f"prmt.b32 v, ${8 + word}, 0, {select};",
                "shr.b32 p1, w, 4;",
                "shr.b32 q1, v, 4;",
                f"lop3.b32 p0, w, 0x000F000F, {magic}, 0xEA;",
                f"lop3.b32 p1, p1, 0x000F000F, {magic}, 0xEA;",
                f"lop3.b32 q0, v, 0x000F000F, {magic}, 0xEA;",
                f"lop3.b32 q1, q1, 0x000F000F, {magic}, 0xEA;",
                f"sub.rn.{t}x2 a0, p0, $32;",  # (n0, n2) of row g: slots 2t, 2t + 1
                f"sub.rn.{t}x2 a1, q0, $34;",  # row g + 8
                f"sub.rn.{t}x2 a2, p1, $32;",  # (n1, n3): slots 2t + 8, 2t + 9
                f"sub.rn.{t}x2 a3, q1, $34;",
                f"prmt.b32 b0, ${x_lo}, ${x_hi}, 0x5410;",  # (x[c], x[c + 2])
                f"prmt.b32 b1, ${x_lo}, ${x_hi}, 0x7632;",  # (x[c + 1], x[c + 3])
                f"mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32 {{d0, d1, d2, d3}}, {{a0, a1, a2, a3}}, "
                "{b0, b1}, {d0, d1, d2, d3};",
            ]
        lines += [f"fma.rn.f32 ${i}, ${28 + i}, d{i}, ${36 + i};" for i in range(4)]
        return "\n".join(lines + ["}"])

    _BF16_GROUP = tl.constexpr(_group_asm("0x43004300", "bf16"))
    _F16_GROUP = tl.constexpr(_group_asm("0x64006400", "f16"))
    _GROUP_CONSTRAINTS = tl.constexpr(",".join(["=f"] * 4 + ["r"] * 24 + ["f"] * 4 + ["r"] * 4 + ["f"] * 4))

    @triton.jit
    def _group_mma(w, v, x0, x1, x2, x3, s, zz, acc, BF16: tl.constexpr):
        """acc + the group's sums (_group_asm), every operand [8, WARPS, 16] in the fragment layout."""
        if BF16:
            out = tl.inline_asm_elementwise(_BF16_GROUP, _GROUP_CONSTRAINTS, [w, v, x0, x1, x2, x3, s, zz, acc],
                                            dtype=tl.float32, is_pure=True, pack=4)
        else:
            out = tl.inline_asm_elementwise(_F16_GROUP, _GROUP_CONSTRAINTS, [w, v, x0, x1, x2, x3, s, zz, acc],
                                            dtype=tl.float32, is_pure=True, pack=4)
        return out

    @triton.jit
    def _lane_operands(w_ptr, s_ptr, z_ptr, group, rows_g, j, KW: tl.constexpr, G: tl.constexpr,
                       HAS_ZERO: tl.constexpr, BF16: tl.constexpr):
        """One group's codes of rows g and g + 8 (int32 words, [8, WARPS, 16]: lane t's 4 words at j = 4t ..
        4t + 3), and the scales and MAGIC + zero of c0..c3 (rows g, g, g + 8, g + 8) at the same places, for the
        warps' groups `group` [1, WARPS, 1]."""
        # The 16 words of a row's group are one contiguous run along the last dimension: Triton gives each
        # thread 4 of them (one 16-byte load) and the run's 4 quarters to 4 lanes (t), then g to the next 8.
        w = tl.load(w_ptr + rows_g * KW + group * 16 + j)
        v = tl.load(w_ptr + (rows_g + 8) * KW + group * 16 + j)
        # Scales and zeros of rows g and g + 8, each loaded once a lane and spread to c0..c3 in registers.
        s_g = tl.load(s_ptr + rows_g * G + group).to(tl.float32)
        s_g8 = tl.load(s_ptr + (rows_g + 8) * G + group).to(tl.float32)
        if HAS_ZERO:
            z_g = tl.load(z_ptr + rows_g * G + group).to(tl.float32)
            z_g8 = tl.load(z_ptr + (rows_g + 8) * G + group).to(tl.float32)
        else:
            z_g = tl.full(s_g.shape, SYMMETRIC_ZERO, tl.float32)
            z_g8 = z_g
        upper = (j % 4) >= 2  # c2, c3: row g + 8
        s = tl.where(upper, s_g8, s_g)
        z = tl.where(upper, z_g8, z_g)
        if BF16:
            half = (z + 128.0).to(tl.bfloat16).to(tl.int16, bitcast=True)
        else:
            half = (z + 1024.0).to(tl.float16).to(tl.int16, bitcast=True)
        bits = half.to(tl.int32) & 0xFFFF
        return w, v, s, bits | (bits << 16)

    @triton.jit
    def _lane_x(x_ptr, group, x_row, j, stride_xm):
        """x's pairs of the group for each lane's columns: word i's four pairs [8, WARPS, 16] for i = 0..3 (lane
        t's columns are 32t .. 32t + 31 of the group, its word i's 8w .. 8w + 7 of those)."""
        base = x_ptr + x_row * stride_xm + group * 64 + (j // 4) * 16 + j % 4
        return tl.load(base), tl.load(base + 4), tl.load(base + 8), tl.load(base + 12)

    @triton.jit
    def _mma_row_sums(x_ptr, w_ptr, s_ptr, z_ptr, n0, gap, stride_xm, PAIRED: tl.constexpr, K: tl.constexpr,
                      ROWS: tl.constexpr, HAS_ZERO: tl.constexpr, BF16: tl.constexpr, WARPS: tl.constexpr,
                      AT_ONCE: tl.constexpr, USE_PDL: tl.constexpr):
        """The sums of the 16 rows from n0 (and with PAIRED of the 16 from n0 + gap), [8, 16] each in the C
        fragment's order: [g, 4t + c] is row n0 + g + 8 (c // 2), x row c % 2 (of ROWS)."""
        KW: tl.constexpr = K // 8
        G: tl.constexpr = K // 128
        g = tl.arange(0, 8)[:, None, None]
        warp = tl.arange(0, WARPS)[None, :, None]
        j = tl.arange(0, 16)[None, None, :]
        x_row = g % ROWS
        rows_g = n0 + g
        acc = tl.zeros([8, WARPS, 16], tl.float32)
        acc_paired = acc
        # The first groups' codes are requested before the wait for x (kiln.kernels.pdl).
        group = tl.minimum(warp, G - 1)
        w, v, s, zz = _lane_operands(w_ptr, s_ptr, z_ptr, group, rows_g, j, KW, G, HAS_ZERO, BF16)
        if PAIRED:
            wp, vp, sp, zzp = _lane_operands(w_ptr, s_ptr, z_ptr, group, rows_g + gap, j, KW, G, HAS_ZERO, BF16)
        wait_for_inputs(USE_PDL)
        for first in range(0, G, WARPS * AT_ONCE):
            for i in tl.static_range(AT_ONCE):
                group = first + i * WARPS + warp
                live = group < G
                group = tl.minimum(group, G - 1)  # a warp past the end re-reads the last group, adds nothing
                if first > 0 or i > 0:
                    w, v, s, zz = _lane_operands(w_ptr, s_ptr, z_ptr, group, rows_g, j, KW, G, HAS_ZERO, BF16)
                    if PAIRED:
                        wp, vp, sp, zzp = _lane_operands(w_ptr, s_ptr, z_ptr, group, rows_g + gap, j, KW, G,
                                                         HAS_ZERO, BF16)
                x0, x1, x2, x3 = _lane_x(x_ptr, group, x_row, j, stride_xm)
                acc = _group_mma(w, v, x0, x1, x2, x3, tl.where(live, s, 0.0), zz, acc, BF16)
                if PAIRED:
                    acc_paired = _group_mma(wp, vp, x0, x1, x2, x3, tl.where(live, sp, 0.0), zzp, acc_paired, BF16)
        y = tl.sum(acc, axis=1)
        y_paired = y
        if PAIRED:
            y_paired = tl.sum(acc_paired, axis=1)
        return y, y_paired

    @triton.jit
    def _w4_mma_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K: tl.constexpr, stride_xm, ROWS: tl.constexpr,
                            HAS_ZERO: tl.constexpr, GATED: tl.constexpr, BF16: tl.constexpr, WARPS: tl.constexpr,
                            AT_ONCE: tl.constexpr, USE_PDL: tl.constexpr):
        """y [ROWS, N] = x @ W^T, 16 outputs a program, the program's warps splitting K. GATED: W's rows are
        [fc; gate] (2N) and y = silu(fc) * gate, the gate rows N further on summed by the same lanes."""
        allow_dependents(USE_PDL)
        n0 = tl.program_id(0) * 16
        y, y_gate = _mma_row_sums(x_ptr, w_ptr, s_ptr, z_ptr, n0, N, stride_xm, GATED, K, ROWS, HAS_ZERO, BF16,
                                  WARPS, AT_ONCE, USE_PDL)
        y = y.to(y_ptr.dtype.element_ty)  # as F.linear rounds its output
        if GATED:
            y = silu_times(y, y_gate.to(y_ptr.dtype.element_ty))
        g = tl.arange(0, 8)[:, None]
        j = tl.arange(0, 16)[None, :]
        c = j % 4
        out = y_ptr + (c % 2) * N + n0 + g + 8 * (c // 2)
        tl.store(out, y, mask=(j < 4) & (c % 2 < ROWS))  # lane t = 0 of each g stores
