"""Families that are the Llama structure but for a field or two of config.json and their tensors' layout:

- ByteDance's Seed-OSS (SeedOssForCausalLM): biases on q, k and v (`attention_bias`), not on o_proj
  (`attention_out_bias`).
- Baidu's ERNIE 4.5 dense (Ernie4_5ForCausalLM): interleaved rotary pairs (q and k rows reordered to the
  rotate-half layout at conversion, as Meta's are) and `use_bias` on every projection, attention's and the MLP's.
- Arcee's AFM (ArceeForCausalLM): a plain MLP, down(relu(up(x))^2), no gate.
- BigCode's StarCoder2 (Starcoder2ForCausalLM): LayerNorms with biases (`norm_epsilon`), a plain gelu_tanh MLP
  (`c_fc`, `c_proj`) and biases on every projection (`use_bias`), a sliding window in every layer (15B).
- AI2's OLMoE (OlmoeForCausalLM): q/k norms over all heads (OLMo 2's) in the pre-norm layout, and a mixture of
  experts routed by softmax, its top-k weights not renormalised (`norm_topk_prob` false), Qwen-MoE's names.
"""

from __future__ import annotations

from kiln.checkpoint.name_map import NameMap
from kiln.errors import ConfigError
from kiln.models import hf_config
from kiln.models.base import DecoderModelForCausalLM
from kiln.models.llama.convert import L, _k_rows, _q_rows, hf_table, qkv_table
from kiln.models.qwen.convert import QK_NORMS, moe_table

HF = "model.layers.{i}."


def seed_oss_structure(hf: dict) -> dict:
    qkv, out = hf.get("attention_bias", False), hf.get("attention_out_bias", False)
    if out and not qkv:
        raise ConfigError("attention_out_bias true with attention_bias false is not supported (kiln's output bias "
                          "comes with q/k/v biases); supported: q/k/v biases with or without one on o_proj")
    return dict(qkv_bias=qkv, attention_bias=out)


def ernie45_structure(hf: dict) -> dict:
    return dict(attention_bias=hf.get("use_bias", False), mlp_bias=hf.get("use_bias", False))


def arcee_structure(hf: dict) -> dict:
    return dict(gated_mlp=False)


class SeedOssForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("SeedOssForCausalLM",)
    HF_STRUCTURE = staticmethod(seed_oss_structure)

    @classmethod
    def hf_name_map(cls, config):
        return NameMap(hf_table(config.tie_word_embeddings))


class Ernie45ForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("Ernie4_5ForCausalLM",)
    HF_STRUCTURE = staticmethod(ernie45_structure)

    @classmethod
    def hf_name_map(cls, config):
        return NameMap({**hf_table(config.tie_word_embeddings), **qkv_table(_q_rows, _k_rows)})


class ArceeForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("ArceeForCausalLM",)
    HF_STRUCTURE = staticmethod(arcee_structure)

    @classmethod
    def hf_name_map(cls, config):
        return NameMap({**hf_table(config.tie_word_embeddings),
                        L + "mlp.fc.weight": HF + "mlp.up_proj.weight", L + "mlp.fc.bias": HF + "mlp.up_proj.bias"})


def starcoder2_structure(hf: dict) -> dict:
    bias = hf.get("use_bias", True)
    return dict(norm_type="layernorm", norm_epsilon=hf.get("norm_epsilon", 1e-5), gated_mlp=False,
                attention_bias=bias, mlp_bias=bias, **hf_config.sliding_fields(hf))


class Starcoder2ForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("Starcoder2ForCausalLM",)
    HF_STRUCTURE = staticmethod(starcoder2_structure)

    @classmethod
    def hf_name_map(cls, config):
        norms = {f"{ours}.bias": f"{theirs}.bias" for ours, theirs in (
            ("transformer.ln_f", "model.norm"), (L + "input_layernorm", HF + "input_layernorm"),
            (L + "post_layernorm", HF + "post_attention_layernorm"))}
        mlp = {L + f"mlp.{ours}.{kind}": HF + f"mlp.{theirs}.{kind}"
               for ours, theirs in (("fc", "c_fc"), ("proj", "c_proj")) for kind in ("weight", "bias")}
        return NameMap({**hf_table(config.tie_word_embeddings), **norms, **mlp})


def olmoe_structure(hf: dict) -> dict:
    if hf.get("clip_qkv") is not None:
        raise ConfigError(f"clip_qkv {hf['clip_qkv']} is not supported; supported: null (OLMoE's released models)")
    return dict(qk_norm=True, qk_norm_full_width=True, moe_num_experts=hf["num_experts"],
                moe_top_k=hf["num_experts_per_tok"], moe_intermediate_size=hf["intermediate_size"],
                moe_normalize_topk=hf.get("norm_topk_prob", False))


class OlmoeForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("OlmoeForCausalLM",)
    HF_STRUCTURE = staticmethod(olmoe_structure)

    @classmethod
    def hf_name_map(cls, config):
        return NameMap({**hf_table(config.tie_word_embeddings), **QK_NORMS,
                        **moe_table("mlp", "gate_proj", "up_proj", "down_proj")})
