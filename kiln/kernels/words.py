"""Pieces of the GEMVs that read their weights as int64 words of codes (8 int8 or e4m3 codes, or 16 int4 ones):
each thread holds one word of each of its outputs and the columns of x that word multiplies, as [B, 8] or [B, 16]
tiles split here into columns, so no value crosses threads until the final sum (kiln.kernels.quant_gemm's int4 and
int8 GEMVs, kiln.kernels.gemv's e4m3 one)."""

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

if triton is not None:

    @triton.jit
    def halves(x):
        """[B, 16] -> columns 0..7 and 8..15, each [B, 8]."""
        return tl.split(tl.permute(tl.reshape(x, [x.shape[0], 2, 8]), (0, 2, 1)))

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
    def gemv_program(N, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr):
        """(x's row m, the first output n0, the outputs from n0) of a word GEMV's program (m, j, 0). Outputs past the
        end read the last one instead (not stored), so no load needs a row mask."""
        m = tl.program_id(0).to(tl.int64)
        n0 = tl.program_id(1) * BLOCK_N
        outs = tl.arange(0, BLOCK_N)
        if not EVEN_N:
            outs = tl.minimum(outs, N - 1 - n0)
        return m, n0, outs
