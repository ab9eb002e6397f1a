"""PretrainedModel and DecoderModelForCausalLM: the model object of the convert -> build -> run flow.

A model is a torch.nn.Module holding one rank's shard of the weights. Converters create it empty
(on the meta device) and attach *lazy* weights, functions that read, transform and shard one
tensor when asked. `save_checkpoint` streams them to disk one at a time (memory bounded by the
largest tensor), and the first forward, or `materialize()`, loads them all.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kiln.checkpoint.atomic import atomic_dir, write_json_atomic
from kiln.checkpoint.hf_source import HFWeights
from kiln.checkpoint.safetensors_io import SafetensorsFile, SafetensorsWriter
from kiln.checkpoint.tokenizer_files import copy_tokenizer_files
from kiln.config import PretrainedConfig, QuantConfig, read_json
from kiln.errors import CheckpointError, ConfigError, EngineVersionError
from kiln.layers.attention import Attention, AttentionBatch
from kiln.layers.mla import MLAttention
from kiln.layers.embedding import LMHead, PositionEmbedding, VocabEmbedding
from kiln.layers.linear import prepare_linear_layers
from kiln.layers.mlp import GatedMLP, make_mlp
from kiln.layers.moe import MoE
from kiln.layers.normalization import RMSNorm, Unnormed, add_and_norm, make_norm
from kiln.mapping import Mapping, replicate
from kiln.models import hf_config
from kiln.quantization.fp8_import import prequantized_format
from kiln.quantization.methods import (apply_quant_config, check_experts_importable, quantized_linears,
                                      quantizes_lm_head)
from kiln.version import FORMAT_VERSION, __version__

CONFIG_FILE = "config.json"


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def check_kiln_config(d: dict, path: Path) -> None:
    """Refuse a config.json that kiln did not write (no format_version, no kiln_version): most often a source
    model's dir passed where a kiln checkpoint or engine is read."""
    if "format_version" not in d and "kiln_version" not in d:
        raise CheckpointError(f"{path}: not a kiln checkpoint or engine (no format_version; a source model's "
                              f"config.json?). Convert it first: `kiln convert --model-dir {path.parent} --output-dir "
                              "CKPT`; kiln run, kiln serve and LLM() also take a source model dir as it is.")


def check_format_version(d: dict, path: Path, what: str, fix: str) -> None:
    check_kiln_config(d, path)
    found = d.get("format_version")
    if found != FORMAT_VERSION:
        raise EngineVersionError(f"{path}: {what} has format_version {found!r} (written by kiln "
                                 f"{d.get('kiln_version', '?')}); this kiln {__version__} reads format_version "
                                 f"{FORMAT_VERSION}. {fix}")


