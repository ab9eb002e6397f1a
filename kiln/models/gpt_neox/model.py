"""GPT-NeoX / Pythia: LayerNorm with bias, partial rotary, parallel residual (or sequential), a plain GELU MLP,
biases everywhere. The source's fused query_key_value interleaves q, k, v per head; kiln's qkv is [q; k; v]."""

from __future__ import annotations

from kiln.checkpoint.name_map import NameMap, Src
from kiln.models.base import DecoderModelForCausalLM
from kiln.models.llama.convert import L

HF = "gpt_neox.layers.{i}."


def _per_head_to_fused(tensor, config):
    """[heads * (q, k, v) * d, ...] -> [q heads; k heads; v heads] rows."""
    heads, d = config.num_attention_heads, config.head_size
    return tensor.reshape(heads, 3, d, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


def neox_structure(hf: dict) -> dict:
    fields = dict(norm_type="layernorm", norm_epsilon=hf.get("layer_norm_eps", 1e-5), gated_mlp=False,
                  parallel_residual=hf.get("use_parallel_residual", True), num_key_value_heads=hf["num_attention_heads"],
                  attention_bias=hf.get("attention_bias", True), mlp_bias=True)
    if "rotary_emb_base" in hf:  # transformers 4.x
        fields["rotary_base"] = hf["rotary_emb_base"]
    return fields


def _pair(kiln: str, source: str, transform=None) -> dict:
    return {f"{kiln}.{k}": Src(f"{source}.{k}", transform) for k in ("weight", "bias")}


class GPTNeoXForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("GPTNeoXForCausalLM",)
    HF_STRUCTURE = staticmethod(neox_structure)

    @classmethod
    def hf_name_map(cls, config):
        return NameMap({
            "transformer.vocab_embedding.weight": "gpt_neox.embed_in.weight",
            "lm_head.weight": "gpt_neox.embed_in.weight" if config.tie_word_embeddings else "embed_out.weight",
            **_pair("transformer.ln_f", "gpt_neox.final_layer_norm"),
            **_pair(L + "input_layernorm", HF + "input_layernorm"),
            **_pair(L + "post_layernorm", HF + "post_attention_layernorm"),
            **_pair(L + "attention.qkv", HF + "attention.query_key_value", _per_head_to_fused),
            **_pair(L + "attention.dense", HF + "attention.dense"),
            **_pair(L + "mlp.fc", HF + "mlp.dense_h_to_4h"),
            **_pair(L + "mlp.proj", HF + "mlp.dense_4h_to_h"),
        })
