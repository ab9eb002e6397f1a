"""GGUF metadata (llama.cpp's `llama.*` keys) -> kiln PretrainedConfig, and the tokenizer inside the file
(shared by every family that reads GGUF)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kiln.checkpoint.gguf_source import GGUFFile
from kiln.config import PretrainedConfig, conversion_dtype
from kiln.errors import CheckpointError, UnsupportedArchitectureError
from kiln.mapping import Mapping

log = logging.getLogger(__name__)

# general.file_type -> the dtype "auto" picks; quantized files dequantize to float32 (exact).
GGUF_FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}
# GGUF general.architecture -> the HF architecture whose class reads it (from_gguf).
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                      "gemma3": "Gemma3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "qwen3": "Qwen3ForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
                      "phi3": "Phi3ForCausalLM", "glm4moe": "Glm4MoeForCausalLM"}


def hf_shape_from_gguf(gguf: GGUFFile, dtype: str, extra_eos: tuple[int, ...] = ()) -> dict:
    """The config.json fields (transformers 5 form) that every llama.cpp architecture's `{arch}.*` metadata gives
    alike: the architecture, dtype, sizes, norm epsilon, context, tied embeddings and special tokens (eos and eot,
    then `extra_eos`). The families that read GGUF as a Hugging Face config add their own fields."""
    arch = gguf.require("general.architecture")
    k = lambda key: gguf.require(f"{arch}.{key}")  # noqa: E731
    hidden, heads = k("embedding_length"), k("attention.head_count")
    tokens = gguf.field("tokenizer.ggml.tokens") or []
    eos = [gguf.field("tokenizer.ggml.eos_token_id"), gguf.field("tokenizer.ggml.eot_token_id"), *extra_eos]
    return {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "dtype": conversion_dtype(dtype, GGUF_FILE_DTYPES.get(gguf.field("general.file_type"), "float32")),
        "vocab_size": int(gguf.field(f"{arch}.vocab_size") or len(tokens) or
                          gguf.tensors["token_embd.weight"].shape[1]),
        "hidden_size": hidden,
        "num_hidden_layers": k("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": gguf.field(f"{arch}.attention.head_count_kv") or heads,
        "head_dim": gguf.field(f"{arch}.attention.key_length") or hidden // heads,
        "intermediate_size": k("feed_forward_length"),
        "rms_norm_eps": float(k("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": k("context_length"),
        "tie_word_embeddings": "output.weight" not in gguf,
        "bos_token_id": gguf.field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": [int(e) for e in dict.fromkeys(eos) if e is not None],
    }


def config_from_gguf(gguf: GGUFFile, dtype: str, mapping: Mapping) -> PretrainedConfig:
    arch = gguf.require("general.architecture")
    if GGUF_ARCHITECTURES.get(arch) != "LlamaForCausalLM":
        raise UnsupportedArchitectureError(f"{gguf.path}: GGUF architecture {arch!r} is not supported as a Llama "
                                           f"file; GGUF architectures kiln reads: {', '.join(GGUF_ARCHITECTURES)} "
                                           "(kiln convert picks the right class)")
    k = lambda key: gguf.require(f"{arch}.{key}")  # noqa: E731
    heads = k("attention.head_count")
    hidden = k("embedding_length")
    tokens = gguf.field("tokenizer.ggml.tokens")
    vocab = gguf.field(f"{arch}.vocab_size") or (len(tokens) if tokens else gguf.tensors["token_embd.weight"].shape[1])
    eos = [gguf.field(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id")]
    scaling = rope_scaling_from_gguf(gguf, arch)
    experts = gguf.field(f"{arch}.expert_count") or 0
    return PretrainedConfig(
        architecture="MixtralForCausalLM" if experts else GGUF_ARCHITECTURES[arch],
        dtype=conversion_dtype(dtype, GGUF_FILE_DTYPES.get(gguf.field("general.file_type"), "float32")),
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_hidden_layers=k("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=gguf.field(f"{arch}.attention.head_count_kv") or heads,
        head_size=gguf.field(f"{arch}.attention.key_length") or hidden // heads,
        intermediate_size=k("feed_forward_length"),
        norm_epsilon=float(k("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=k("context_length"),
        rotary_base=float(gguf.field(f"{arch}.rope.freq_base", 10000.0)),
        rotary_scaling=scaling,
        tie_word_embeddings="output.weight" not in gguf,
        bos_token_id=gguf.field("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        mapping=mapping,
        **(_mixtral_fields(gguf, arch, experts) if experts else {}),
    )


def _mixtral_fields(gguf: GGUFFile, arch: str, experts: int) -> dict:
    """llama.cpp writes Mixtral as a `llama` file with experts: each of feed_forward_length, softmax routing with
    the top-k weights renormalized (its rule for `llama`), as transformers' Mixtral routes."""
    return dict(moe_num_experts=experts, moe_top_k=gguf.require(f"{arch}.expert_used_count"),
                moe_intermediate_size=gguf.require(f"{arch}.feed_forward_length"), moe_normalize_topk=True)