class PretrainedModel(nn.Module):
    """Base of every model: config, this rank's weights (maybe lazy), checkpoint I/O."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self._lazy: dict[str, Callable[[], torch.Tensor]] = {}
        # Writes the tokenizer files (tokenizer, chat template, generation config) into a dir.
        self.tokenizer_writer: Callable[[Path], None] | None = None

    @property
    def mapping(self) -> Mapping:
        return self.config.mapping

    @classmethod
    def empty(cls, config: PretrainedConfig) -> "PretrainedModel":
        """The model structure on the meta device: shapes and names, no memory."""
        with torch.device("meta"):
            return cls(config)

    # ---- weights ------------------------------------------------------------------------------------

    def weight_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Name -> (dtype, shape) of every weight this rank holds (tied weights once). Floating-point weights
        take the model's dtype; integer ones (quantized codes) keep their own."""
        return {name: self._spec(p) for name, p in self.named_parameters()}

    def _spec(self, param: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...]]:
        # FP8 codes (one byte) keep their dtype like integer codes; wider floats take the model's.
        full_precision = param.is_floating_point() and param.element_size() > 1
        return self.config.torch_dtype if full_precision else param.dtype, tuple(param.shape)

    def shard_rule(self, name: str):
        module_name, _, leaf = name.rpartition(".")
        return getattr(self.get_submodule(module_name), "shard_rules", {}).get(leaf, replicate)

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        """Load this rank's weights; names and shapes must match exactly (errors list every mismatch)."""
        specs = self.weight_specs()
        missing = sorted(set(specs) - set(weights))
        unexpected = sorted(set(weights) - set(specs))
        misshaped = [f"{n}: got {tuple(weights[n].shape)}, expected {specs[n][1]}"
                     for n in specs if n in weights and tuple(weights[n].shape) != specs[n][1]]
        if missing or unexpected or misshaped:
            problems = [f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                        for label, items in (("missing", missing), ("unexpected", unexpected),
                                             ("mis-shaped", misshaped)) if items]
            raise CheckpointError(f"{type(self).__name__}.load: weights do not match the config: "
                                  + "; ".join(problems))
        for name, tensor in weights.items():
            module_name, _, leaf = name.rpartition(".")
            setattr(self.get_submodule(module_name), leaf,
                    nn.Parameter(tensor.to(specs[name][0]), requires_grad=False))
        self._lazy.clear()
        self.tie_weights()

    def tie_weights(self) -> None:
        """Models with tied embeddings share one tensor where both live on this rank."""

    def set_lazy_weights(self, loaders: dict[str, Callable[[], torch.Tensor]]) -> None:
        self._lazy = loaders

    def attach_source(self, source, name_map, where: str) -> None:
        """Make every weight a lazy read of `source` (anything with get(name) and `in`) through
        `name_map`, then this rank's shard. Missing source tensors are reported up front."""
        names = self.weight_specs()
        missing = sorted({s for n in names for s in name_map.source_names(n, self.config) if s not in source})
        if missing:
            raise CheckpointError(f"{where}: missing tensor(s) the config calls for: {', '.join(missing[:8])}"
                                  f"{' ...' if len(missing) > 8 else ''}")

        def load(name):
            return self.shard_rule(name)(name_map.load(name, source, self.config), self.mapping)
        self.set_lazy_weights({name: functools.partial(load, name) for name in names})

    def _read_lazy(self, name: str) -> torch.Tensor:
        dtype, shape = self._spec(self.get_parameter(name))  # (not weight_specs(): one walk per tensor read)
        tensor = self._lazy[name]()
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"weight {name!r} has shape {tuple(tensor.shape)} but the config gives "
                                  f"{shape}; the checkpoint's config.json does not match its weights")
        return tensor.to(dtype)

    def materialize(self, device: str | torch.device = "cpu") -> "PretrainedModel":
        """Load every lazy weight (onto `device`); a no-op when the weights are already loaded."""
        if self._lazy:
            self.load({name: self._read_lazy(name).to(device) for name in self._lazy})
        return self.to(device)

    def read_weight(self, name: str) -> torch.Tensor:
        """One weight, read from its source if it is still lazy (a tied weight by the name it is stored under)."""
        name = self.stored_name(name)
        return self._read_lazy(name) if name in self._lazy else self.get_parameter(name).detach()

    def stored_name(self, name: str) -> str:
        """The name a weight is held under: a tied weight's is its owner's (weight_specs lists it once)."""
        return name

    def named_weights(self):
        """(name, tensor) of every weight, reading lazy ones one at a time."""
        for name in self.weight_specs():
            yield name, self.read_weight(name)

    # ---- checkpoint I/O ----------------------------------------------------------------------------

    def checkpoint_config(self) -> dict:
        return {**self.config.to_dict(), "kiln_version": __version__, "format_version": FORMAT_VERSION}

    def write_rank(self, out_dir: Path) -> None:
        """Stream this rank's weights into out_dir/rank{N}.safetensors, one tensor in memory at a time."""
        path = Path(out_dir) / rank_file(self.mapping.rank)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with SafetensorsWriter(tmp, self.weight_specs(), {"format": "pt"}) as writer:
            for name, tensor in self.named_weights():
                writer.write(name, tensor)
        tmp.rename(path)

    def write_metadata(self, out_dir: Path) -> None:
        """config.json and the tokenizer files."""
        write_json_atomic(Path(out_dir) / CONFIG_FILE, self.checkpoint_config())
        if self.tokenizer_writer is not None:
            self.tokenizer_writer(Path(out_dir))

    def save_checkpoint(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write a kiln checkpoint. A single-rank model writes the whole dir atomically; a rank of a
        larger mapping adds its rank file (and the shared config) to the dir, each file atomically."""
        out_dir = Path(out_dir)
        if self.mapping.world_size == 1:
            with atomic_dir(out_dir, overwrite) as tmp:
                self.write_rank(tmp)
                self.write_metadata(tmp)
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.write_rank(out_dir)
            self.write_metadata(out_dir)
        return out_dir

    @classmethod
    def quantize(cls, hf_dir: str | Path, output_dir: str | Path, quant_config: QuantConfig,
                 mapping: Mapping | None = None, calib_dataset: str | Path | None = None, calib_size: int = 32,
                 calib_max_seq_len: int = 256, dtype: str = "auto", overwrite: bool = False,
                 evaluate: bool = False, device: str | None = None,
                 eval_dataset: str | Path | None = None) -> Path:
        """Write a quantized kiln checkpoint of the source model `hf_dir` (any format `kiln convert` reads) for
        every rank of `mapping`, atomically; weight-only algorithms stream tensor by tensor, AWQ calibrates
        layer by layer first. With `evaluate`, then also write quant_report.json (see kiln.quantization.evaluate)
        from the held-out text shipped with kiln, or from `eval_dataset` (.txt, or .jsonl with a 'text' field).
        `device` does the work (default: cuda when there is a GPU, else cpu)."""
        from kiln.quantization.workflow import quantize_checkpoint

        return quantize_checkpoint(hf_dir, output_dir, quant_config, mapping, calib_dataset, calib_size,
                                   calib_max_seq_len, dtype, overwrite, evaluate_quality=evaluate, device=device,
                                   eval_dataset=eval_dataset)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, rank: int = 0) -> "PretrainedModel":
        ckpt_dir = Path(ckpt_dir)
        d = read_json(ckpt_dir / CONFIG_FILE, "kiln checkpoint config")
        check_format_version(d, ckpt_dir / CONFIG_FILE, "this checkpoint",
                             "Re-run `kiln convert` on the source model with this kiln.")
        from kiln.models import model_class  # the registry imports the model modules

        config = PretrainedConfig.from_dict({k: v for k, v in d.items() if k not in ("kiln_version",
                                                                                      "format_version")}, rank)
        model = model_class(config.architecture).empty(config)
        weights = SafetensorsFile(ckpt_dir / rank_file(rank))
        model.check_file_matches(weights)
        model.set_lazy_weights({name: (lambda n=name: weights.get(n)) for name in model.weight_specs()})
        model.tokenizer_writer = lambda dst: copy_tokenizer_files(ckpt_dir, dst)
        return model

    def check_file_matches(self, weights: SafetensorsFile) -> None:
        """Compare a rank file's header with the config before reading any tensor."""
        specs = self.weight_specs()
        missing = sorted(set(specs) - set(weights.keys()))
        misshaped = [f"{n} {weights.shape(n)} != {specs[n][1]}" for n in specs
                     if n in weights.header and weights.shape(n) != specs[n][1]]
        kv_algo = self.config.quantization.kv_cache_quant_algo
        no_kv_scales = [n for n in missing if n.endswith(".kv_cache_scaling_factor")]
        if no_kv_scales:
            raise CheckpointError(
                f"{weights.path}: config.json sets quantization.kv_cache_quant_algo {kv_algo.value} but the file has "
                f"no kv_cache_scaling_factor for {len(no_kv_scales)} layer(s) ({no_kv_scales[0]}, ...); make it with "
                f"`kiln quantize --kv-cache-quant-algo {kv_algo.value}` (which calibrates the scales), or set "
                "kv_cache_quant_algo to null for a full-precision cache")
        if missing or misshaped:
            quant = self.config.quantization.quant_algo
            made_by = f"`kiln quantize --quant-algo {quant.value}`" if quant else "`kiln convert`"
            raise CheckpointError(f"{weights.path}: does not match config.json: missing "
                                  f"{missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}), mis-shaped "
                                  f"{misshaped[:5]} ({len(misshaped)}); the checkpoint is incomplete or its files "
                                  f"are from different runs: write it again with {made_by} of the source model")


def final_logits(config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
    """lm_head's output as the model's logits: divided by logits_scaling (Granite), soft-capped (Gemma 2)."""
    if config.logits_scaling != 1.0:
        logits = logits / config.logits_scaling
    cap = config.final_logit_softcapping
    return logits if cap is None else torch.tanh(logits / cap) * cap


class DecoderLayer(nn.Module):
    """One decoder block. Pre-norm (Llama): h = x + attn(norm(x)), then h + mlp(norm(h)); parallel
    residual (GPT-NeoX): x + attn(norm1(x)) + mlp(norm2(x)); sandwich norms (Gemma 2/3) also normalise
    each sub-block's output before it joins the residual, and without pre-norms (OLMo 2) only that.

    A layer returns its last sub-block's output and the residual stream apart, (out, residual): the next
    layer's first norm adds them (`add_and_norm`), one fused kernel on the GPU instead of an add and a norm.
    residual None means x is the whole stream (the first layer); out + residual is the layer's output."""

    def __init__(self, config: PretrainedConfig, layer_idx: int, fused_mlp: bool):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.input_layernorm = make_norm(config) if config.pre_norm else Unnormed()
        self.attention = (MLAttention if config.mla_kv_lora_rank else Attention)(config, layer_idx, config.mapping)
        self.post_layernorm = make_norm(config) if config.pre_norm else Unnormed()
        self.mlp = MoE(config, fused_mlp) if config.is_moe_layer(layer_idx) else make_mlp(config, fused_mlp)
        self.sandwich_norm = config.sandwich_norm
        if config.sandwich_norm:
            self.attention_out_layernorm = make_norm(config)
            self.mlp_out_layernorm = make_norm(config)
        self.residual_multiplier = config.residual_multiplier
        # Set at engine load (defer_norms): the norms that the attention's and the MLP's output projections begin in
        # their kernels (post_layernorm, and the next layer's input_layernorm), None where a norm kernel runs.
        self.norms_begun: tuple = (None, None)

    def forward(self, x, positions, batch, residual=None):
        # (x may be a PendingNorm: the norm begun by the layer before, its residual added)
        h, residual = add_and_norm(self.input_layernorm, x, residual)
        after_attention, after_mlp = self.norms_begun
        attn = self.attention(h, positions, batch, **_adding(residual, after_attention))
        if self.parallel_residual:  # in transformers' order: (mlp + attn) + x
            return self.mlp(self.post_layernorm(residual)) + attn, residual
        if self.sandwich_norm:
            attn = self.attention_out_layernorm(attn)
        h, residual = add_and_norm(self.post_layernorm, self._scaled(attn), residual)
        mlp = self.mlp(h, **_adding(residual, after_mlp))
        return self._scaled(self.mlp_out_layernorm(mlp) if self.sandwich_norm else mlp), residual

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        """A sub-block's output as it joins the residual: times residual_multiplier (Granite), in its dtype."""
        return out if self.residual_multiplier == 1.0 else out * self.residual_multiplier

    def fuse_input_quantization(self) -> None:
        """Where a linear takes quantized input (LinearMethod.input_quant: the FP8 formats, SmoothQuant, W4A8_AWQ)
        and an RMSNorm, the gated activation or decode attention computes that input, the kernel writes the codes
        and scales itself (kiln.kernels.input_quant): one pass less per linear, no bit changed. A no-op for every
        other format. Set once, when the engine loads (ModelRunner)."""
        if isinstance(self.attention, Attention):  # (latent attention's norm feeds two linears, its output is cut)
            self._fuse_attention_input_quantization()
        if isinstance(self.mlp, GatedMLP) and self.mlp.fused:
            if isinstance(self.post_layernorm, RMSNorm):  # its output feeds fc_gate alone
                self.post_layernorm.out_quant = self.mlp.fc_gate.input_quant()
            self.mlp.act_quant = self.mlp.proj.input_quant()

    def defer_norms(self, next_layer: "DecoderLayer | None") -> None:
        """Where the GEMVs of a decode step can carry the RMSNorms between them, set norms_begun: the output
        projections' kernels add the residual and sum its squares, the next linear's kernel applies the 1/rms
        (kiln.layers.normalization.PendingNorm), and no norm kernel runs between them. A Llama-3-8B W4A16 batch-1
        step then launches 2 of its 65 norms: 0.9% faster on an H100 (docs/performance.md). Layers of int4
        linears (LinearMethod.carries_norms; RowLinear.matmul_then_norm declines on more than one rank);
        `next_layer` is the one after on this stage (the MLP begins its input norm), or None. KILN_DEFER_NORMS=0
        keeps the norm kernels. Set once, at engine load."""
        if os.environ.get("KILN_DEFER_NORMS", "1") == "0" or not self._carries_norms():
            return
        after_mlp = next_layer.input_layernorm if next_layer is not None and next_layer._carries_norms() else None
        self.norms_begun = (self.post_layernorm, after_mlp)

    def _carries_norms(self) -> bool:
        """A plain pre-norm layer (Llama's) of RMSNorms, fused rotary and SiLU, whose four linears carry pending
        norms."""
        attn, mlp = self.attention, self.mlp
        if not (isinstance(attn, Attention) and isinstance(mlp, GatedMLP) and mlp.fused and mlp.act is F.silu
                and not self.parallel_residual and not self.sandwich_norm and self.residual_multiplier == 1.0):
            return False
        if not all(type(n) is RMSNorm and not n.unit_offset for n in (self.input_layernorm, self.post_layernorm)):
            return False
        if attn.qk_norm or attn.rope is None or not attn.fused_rope:
            return False
        return all(linear.bias is None and linear.quant_method.carries_norms(linear)
                   for linear in (attn.qkv, attn.dense, mlp.fc_gate, mlp.proj))

    def _fuse_attention_input_quantization(self) -> None:
        if isinstance(self.input_layernorm, RMSNorm):  # its output feeds qkv alone
            self.input_layernorm.out_quant = self.attention.qkv.input_quant()
        if os.environ.get("KILN_FP8_ATTENTION_CODES", "1") != "0":  # (3% faster FP8 batch-1 decode on an H200)
            self.attention.out_quant = self.attention.dense.input_quant()  # decode attention's output feeds it

    def full_output(self, x, positions, batch):
        """The layer's output as one tensor (calibration runs layers one at a time)."""
        out, residual = self(x, positions, batch)
        return out + residual


def _adding(residual, norm) -> dict:
    """A sub-block's keywords for ending with its output added to the residual and `norm` begun (add_norm), none
    where a norm kernel runs (norm None)."""
    return {} if norm is None else {"add_norm": (residual, norm)}


class DecoderModel(nn.Module):
    """The `transformer` of a causal LM: embedding (first stage), this stage's layers, final norm (last)."""

    def __init__(self, config: PretrainedConfig, fused_mlp: bool):
        super().__init__()
        m = config.mapping
        self.vocab_embedding = VocabEmbedding(config.vocab_size, config.hidden_size, m) \
            if m.is_first_pp_rank else None
        self.position_embedding = PositionEmbedding(config.max_position_embeddings, config.hidden_size) \
            if m.is_first_pp_rank and config.position_embedding_type == "learned_absolute" else None
        self.embedding_multiplier = config.embedding_multiplier
        # Keyed by the global layer index, so names match across pipeline stages.
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, i, fused_mlp)
                                     for i in m.pp_layers(config.num_hidden_layers)})
        self.ln_f = make_norm(config) if m.is_last_pp_rank else None

    def embed(self, input_ids, positions):
        x = self.vocab_embedding(input_ids)
        if self.embedding_multiplier != 1.0:  # Gemma: sqrt(hidden), rounded to the activations' dtype first
            x = x * torch.tensor(self.embedding_multiplier, dtype=x.dtype)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        return x

    def forward(self, input_ids, hidden, positions, batch):
        x = self.embed(input_ids, positions) if self.vocab_embedding is not None else hidden
        residual = None
        for layer in self.layers.values():
            x, residual = layer(x, positions, batch, residual)
        if self.ln_f is not None:
            return add_and_norm(self.ln_f, x, residual)[0]
        return x if residual is None else x + residual  # the next pipeline stage's input: the whole stream


