"""Families that are the Llama structure but for a field or two of config.json and their tensors' layout:

- ByteDance's Seed-OSS (SeedOssForCausalLM): biases on q, k and v (`attention_bias`), not on o_proj
  (`attention_out_bias`).
- Baidu's ERNIE 4.5 dense (Ernie4_5ForCausalLM): interleaved rotary pairs (q and k rows reordered to the
  rotate-half layout at conversion, as Meta's are) and `use_bias` on every projection, attention's and the MLP's.
- Arcee's AFM (ArceeForCausalLM): a plain MLP, down(relu(up(x))^2), no gate.
"""

from __future__ import annotations

from kiln.checkpoint.name_map import NameMap, Src
from kiln.errors import ConfigError
from kiln.models import hf_config
from kiln.models.base import DecoderModelForCausalLM
from kiln.models.llama.convert import L, _k_rows, _q_rows, hf_table

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

    @classmethod
    def config_from_hf(cls, hf, dtype, mapping, generation, path):
        return hf_config.config_from_hf(hf, dtype, mapping, generation, path, seed_oss_structure)

    @classmethod
    def hf_name_map(cls, config):
        return NameMap(hf_table(config.tie_word_embeddings))


class Ernie45ForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("Ernie4_5ForCausalLM",)

    @classmethod
    def config_from_hf(cls, hf, dtype, mapping, generation, path):
        return hf_config.config_from_hf(hf, dtype, mapping, generation, path, ernie45_structure)

    @classmethod
    def hf_name_map(cls, config):
        attn = HF + "self_attn."
        return NameMap({
            **hf_table(config.tie_word_embeddings),
            **{L + f"attention.qkv.{kind}": (Src(attn + f"q_proj.{kind}", _q_rows), Src(attn + f"k_proj.{kind}", _k_rows),
                                             attn + f"v_proj.{kind}") for kind in ("weight", "bias")},
        })


class ArceeForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("ArceeForCausalLM",)

    @classmethod
    def config_from_hf(cls, hf, dtype, mapping, generation, path):
        return hf_config.config_from_hf(hf, dtype, mapping, generation, path, arcee_structure)

    @classmethod
    def hf_name_map(cls, config):
        return NameMap({**hf_table(config.tie_word_embeddings),
                        L + "mlp.fc.weight": HF + "mlp.up_proj.weight", L + "mlp.fc.bias": HF + "mlp.up_proj.bias"})
