"""AWQ's weight clipping search: the bound it picks per (output channel, input group) never raises that
group's output error over no clipping, and clip_weight applies the bound in the scaled domain."""

import torch

from kiln.config import QuantConfig
from kiln.quantization.awq import CLIP_GRID, CLIP_MAX_SHRINK, clip_weight, search_clip
from kiln.quantization.weight_only import dequantize_int4, quantize_int4_groups

QC = QuantConfig(quant_algo="W4A16_AWQ", group_size=32)


def group_errors(x, w, bound=None):
    """Per (output, group): mean over tokens of (x_g w_g^T - x_g q(w_g)^T)^2, q after clipping to bound."""
    wc = w if bound is None else clip_weight(w, bound, None, QC.group_size)
    q = dequantize_int4(*quantize_int4_groups(wc, QC.group_size, QC.has_zero_point, torch.float32), QC.group_size,
                        torch.float32)
    xg, wg, qg = (t.reshape(t.shape[0], -1, QC.group_size) for t in (x, w, q))
    return (torch.einsum("ngk,ogk->nog", xg, qg) - torch.einsum("ngk,ogk->nog", xg, wg)).pow(2).mean(0)


def test_search_clip_never_does_worse_and_helps_with_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 96, generator=g)
    w = torch.randn(40, 96, generator=g)
    w[torch.arange(40), torch.randint(0, 96, (40,), generator=g)] *= 8  # one outlier weight per row
    bound = search_clip(x, w, QC, torch.float32)
    full = w.abs().reshape(40, -1, QC.group_size).amax(-1)
    assert bound.shape == full.shape
    assert torch.all(bound <= full) and torch.all(bound >= full * (1 - CLIP_MAX_SHRINK))
    clipped, plain = group_errors(x, w, bound), group_errors(x, w)
    assert torch.all(clipped <= plain * (1 + 1e-6))
    assert clipped.sum() < 0.9 * plain.sum()  # and clipping the outlier groups really pays
    assert (bound < full).float().mean() > 0.1 and CLIP_GRID == 20


def test_clip_weight_bounds_the_scaled_weight_and_leaves_the_rest():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g)
    s = torch.rand(64, generator=g) + 0.5
    bound = (w * s).abs().reshape(8, -1, 32).amax(-1) * 0.7
    out = clip_weight(w, bound, s, 32)
    limit = bound.repeat_interleave(32, dim=1)
    assert torch.all((out * s).abs() <= limit * (1 + 1e-6))
    inside = (w * s).abs() <= limit
    assert torch.equal(out[inside], w[inside]) and not torch.all(inside)
