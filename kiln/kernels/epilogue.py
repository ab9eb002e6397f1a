"""Math that kernels apply to their results before storing them, in one place, so that each kernel rounds as torch
does and all of them alike: the gated MLP's SiLU-and-mul, computed by its own kernel (kiln.kernels.activation) and
as the epilogue of the GEMVs that produce fc and gate (the int4 one in kiln.kernels.quant_gemm, the e4m3 one in
kiln.kernels.gemv)."""

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
