"""Mixture of experts (Mixtral, Qwen-MoE, GLM-4.5, DeepSeek, gpt-oss, MiniMax-M2, ...): a router picks top-k experts
per token, by softmax (Mixtral, Qwen, gpt-oss) or by DeepSeek-V3's biased sigmoid scores within the best groups
(GLM-4.5, MiniMax-M2; config.moe_router). gpt-oss adds a bias to the router and to every expert projection, and its
clamped GLU (config.moe_expert_bias, moe_swiglu_limit; kiln.kernels.moe.ExpertBiases).

Expert weights are stacked, one tensor per projection: `experts.fc` and `experts.gate` [experts, inter, hidden],
`experts.proj` [experts, hidden, inter] (engines fuse fc and gate into `experts.fc_gate`). Under tensor
parallelism a rank holds the experts of its expert-parallel group (Mapping.moe_ep_size groups) and its
moe_tp_size-th slice of their intermediate dim; every rank routes with the full (replicated) router, runs only
its local experts on the tokens routed to them, and one all-reduce over the TP group sums the partial outputs.
Tokens are grouped by expert, never looped one by one: on CUDA one sort and two grouped Triton GEMMs for all
experts, with no host sync (kiln.kernels.moe.fused_moe, so decode graphs capture it); elsewhere one matmul per
expert present (fused_moe_ref). Quantized, the stacked weights are codes with their scales (the expert methods of
kiln.quantization.methods.EXPERT_METHODS, kiln.kernels.moe.ExpertCodes), dequantized by both paths as they read
them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.kernels import triton_available
from kiln.kernels.gemv import GEMV_MAX_ROWS, gemv
from kiln.kernels.moe import ExpertBiases, Router, expert_halves, fused_moe, fused_moe_ref, route, route_ref
from kiln.layers.linear import Linear
from kiln.layers.mlp import GatedMLP
from kiln.mapping import Mapping, replicate, shard_expert_column, shard_expert_row, shard_expert_row_bias
from kiln.runtime.distributed import all_reduce


class ExpertLinear(nn.Module):
    """One projection of every expert, stacked: weight [experts, out, in], sharded like its dense kin, and an
    optional bias [experts, out] (gpt-oss; kept in the model dtype). A quantized model gives it a method
    (kiln.quantization.methods.EXPERT_METHODS: codes and scales in place of the weight); `quant_method` is None in
    full precision."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, rule, bias: bool = False):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight_rule = rule
        self.input_sharded = rule is shard_expert_row  # (a row-parallel expert's per-output tensors stay whole)
        self.quant_method = None
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(num_experts, out_features), requires_grad=False) if bias else None
        self.shard_rules = {"weight": rule, "bias": shard_expert_row_bias if self.input_sharded else rule}

    def set_quant_method(self, method) -> None:
        """Replace the weight by the tensors of `method` (created on the current default device)."""
        del self.weight
        self.quant_method = method
        method.create_weights(self)

    def operand(self):
        """What kiln.kernels.moe multiplies: the float weight, or the method's ExpertCodes."""
        return self.weight if self.quant_method is None else self.quant_method.codes(self)


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str,
                 mapping: Mapping, fused: bool, bias: bool = False, swiglu_limit: float | None = None):
        super().__init__()
        self.local = mapping.local_experts(num_experts)  # global expert ids; weight row i is self.local[i]
        inter = intermediate_size // mapping.moe_tp_size
        local = len(self.local)
        self.act, self.swiglu_limit = hidden_act, swiglu_limit
        self.fused = fused
        if fused:
            self.fc_gate = ExpertLinear(local, hidden_size, 2 * inter, shard_expert_column, bias)
        else:
            self.fc = ExpertLinear(local, hidden_size, inter, shard_expert_column, bias)
            self.gate = ExpertLinear(local, hidden_size, inter, shard_expert_column, bias)
        self.proj = ExpertLinear(local, inter, hidden_size, shard_expert_row, bias)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden]; experts (global ids), weights [tokens, top_k]. This rank's partial sum (not
        reduced): only its local experts contribute; the others' tokens are some other rank's work."""
        if self.fused:  # views of the runtime's [fc | gate] rows (and of their scales)
            fc, gate = expert_halves(self.fc_gate.operand())
        else:
            fc, gate = self.fc.operand(), self.gate.operand()
        run = fused_moe if x.is_cuda and triton_available() else fused_moe_ref
        return run(x, fc, gate, self.proj.operand(), experts, weights, self.local.start, self.act,
                   biases=self._biases())

    def _biases(self) -> ExpertBiases | None:
        """gpt-oss's: each projection's bias and the GLU's limit; None for experts without."""
        if self.proj.bias is None:
            return None
        fc, gate = (self.fc_gate.bias.chunk(2, dim=-1) if self.fused else (self.fc.bias, self.gate.bias))
        return ExpertBiases(fc, gate, self.proj.bias, self.swiglu_limit)


class MoE(nn.Module):
    def __init__(self, config, fused: bool):
        super().__init__()
        m = config.mapping
        self.mapping = m
        self.config = config
        self.router = Linear(config.hidden_size, config.moe_num_experts, config.moe_router_bias, replicate, replicate)
        if config.moe_router == "sigmoid":  # DeepSeek-V3's balance bias (every rank's): it chooses, scores weigh
            self.choice_bias = nn.Parameter(torch.empty(config.moe_num_experts), requires_grad=False)
        self.experts = Experts(config.moe_num_experts, config.hidden_size, config.moe_intermediate_size,
                               config.hidden_act, m, fused, config.moe_expert_bias, config.moe_swiglu_limit)
        self.shared_expert = self.shared_expert_gate = None
        if config.moe_shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(config.hidden_size, config.moe_shared_expert_intermediate_size,
                                          config.hidden_act, False, m, fused)
            if config.moe_shared_expert_gated:
                self.shared_expert_gate = Linear(config.hidden_size, 1, False, replicate, replicate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        out = all_reduce(self.experts(x, experts, weights), self.mapping)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            gate = self.shared_expert_gate
            out = out + (shared if gate is None else torch.sigmoid(gate(x)) * shared)
        return out

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [tokens, top_k] in x's dtype, experts [tokens, top_k]) of the config's router."""
        c = self.config
        sigmoid = c.moe_router == "sigmoid"
        router = Router(c.moe_top_k, c.moe_normalize_topk, sigmoid, self.choice_bias if sigmoid else None,
                        c.moe_num_groups, c.moe_topk_groups, c.moe_routed_scaling)
        logits = self._float32_logits(x) if sigmoid else self.router(x)
        choose = route if logits.is_cuda and triton_available() else route_ref
        return choose(logits, router, x.dtype)

    def _float32_logits(self, x: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 and GLM-4.5 route on float32 logits (their gate is kept in float32): on the GPU a decode step's
        few rows take the GEMV's float32 sums as they are, other rows float32 operands."""
        w = self.router.weight
        if x.is_cuda and triton_available() and x.shape[0] <= GEMV_MAX_ROWS and w.dtype == x.dtype:
            return gemv(x, w, torch.float32)
        return F.linear(x.float(), w.float())
