"""The Llama family (Llama 2/3/3.1/3.2, Mistral): the generic decoder plus its three source formats."""

from __future__ import annotations

from pathlib import Path

from kiln.checkpoint.gguf_source import GGUFFile
from kiln.checkpoint.meta_source import MetaWeights
from kiln.checkpoint.tokenizer_files import copy_tokenizer_files
from kiln.config import QuantConfig
from kiln.mapping import Mapping
from kiln.models import model_class
from kiln.models.base import DecoderModelForCausalLM, refuse_quantization
from kiln.models.llama import convert
from kiln.models.llama.config import llama_structure
from kiln.models.llama.gguf import config_from_gguf, gguf_tokenizer_writer
from kiln.quantization.gguf_import import keep_int4
from kiln.models.llama.meta import config_from_meta


class LLaMAForCausalLM(DecoderModelForCausalLM):
    HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
    HF_STRUCTURE = staticmethod(llama_structure)

    @classmethod
    def hf_name_map(cls, config):
        return convert.hf_name_map(config.tie_word_embeddings)

    @classmethod
    def from_meta_ckpt(cls, meta_dir: str | Path, dtype: str = "auto", mapping: Mapping | None = None,
                       quant_config: QuantConfig | None = None) -> "LLaMAForCausalLM":
        refuse_quantization(quant_config)
        meta_dir = Path(meta_dir)
        weights = MetaWeights(meta_dir)
        config = config_from_meta(meta_dir, weights, dtype, mapping or Mapping())
        model = cls.empty(config)
        model.attach_source(weights, convert.meta_name_map(config.tie_word_embeddings), str(meta_dir))
        model.tokenizer_writer = lambda dst: copy_tokenizer_files(meta_dir, dst)
        return model

    @classmethod
    def from_gguf(cls, path: str | Path, dtype: str = "auto", mapping: Mapping | None = None,
                  quant_config: QuantConfig | None = None, keep_quantization: bool = False) -> "LLaMAForCausalLM":
        """keep_quantization: 4-bit linears stay W4A16 (kiln.quantization.gguf_import), else all is dequantized. A
        `llama` file with experts (llama.cpp's Mixtral) gives a MixtralForCausalLM."""
        refuse_quantization(quant_config)
        gguf = GGUFFile(path)
        config = config_from_gguf(gguf, dtype, mapping or Mapping())
        name_map = convert.gguf_name_map(config.tie_word_embeddings, "blk.0.ffn_gate.0.weight" not in gguf)
        model_cls = model_class(config.architecture)  # (Mixtral's, where the file has experts)
        if keep_quantization:
            config, name_map = keep_int4(model_cls, config, gguf, name_map, dtype)
        model = model_cls.empty(config)
        model.attach_source(gguf, name_map, str(path))
        model.tokenizer_writer = gguf_tokenizer_writer(gguf)
        return model
