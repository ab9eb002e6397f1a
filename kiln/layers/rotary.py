"""Rotary position embeddings (GPT-NeoX / Hugging Face "rotate half" layout) and their scalings.

Scalings follow the reference implementations in transformers' modeling_rope_utils:
- linear: positions divided by the factor;
- dynamic NTK: base grown with the sequence length (https://www.reddit.com/r/LocalLLaMA/comments/14mrgpr);
- llama3: frequency-dependent interpolation from the Llama 3.1 release;
- yarn (NTK-by-parts, arXiv:2309.00071; Qwen2.5 / Qwen3 past 32k tokens): each frequency interpolated by the
  factor, kept, or ramped between, by how many turns it makes over the original context, with cos/sin scaled by
  an attention factor;
- longrope (Phi-3, arXiv:2402.13753): per-frequency factors, short below the original context and long beyond it,
  with cos/sin scaled by an attention factor;
- freq_factors: a divisor per frequency, as GGUF files of Llama 3.1 and later carry llama3's scaling (llama.cpp's
  `rope_freqs` tensor).
"""
from __future__ import annotations

import math

import torch


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(inv_freq: torch.Tensor, base: float, dim: int, scaling: dict) -> torch.Tensor:
    """Frequencies that turn fewer than beta_slow times over the original context are divided by the factor, those
    that turn more than beta_fast times kept, and those between ramped linearly (by frequency index) from one to
    the other."""
    original = scaling["original_max_position_embeddings"]

    def index_of_turns(turns: float) -> float:  # the (fractional) frequency index that turns `turns` times
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = index_of_turns(scaling["beta_fast"]), index_of_turns(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    return inv_freq / scaling["factor"] * ramp + inv_freq * (1 - ramp)


def inv_freq(base: float, dim: int, scaling: dict | None, max_position: int, seq_len: int) -> torch.Tensor:
    """Inverse frequencies for a forward whose largest position is seq_len - 1."""
    kind = scaling and scaling["type"]
    if kind == "dynamic":
        original = scaling.get("original_max_position_embeddings") or max_position
        if seq_len > original:
            factor = scaling["factor"]
            base = base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
    if kind == "longrope":
        long = seq_len > scaling["original_max_position_embeddings"]
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (factors * base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = _default_inv_freq(base, dim)
    if kind == "linear":
        freqs = freqs / scaling["factor"]
    elif kind == "llama3":
        freqs = _llama3_inv_freq(freqs, scaling)
    elif kind == "freq_factors":
        freqs = freqs / torch.tensor(scaling["factors"], dtype=torch.float32)
    elif kind == "yarn":
        freqs = _yarn_inv_freq(freqs, base, dim, scaling)
    return freqs


def attention_factor(scaling: dict | None) -> float:
    """The factor longrope and yarn apply to cos and sin (1 for every other scaling)."""
    return scaling["attention_factor"] if scaling and scaling["type"] in ("longrope", "yarn") else 1.0


def rope_cos_sin(positions: torch.Tensor, freqs: torch.Tensor, dtype: torch.dtype, factor: float = 1.0):
    """cos and sin of shape [tokens, 1, dim], computed in float32 and cast to the activations' dtype."""
    angles = positions.float()[:, None] * freqs.to(positions.device)[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return (emb.cos() * factor).to(dtype)[:, None, :], (emb.sin() * factor).to(dtype)[:, None, :]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_size]; rotates the first cos.shape[-1] dims (partial rotary), keeps the rest."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    head, tail = x[..., :rot], x[..., rot:]
    return torch.cat([head * cos + _rotate_half(head) * sin, tail], dim=-1)


def interleaved_to_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Meta's interleaved rotary pairs (also GGUF's layout) to the
    rotate-half layout kiln and Hugging Face use; the inverse of llama.cpp's permute on convert."""
    rows = weight.shape[0]
    head_size = rows // num_heads
    return (weight.reshape(num_heads, head_size // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(rows, *weight.shape[1:]))
