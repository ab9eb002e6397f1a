"""Configs are data: dataclasses that round-trip through JSON and validate themselves.

PretrainedConfig describes a model (and which shard a checkpoint holds), QuantConfig how it is
quantized, BuildConfig the limits an engine is built for. Field names follow TensorRT-LLM's.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from kiln.errors import ConfigError
from kiln.mapping import Mapping, kv_heads_per_rank

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def conversion_dtype(requested: str, source: str) -> str:
    """The dtype a conversion writes: the source checkpoint's own (`source`) for "auto", else the one requested,
    checked here so that a bad request is not blamed on the source's config."""
    if requested == "auto":
        return source
    if requested not in DTYPES:
        raise ConfigError(f"the requested dtype must be auto or one of {sorted(DTYPES)}, got {requested!r}")
    return requested


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: `device`, else cuda where torch sees a GPU, else cpu. A device this torch cannot run on
    is refused here, with the fix, before any conversion or build starts."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {str(resolved)!r}: this torch ({torch.__version__}) sees no CUDA GPU; run on "
                              "the CPU (device='cpu', --device cpu) or install a CUDA build of torch")
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"device {str(resolved)!r}: this machine has {count} CUDA GPU(s), cuda:0 to "
                              f"cuda:{count - 1}")
    return resolved


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


class QuantAlgo(str, enum.Enum):
    W8A16 = "W8A16"
    W4A16 = "W4A16"
    W4A16_AWQ = "W4A16_AWQ"
    W4A16_GPTQ = "W4A16_GPTQ"
    W4A8_AWQ = "W4A8_AWQ"
    W8A8_SQ_PER_CHANNEL = "W8A8_SQ_PER_CHANNEL"
    FP8 = "FP8"
    FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
    FP8_BLOCK_SCALES = "FP8_BLOCK_SCALES"
    INT8 = "INT8"  # KV cache
    # FP8 above doubles as the KV-cache algorithm, as in TensorRT-LLM.


KV_CACHE_ALGOS = (QuantAlgo.INT8, QuantAlgo.FP8)
GROUP_SIZES = (32, 64, 128)  # inputs per scale of the group-wise formats (int4, FP8_BLOCK_SCALES)
# How weights are rounded onto their grid: to the nearest value, or by GPTQ's error feedback on calibration
# inputs (kiln.quantization.gptq; the FP8 formats: int4 has its own algorithm name, W4A16_GPTQ)
WEIGHT_ROUNDINGS = ("nearest", "gptq")
WEIGHT_ALGOS = tuple(a for a in QuantAlgo if a is not QuantAlgo.INT8)


