"""Math that kernels apply to their results before storing them, in one place, so that each kernel rounds as torch
does and all of them alike: the gated MLP's SiLU-and-mul, computed by its own kernel (kiln.kernels.activation) and
as the epilogue of the GEMVs that produce fc and gate (the int4 one in kiln.kernels.quant_gemm, the e4m3 one in
kiln.kernels.gemv); and an RMSNorm split between two int4 GEMVs (kiln.layers.normalization.PendingNorm): the one
that writes the residual stream adds it and sums its squares (`add_residual_for_norm`), the one that reads the
norm's output scales its sums by the norm's 1/rms (`pending_inv_rms`), so no norm kernel runs between them."""

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

if triton is not None:

    @triton.jit
    def silu_times(fc, gate):
        """silu(fc) * gate in fc's dtype: silu in float32 rounded to the dtype, then the multiply rounded, the two
        roundings torch makes."""
        f = fc.to(tl.float32)
        act = (f / (1.0 + tl.exp(-f))).to(fc.dtype)
        return (act.to(tl.float32) * gate.to(tl.float32)).to(fc.dtype)

    @triton.jit
    def add_residual_for_norm(y, m, n0, N, res_ptr, nw_ptr, h_ptr, g_ptr, sq_ptr, BLOCK_N: tl.constexpr):
        """The epilogue of a GEMV whose output joins the residual stream before an RMSNorm: y (outputs n0 ..
        n0 + BLOCK_N of row m, in the output's dtype) plus the residual (res_ptr [rows, N]), rounded to the dtype as
        torch's add rounds, is the stream h (to h_ptr); h times the norm's weight (nw_ptr [N]), rounded once, is the
        next GEMV's input (to g_ptr); and the sum of h's squares over this program's outputs, float32, goes to
        sq_ptr[m, program] (pending_inv_rms adds them up)."""
        out = n0 + tl.arange(0, BLOCK_N)
        ok = out < N
        h = (y.to(tl.float32) + tl.load(res_ptr + m * N + out, mask=ok, other=0.0).to(tl.float32)).to(y.dtype)
        tl.store(h_ptr + m * N + out, h, mask=ok)
        h = tl.where(ok, h.to(tl.float32), 0.0)
        weight = tl.load(nw_ptr + out, mask=ok, other=0.0).to(tl.float32)
        tl.store(g_ptr + m * N + out, (h * weight).to(y.dtype), mask=ok)
        tl.store(sq_ptr + m * tl.num_programs(1) + tl.program_id(1), tl.sum(h * h, axis=0))

    @triton.jit
    def pending_inv_rms(sq_ptr, m, parts, K: tl.constexpr, eps, PARTS: tl.constexpr):
        """The RMSNorm's 1/rms of row m, as kiln.kernels.rmsnorm computes it: 1 / sqrt(mean of squares + eps), from
        the `parts` sums of squares at sq_ptr[m, :] (add_residual_for_norm's; PARTS a power of two >= parts) over a
        row of K."""
        p = tl.arange(0, PARTS)
        squares = tl.load(sq_ptr + m * parts + p, mask=p < parts, other=0.0)
        return 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
