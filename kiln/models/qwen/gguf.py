"""Qwen2 / Qwen2.5, Qwen3 and their MoE variants from a GGUF file (llama.cpp's `qwen2`, `qwen3`, `qwen2moe` and
`qwen3moe` architectures): the metadata read as the Hugging Face config it came from, and the GGUF tensor
names -> kiln names.

llama.cpp runs these with NeoX rotary, so its converter leaves q/k rows as Hugging Face has them (no
permutation, unlike `llama`). Qwen2's q, k and v carry biases (`attn_q.bias`, ...); Qwen3's carry none and
normalize q and k per head (`attn_q_norm`, `attn_k_norm`). The MoE files stack each projection's experts in one
tensor (`ffn_gate_exps` [experts, ff, hidden], ...), which is kiln's layout as it is; Qwen2-MoE adds a shared
expert (`ffn_*_shexp`) and its sigmoid gate (`ffn_gate_inp_shexp`, one vector). What the file leaves out,
llama.cpp fixes by rule, and so do we: Qwen3-MoE renormalizes its top-k routing weights and Qwen2-MoE does not
(unless the file says otherwise in `expert_weights_norm`), and a layer is dense where it has no expert tensors.
"""

from __future__ import annotations

from kiln.checkpoint.gguf_source import GGUFFile
from kiln.checkpoint.name_map import NameMap, Src
from kiln.errors import CheckpointError
from kiln.models.llama.convert import L, gguf_moe_table, gguf_table
from kiln.models.llama.gguf import hf_shape_from_gguf

QWEN_GGUF_ARCHITECTURES = ("qwen2", "qwen3", "qwen2moe", "qwen3moe")  # (GGUF_ARCHITECTURES: the HF architecture)
NORMALIZES_TOP_K = {"qwen2moe": False, "qwen3moe": True}  # llama.cpp's build_moe_ffn norm_w for each MoE architecture


def hf_config_from_gguf(gguf: GGUFFile, dtype: str) -> dict:
    """The config.json (transformers 5 form) that the file's `qwen2.*` / `qwen3.*` metadata encodes."""
    arch = gguf.require("general.architecture")
    return {
        **hf_shape_from_gguf(gguf, dtype),
        "hidden_act": "silu",
        "rope_parameters": _rope(gguf, arch),
        "qkv_bias": "blk.0.attn_q.bias" in gguf,
        **(_moe(gguf, arch) if arch in NORMALIZES_TOP_K else {}),
    }


def _moe(gguf: GGUFFile, arch: str) -> dict:
    k = lambda key: gguf.require(f"{arch}.{key}")  # noqa: E731
    layers = k("block_count")
    return {
        "num_experts": k("expert_count"),
        "num_experts_per_tok": k("expert_used_count"),
        "moe_intermediate_size": k("expert_feed_forward_length"),
        "shared_expert_intermediate_size": gguf.field(f"{arch}.expert_shared_feed_forward_length", 0),
        "norm_topk_prob": bool(gguf.field(f"{arch}.expert_weights_norm", NORMALIZES_TOP_K[arch])),
        "mlp_only_layers": [i for i in range(layers) if f"blk.{i}.ffn_gate_exps.weight" not in gguf],
    }


def _rope(gguf: GGUFFile, arch: str) -> dict:
    theta = float(gguf.field(f"{arch}.rope.freq_base", 1000000.0))
    kind = gguf.field(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return {"rope_type": "default", "rope_theta": theta}
    if kind not in ("linear", "yarn"):
        raise CheckpointError(f"{gguf.path}: {arch}.rope.scaling.type {kind!r} is not supported (kiln reads 'linear' "
                              f"and 'yarn' from GGUF); convert the Hugging Face checkpoint instead")
    rope = {"rope_type": kind, "rope_theta": theta, "factor": float(gguf.require(f"{arch}.rope.scaling.factor"))}
    if kind == "yarn":  # (Qwen2.5 / Qwen3 past 32k tokens; YaRN's other parameters at their defaults)
        rope["original_max_position_embeddings"] = gguf.require(f"{arch}.rope.scaling.original_context_length")
    return rope


def gguf_name_map(tied: bool) -> NameMap:
    b = "blk.{i}."
    return NameMap({
        **gguf_table(tied, rotary_rows=False),
        L + "attention.qkv.bias": (b + "attn_q.bias", b + "attn_k.bias", b + "attn_v.bias"),
        L + "attention.q_norm.weight": b + "attn_q_norm.weight",
        L + "attention.k_norm.weight": b + "attn_k_norm.weight",
        **gguf_moe_table(),
        L + "mlp.shared_expert_gate.weight": Src(b + "ffn_gate_inp_shexp.weight", _one_row),
    })


def _one_row(w, config):
    """The shared expert's gate: a [hidden] vector in GGUF, a [1, hidden] linear in kiln (and HF)."""
    return w.reshape(1, -1)
