"""GPT-2: learned absolute positions, LayerNorm with bias, a plain GELU-tanh MLP, biases everywhere, tied
lm_head. Its linears are Conv1D ([in, out] weights), transposed here to kiln's [out, in]."""

from __future__ import annotations

from kiln.checkpoint.name_map import NameMap, Src
from kiln.errors import ConfigError
from kiln.models import hf_config
from kiln.models.base import DecoderModelForCausalLM
from kiln.models.llama.convert import L

HF = "transformer.h.{i}."
# GPT-2's config names -> the common ones.
RENAMES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
           "n_positions": "max_position_embeddings", "activation_function": "hidden_act"}


def _conv1d(tensor, config):
    return tensor.t().contiguous()


def gpt2_structure(hf: dict) -> dict:
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise ConfigError("GPT-2 attention scaled by layer index or unscaled is not supported")
    return dict(norm_type="layernorm", norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), gated_mlp=False,
                position_embedding_type="learned_absolute", attention_bias=True, mlp_bias=True,
                tie_word_embeddings=hf.get("tie_word_embeddings", True))


def _pair(kiln: str, source: str, transform=None) -> dict:
    return {f"{kiln}.weight": Src(f"{source}.weight", transform), f"{kiln}.bias": f"{source}.bias"}


class GPT2ForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("GPT2LMHeadModel",)

    @classmethod
    def config_from_hf(cls, hf, dtype, mapping, generation, path):
        hf = {**hf, **{new: hf[old] for old, new in RENAMES.items() if old in hf}}
        hf.setdefault("intermediate_size", hf.get("n_inner") or 4 * hf.get("hidden_size", 0))
        return hf_config.config_from_hf(hf, dtype, mapping, generation, path, gpt2_structure)

    @classmethod
    def hf_name_map(cls, config):
        return NameMap({
            "transformer.vocab_embedding.weight": "transformer.wte.weight",
            "transformer.position_embedding.weight": "transformer.wpe.weight",
            "lm_head.weight": "transformer.wte.weight" if config.tie_word_embeddings else "lm_head.weight",
            **_pair("transformer.ln_f", "transformer.ln_f"),
            **_pair(L + "input_layernorm", HF + "ln_1"),
            **_pair(L + "post_layernorm", HF + "ln_2"),
            **_pair(L + "attention.qkv", HF + "attn.c_attn", _conv1d),
            **_pair(L + "attention.dense", HF + "attn.c_proj", _conv1d),
            **_pair(L + "mlp.fc", HF + "mlp.c_fc", _conv1d),
            **_pair(L + "mlp.proj", HF + "mlp.c_proj", _conv1d),
        })
