"""OpenAI's gpt-oss (GptOssForCausalLM): Llama-style attention with biases and a learned sink logit per head in
each softmax's denominator (`self_attn.sinks`: kiln's attention_sinks), sliding-window layers alternating with full
ones, YaRN rotary, and in every layer a mixture of experts with biases everywhere: a router with a bias (softmax
over its top-k logits, the top-k of the softmax renormalised) and experts computing
quick_gelu(min(fc, limit)) * (clamp(up, -limit, limit) + 1) (kiln's moe_swiglu_limit; alpha 1.702 is quick_gelu's).

Source names: `mlp.router.weight`/`.bias`; `mlp.experts.gate_up_proj` [experts, hidden, 2 x inter], its columns
interleaved (gate even, up odd) and `gate_up_proj_bias` alike; `mlp.experts.down_proj` [experts, inter, hidden]
and `down_proj_bias`: transposed and de-interleaved here into kiln's fc, gate and proj. OpenAI's published
checkpoints store the experts in MXFP4 (`gate_up_proj_blocks` and `_scales`, ...): they are read back exactly in the
model dtype (kiln.quantization.mxfp4).
"""

from __future__ import annotations

from kiln.checkpoint.name_map import NameMap, Src
from kiln.errors import ConfigError
from kiln.models import hf_config
from kiln.models.base import DecoderModelForCausalLM
from kiln.models.llama.convert import L, hf_table

HF = "model.layers.{i}."
QUICK_GELU_ALPHA = 1.702


def gpt_oss_structure(hf: dict) -> dict:
    if hf.get("swiglu_alpha", QUICK_GELU_ALPHA) != QUICK_GELU_ALPHA:
        raise ConfigError(f"swiglu_alpha {hf['swiglu_alpha']} is not supported; supported: {QUICK_GELU_ALPHA} "
                          "(gpt-oss's, quick_gelu's)")
    return dict(hidden_act="quick_gelu", attention_sinks=True, moe_num_experts=hf["num_local_experts"],
                moe_top_k=hf["num_experts_per_tok"], moe_intermediate_size=hf["intermediate_size"],
                moe_normalize_topk=True, moe_router_bias=True, moe_expert_bias=True,
                moe_swiglu_limit=float(hf.get("swiglu_limit", 7.0)), **hf_config.sliding_fields(hf))


def _gate(t, config):
    """[experts, hidden, (gate, up) interleaved] -> the gate projections [experts, inter, hidden] (kiln's fc)."""
    return t[..., 0::2].transpose(-1, -2).contiguous() if t.dim() == 3 else t[..., 0::2].contiguous()


def _up(t, config):
    """... -> the up projections (kiln's gate); biases [experts, 2 x inter] likewise, without the transpose."""
    return t[..., 1::2].transpose(-1, -2).contiguous() if t.dim() == 3 else t[..., 1::2].contiguous()


def _transposed(t, config):
    """down_proj [experts, inter, hidden] -> kiln's proj [experts, hidden, inter]."""
    return t.transpose(-1, -2).contiguous()


class GptOssForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("GptOssForCausalLM",)
    HF_STRUCTURE = staticmethod(gpt_oss_structure)

    @classmethod
    def hf_name_map(cls, config):
        experts = HF + "mlp.experts."
        return NameMap({
            **hf_table(config.tie_word_embeddings),
            L + "attention.sinks": HF + "self_attn.sinks",
            L + "mlp.router.weight": HF + "mlp.router.weight",
            L + "mlp.router.bias": HF + "mlp.router.bias",
            L + "mlp.experts.fc.weight": Src(experts + "gate_up_proj", _gate),
            L + "mlp.experts.gate.weight": Src(experts + "gate_up_proj", _up),
            L + "mlp.experts.proj.weight": Src(experts + "down_proj", _transposed),
            L + "mlp.experts.fc.bias": Src(experts + "gate_up_proj_bias", _gate),
            L + "mlp.experts.gate.bias": Src(experts + "gate_up_proj_bias", _up),
            L + "mlp.experts.proj.bias": experts + "down_proj_bias",
        })
