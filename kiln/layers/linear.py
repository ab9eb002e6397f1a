"""Tensor-parallel linear layers. Each knows which slice of the full weight it owns (`shard_rules`),
so model files only declare structure and never compute offsets.

The quantization seam: a linear layer holds a `LinearMethod` that creates its weight tensors, says how
each is sharded, turns a full-precision weight into them, and applies them to an input. The default is
the plain matmul below; quantized methods live in kiln/quantization (one module per algorithm) and are
chosen from the checkpoint's QuantConfig (kiln.quantization.methods.quant_method_for). The layer itself
only adds the bias and, for a row-parallel layer, the all-reduce.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from kiln.kernels import gated_gemm
from kiln.kernels.gemv import GEMV_MAX_ROWS, linear, use_gemv
from kiln.kernels.input_quant import InputQuant
from kiln.layers.normalization import PendingNorm
from kiln.mapping import Mapping, kv_heads_per_rank, replicate, shard_column, shard_qkv, shard_row
from kiln.runtime.distributed import all_reduce


class LinearMethod:
    """How a linear layer holds and applies its weight. Subclasses register their tensors as parameters
    of the layer (so checkpoint names are `<linear>.<leaf>`) and add their shard rules."""

    name = "none"

    def create_weights(self, layer: "Linear") -> None:
        raise NotImplementedError

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        """x W^T with this rank's weights, no bias."""
        raise NotImplementedError

    def silu_and_mul_matmul(self, layer: "Linear", x, out_quant: InputQuant | None = None):
        """silu(fc) * gate of [fc | gate] = apply(layer, x), in one kernel where this method has one for x (the
        gated MLP's fc_gate), quantized as `out_quant` says where given (the down projection's input: Fp8Rows,
        Int8Rows); None (the default) where not: the caller multiplies, then activates."""
        return None

    def rotary_qkv_matmul(self, layer: "QKVLinear", x: torch.Tensor, positions: torch.Tensor,
                          inv_freq: torch.Tensor, cache: tuple) -> torch.Tensor | None:
        """apply(layer, x) for the fused QKV projection, then rotary on q and k and the keys and values written to
        `cache` ((k_cache, v_cache, slots, kv_scale): kiln.kernels.rotary.apply_rotary_and_write_cache), in one
        kernel where this method has one for x; None (the default) where not: the caller does the three apart."""
        return None

    def add_norm_matmul(self, layer: "Linear", x: torch.Tensor, residual: torch.Tensor, norm) -> PendingNorm | None:
        """apply(layer, x) + residual with the RMSNorm `norm` of that sum begun (PendingNorm), in one kernel where
        this method has one for x; None (the default) where not: the caller adds and norms."""
        return None

    def carries_norms(self, layer: "Linear") -> bool:
        """Whether add_norm_matmul, silu_and_mul_matmul and rotary_qkv_matmul take part in a decode step's pending
        norms (PendingNorm) on this layer: x as it reaches the kernel, no input scale or permutation."""
        return False

    def input_quant(self, layer: "Linear") -> InputQuant | None:
        """The quantized input this method's apply takes ready-made (Fp8Rows, Int8Rows), for the kernel that
        computes the layer's input to write it in place of a pass of its own (kiln.kernels.input_quant); None (the
        default) where apply takes the 16-bit input alone."""
        return None

    def prepare(self, layer: "Linear") -> None:
        """Once the weights are loaded, before the engine's first step: derive what apply needs from them
        (nothing by default)."""

    def quantize(self, weight: torch.Tensor, dtype: torch.dtype,
                 input_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """A full-precision weight [out, in] -> {leaf: tensor} of this method (unsharded)."""
        raise NotImplementedError

    def dequantize(self, layer: "Linear", dtype: torch.dtype) -> torch.Tensor:
        """This rank's weight [out, in] in `dtype`: the codes times their scales."""
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: "Linear") -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features), requires_grad=False)
        layer.shard_rules["weight"] = layer.weight_rule

    def dequantize(self, layer, dtype):
        return layer.weight.to(dtype)

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        return linear(x, layer.weight)  # cuBLAS, or a GEMV for batch-1 shapes where it measured faster

    def silu_and_mul_matmul(self, layer, x, out_quant=None):
        """Prompt-sized rows on Hopper with KILN_GATED_GEMM=1: the Triton GEMM with the activation as its epilogue
        (kiln.kernels.gated_gemm; off: it measured slower than cuBLAS plus the activation). 16-bit output only."""
        if (out_quant is not None or not x.is_cuda or x.dim() != 2 or x.shape[0] < gated_gemm.MIN_ROWS
                or not gated_gemm.gated_gemm_enabled() or not gated_gemm.can_run(x, layer.weight)):
            return None
        return gated_gemm.silu_and_mul_gemm(x, layer.weight)

    def quantize(self, weight, dtype, input_scale=None):
        return {"weight": weight.to(dtype)}