def _check(condition: bool, owner: str, name: str, allowed: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{owner}.{name} must be {allowed}, got {value!r}")


def _check_positive_ints(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
               type(obj).__name__, name, "an integer >= 1", value)


def _parse_algo(value: Any, owner: str, name: str, allowed: tuple[QuantAlgo, ...]) -> QuantAlgo | None:
    if value is None or isinstance(value, QuantAlgo) and value in allowed:
        return value
    names = [a.value for a in allowed]
    if isinstance(value, str) and value.upper() in names:
        return QuantAlgo(value.upper())
    raise ConfigError(f"{owner}.{name} must be one of {names} or None, got {value!r}")


def exclusions(quantize_lm_head: bool, patterns=()) -> tuple[str, ...]:
    """QuantConfig.exclude_modules: lm_head unless it is to be quantized, then `patterns` (duplicates dropped)."""
    return tuple(dict.fromkeys(("lm_head",) * (not quantize_lm_head) + tuple(patterns)))


@dataclass(frozen=True)
class QuantConfig:
    quant_algo: QuantAlgo | None = None
    kv_cache_quant_algo: QuantAlgo | None = None
    group_size: int = 128
    has_zero_point: bool = False
    exclude_modules: tuple[str, ...] = ("lm_head",)
    # W8A8_SQ_PER_CHANNEL's migration strength, or "auto": searched per input (kiln.quantization.smoothquant)
    smoothquant_alpha: float | str = 0.5
    keep_sensitive_layers: int = 0  # layers kept in full precision, chosen on calibration (quantization.sensitivity)
    weight_rounding: str = "nearest"  # one of WEIGHT_ROUNDINGS

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass normalisation)
        set_("quant_algo", _parse_algo(self.quant_algo, "QuantConfig", "quant_algo", WEIGHT_ALGOS))
        set_("kv_cache_quant_algo",
             _parse_algo(self.kv_cache_quant_algo, "QuantConfig", "kv_cache_quant_algo", KV_CACHE_ALGOS))
        _check(self.group_size in GROUP_SIZES, "QuantConfig", "group_size", "one of 32, 64, 128", self.group_size)
        number = isinstance(self.smoothquant_alpha, (int, float)) and not isinstance(self.smoothquant_alpha, bool)
        _check(self.smoothquant_alpha == "auto" or (number and 0.0 <= self.smoothquant_alpha <= 1.0), "QuantConfig",
               "smoothquant_alpha", "a number in [0, 1] or 'auto'", self.smoothquant_alpha)
        if number:
            set_("smoothquant_alpha", float(self.smoothquant_alpha))
        _check(isinstance(self.keep_sensitive_layers, int) and not isinstance(self.keep_sensitive_layers, bool)
               and self.keep_sensitive_layers >= 0, "QuantConfig", "keep_sensitive_layers", "an integer >= 0",
               self.keep_sensitive_layers)
        _check(self.weight_rounding in WEIGHT_ROUNDINGS, "QuantConfig", "weight_rounding",
               f"one of {list(WEIGHT_ROUNDINGS)}", self.weight_rounding)
        set_("exclude_modules", tuple(self.exclude_modules))

    @property
    def is_quantized(self) -> bool:
        return self.quant_algo is not None or self.kv_cache_quant_algo is not None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["quant_algo"] = self.quant_algo and self.quant_algo.value
        d["kv_cache_quant_algo"] = self.kv_cache_quant_algo and self.kv_cache_quant_algo.value
        d["exclude_modules"] = list(self.exclude_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        return cls(**_known_fields(cls, d, "quantization"))


def _known_fields(cls, d: dict, where: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {where} field(s) {unknown}; known fields: {sorted(names)}")
    return dict(d)


# rope_gpt_neox: rotary ("rotate half" layout); learned_absolute: a position embedding table (GPT-2).
POSITION_EMBEDDING_TYPES = ("rope_gpt_neox", "learned_absolute")
# Rope scaling type -> the fields it needs (see kiln/layers/rotary.py).
ROPE_SCALING_FIELDS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings", "attention_factor"),
    "freq_factors": ("factors",),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "truncate"),
}
ROPE_SCALING_TYPES = tuple(ROPE_SCALING_FIELDS)
ROPE_PER_FREQUENCY_FIELDS = ("factors", "short_factor", "long_factor")  # lists of (rotary dim / 2) values
NORM_TYPES = ("rmsnorm", "layernorm")
# Activations by MLP kind: a gated MLP is act(fc(x)) * gate(x) (SwiGLU, GeGLU), a plain one act(fc(x)).
GATED_ACTIVATIONS = ("silu", "gelu_tanh", "quick_gelu")
PLAIN_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "relu2", "silu")
LAYER_TYPES = ("full_attention", "sliding_attention")
MOE_ROUTERS = ("softmax", "sigmoid")  # how a mixture of experts chooses (PretrainedConfig.moe_router)


@dataclass(frozen=True)
class KVCacheLayout:
    """A layer's paged cache on one rank: `heads` rows of `width` a token, keys and values apart, or values read
    from the keys' rows (values_in_keys: one tensor)."""

    heads: int
    width: int
    values_in_keys: bool = False

    @property
    def tensors(self) -> int:
        return 1 if self.values_in_keys else 2


