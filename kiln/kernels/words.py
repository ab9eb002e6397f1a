"""Pieces of the GEMVs that read their weights as int64 words of codes (8 int8 or e4m3 codes, or 16 int4 ones):
each thread holds one word of each of its outputs and the columns of x that word multiplies, as [B, 8] tiles
split here into columns, so no value crosses threads until the final sum (kiln.kernels.quant_gemm's int4 and
int8 GEMVs, kiln.kernels.gemv's e4m3 one, kiln.kernels.moe's int4 and int8 GEMVs a (token, expert) pair). The int4
and int8 GEMVs' sums (`w4_row_sums`, `w8_row_sums`) are here whole: the dense and the MoE kernels call them on their
own rows. The e4m3 GEMV's (kiln.kernels.gemv.fp8_word_row_sums) runs the int8 one's loop (`byte_word_steps`) with
its own products and scales. The int4 sums are integer dot products: x rounded to 16-bit fixed point a word,
two codes an instruction by dp2a (`_word_int_sums`; float products of codes read as subnormals, an AND and an FMA
a weight, measured 6.9% slower at batch-1 decode on an H100 and removed in the forty-eighth session)."""

import os

INT4_SYMMETRIC_ZERO = 8  # int4 codes' zero point where a format has none (kiln.quantization.weight_only's formats)


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

