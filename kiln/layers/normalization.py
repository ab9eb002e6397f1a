"""RMSNorm (optionally scaling by 1 + w, as Gemma does) and LayerNorm, computed in float32 as the
reference models do, then cast back; `add_and_norm` adds a residual first, fused into one kernel on the GPU."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln.kernels import triton_available
from kiln.kernels.input_quant import InputQuant
from kiln.kernels.rmsnorm import rms_norm, rms_norm_ref
from kiln.mapping import replicate
from kiln.runtime.distributed import all_reduce


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps = eps
        self.unit_offset = unit_offset
        self.shard_rules = {"weight": replicate}
        # Set at engine load (DecoderLayer.fuse_input_quantization) when the linear that reads this norm's output
        # takes quantized input (kiln.kernels.input_quant): the output is then that input, Fp8Rows or Int8Rows.
        self.out_quant: InputQuant | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or (norm(x + residual), x + residual) with the sum rounded to x's dtype first."""
        if x.is_cuda and not self.unit_offset and triton_available():  # the same math in one Triton launch
            return rms_norm(x, self.weight, self.eps, residual, self.out_quant)
        if residual is not None:
            x = x + residual
            return self(x), x
        normed = self._normed(x)
        return normed if self.out_quant is None else self.out_quant.quantize(normed.reshape(-1, normed.shape[-1]))

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps, unit_offset=self.unit_offset)


class Unnormed(nn.Module):
    """No norm before a sub-block (OLMo 2 norms the sub-blocks' outputs instead): it reads the residual stream as
    it is; with a residual, (x + residual, x + residual), as add_and_norm expects of a norm."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return x
        x = x + residual
        return x, x


class ShardedRMSNorm(nn.Module):
    """RMSNorm over all of a token's heads at once (OLMo 2's q_norm and k_norm, `qk_norm_full_width`), on
    [tokens, heads, head_size] of this rank's heads: the mean square over every rank's, their sums all-reduced
    across tensor-parallel ranks and divided by all ranks' widths. Replicated KV heads (more ranks than heads)
    count once per rank in both, so the mean is the same. The weight multiplies in float32 before the rounding,
    as OLMo's norms do."""

    def __init__(self, heads: int, head_size: int, eps: float, mapping, shard_rule):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads * head_size), requires_grad=False)
        self.eps, self.mapping = eps, mapping
        self.shard_rules = {"weight": shard_rule}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], -1).float()
        squares = all_reduce(h.pow(2).sum(-1, keepdim=True), self.mapping)
        h = h * torch.rsqrt(squares / (h.shape[1] * self.mapping.tp_size) + self.eps)
        return (self.weight.float() * h).to(x.dtype).view_as(x)


class PerHeadLayerNorm(nn.Module):
    """Command R+'s q_norm and k_norm: a bias-free LayerNorm over each head's dims, a weight per head [heads,
    head_size] (this rank's heads), on [tokens, heads, head_size]; the weight multiplies in float32 before the
    rounding, as Cohere's norms do."""

    def __init__(self, heads: int, head_size: int, eps: float, shard_rule):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, head_size), requires_grad=False)
        self.eps = eps
        self.shard_rules = {"weight": shard_rule}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h - h.mean(-1, keepdim=True)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden_size), requires_grad=False) if bias else None
        self.eps = eps
        self.shard_rules = {"weight": replicate, "bias": replicate}

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """As RMSNorm.forward."""
        if residual is not None:
            x = x + residual
            return self(x), x
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.weight.shape, self.weight.float(), bias, self.eps).to(x.dtype)


@dataclass
class PendingNorm:
    """An RMSNorm's output, its last step still to take. The GEMV whose output joined the residual stream wrote the
    stream (`residual`: its output plus the residual), the stream times the norm's weight (`weighted`) and its
    programs' sums of squares (`squares` [rows, parts], float32); the GEMV that reads the norm's output takes
    `weighted` and applies the norm's 1/rms to its sums (kiln.kernels.epilogue). So no norm kernel runs between two
    int4 GEMVs of a decode step (DecoderLayer.defer_norms). One rounding differs from the norm's: the stream times
    the weight is rounded, where the norm rounds the stream times 1/rms, then times the weight."""

    residual: torch.Tensor
    weighted: torch.Tensor
    squares: torch.Tensor
    eps: float

    def normed(self) -> torch.Tensor:
        """The norm's output, for a reader that cannot apply the 1/rms itself."""
        rows = self.weighted.reshape(-1, self.weighted.shape[-1])
        inv_rms = torch.rsqrt(self.squares.sum(-1, keepdim=True) / rows.shape[-1] + self.eps)
        return (rows.float() * inv_rms).to(rows.dtype).view(self.weighted.shape)


def add_and_norm(norm: nn.Module, x: torch.Tensor | PendingNorm, residual: torch.Tensor | None):
    """(norm(x + residual), x + residual); residual None means x is already the whole stream. A PendingNorm x is
    that norm begun by the GEMV before it, the residual added: (x, its stream)."""
    if isinstance(x, PendingNorm):
        return x, x.residual
    return (norm(x), x) if residual is None else norm(x, residual)


def make_norm(config, size: int | None = None) -> nn.Module:
    """The config's norm over `size` features (default hidden_size)."""
    size = size or config.hidden_size
    if config.norm_type == "layernorm":
        return LayerNorm(size, config.norm_epsilon, config.norm_bias)
    return RMSNorm(size, config.norm_epsilon, config.norm_unit_offset)
