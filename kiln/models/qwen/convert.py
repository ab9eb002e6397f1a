"""Qwen name maps: Llama's HF names plus q/k norms (Qwen3) and the sparse MoE block (Qwen2-MoE, Qwen3-MoE).

Experts are stacked: the source's `mlp.experts.{e}.*` become one [experts, ...] tensor per projection.
"""

from __future__ import annotations

from kiln.checkpoint.name_map import NameMap
from kiln.models.llama.convert import L, hf_table

HF = "model.layers.{i}."


def moe_table(block: str, fc: str, gate: str, proj: str, router: str = "gate") -> dict:
    """Kiln MoE names -> `HF + block` names (shared by Qwen-MoE and Mixtral)."""
    src = HF + block + "."
    return {
        L + "mlp.router.weight": src + f"{router}.weight",
        L + "mlp.experts.fc.weight": src + f"experts.{{e}}.{fc}.weight",
        L + "mlp.experts.gate.weight": src + f"experts.{{e}}.{gate}.weight",
        L + "mlp.experts.proj.weight": src + f"experts.{{e}}.{proj}.weight",
    }


def shared_expert_table(block: str) -> dict:
    """Kiln's shared-expert names -> `HF + block` names (Qwen2-MoE's `mlp.shared_expert`, GLM-4.5's
    `mlp.shared_experts`): a gated MLP's gate_proj, up_proj and down_proj."""
    src = HF + block + "."
    return {L + f"mlp.shared_expert.{ours}.weight": src + f"{theirs}.weight"
            for ours, theirs in (("fc", "gate_proj"), ("gate", "up_proj"), ("proj", "down_proj"))}


QK_NORMS = {L + "attention.q_norm.weight": HF + "self_attn.q_norm.weight",
            L + "attention.k_norm.weight": HF + "self_attn.k_norm.weight"}


def hf_name_map(tied: bool) -> NameMap:
    return NameMap({
        **hf_table(tied),
        **QK_NORMS,
        **moe_table("mlp", "gate_proj", "up_proj", "down_proj"),
        **shared_expert_table("mlp.shared_expert"),
        L + "mlp.shared_expert_gate.weight": HF + "mlp.shared_expert_gate.weight",
    })
