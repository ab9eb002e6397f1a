"""Rotary position embedding (Su et al. 2021, arXiv:2104.09864) on q and k, in place.

GPT-NeoX "rotate half" layout, which kiln and Hugging Face use: dimension i pairs with i + d/2.
The kernel computes cos/sin from positions itself, so no [tokens, d] cos/sin table is read or built:
one launch rotates both q and k of a token with a single read and write of each.
"""

import torch

try:
    import triton
    import triton.language as tl

    try:
        from triton.language.extra import libdevice
    except ImportError:  # Triton < 3.0 keeps it under the CUDA backend
        from triton.language.extra.cuda import libdevice
except ImportError:  # CPU-only installs: the reference below still works
    triton = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor):
    """Rotate q [tokens, heads, d] and k [tokens, kv_heads, d] in place and return them.

    angle = position * inv_freq in float32; cos and sin are cast to x's dtype before the multiplies.
    """
    angles = positions.float()[:, None] * inv_freq.float().to(positions.device)[None, :]
    emb = torch.cat([angles, angles], dim=-1)[:, None, :]
    for x in (q, k):
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x.copy_(x * cos + _rotate_half(x) * sin)
    return q, k


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor):
    """Triton version of `apply_rotary_ref`: rotates in place, returns (q, k). CUDA tensors.

    q and k may be strided views (say, slices of a fused QKV output) as long as head_size is contiguous.
    """
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "apply_rotary: head_size must be the contiguous dim"
    tokens, heads, head_size = q.shape
    half = head_size // 2
    _rotary_kernel[(tokens,)](
        q, k, positions, inv_freq, q.stride(0), q.stride(1), k.stride(0), k.stride(1), heads, k.shape[1], half,
        BLOCK_HQ=triton.next_power_of_2(heads), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_D=triton.next_power_of_2(half), num_warps=4)
    return q, k


if triton is not None:

    @triton.jit
    def _rotate_heads(x_ptr, tok_stride, head_stride, token, heads, half, cos, sin,
                      BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        h = tl.arange(0, BLOCK_H)[:, None]
        i = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < heads) & (i < half)
        ptr = x_ptr + token * tok_stride + h * head_stride + i
        x1 = tl.load(ptr, mask=mask, other=0.0)
        x2 = tl.load(ptr + half, mask=mask, other=0.0)
        c, s = cos.to(x1.dtype)[None, :], sin.to(x1.dtype)[None, :]
        # Round after each multiply as torch's elementwise ops do, so 16-bit results match the reference.
        out1 = (x1 * c).to(x1.dtype).to(tl.float32) - (x2 * s).to(x1.dtype).to(tl.float32)
        out2 = (x2 * c).to(x1.dtype).to(tl.float32) + (x1 * s).to(x1.dtype).to(tl.float32)
        tl.store(ptr, out1.to(x1.dtype), mask=mask)
        tl.store(ptr + half, out2.to(x1.dtype), mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, pos_ptr, freq_ptr, q_tok_stride, q_head_stride, k_tok_stride, k_head_stride,
                       q_heads, k_heads, half,
                       BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BLOCK_D)
        angle = tl.load(pos_ptr + token).to(tl.float32) * tl.load(freq_ptr + i, mask=i < half, other=0.0)
        # libdevice's cos/sin, not the approximate PTX ones: angles reach max_position radians.
        cos, sin = libdevice.cos(angle), libdevice.sin(angle)
        _rotate_heads(q_ptr, q_tok_stride, q_head_stride, token, q_heads, half, cos, sin, BLOCK_HQ, BLOCK_D)
        _rotate_heads(k_ptr, k_tok_stride, k_head_stride, token, k_heads, half, cos, sin, BLOCK_HK, BLOCK_D)