def refuse_quantization(quant_config: QuantConfig | None) -> None:
    if quant_config is not None and quant_config.is_quantized:
        raise ConfigError("quant_config: quantized conversion is not available yet; convert without "
                          "quant_config (quant_algo None)")


class DecoderModelForCausalLM(PretrainedModel):
    """A decoder-only LM; `fused_mlp` selects the engine's runtime layout (fc and gate in one matmul).

    A family subclass declares its HF reading: `config_from_hf` (config.json -> PretrainedConfig) and
    `hf_name_map` (kiln names -> HF tensor names); `from_hugging_face` is shared.
    """

    HF_ARCHITECTURES: tuple[str, ...] = ()
    # The family's own fields of its HF config.json (kiln.models.hf_config.config_from_hf's `structure`), as a
    # staticmethod: a family that reads its config otherwise overrides config_from_hf instead.
    HF_STRUCTURE: Callable[[dict], dict] | None = None

    @classmethod
    def config_from_hf(cls, hf: dict, dtype: str, mapping: Mapping, generation: dict | None,
                       path: str) -> PretrainedConfig:
        if cls.HF_STRUCTURE is None:
            raise NotImplementedError(f"{cls.__name__}: set HF_STRUCTURE or override config_from_hf")
        return hf_config.config_from_hf(hf, dtype, mapping, generation, path, cls.HF_STRUCTURE)

    @classmethod
    def hf_name_map(cls, config: PretrainedConfig):
        raise NotImplementedError

    @classmethod
    def from_hugging_face(cls, hf_dir: str | Path, dtype: str = "auto", mapping: Mapping | None = None,
                          quant_config: QuantConfig | None = None,
                          keep_quantization: bool = False) -> "DecoderModelForCausalLM":
        """keep_quantization: an MXFP4 checkpoint's experts stay codes (kiln.quantization.mxfp4)."""
        refuse_quantization(quant_config)
        hf_dir = Path(hf_dir)
        hf = read_json(hf_dir / "config.json", "Hugging Face config.json")
        generation = (read_json(hf_dir / "generation_config.json", "generation config")
                      if (hf_dir / "generation_config.json").is_file() else None)
        config = cls.config_from_hf(hf, dtype, mapping or Mapping(), generation, str(hf_dir / "config.json"))
        prequantized = prequantized_format(hf, str(hf_dir / "config.json"),  # AWQ / GPTQ / FP8: imported as is
                                           keep_quantization)
        if prequantized is not None:
            config = config.replace(quantization=prequantized.quant_config)
            check_experts_importable(config, f"{hf_dir / 'config.json'}: quantization_config")
            if config.tie_word_embeddings and quantizes_lm_head(config.quantization):
                raise ConfigError(f"{hf_dir / 'config.json'}: quantization_config quantizes lm_head (lm_head: true) "
                                  "but tie_word_embeddings is true; kiln imports a quantized lm_head from untied "
                                  "checkpoints only. Convert the float model and run `kiln quantize "
                                  "--quantize-lm-head` instead")
        model = cls.empty(config)
        name_map = cls.hf_name_map(config)
        if prequantized is not None:
            name_map = prequantized.name_map(name_map, quantized_linears(model))
        model.attach_source(HFWeights(hf_dir), name_map, str(hf_dir))
        model.tokenizer_writer = lambda dst: copy_tokenizer_files(hf_dir, dst)
        return model

    def __init__(self, config: PretrainedConfig, fused_mlp: bool = False):
        super().__init__(config)
        m = config.mapping
        self.transformer = DecoderModel(config, fused_mlp)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, m) if m.is_last_pp_rank else None
        apply_quant_config(self, config.quantization)  # each quantized linear gets its method's tensors
        self.tie_weights()

    @classmethod
    def empty_runtime(cls, config: PretrainedConfig) -> "DecoderModelForCausalLM":
        """The engine's structure (fused MLP) on the meta device."""
        with torch.device("meta"):
            return cls(config, fused_mlp=True)

    def prepare_runtime(self) -> None:
        """Once the weights are loaded, before the engine's first step (ModelRunner): each linear's derived
        tensors, the FP8 input quantization fused into the kernels before those linears, and the norms that the
        int4 GEMVs carry (DecoderLayer.defer_norms)."""
        prepare_linear_layers(self)
        layers = list(self.transformer.layers.values())
        for layer in layers:
            layer.fuse_input_quantization()
        for layer, next_layer in zip(layers, layers[1:] + [None]):
            layer.defer_norms(next_layer)

    def _ties_lm_head(self) -> bool:
        """lm_head shares the embedding's tensor: tied embeddings, both on this rank, lm_head in full precision
        (a quantized lm_head holds its own tensors, quantized from the embedding matrix)."""
        return (self.config.tie_word_embeddings and self.lm_head is not None and
                self.transformer.vocab_embedding is not None and self.lm_head.quant_method.name == "none")

    def tie_weights(self) -> None:
        if self._ties_lm_head():
            self.lm_head.weight = self.transformer.vocab_embedding.weight

    def stored_name(self, name: str) -> str:
        return "transformer.vocab_embedding.weight" if name == "lm_head.weight" and self._ties_lm_head() else name

    def forward(self, input_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                batch: AttentionBatch | None = None, hidden_states: torch.Tensor | None = None,
                last_token_only: bool = False) -> torch.Tensor:
        """Logits (last stage) or hidden states (earlier pipeline stages).

        With a [batch, seq] LongTensor alone, runs whole causal sequences and returns [batch, seq, vocab].
        Otherwise input_ids is a flat token stream described by `batch`, with one position per token;
        `last_token_only` keeps the logits of each sequence's last token.
        """
        if self._lazy:
            self.materialize()
        tokens = input_ids if input_ids is not None else hidden_states
        if tokens.dim() == 2 and batch is None and input_ids is not None:
            b, t = input_ids.shape
            positions = torch.arange(t, device=input_ids.device).repeat(b)
            out = self.forward(input_ids.reshape(-1), positions, AttentionBatch.uncached(b, t))
            return out.reshape(b, t, -1)
        x = self.transformer(input_ids, hidden_states, positions, batch)
        if self.lm_head is None:
            return x
        if last_token_only and max(batch.query_lens) > 1:  # (decode steps have one token per sequence)
            x = x[batch.last_token_rows(x.device)]
        return final_logits(self.config, self.lm_head(x))