if triton is not None:
    from kiln.kernels.pdl import wait_for_inputs

    SYMMETRIC_ZERO = tl.constexpr(INT4_SYMMETRIC_ZERO)
    # The int8 word GEMV keeps its sums at 2^-SHIFT_EXP of their value (w8_row_sums): x scaled by up to 2^80 stays
    # finite for |x| < 2^48, and a product u x 2^-69 stays a normal float for |u x| > 2^-57.
    SHIFT_EXP = tl.constexpr(69)
    BYTE_SIGNS = tl.constexpr(-0x7F7F7F80)  # 0x80808080 as an int32: the sign bit of each byte
    # The integer dot products' x (_x_fixed_point): the float32 bits of 1.5 x 2^23 + v are ROUNDING_BITS + v for
    # every integer |v| < 2^22, so one FMA rounds x 2^P to an integer in the low bits.
    ROUNDING_MAGIC = tl.constexpr(12582912.0)
    ROUNDING_BITS = tl.constexpr(0x4B400000)
    SIXTEEN_ROUNDING_BITS = tl.constexpr(-0x4C000000)  # 16 ROUNDING_BITS modulo 2^32, as an int32
    # Triton's interpreter (TRITON_INTERPRET=1, the kernel checks on a CPU) cannot run inline PTX: under it the
    # dot products take the same integer arithmetic in plain Triton (_word_int_dot_plain).
    INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

    @triton.jit
    def sum8(xs):
        """The sum of split8's 8 columns."""
        return ((xs[0] + xs[1]) + (xs[2] + xs[3])) + ((xs[4] + xs[5]) + (xs[6] + xs[7]))

    @triton.jit
    def split8(x):
        """[B, 8] -> its 8 columns, each [B] (three halvings of the last dim: j = 4 a + 2 b + c)."""
        c0, c1 = tl.split(tl.reshape(x, [x.shape[0], 2, 2, 2]))  # by c
        c00, c01 = tl.split(c0)  # by b
        c10, c11 = tl.split(c1)
        x0, x4 = tl.split(c00)  # by a
        x2, x6 = tl.split(c01)
        x1, x5 = tl.split(c10)
        x3, x7 = tl.split(c11)
        return x0, x1, x2, x3, x4, x5, x6, x7

    @triton.jit
    def load_step(p, ok, EVEN_K: tl.constexpr):
        """A GEMV step's values at p, 0 past the row's end (where ok is False); no mask when steps are whole."""
        if EVEN_K:
            v = tl.load(p)
        else:
            v = tl.load(p, mask=ok, other=0)
        return v

    @triton.jit
    def step_words(w_row, k0, first, outs, KW: tl.constexpr, EVEN_K: tl.constexpr):
        """A word GEMV's step of codes: words k0 + first [B] of rows outs [N] from w_row (KW words a row), one word
        a thread and row, 0 past a row's end. The address is the step's scalar base, plus the thread's word, plus
        the row's constant offset, added in that order so the last becomes the load's immediate offset."""
        return load_step(w_row + k0 + first[:, None] + (outs * KW)[None, :], (k0 + first < KW)[:, None], EVEN_K)

    @triton.jit
    def gemv_program(N, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr):
        """(x's row m, the first output n0, the outputs from n0) of a word GEMV's program (m, j, 0). Outputs past the
        end read the last one instead (not stored), so no load needs a row mask."""
        m = tl.program_id(0).to(tl.int64)
        n0 = tl.program_id(1) * BLOCK_N
        outs = tl.arange(0, BLOCK_N)
        if not EVEN_N:
            outs = tl.minimum(outs, N - 1 - n0)
        return m, n0, outs

    @triton.jit
    def _step_weights(w_row, s_row, z_row, k0, first, outs, G: tl.constexpr, KW: tl.constexpr, WPG: tl.constexpr,
                      HAS_ZERO: tl.constexpr, EVEN_K: tl.constexpr):
        """The int4 GEMV's codes (step_words), scales and zeros (float32; the symmetric zero without zero points)
        of the step at word k0 for rows outs (G groups a row), each address added as step_words adds its own."""
        ok = (k0 + first < KW)[:, None]
        w = step_words(w_row, k0, first, outs, KW, EVEN_K)
        group = (first // WPG)[:, None]
        s = load_step(s_row + k0 // WPG + group + (outs * G)[None, :], ok, EVEN_K).to(tl.float32)
        if HAS_ZERO:
            z = load_step(z_row + k0 // WPG + group + (outs * G)[None, :], ok, EVEN_K).to(tl.float32)
        else:
            z = tl.full(s.shape, SYMMETRIC_ZERO, tl.float32)
        return w, s, z

    @triton.jit
    def _x_fixed_point(xs_low, xs_high):
        """x's 16 columns that a thread's words multiply (split8's columns of each half, float32 [B] each) as
        integers v = round(x 2^P), P a row's own, the largest power of two that keeps |v| <= 2^14: (the pairs of v
        that the dot products take from the low halves of the words and from the high ones, each 4 int32 [B] of two
        int16 (_int16_pairs), 16 sum_j v_j as float32 [B], exactly, and 2^-P / 16, float32 [B]: _word_int_dot's
        sums are 16 times the dot product). A row's error is at most 2^-15 of its largest |x|: 16-bit inputs'
        largest values are exact."""
        # (Column by column: a reduction over the [B, 16] tile's columns moved x between threads through shared
        # memory.) The exponent field e of the row's largest |x| (at least 18, so that 2^-P / 16 stays a normal
        # float): that |x| is below 2^(e - 126), so P = 140 - e.
        top = tl.maximum(_abs_max8(xs_low), _abs_max8(xs_high))
        e = tl.maximum(top.to(tl.int32, bitcast=True) >> 23, 18)
        scale = ((267 - e) << 23).to(tl.float32, bitcast=True)  # 2^P: the exponent field P + 127
        unscale = ((e - 17) << 23).to(tl.float32, bitcast=True)  # 2^-P / 16
        bits_low, bits_high = _fixed8(xs_low, scale), _fixed8(xs_high, scale)
        # (the sum of the bits wraps around int32 as 16 ROUNDING_BITS does: the difference is exact)
        v_sum = (sum8(bits_low) + sum8(bits_high) - SIXTEEN_ROUNDING_BITS).to(tl.float32) * 16.0
        return _int16_pairs(bits_low), _int16_pairs(bits_high), v_sum, unscale

    @triton.jit
    def _abs_max8(xs):
        """The largest |x| of split8's 8 columns."""
        a = tl.maximum(tl.maximum(tl.abs(xs[0]), tl.abs(xs[1])), tl.maximum(tl.abs(xs[2]), tl.abs(xs[3])))
        b = tl.maximum(tl.maximum(tl.abs(xs[4]), tl.abs(xs[5])), tl.maximum(tl.abs(xs[6]), tl.abs(xs[7])))
        return tl.maximum(a, b)

    @triton.jit
    def _fixed8(xs, scale):
        """split8's 8 columns times scale, each rounded to an integer v held as ROUNDING_BITS + v (_fixed)."""
        return (_fixed(xs[0], scale), _fixed(xs[1], scale), _fixed(xs[2], scale), _fixed(xs[3], scale),
                _fixed(xs[4], scale), _fixed(xs[5], scale), _fixed(xs[6], scale), _fixed(xs[7], scale))

    @triton.jit
    def _fixed(x, scale):
        """ROUNDING_BITS + round(x scale) as int32, for |x scale| < 2^22 (ROUNDING_MAGIC), in one FMA: its low 16
        bits are round(x scale)'s, as ROUNDING_BITS' are 0."""
        return (x * scale + ROUNDING_MAGIC).to(tl.int32, bitcast=True)

    @triton.jit
    def _int16_pairs(vs):
        """The 8 integers (split8) of a word half's columns as the 4 pairs _word_int_dot takes, two int16 an int32
        (the first in the low 16 bits): columns (0, 2), (4, 6), (1, 3), (5, 7), the order of the nibbles in the
        bytes of a half masked by 0x0F0F0F0F and by 0xF0F0F0F0."""
        return _pair(vs[0], vs[2]), _pair(vs[4], vs[6]), _pair(vs[1], vs[3]), _pair(vs[5], vs[7])

    @triton.jit
    def _pair(low, high):
        """The low 16 bits of low and of high as one int32, low's first: one prmt (an AND and a shift-and-add as
        plain Triton)."""
        if INTERPRETED:
            return (low & 0xFFFF) | (high << 16)
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [low, high], dtype=tl.int32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _word_int_dot(w, pairs_low, pairs_high):
        """16 sum_j u_j v_j, int32 [k, n]: the 16 codes u of each int64 word [k, n] times x's integers v (the pairs
        of _x_fixed_point, [k]). Each 32-bit half masked by 0x0F0F0F0F holds the even columns' codes as bytes, and
        masked by 0xF0F0F0F0 the odd columns' times 16; dp2a multiplies two int16 by two of those bytes and adds
        both to an int32. So 16 weights cost 4 ANDs, 8 dp2a and one shift-and-add of the two sums, exact (|sum| <
        2^26)."""
        if INTERPRETED:
            return _word_int_dot_plain(w, pairs_low, pairs_high)
        low, high = w.to(tl.int32), (w >> 32).to(tl.int32)  # (the low half: truncation)
        return tl.inline_asm_elementwise(
            "{ .reg .b32 l0, h0, l1, h1, a, b; "
            "and.b32 l0, $1, 0x0F0F0F0F; and.b32 h0, $1, 0xF0F0F0F0; "
            "and.b32 l1, $2, 0x0F0F0F0F; and.b32 h1, $2, 0xF0F0F0F0; "
            "dp2a.lo.s32.u32 a, $3, l0, 0; dp2a.hi.s32.u32 a, $4, l0, a; "
            "dp2a.lo.s32.u32 a, $7, l1, a; dp2a.hi.s32.u32 a, $8, l1, a; "
            "dp2a.lo.s32.u32 b, $5, h0, 0; dp2a.hi.s32.u32 b, $6, h0, b; "
            "dp2a.lo.s32.u32 b, $9, h1, b; dp2a.hi.s32.u32 b, $10, h1, b; "
            "shl.b32 a, a, 4; add.s32 $0, a, b; }",
            "=r,r,r,r,r,r,r,r,r,r,r",
            [low, high, _across(pairs_low[0], w), _across(pairs_low[1], w), _across(pairs_low[2], w),
             _across(pairs_low[3], w), _across(pairs_high[0], w), _across(pairs_high[1], w),
             _across(pairs_high[2], w), _across(pairs_high[3], w)], dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _word_int_dot_plain(w, pairs_low, pairs_high):
        """_word_int_dot without PTX, for the interpreter: each half's even codes (its bytes masked by 0x0F0F0F0F)
        and odd codes times 16 (by 0xF0F0F0F0) times their int16 of x, the pairs' low 16 bits first; 16 times the
        even sums plus the odd."""
        low, high = w.to(tl.int32), (w >> 32).to(tl.int32)
        even = (_bytes_times_pairs(low & 0x0F0F0F0F, pairs_low[0][:, None], pairs_low[1][:, None])
                + _bytes_times_pairs(high & 0x0F0F0F0F, pairs_high[0][:, None], pairs_high[1][:, None]))
        odd = (_bytes_times_pairs(low & -0x0F0F0F10, pairs_low[2][:, None], pairs_low[3][:, None])
               + _bytes_times_pairs(high & -0x0F0F0F10, pairs_high[2][:, None], pairs_high[3][:, None]))
        return even * 16 + odd

    @triton.jit
    def _bytes_times_pairs(codes, first, second):
        """Bytes 0 and 1 of codes (unsigned) times the two int16 of `first`, bytes 2 and 3 times those of
        `second`."""
        return ((codes & 0xFF) * ((first << 16) >> 16) + ((codes >> 8) & 0xFF) * (first >> 16)
                + ((codes >> 16) & 0xFF) * ((second << 16) >> 16) + ((codes >> 24) & 0xFF) * (second >> 16))

    @triton.jit
    def _across(column, tile):
        """column [k] repeated across tile's outputs, tile's shape [k, n]."""
        return tl.broadcast_to(column[:, None], tile.shape)

    @triton.jit
    def _word_int_sums(w, s, z, x_fixed):
        """Each word's s (sum_j u_j x_j - z sum_j x_j), float32 [k, n]: w the int64 words [k, n] of 16 codes u, s
        and z [k, n] in float32, x_fixed the fixed point x of the word's 16 columns (_x_fixed_point). Half an
        instruction a weight for the products (_word_int_dot), then a conversion and three float instructions a
        word."""
        pairs_low, pairs_high, v_sum, unscale = x_fixed
        dot = _word_int_dot(w, pairs_low, pairs_high)
        return (s * unscale[:, None]) * (dot.to(tl.float32) - z * v_sum[:, None])

    @triton.jit
    def w4_row_sums(x_row, w_row, s_row, z_row, outs, gap, PAIRED: tl.constexpr, K: tl.constexpr,
                    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_KW: tl.constexpr, USE_PDL: tl.constexpr):
        """The int4 GEMV's sums, float32 [BLOCK_N]: x (at x_row) times rows `outs` of the codes from w_row (their
        scales and zeros from s_row and z_row, rows of the same first output), and with PAIRED also the rows
        `gap` further on (the same x read once for both): (y, y of the paired rows; y again without PAIRED).
        Requests the first step's weights, then waits for x (kiln.kernels.pdl)."""
        # w_row points at packed codes read as int64 words: word c of a row holds the codes of columns
        # 16c..16c+15, column 16c + j in bits 4j..4j+3 (little-endian bytes, low nibble first), each 32-bit half
        # 8 of them. x's 16 columns of a word become 16-bit integers (_x_fixed_point, once a thread and step, shared
        # by its outputs), dp2a multiplies them by the codes two at a time (_word_int_dot), and the group's scale
        # and zero come once per word: s (sum_j u_j x_j - z sum_j x_j) (_word_int_sums).
        # The tile is [BLOCK_KW words, BLOCK_N outputs] with one word per thread and output: the word indices are
        # XORed with program_id(2), always 0, so that Triton cannot prove a thread's words contiguous and does not
        # give it two (one 16-byte load). x's 16 columns of a word are loaded as two [BLOCK_KW, 8] tiles, one
        # 16-byte load each, which land in the thread that holds the word. (One [BLOCK_KW, 16] tile split in two
        # took x through shared memory, two barriers a step; with four words a thread, 20 barriers a step:
        # scripts/kernel_sass.py "w4 gemv".)
        KW: tl.constexpr = K // 16  # words per row
        WPG: tl.constexpr = GROUP // 16  # words per group (BLOCK_KW is a multiple: a step holds whole groups)
        G: tl.constexpr = (K + GROUP - 1) // GROUP
        # Each address is a scalar base (uniform registers), plus the thread's word (one 64-bit add), plus the
        # output's distance from the first, a constant with whole tiles: then the loads of a thread's outputs
        # share one address register with immediate offsets. Offsets as one int32 tensor before the add cost two
        # 64-bit adds a load instead (scripts/kernel_sass.py "w4 gemv").
        first = tl.arange(0, BLOCK_KW) ^ tl.program_id(2)
        acc = tl.zeros([BLOCK_KW, BLOCK_N], tl.float32)
        if PAIRED:
            wp_row, sp_row, zp_row = w_row + gap * KW, s_row + gap * G, z_row + gap * G
            acc_paired = tl.zeros([BLOCK_KW, BLOCK_N], tl.float32)
        # The first step's weights are requested before the wait for x, so they stream while the kernel before
        # this one ends.
        w, s, z = _step_weights(w_row, s_row, z_row, 0, first, outs, G, KW, WPG, HAS_ZERO, EVEN_K)
        if PAIRED:
            wp, sp, zp = _step_weights(wp_row, sp_row, zp_row, 0, first, outs, G, KW, WPG, HAS_ZERO, EVEN_K)
        wait_for_inputs(USE_PDL)
        for k0 in range(0, KW, BLOCK_KW):
            if k0 > 0:
                w, s, z = _step_weights(w_row, s_row, z_row, k0, first, outs, G, KW, WPG, HAS_ZERO, EVEN_K)
                if PAIRED:
                    wp, sp, zp = _step_weights(wp_row, sp_row, zp_row, k0, first, outs, G, KW, WPG, HAS_ZERO,
                                               EVEN_K)
            x_p = x_row + 16 * k0 + (16 * first)[:, None] + tl.arange(0, 8)[None, :]
            x_low = load_step(x_p, (k0 + first < KW)[:, None], EVEN_K).to(tl.float32)
            x_high = load_step(x_p + 8, (k0 + first < KW)[:, None], EVEN_K).to(tl.float32)
            x_fixed = _x_fixed_point(split8(x_low), split8(x_high))
            acc += _word_int_sums(w, s, z, x_fixed)
            if PAIRED:
                acc_paired += _word_int_sums(wp, sp, zp, x_fixed)
        y = tl.sum(acc, axis=0)
        y_paired = y
        if PAIRED:
            y_paired = tl.sum(acc_paired, axis=0)
        return y, y_paired

    @triton.jit
    def byte_word_steps(x_row, w_row, outs, pair_offset, word_sums, PAIRED: tl.constexpr, K: tl.constexpr,
                        EVEN_K: tl.constexpr, BLOCK_KW: tl.constexpr, USE_PDL: tl.constexpr,
                        X_SCALE: tl.constexpr = 1.0, SUM_X: tl.constexpr = False):
        """The loop of the GEMVs on words of 8 byte codes, int8's (w8_row_sums) and e4m3's
        (kiln.kernels.gemv.fp8_word_row_sums): (acc, acc of the rows pair_offset further on, x's sums), float32
        [BLOCK_KW, BLOCK_N] a word of each output and [BLOCK_KW] a word of x, which each format's own epilogue sums
        and scales (the paired acc 0 without PAIRED, x's sums 0 without SUM_X). A step adds the format's products,
        word_sums(acc, w, xs): w the int64 words [BLOCK_KW, BLOCK_N] of rows `outs` of the codes at w_row, xs
        (split8) the 8 columns of x (at x_row) they multiply, times X_SCALE. Requests the first step's weights,
        then waits for x (kiln.kernels.pdl)."""
        # Word c of a row holds columns 8c..8c+7, column 8c + j in bits 8j..8j+7: each thread loads 8 bytes of an
        # output's codes and the 8 columns of x they multiply, as w4_row_sums loads a word of 16 codes.
        # The lines up to the loop keep the order that gives both formats the sm_90 code of their own loops before
        # they shared this one (the order of the values the loop carries; scripts/kernel_sass.py --sass).
        KW: tl.constexpr = K // 8  # words per row
        pair_row = w_row + pair_offset * KW
        first = tl.arange(0, BLOCK_KW) ^ tl.program_id(2)  # (one word a thread: see w4_row_sums)
        acc = tl.zeros([BLOCK_KW, outs.shape[0]], tl.float32)
        x_sums = tl.zeros([BLOCK_KW], tl.float32)
        acc_pair = acc
        w = step_words(w_row, 0, first, outs, KW, EVEN_K)
        if PAIRED:
            w_pair = step_words(pair_row, 0, first, outs, KW, EVEN_K)
        wait_for_inputs(USE_PDL)
        for k0 in range(0, KW, BLOCK_KW):
            if k0 > 0:
                w = step_words(w_row, k0, first, outs, KW, EVEN_K)
                if PAIRED:
                    w_pair = step_words(pair_row, k0, first, outs, KW, EVEN_K)
            x_p = x_row + 8 * k0 + (8 * first)[:, None] + tl.arange(0, 8)[None, :]
            # (a word past the row's end reads 0, and so does x there. Not load_step: the interpreter cannot cast
            # its integer 0 to e4m3 codes of x, and as a call it moved registers in the e4m3 MoE kernel's sm_90 code)
            x = tl.load(x_p) if EVEN_K else tl.load(x_p, mask=(k0 + first < KW)[:, None], other=0.0)
            xs = split8(x.to(tl.float32) * X_SCALE)
            if SUM_X:
                x_sums += sum8(xs)
            acc = word_sums(acc, w, xs)
            if PAIRED:
                acc_pair = word_sums(acc_pair, w_pair, xs)
        return acc, acc_pair, x_sums

    @triton.jit
    def w8_row_sums(x_row, w_row, s_row, outs, gap, PAIRED: tl.constexpr, K: tl.constexpr, EVEN_K: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, USE_PDL: tl.constexpr):
        """The int8 GEMV's outputs, float32 [BLOCK_N]: x (at x_row) times rows `outs` of int8 codes from w_row, each
        times its row's scale (at s_row + the row), and with PAIRED also the rows `gap` further on (the same x read
        once for both): (y, y of the paired rows; y again without PAIRED). Requests the first step's weights, then
        waits for x (kiln.kernels.pdl)."""
        # Codes read as int64 words of 8 (byte_word_steps). Each 32-bit half is XORed with 0x80808080, which makes
        # each byte the unsigned code u = q + 128 (one instruction a half); a code masked in its place reads as a
        # float: bytes 0 and 1 masked in place, bytes 2 and 3 after a shift of the half by 16 bits, read as float32
        # bits, are the subnormals u 2^-149 and u 2^-141, exactly. So a weight costs one AND and one FMA. The sums
        # carry 2^-SHIFT_EXP until the end: sum_j q_j x_j = sum_j u_j x_j - 128 sum_j x_j, then the scale, in
        # float32 (a word past the row's end reads 0: codes 128 times x's 0 there).
        acc, acc_paired, x_sums = byte_word_steps(x_row, w_row, outs, gap, _word_byte_sums, PAIRED, K, EVEN_K,
                                                  BLOCK_KW, USE_PDL, SUM_X=True)
        x_total = tl.sum(x_sums) * (128.0 * 2.0 ** -SHIFT_EXP)
        y = (tl.sum(acc, axis=0) - x_total) * (2.0 ** SHIFT_EXP) * tl.load(s_row + outs).to(tl.float32)
        y_paired = y
        if PAIRED:
            y_paired = (tl.sum(acc_paired, axis=0) - x_total) * (2.0 ** SHIFT_EXP) * tl.load(
                s_row + gap + outs).to(tl.float32)
        return y, y_paired

    @triton.jit
    def _word_byte_sums(acc, w, xs):
        """acc plus each int64 word's sum_j u_j x_j 2^-SHIFT_EXP: w [k, n] words of 8 int8 codes, xs (split8) the 8
        columns of x they multiply."""
        acc = _byte_sums(acc, w.to(tl.int32), xs[0], xs[1], xs[2], xs[3])  # (the low half: truncation)
        return _byte_sums(acc, (w >> 32).to(tl.int32), xs[4], xs[5], xs[6], xs[7])

    @triton.jit
    def _byte_sums(acc, half, x0, x1, x2, x3):
        """acc plus each 32-bit half's sum_j u_j x_j 2^-SHIFT_EXP: half [k, n] holds 4 int8 codes, x0..x3 [k] the
        columns of x they multiply."""
        u = half ^ BYTE_SIGNS
        high = u >> 16
        acc += (u & 0xFF).to(tl.float32, bitcast=True) * (x0 * 2.0 ** (149 - SHIFT_EXP))[:, None]
        acc += (u & 0xFF00).to(tl.float32, bitcast=True) * (x1 * 2.0 ** (141 - SHIFT_EXP))[:, None]
        acc += (high & 0xFF).to(tl.float32, bitcast=True) * (x2 * 2.0 ** (149 - SHIFT_EXP))[:, None]
        acc += (high & 0xFF00).to(tl.float32, bitcast=True) * (x3 * 2.0 ** (141 - SHIFT_EXP))[:, None]
        return acc
