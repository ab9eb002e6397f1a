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


def hf_name_map(tied: bool) -> NameMap:
    return NameMap({
        **hf_table(tied),
        L + "attention.q_norm.weight": HF + "self_attn.q_norm.weight",
        L + "attention.k_norm.weight": HF + "self_attn.k_norm.weight",
        **moe_table("mlp", "gate_proj", "up_proj", "down_proj"),
        L + "mlp.shared_expert.fc.weight": HF + "mlp.shared_expert.gate_proj.weight",
        L + "mlp.shared_expert.gate.weight": HF + "mlp.shared_expert.up_proj.weight",
        L + "mlp.shared_expert.proj.weight": HF + "mlp.shared_expert.down_proj.weight",
        L + "mlp.shared_expert_gate.weight": HF + "mlp.shared_expert_gate.weight",
    })