def rope_scaling_from_gguf(gguf: GGUFFile, arch: str) -> dict | None:
    """kiln's rotary_scaling for the file: linear from `{arch}.rope.scaling.*`, or the per-frequency divisors of
    `rope_freqs.weight`, which llama.cpp's converter writes for Llama 3.1 and later in place of llama3's
    parameters (factor, low/high_freq_factor, original context): they are the same scaling, evaluated."""
    kind = gguf.field(f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in gguf:
        if kind not in (None, "none"):
            raise CheckpointError(f"{gguf.path}: the file has both rope_freqs.weight and {arch}.rope.scaling.type "
                                  f"{kind!r}; kiln reads one rope scaling, so it cannot tell which applies")
        return {"type": "freq_factors", "factors": gguf.get("rope_freqs.weight").float().tolist()}
    if kind == "linear":
        return {"type": "linear", "factor": gguf.require(f"{arch}.rope.scaling.factor")}
    return None


def from_gguf_as_hf(cls, path, dtype: str, mapping: Mapping | None, keep_quantization: bool, architectures,
                    hf_config, name_map, chat_template: str | None = None):
    """The model of a GGUF file for a family that reads the metadata as the Hugging Face config it came from (Gemma 3,
    Qwen): `hf_config(gguf, dtype)` -> that config.json, `name_map(tied)` -> the GGUF names, `architectures` the
    GGUF ones the family reads, `chat_template` its default for files that carry none. Weights are read lazily;
    with keep_quantization the 4-bit linears stay int4 (kiln.quantization.gguf_import)."""
    from kiln.quantization.gguf_import import keep_int4

    gguf = GGUFFile(path)
    arch = gguf.require("general.architecture")
    if arch not in architectures:
        raise UnsupportedArchitectureError(
            f"{gguf.path}: GGUF architecture {arch!r} is not supported by {cls.__name__} (it reads "
            f"{list(architectures)}); GGUF architectures kiln reads: {', '.join(GGUF_ARCHITECTURES)}")
    config = cls.config_from_hf(hf_config(gguf, dtype), dtype, mapping or Mapping(), None,
                                f"{gguf.path} (GGUF metadata)")
    names = name_map(config.tie_word_embeddings)
    if keep_quantization:
        config, names = keep_int4(cls, config, gguf, names, dtype)
    model = cls.empty(config)
    model.attach_source(gguf, names, str(path))
    model.tokenizer_writer = gguf_tokenizer_writer(gguf, chat_template, config.eos_token_ids)
    return model


def gguf_tokenizer_writer(gguf: GGUFFile, chat_template: str | None = None, eos_token_ids=None):
    """Writes the file's tokenizer and chat template as Hugging Face tokenizer files (or nothing, with a
    warning, when the GGUF carries no tokenizer). `chat_template` is the family's default for files that
    carry none; `eos_token_ids` (default: the file's eos and eot) go to generation_config.json."""

    def write(dst: Path) -> None:
        if gguf.field("tokenizer.ggml.model") is None:
            log.warning("%s carries no tokenizer; the checkpoint will need token ids as input", gguf.path)
            return
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.path.parent, gguf_file=gguf.path.name)
        template = gguf.field("tokenizer.chat_template") or chat_template
        if template and not tokenizer.chat_template:
            tokenizer.chat_template = template
        tokenizer.save_pretrained(dst)
        eos = list(eos_token_ids) if eos_token_ids is not None else [
            int(e) for e in (gguf.field("tokenizer.ggml.eos_token_id"), gguf.field("tokenizer.ggml.eot_token_id"))
            if e is not None]
        generation = {"bos_token_id": gguf.field("tokenizer.ggml.bos_token_id"), "eos_token_id": eos}
        (dst / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    return write
