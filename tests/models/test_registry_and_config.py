"""The registry serves every family and refuses the rest by listing them; the structure fields of
PretrainedConfig round-trip through JSON and refuse nonsense; real shapes of the new families convert."""

from __future__ import annotations

import json

import pytest

from kiln.bench.shapes import FAMILY_SHAPES
from kiln.config import PretrainedConfig
from kiln.errors import ConfigError, UnsupportedArchitectureError
from kiln.mapping import Mapping
from kiln.models import model_class, supported_architectures

FAMILIES = ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
            "MixtralForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
            "GPTNeoXForCausalLM", "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM"]
BASE = dict(architecture="Gemma2ForCausalLM", dtype="bfloat16", vocab_size=128, hidden_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_size=16, intermediate_size=96)


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_family_is_registered_and_declares_its_architecture(arch):
    cls = model_class(arch)
    assert arch in cls.HF_ARCHITECTURES and arch in supported_architectures()


def test_unsupported_architecture_is_refused_with_the_supported_list():
    with pytest.raises(UnsupportedArchitectureError) as info:
        model_class("FalconForCausalLM")
    for arch in FAMILIES:
        assert arch in str(info.value)


def test_structure_fields_round_trip_through_json():
    config = PretrainedConfig(**BASE, gated_mlp=True, hidden_act="gelu_tanh", norm_unit_offset=True, qk_norm=True,
                              sandwich_norm=True, embedding_multiplier=8.0, query_pre_attn_scalar=24.0,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4,
                              layer_types=("sliding_attention", "full_attention"), rotary_dim=8,
                              rotary_base_local=10000.0, qkv_bias=True, moe_num_experts=4, moe_top_k=2,
                              moe_intermediate_size=32, moe_normalize_topk=False,
                              moe_shared_expert_intermediate_size=48, moe_dense_layers=(1,), moe_router="sigmoid",
                              moe_num_groups=2, moe_topk_groups=1, moe_routed_scaling=2.5,
                              moe_shared_expert_gated=False,
                              rotary_scaling={"type": "longrope", "short_factor": [1.0] * 4,
                                              "long_factor": [2.0] * 4, "original_max_position_embeddings": 64,
                                              "attention_factor": 1.1})
    d = json.loads(json.dumps(config.to_dict()))
    assert PretrainedConfig.from_dict(d) == config


@pytest.mark.parametrize("changes, field", [
    (dict(norm_type="batchnorm"), "norm_type"),
    (dict(norm_type="layernorm", norm_unit_offset=True), "norm_unit_offset"),
    (dict(hidden_act="gelu"), "hidden_act"),  # exact GELU only in a plain MLP
    (dict(gated_mlp=False, hidden_act="swiglu"), "hidden_act"),
    (dict(layer_types=("full_attention",)), "layer_types"),
    (dict(layer_types=("local", "global")), "layer_types"),
    (dict(rotary_dim=3), "rotary_dim"),
    (dict(rotary_dim=32), "rotary_dim"),
    (dict(final_logit_softcapping=0.0), "final_logit_softcapping"),
    (dict(embedding_multiplier=None), "embedding_multiplier"),
    (dict(moe_num_experts=4, moe_top_k=5, moe_intermediate_size=8), "moe_top_k"),
    (dict(moe_num_experts=4, moe_top_k=2), "moe_intermediate_size"),
    (dict(moe_dense_layers=(2,)), "moe_dense_layers"),
    (dict(moe_router="top1"), "moe_router"),
    (dict(moe_num_experts=8, moe_top_k=2, moe_intermediate_size=8, moe_num_groups=3), "moe_num_groups"),
    (dict(moe_num_experts=8, moe_top_k=2, moe_intermediate_size=8, moe_router="sigmoid", moe_num_groups=8),
     "moe_num_groups"),  # groups of one expert: no two best
    (dict(moe_num_experts=8, moe_top_k=2, moe_intermediate_size=8, moe_router="sigmoid", moe_num_groups=2,
          moe_topk_groups=3), "moe_topk_groups"),
    (dict(moe_router="sigmoid", moe_routed_scaling=0), "moe_routed_scaling"),
    (dict(mla_kv_lora_rank=32, mla_rope_head_dim=0, mla_v_head_dim=8), "mla_rope_head_dim"),
    (dict(mla_kv_lora_rank=32, mla_rope_head_dim=8, mla_v_head_dim=0), "mla_v_head_dim"),
    (dict(mla_kv_lora_rank=-1), "mla_kv_lora_rank"),
    (dict(mla_kv_lora_rank=32, mla_rope_head_dim=8, mla_v_head_dim=8), "num_key_value_heads"),  # (2 of 4)
    (dict(parallel_residual=True, sandwich_norm=True), "sandwich_norm"),
    (dict(position_embedding_type="alibi"), "position_embedding_type"),
])
def test_out_of_range_structure_fields_are_refused(changes, field):
    with pytest.raises(ConfigError, match=field):
        PretrainedConfig(**{**BASE, **changes})


@pytest.mark.parametrize("shape", sorted(FAMILY_SHAPES))
def test_real_shapes_read_as_kiln_configs(shape):
    """The real-model table holds configs each family's reader accepts (no weights needed)."""
    fields = dict(FAMILY_SHAPES[shape])
    arch = fields.pop("architecture")
    config = model_class(arch).config_from_hf({"architectures": [arch], **fields}, "bfloat16",
                                              Mapping(), None, shape)
    assert config.architecture == arch and config.hidden_size == fields["hidden_size"]
    # (DeepSeek's first layer is dense)
    assert config.is_moe_layer(0) == (shape in ("gpt-oss-20b", "mixtral-8x7b", "qwen3-30b-a3b"))
