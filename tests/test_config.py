"""Configs are data: they round-trip through JSON and refuse nonsense with a ConfigError naming the field."""

from __future__ import annotations

import json

import pytest

from kiln.config import BuildConfig, PretrainedConfig, QuantAlgo, QuantConfig
from kiln.errors import ConfigError, KilnError
from kiln.mapping import Mapping


def through_json(d: dict) -> dict:
    return json.loads(json.dumps(d))


def llama_config(**changes) -> PretrainedConfig:
    fields = dict(architecture="LlamaForCausalLM", dtype="bfloat16", vocab_size=128, hidden_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_size=16,
                  intermediate_size=96)
    return PretrainedConfig(**{**fields, **changes})


def rejects(make, *fields):
    """`make()` raises a ConfigError whose message names every one of `fields`."""
    with pytest.raises(ConfigError) as info:
        make()
    assert isinstance(info.value, KilnError)
    for f in fields:
        assert f in str(info.value), f"{f!r} not in {str(info.value)!r}"
    return info.value


# ---- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    llama_config(),
    llama_config(dtype="float16", rotary_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192},
                 rotary_base=500000.0, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                 sliding_window=4096, bos_token_id=1, eos_token_ids=(2, 7), norm_epsilon=1e-6,
                 max_position_embeddings=131072,
                 mapping=Mapping.of(tp_size=2, pp_size=2),
                 quantization=QuantConfig(quant_algo=QuantAlgo.W4A16_AWQ, kv_cache_quant_algo=QuantAlgo.INT8,
                                          group_size=64, has_zero_point=True, exclude_modules=["lm_head", "x"])),
], ids=["plain", "everything_set"])
def test_pretrained_config_round_trips_through_json(config):
    d = through_json(config.to_dict())
    assert PretrainedConfig.from_dict(d) == config
    assert d["mapping"] == {"world_size": config.mapping.world_size, "tp_size": config.mapping.tp_size,
                            "pp_size": config.mapping.pp_size}
    assert through_json(PretrainedConfig.from_dict(d).to_dict()) == d


def test_pretrained_config_from_dict_takes_the_rank():
    config = llama_config(mapping=Mapping.of(tp_size=2, pp_size=2))
    loaded = PretrainedConfig.from_dict(through_json(config.to_dict()), rank=3)
    assert loaded.mapping == Mapping.of(tp_size=2, pp_size=2, rank=3)


@pytest.mark.parametrize("quant", [
    QuantConfig(),
    QuantConfig(quant_algo="W8A16"),
    QuantConfig(quant_algo=QuantAlgo.FP8, kv_cache_quant_algo=QuantAlgo.FP8, exclude_modules=()),
    QuantConfig(quant_algo=QuantAlgo.W4A16_GPTQ, group_size=32, has_zero_point=True),
    QuantConfig(kv_cache_quant_algo="int8"),
])
def test_quant_config_round_trips_through_json(quant):
    d = through_json(quant.to_dict())
    assert QuantConfig.from_dict(d) == quant
    assert d["quant_algo"] in (None, *[a.value for a in QuantAlgo])


def test_quant_algo_strings_parse_to_the_enum():
    q = QuantConfig(quant_algo="w4a16_awq", kv_cache_quant_algo="fp8")
    assert q.quant_algo is QuantAlgo.W4A16_AWQ and q.kv_cache_quant_algo is QuantAlgo.FP8
    assert q.is_quantized and not QuantConfig().is_quantized


@pytest.mark.parametrize("build", [
    BuildConfig(),
    BuildConfig(max_batch_size=3, max_input_len=100, max_seq_len=100, max_num_tokens=512,
                kv_cache_type="continuous", tokens_per_block=64, kv_cache_free_gpu_mem_fraction=0.5),
    BuildConfig(max_seq_len=4096),
])
def test_build_config_round_trips_through_json(build):
    assert BuildConfig.from_dict(through_json(build.to_dict())) == build


def test_mapping_round_trips_through_json():
    m = Mapping.of(tp_size=4, pp_size=2, rank=5)
    d = through_json(m.to_dict())
    assert "rank" not in d  # a checkpoint stores the layout, not who reads it
    assert Mapping.from_dict(d, rank=5) == m
    assert Mapping.from_dict(d) == m.with_rank(0)


# ---- PretrainedConfig validation -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "fp16", "int8", "", None])
def test_bad_dtype(dtype):
    rejects(lambda: llama_config(dtype=dtype), "dtype")


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "head_size", "intermediate_size",
                                   "max_position_embeddings"])
@pytest.mark.parametrize("value", [0, -4, 2.5, "64", True])
def test_sizes_must_be_positive_integers(field, value):
    rejects(lambda: llama_config(**{field: value}), field)


def test_kv_heads_must_divide_the_heads():
    rejects(lambda: llama_config(num_key_value_heads=3), "num_key_value_heads")