def prepare_linear_layers(model: nn.Module) -> None:
    """Each linear layer's `LinearMethod.prepare`, once its weights are loaded."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.quant_method.prepare(m)


def choose_linear_kernels(model: nn.Module) -> None:
    """Time the GEMV against cuBLAS once for each distinct full-precision weight shape of `model` (on CUDA),
    at 1 to GEMV_MAX_ROWS rows, so that decode steps and their CUDA graphs find the choice made."""
    weights = [m.weight for m in model.modules()  # (lm_head too: it is a Linear)
               if isinstance(m, Linear) and isinstance(m.quant_method, UnquantizedLinearMethod)]
    weights = [w for w in weights if w.is_cuda]
    for weight in weights:
        for rows in range(1, GEMV_MAX_ROWS + 1):
            use_gemv(torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device), weight)
    if weights:  # the timer's L2-flush buffer goes back to the GPU, for the KV cache to size itself
        torch.cuda.empty_cache()


class Linear(nn.Module):
    """y = x W^T + b over this rank's shard; `shard_rules` maps each parameter to its shard function.

    in_features / out_features are this rank's; `input_sharded` says the input dim is split across ranks
    (row-parallel), which a method needs to shard per-input-channel tensors.
    """

    input_sharded = False

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_rule, bias_rule):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_rule = weight_rule
        self.shard_rules = {}
        self.quant_method: LinearMethod = UnquantizedLinearMethod()
        self.quant_method.create_weights(self)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.shard_rules["bias"] = bias_rule

    def set_quant_method(self, method: LinearMethod) -> None:
        """Replace the weight tensors by those of `method` (created on the current default device)."""
        for leaf in [k for k in self.shard_rules if k != "bias"]:
            delattr(self, leaf)
            del self.shard_rules[leaf]
        self.quant_method = method
        method.create_weights(self)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The [out, in] matrix this layer's matmul multiplies by, in `dtype`: its method's weight, an input scale
        (prequant_scaling_factor) folded in. For a layer folded into other math (latent attention's kv_b); the
        activations of an FP8 or int8 method are then not quantized."""
        weight = self.quant_method.dequantize(self, dtype)
        prequant = getattr(self, "prequant_scaling_factor", None)
        return weight if prequant is None else weight * prequant.to(dtype)

    def input_quant(self) -> InputQuant | None:
        """The quantized input this layer takes ready-made, if any (LinearMethod.input_quant)."""
        return self.quant_method.input_quant(self)

    def forward(self, x: torch.Tensor | PendingNorm) -> torch.Tensor:
        if isinstance(x, PendingNorm):  # (a reader that took no fused kernel)
            x = x.normed()
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias


class ColumnLinear(Linear):
    """Output features split across tensor-parallel ranks; each rank returns its slice of y."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mapping: Mapping):
        super().__init__(in_features, out_features // mapping.tp_size, bias, shard_column, shard_column)


class RowLinear(Linear):
    """Input features split across ranks; the partial sums are all-reduced, then the whole bias is added."""

    input_sharded = True

    def __init__(self, in_features: int, out_features: int, bias: bool, mapping: Mapping):
        super().__init__(in_features // mapping.tp_size, out_features, bias, shard_row, replicate)
        self.mapping = mapping

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(self.matmul(x), self.mapping)
        return y if self.bias is None else y + self.bias

    def matmul_then_norm(self, x: torch.Tensor, residual: torch.Tensor, norm) -> torch.Tensor | PendingNorm:
        """forward(x) + residual with the RMSNorm `norm` of that sum begun, a PendingNorm, where the method's kernel
        does both (LinearMethod.add_norm_matmul: one rank, no bias); else forward(x), which add_and_norm adds to
        the residual and norms."""
        pending = None
        if self.bias is None and self.mapping.tp_size == 1:
            pending = self.quant_method.add_norm_matmul(self, x, residual, norm)
        return self(x) if pending is None else pending


class QKVLinear(Linear):
    """The fused [q; k; v] projection, split by heads; KV heads are replicated when tp_size exceeds them."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_size: int, bias: bool,
                 mapping: Mapping):
        self.num_heads = num_heads // mapping.tp_size
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, mapping.tp_size)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_size
        rule = functools.partial(shard_qkv, num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size)
        super().__init__(hidden_size, out, bias, rule, rule)
        self.head_size = head_size

    def split_heads(self, qkv: torch.Tensor):
        """[tokens, (h + 2 kv) * d] -> q [tokens, h, d], k and v [tokens, kv, d]."""
        d = self.head_size
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        return q.unflatten(-1, (-1, d)), k.unflatten(-1, (-1, d)), v.unflatten(-1, (-1, d))