@dataclass(frozen=True)
class PretrainedConfig:
    """A model's structure, dtype, and the shard layout of the checkpoint that holds it."""

    architecture: str
    dtype: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    intermediate_size: int
    hidden_act: str = "silu"
    norm_epsilon: float = 1e-5
    max_position_embeddings: int = 2048
    position_embedding_type: str = "rope_gpt_neox"
    rotary_base: float = 10000.0
    rotary_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    # Structure beyond Llama (defaults are Llama's). Families set them in their HF config readers.
    qkv_bias: bool = False  # bias on q/k/v only (Qwen2); attention_bias puts one on the output too
    norm_type: str = "rmsnorm"  # "layernorm" has a bias (GPT-2, GPT-NeoX)
    norm_bias: bool = True  # the layernorm's bias; False: none (Cohere)
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + w) (Gemma)
    qk_norm: bool = False  # RMSNorm over each head's q and k before rotary (Qwen3, Gemma 3)
    qk_norm_full_width: bool = False  # ... over all of a token's q heads, and all its k heads, at once (OLMo 2)
    qk_norm_per_head_weight: bool = False  # ... each head's a bias-free LayerNorm with its own weight (Command R+)
    attention_sinks: bool = False  # a learned logit per head joins each softmax's denominator (gpt-oss: `sinks`)
    pre_norm: bool = True  # a norm before each sub-block; False with sandwich_norm: after it only (OLMo 2)
    gated_mlp: bool = True
    parallel_residual: bool = False  # x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX)
    sandwich_norm: bool = False  # norms on the attention and MLP outputs too (Gemma 2/3)
    embedding_multiplier: float = 1.0  # sqrt(hidden_size) in Gemma, applied in the activations' dtype
    residual_multiplier: float = 1.0  # each sub-block's output times this before it joins the residual (Granite)
    logits_scaling: float = 1.0  # logits divided by this (Granite)
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power; None: head_size
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float | None = None
    layer_types: tuple[str, ...] | None = None  # per layer: full or sliding; None: sliding_window for all
    rotary_dim: int | None = None  # rotate the first rotary_dim dims of each head (GPT-NeoX); None: all
    rotary_base_local: float | None = None  # rotary base of sliding layers, unscaled (Gemma 3)
    nope_layers: tuple[int, ...] = ()  # layers whose attention has no rotary: no positions at all (SmolLM3)
    moe_num_experts: int = 0  # 0: dense MLP
    moe_top_k: int = 0
    moe_intermediate_size: int = 0
    moe_normalize_topk: bool = True  # renormalise the top-k softmax probabilities to sum to 1
    moe_shared_expert_intermediate_size: int = 0  # a shared expert every token runs (Qwen2-MoE, GLM-4.5)
    moe_shared_expert_gated: bool = True  # its output times a sigmoid gate (Qwen2-MoE) or added as is (GLM-4.5)
    moe_dense_layers: tuple[int, ...] = ()  # layers that keep the dense MLP in a MoE model
    # MOE_ROUTERS: "softmax" top-k of softmax probabilities (Mixtral, Qwen-MoE); "sigmoid" DeepSeek-V3's and
    # GLM-4.5's, top-k of sigmoid scores plus a learned bias (`mlp.choice_bias`, used to choose only), from the
    # moe_topk_groups best of moe_num_groups groups of experts, weighted by the scores times moe_routed_scaling
    # (kiln.kernels.moe.Router; a softmax router with groups keeps the groups of the best probabilities: DeepSeek-V2)
    moe_router: str = "softmax"
    moe_num_groups: int = 1
    moe_topk_groups: int = 1
    moe_routed_scaling: float = 1.0
    # gpt-oss: a bias on the router and on every expert's projections, and its clamped GLU: act(min(fc, limit)) *
    # (clamp(gate, -limit, limit) + 1) where moe_swiglu_limit is set (None: act(fc) * gate)
    moe_router_bias: bool = False
    moe_expert_bias: bool = False
    moe_swiglu_limit: float | None = None
    # Multi-head latent attention (DeepSeek-V3, Kimi K2; kiln.layers.mla), on where mla_kv_lora_rank > 0: each head's
    # key and value expanded from one latent of that rank, the key's last mla_rope_head_dim dims from one rotated key
    # all heads share (in interleaved pairs when mla_rope_interleave); q through a rank-mla_q_lora_rank bottleneck (0:
    # none). head_size is a key's width, values are mla_v_head_dim wide. The cache holds the latent and the rotated
    # key alone (kv_cache_layout).
    mla_kv_lora_rank: int = 0
    mla_q_lora_rank: int = 0
    mla_rope_head_dim: int = 0
    mla_v_head_dim: int = 0
    mla_rope_interleave: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    mapping: Mapping = field(default_factory=Mapping)
    quantization: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self):
        owner = "PretrainedConfig"
        torch_dtype(self.dtype)
        _check_positive_ints(self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                    "num_key_value_heads", "head_size", "intermediate_size",
                                    "max_position_embeddings"))
        _check(self.num_attention_heads % self.num_key_value_heads == 0, owner, "num_key_value_heads",
               f"a divisor of num_attention_heads ({self.num_attention_heads})", self.num_key_value_heads)
        acts = GATED_ACTIVATIONS if self.gated_mlp else PLAIN_ACTIVATIONS
        _check(self.hidden_act in acts, owner, "hidden_act",
               f"one of {acts} for a {'gated' if self.gated_mlp else 'plain'} MLP", self.hidden_act)
        self._check_structure()
        _check(self.position_embedding_type in POSITION_EMBEDDING_TYPES, owner, "position_embedding_type",
               f"one of {POSITION_EMBEDDING_TYPES}", self.position_embedding_type)
        for name in ("rotary_base", "norm_epsilon"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, owner, name,
                   "a number > 0", value)
        scaling = self.rotary_scaling
        _check(scaling is None or isinstance(scaling, dict) and scaling.get("type") in ROPE_SCALING_TYPES, owner,
               "rotary_scaling.type", f"one of {ROPE_SCALING_TYPES}", scaling)
        if scaling is not None:
            needed = ROPE_SCALING_FIELDS[scaling["type"]]
            _check(all(f in scaling for f in needed), owner, "rotary_scaling",
                   f"a dict with {list(needed)} for type {scaling['type']!r}", scaling)
            pairs = (self.rotary_dim or self.head_size) // 2
            for name in set(needed) & set(ROPE_PER_FREQUENCY_FIELDS):
                _check(len(scaling[name]) == pairs, owner, f"rotary_scaling.{name}",
                       f"one value per rotary frequency ({pairs})", f"{len(scaling[name])} values")
        _check(self.sliding_window is None or isinstance(self.sliding_window, int) and self.sliding_window >= 1,
               owner, "sliding_window", "None or an integer >= 1", self.sliding_window)
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    def _check_structure(self) -> None:
        owner = "PretrainedConfig"
        _check(self.norm_type in NORM_TYPES, owner, "norm_type", f"one of {NORM_TYPES}", self.norm_type)
        _check(not (self.norm_unit_offset and self.norm_type != "rmsnorm"), owner, "norm_unit_offset",
               "False unless norm_type is 'rmsnorm'", self.norm_unit_offset)
        _check(not (self.parallel_residual and self.sandwich_norm), owner, "sandwich_norm",
               "False with parallel_residual", self.sandwich_norm)
        _check(self.pre_norm or self.sandwich_norm, owner, "pre_norm",
               "True unless sandwich_norm (a layer needs its norms before or after each sub-block)", self.pre_norm)
        _check(self.qk_norm or not self.qk_norm_full_width, owner, "qk_norm_full_width", "False without qk_norm",
               self.qk_norm_full_width)
        _check(self.qk_norm and not self.qk_norm_full_width or not self.qk_norm_per_head_weight, owner,
               "qk_norm_per_head_weight", "False without qk_norm or with qk_norm_full_width",
               self.qk_norm_per_head_weight)
        multipliers = ("embedding_multiplier", "residual_multiplier", "logits_scaling")  # (never None)
        for name in (*multipliers, "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                     "rotary_base_local"):
            value = getattr(self, name)
            _check(value is None and name not in multipliers or
                   isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, owner, name,
                   "a number > 0" + ("" if name in multipliers else " or None"), value)
        object.__setattr__(self, "nope_layers", tuple(self.nope_layers))
        _check(all(isinstance(i, int) and 0 <= i < self.num_hidden_layers for i in self.nope_layers), owner,
               "nope_layers", f"layer indices in [0, num_hidden_layers={self.num_hidden_layers})", self.nope_layers)
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            _check(len(self.layer_types) == self.num_hidden_layers and set(self.layer_types) <= set(LAYER_TYPES),
                   owner, "layer_types", f"None or num_hidden_layers ({self.num_hidden_layers}) of {LAYER_TYPES}",
                   self.layer_types)
        rd = self.rotary_dim
        _check(rd is None or isinstance(rd, int) and not isinstance(rd, bool) and 2 <= rd <= self.head_size
               and rd % 2 == 0, owner, "rotary_dim", f"None or an even integer in [2, head_size={self.head_size}]",
               rd)
        for name in ("moe_num_experts", "moe_top_k", "moe_intermediate_size",
                     "moe_shared_expert_intermediate_size"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, owner, name,
                   "an integer >= 0", value)
        if self.moe_num_experts:
            _check(1 <= self.moe_top_k <= self.moe_num_experts, owner, "moe_top_k",
                   f"in [1, moe_num_experts={self.moe_num_experts}]", self.moe_top_k)
            _check(self.moe_intermediate_size >= 1, owner, "moe_intermediate_size", "an integer >= 1 with experts",
                   self.moe_intermediate_size)
        self._check_router()
        self._check_mla()
        object.__setattr__(self, "moe_dense_layers", tuple(self.moe_dense_layers))
        _check(all(isinstance(i, int) and 0 <= i < self.num_hidden_layers for i in self.moe_dense_layers), owner,
               "moe_dense_layers", f"layer indices in [0, {self.num_hidden_layers - 1}]", self.moe_dense_layers)

    def _check_router(self) -> None:
        owner = "PretrainedConfig"
        _check(self.moe_router in MOE_ROUTERS, owner, "moe_router", f"one of {MOE_ROUTERS}", self.moe_router)
        groups, best = self.moe_num_groups, self.moe_topk_groups
        _check(isinstance(groups, int) and groups >= 1 and (self.moe_num_experts % groups == 0), owner,
               "moe_num_groups", f"a divisor of moe_num_experts ({self.moe_num_experts})", groups)
        _check(isinstance(best, int) and 1 <= best <= groups, owner, "moe_topk_groups",
               f"in [1, moe_num_groups={groups}]", best)
        _check(groups == 1 or self.moe_router != "sigmoid" or self.moe_num_experts // groups >= 2, owner,
               "moe_num_groups", "groups of 2 experts or more with moe_router 'sigmoid' (a group's worth is its "
               "two best)", groups)
        scaling = self.moe_routed_scaling
        _check(isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and scaling > 0, owner,
               "moe_routed_scaling", "a number > 0", scaling)

    def _check_mla(self) -> None:
        owner = "PretrainedConfig"
        for name in ("mla_kv_lora_rank", "mla_q_lora_rank", "mla_rope_head_dim", "mla_v_head_dim"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, owner, name,
                   "an integer >= 0", value)
        if not self.mla_kv_lora_rank:
            return
        rope = self.mla_rope_head_dim
        _check(rope % 2 == 0 and 2 <= rope < self.head_size, owner, "mla_rope_head_dim",
               f"an even integer in [2, head_size={self.head_size}) with mla_kv_lora_rank", rope)
        _check(self.mla_v_head_dim >= 1, owner, "mla_v_head_dim", "an integer >= 1 with mla_kv_lora_rank",
               self.mla_v_head_dim)
        _check(self.num_key_value_heads == self.num_attention_heads, owner, "num_key_value_heads",
               f"num_attention_heads ({self.num_attention_heads}) with mla_kv_lora_rank: each head has its own key",
               self.num_key_value_heads)

    def kv_cache_layout(self, tp_size: int) -> "KVCacheLayout":
        """What a rank caches of a token in each layer: its kv heads' keys and values; with latent attention one
        row of kv_lora_rank + rope dims (the normed latent and the rotated key, on every rank), which its heads
        attend as keys and read the first kv_lora_rank of as values (kiln.layers.mla)."""
        if self.mla_kv_lora_rank:
            return KVCacheLayout(1, self.mla_kv_lora_rank + self.mla_rope_head_dim, values_in_keys=True)
        return KVCacheLayout(kv_heads_per_rank(self.num_key_value_heads, tp_size), self.head_size)

    def is_sliding_layer(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_num_experts > 0 and layer not in self.moe_dense_layers

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    def replace(self, **changes) -> "PretrainedConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["moe_dense_layers"] = list(self.moe_dense_layers)
        if self.layer_types is not None:
            d["layer_types"] = list(self.layer_types)
        d["mapping"] = self.mapping.to_dict()
        d["quantization"] = self.quantization.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict, rank: int = 0) -> "PretrainedConfig":
        d = _known_fields(cls, d, "model config")
        d["mapping"] = Mapping.from_dict(d.get("mapping", {"world_size": 1, "tp_size": 1, "pp_size": 1}), rank)
        d["quantization"] = QuantConfig.from_dict(d.get("quantization", {}))
        try:
            return cls(**d)
        except TypeError as e:  # a required field is missing
            raise ConfigError(f"model config: {e}") from None


CAPACITY_SCHEDULER_POLICIES = ("max_utilization", "guaranteed_no_evict")
MAX_DRAFT_LEN = 16  # draft tokens a step may check: past a few, a copied run rarely holds


@dataclass(frozen=True)
class BuildConfig:
    """Ceilings on the dynamic shapes an engine serves; the KV cache comes from one memory budget.

    max_seq_len and max_input_len left as None are filled from the model at build time.
    """

    max_batch_size: int = 8
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int = 8192
    kv_cache_type: str = "paged"
    tokens_per_block: int = 32
    kv_cache_free_gpu_mem_fraction: float = 0.9
    kv_cache_max_tokens: int | None = None  # an explicit KV-cache size instead of the memory fraction
    # Greedy decode steps run back to back on the GPU (CUDA graphs feeding each step's argmax to the next)
    # before the host looks at the tokens: the host's per-step work then overlaps the GPU's. 1 turns it off.
    decode_steps_per_sync: int = 4
    # Speculative decoding by n-gram lookup (kiln.runtime.speculative): up to this many draft tokens, found in a
    # greedy sequence's own prompt and output, checked in each decode step. 0 turns it off.
    max_draft_len: int = 0
    # Who gets the KV cache (TensorRT-LLM's names): "max_utilization" admits a request when its prompt fits and
    # preempts the newest running one (to be recomputed) when blocks run out; "guaranteed_no_evict" admits one
    # only when the cache can also hold every running request's output to its max_tokens, so none is ever
    # preempted (no recomputation; fewer requests at once when max_tokens is far above what they generate).
    capacity_scheduler_policy: str = "max_utilization"

    # Options read when an engine is loaded, not built into it: the KV cache is sized on the GPU the engine runs
    # on, and the decode bursts and the admission policy are the scheduler's. LLM(engine_dir, build_config=bc)
    # takes those bc sets (with_runtime_options) whatever the engine was built with; the other fields shape the
    # engine (its CUDA graphs, its limits) and change only by building again.
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("kv_cache_free_gpu_mem_fraction", "kv_cache_max_tokens",
                                                 "decode_steps_per_sync", "max_draft_len", "capacity_scheduler_policy")

    def __post_init__(self):
        owner = "BuildConfig"
        _check_positive_ints(self, ("max_batch_size", "max_num_tokens", "tokens_per_block", "decode_steps_per_sync"))
        _check(isinstance(self.max_draft_len, int) and not isinstance(self.max_draft_len, bool)
               and 0 <= self.max_draft_len <= MAX_DRAFT_LEN, owner, "max_draft_len",
               f"an integer in [0, {MAX_DRAFT_LEN}] (0: no speculative decoding)", self.max_draft_len)
        for name in ("max_input_len", "max_seq_len", "kv_cache_max_tokens"):
            value = getattr(self, name)
            _check(value is None or isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                   owner, name, "None or an integer >= 1", value)
        if self.max_input_len is not None and self.max_seq_len is not None:
            _check(self.max_input_len <= self.max_seq_len, owner, "max_input_len",
                   f"<= max_seq_len ({self.max_seq_len})", self.max_input_len)
        _check(self.kv_cache_type in ("paged", "continuous"), owner, "kv_cache_type", "'paged' or 'continuous'",
               self.kv_cache_type)
        _check(self.tokens_per_block & (self.tokens_per_block - 1) == 0, owner, "tokens_per_block",
               "a power of two", self.tokens_per_block)
        _check(self.capacity_scheduler_policy in CAPACITY_SCHEDULER_POLICIES, owner, "capacity_scheduler_policy",
               " or ".join(map(repr, CAPACITY_SCHEDULER_POLICIES)), self.capacity_scheduler_policy)
        _check(isinstance(self.kv_cache_free_gpu_mem_fraction, (int, float))
               and 0.0 < self.kv_cache_free_gpu_mem_fraction <= 1.0, owner, "kv_cache_free_gpu_mem_fraction",
               "in (0, 1]", self.kv_cache_free_gpu_mem_fraction)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BuildConfig":
        return cls(**_known_fields(cls, d, "build config"))

    def engine_fields(self) -> dict:
        """The fields an engine is built with (all but RUNTIME_FIELDS)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_FIELDS}

    def fields_set(self, names) -> dict:
        """Those of the fields `names` that this config sets: a field at BuildConfig's default counts as not set
        (the flags of `kiln run` and `serve` are the defaults when not given)."""
        default = BuildConfig()
        return {name: getattr(self, name) for name in names if getattr(self, name) != getattr(default, name)}

    def with_runtime_options(self, asked: "BuildConfig | None", every: bool = False) -> "BuildConfig":
        """This engine's config with the RUNTIME_FIELDS `asked` sets (fields_set); itself when asked is None.
        every: all of asked's RUNTIME_FIELDS, those at their defaults too (BuildConfig()'s when asked is None)."""
        if every:
            asked = asked or BuildConfig()
            return dataclasses.replace(self, **{name: getattr(asked, name) for name in self.RUNTIME_FIELDS})
        given = asked.fields_set(self.RUNTIME_FIELDS) if asked is not None else {}
        if "kv_cache_free_gpu_mem_fraction" in given:  # (the two KV sizes are alternatives: the one asked for wins)
            given.setdefault("kv_cache_max_tokens", None)
        return dataclasses.replace(self, **given)


def read_json(path: Path, what: str) -> dict:
    """Read a JSON file, naming it in the error when it is missing or not valid JSON."""
    from kiln.errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