@pytest.mark.parametrize("changes, field", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(position_embedding_type="alibi"), "position_embedding_type"),
    (dict(rotary_base=0.0), "rotary_base"),
    (dict(norm_epsilon=-1e-5), "norm_epsilon"),
    (dict(rotary_scaling={"type": "yarn", "factor": 2.0}), "rotary_scaling"),
    (dict(rotary_scaling="linear"), "rotary_scaling"),
    (dict(rotary_scaling={"type": "linear"}), "factor"),
    (dict(rotary_scaling={"type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (dict(rotary_base="10000"), "rotary_base"),
    (dict(norm_epsilon="1e-5"), "norm_epsilon"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(sliding_window=-5), "sliding_window"),
])
def test_out_of_range_model_fields(changes, field):
    rejects(lambda: llama_config(**changes), field)


def test_from_dict_refuses_unknown_and_missing_fields():
    d = through_json(llama_config().to_dict())
    rejects(lambda: PretrainedConfig.from_dict({**d, "hiden_size": 64}), "hiden_size")
    del d["intermediate_size"]
    rejects(lambda: PretrainedConfig.from_dict(d), "intermediate_size")


def test_from_dict_names_the_field_of_a_wrongly_typed_value():
    d = through_json(llama_config().to_dict())
    rejects(lambda: PretrainedConfig.from_dict({**d, "norm_epsilon": "1e-5"}), "norm_epsilon")
    rejects(lambda: PretrainedConfig.from_dict({**d, "rotary_scaling": "linear"}), "rotary_scaling")


def test_from_dict_validates_nested_configs():
    d = through_json(llama_config().to_dict())
    rejects(lambda: PretrainedConfig.from_dict({**d, "mapping": {"world_size": 3, "tp_size": 2, "pp_size": 2}}),
            "world_size")
    rejects(lambda: PretrainedConfig.from_dict({**d, "quantization": {"quant_algo": "W3A16"}}), "quant_algo")
    rejects(lambda: PretrainedConfig.from_dict({**d, "quantization": {"bits": 4}}), "bits")


# ---- QuantConfig validation ----------------------------------------------------------------------

@pytest.mark.parametrize("changes, field", [
    (dict(quant_algo="W3A16"), "quant_algo"),
    (dict(quant_algo="INT8"), "quant_algo"),  # a KV-cache algorithm, not a weight one
    (dict(quant_algo=7), "quant_algo"),
    (dict(kv_cache_quant_algo="W8A16"), "kv_cache_quant_algo"),
    (dict(kv_cache_quant_algo=QuantAlgo.W4A16), "kv_cache_quant_algo"),
    (dict(group_size=100), "group_size"),
    (dict(group_size=0), "group_size"),
])
def test_bad_quant_config(changes, field):
    rejects(lambda: QuantConfig(**changes), field)


def test_quant_config_from_dict_refuses_unknown_fields():
    rejects(lambda: QuantConfig.from_dict({"quant_algo": "W8A16", "group": 128}), "group")


# ---- BuildConfig validation ----------------------------------------------------------------------

@pytest.mark.parametrize("changes, field", [
    (dict(max_input_len=200, max_seq_len=100), "max_input_len"),
    (dict(max_batch_size=0), "max_batch_size"),
    (dict(max_batch_size=-1), "max_batch_size"),
    (dict(max_num_tokens=-8), "max_num_tokens"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(max_input_len=-3), "max_input_len"),
    (dict(max_seq_len=1.5), "max_seq_len"),
    (dict(tokens_per_block=24), "tokens_per_block"),
    (dict(tokens_per_block=0), "tokens_per_block"),
    (dict(kv_cache_type="ring"), "kv_cache_type"),
    (dict(kv_cache_free_gpu_mem_fraction=0.0), "kv_cache_free_gpu_mem_fraction"),
    (dict(kv_cache_free_gpu_mem_fraction=1.5), "kv_cache_free_gpu_mem_fraction"),
])
def test_bad_build_config(changes, field):
    rejects(lambda: BuildConfig(**changes), field)


def test_max_input_len_error_names_the_limit():
    err = rejects(lambda: BuildConfig(max_input_len=200, max_seq_len=100), "max_input_len", "max_seq_len")
    assert "100" in str(err) and "200" in str(err)


def test_build_config_from_dict_refuses_unknown_fields():
    rejects(lambda: BuildConfig.from_dict({"max_batch_size": 4, "max_beam_width": 2}), "max_beam_width")


# ---- Mapping validation --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(world_size=4, tp_size=2, pp_size=1), "world_size"),
    (dict(world_size=2, tp_size=2, pp_size=2), "world_size"),
    (dict(world_size=1, tp_size=0, pp_size=1), "tp_size"),
    (dict(world_size=1, tp_size=1, pp_size=-1), "pp_size"),
    (dict(world_size=2, tp_size=2, pp_size=1, rank=2), "rank"),
    (dict(world_size=2, tp_size=2, pp_size=1, rank=-1), "rank"),
])
def test_bad_mapping(kwargs, field):
    rejects(lambda: Mapping(**kwargs), field)


def test_mapping_from_dict_refuses_unknown_and_missing_fields():
    rejects(lambda: Mapping.from_dict({"world_size": 2, "tp_size": 2, "pp_size": 1, "cp_size": 1}), "cp_size")
    rejects(lambda: Mapping.from_dict({"world_size": 2, "tp_size": 2}), "pp_size")


def test_resolve_device_refuses_what_this_torch_cannot_run_on():
    """A device string torch does not know, and (without a visible GPU) a CUDA device, are refused with the fix,
    before an LLM converts or builds anything; no device means cuda where there is a GPU, else cpu."""
    import torch

    from kiln.config import resolve_device

    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="cpu, cuda or cuda:N"):
        resolve_device("gpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match="--device cpu" if count == 0 else f"has {count} CUDA GPU"):
        resolve_device(f"cuda:{count}" if count else "cuda")
