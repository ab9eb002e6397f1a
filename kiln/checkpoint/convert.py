"""One convert for every model: detect the source format, pick the architecture's class, write all ranks.

Formats: a Hugging Face dir (config.json), a Meta dir (params.json + consolidated.NN.pth), a GGUF
file.
"""

from __future__ import annotations

from pathlib import Path

from kiln.checkpoint.atomic import atomic_dir
from kiln.config import read_json
from kiln.errors import CheckpointError, ConfigError
from kiln.mapping import Mapping

SOURCE_FORMATS = ("hf", "meta", "gguf")


def detect_source_format(src: str | Path) -> str:
    src = Path(src)
    if src.is_file() and src.suffix == ".gguf":
        return "gguf"
    if src.is_dir():
        if (src / "config.json").is_file():
            if "format_version" in read_json(src / "config.json", "config"):
                raise CheckpointError(f"{src}: is already a kiln checkpoint or engine; build or run it directly")
            return "hf"
        if (src / "params.json").is_file():
            return "meta"
        raise CheckpointError(f"{src}: config.json not found (expected a Hugging Face dir with config.json, "
                              "a kiln checkpoint, a Meta dir with params.json, or a .gguf file)")
    raise CheckpointError(f"{src}: no such model (expected a Hugging Face, kiln or Meta dir, or a .gguf file)")


def source_model_class(src: str | Path):
    """The kiln model class of `src`'s architecture (any supported format), read from its config."""
    from kiln.models import model_class

    src = Path(src)
    fmt = detect_source_format(src)
    if fmt == "hf":
        architectures = read_json(src / "config.json", "config").get("architectures") or ["<none>"]
        return model_class(architectures[0])
    if fmt == "meta":
        return model_class("LlamaForCausalLM")
    from kiln.checkpoint.gguf_source import GGUFFile
    from kiln.models.llama.gguf import GGUF_ARCHITECTURES

    arch = GGUFFile(src).field("general.architecture")
    return model_class(GGUF_ARCHITECTURES.get(arch, f"gguf:{arch}"))


# The reader of each source format: (model class, path, dtype, mapping) -> the model.
SOURCE_READERS = {"hf": lambda cls, *args: cls.from_hugging_face(*args),
                  "meta": lambda cls, *args: cls.from_meta_ckpt(*args),
                  "gguf": lambda cls, *args: cls.from_gguf(*args),
                  "gguf_kept": lambda cls, *args: cls.from_gguf(*args, keep_quantization=True),
                  "hf_kept": lambda cls, *args: cls.from_hugging_face(*args, keep_quantization=True)}
# Hugging Face checkpoints whose quantization keep_quantization keeps as codes (others keep theirs anyway)
KEPT_HF_METHODS = ("mxfp4",)


def load_source_model(src: str | Path, dtype: str = "auto", mapping: Mapping | None = None,
                      keep_quantization: bool = False):
    """The model object for one rank of `src`, with lazy weights; any supported format. keep_quantization: a
    GGUF file's 4-bit linears stay int4 (kiln.quantization.gguf_import), an MXFP4 checkpoint's experts e4m3 codes
    (kiln.quantization.mxfp4); other formats refuse it."""
    src = Path(src)
    fmt = detect_source_format(src)
    if keep_quantization:
        method = (read_json(src / "config.json", "config").get("quantization_config") or {}).get(
            "quant_method") if fmt == "hf" else None
        if fmt != "gguf" and method not in KEPT_HF_METHODS:
            raise ConfigError(f"{src}: --keep-quantization applies to GGUF files and MXFP4 checkpoints; a "
                              "pre-quantized Hugging Face checkpoint (AWQ, GPTQ, FP8, compressed-tensors) keeps its "
                              "quantization without it")
        fmt = f"{fmt}_kept"
    return SOURCE_READERS[fmt](source_model_class(src), src, dtype, mapping or Mapping())


def convert_checkpoint(src: str | Path, out_dir: str | Path, dtype: str = "auto", tp_size: int = 1,
                       pp_size: int = 1, overwrite: bool = False, progress=None, moe_tp_size: int | None = None,
                       moe_ep_size: int | None = None, keep_quantization: bool = False) -> Path:
    """Write a kiln checkpoint of every rank of `src` into out_dir (atomically), streaming tensor by tensor.

    `moe_tp_size` x `moe_ep_size` (= tp_size) split MoE experts as in Mapping; by default experts are
    tensor-parallel like the dense MLP. `progress`, if given, is called with (rank, world_size) before each
    rank is written. `keep_quantization`: see load_source_model.
    """
    mapping = Mapping.of(tp_size, pp_size, moe_tp_size=moe_tp_size, moe_ep_size=moe_ep_size)
    load_source_model(src, dtype, mapping, keep_quantization)  # fail on a bad source before creating anything
    with atomic_dir(out_dir, overwrite) as tmp:
        for rank in range(mapping.world_size):
            if progress:
                progress(rank, mapping.world_size)
            model = load_source_model(src, dtype, mapping.with_rank(rank), keep_quantization)
            model.write_rank(tmp)
        model.write_metadata(tmp)
    return Path(out_dir)
