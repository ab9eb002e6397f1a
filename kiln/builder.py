"""build(model, BuildConfig) -> Engine: the weights in the runtime layout, the limits, the plan, a fingerprint.

The runtime layout fuses the MLP's fc and gate into one matmul (QKV is fused from the checkpoint on).
Build limits are ceilings on dynamic shapes, not compiled-in sizes. An engine dir carries its
manifest (format and kiln/torch versions, mapping, weights hash) so a load can refuse a mismatch and
print the command that fixes it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import torch

from kiln.checkpoint.atomic import atomic_dir
from kiln.checkpoint.safetensors_io import SafetensorsFile, SafetensorsWriter
from kiln.checkpoint.tokenizer_files import copy_tokenizer_files
from kiln.config import BuildConfig, PretrainedConfig, read_json
from kiln.errors import CheckpointError, ConfigError
from kiln.kernels.quant_gemm import linear_plan
from kiln.checkpoint.atomic import write_json_atomic
from kiln.models.base import CONFIG_FILE, PretrainedModel, check_format_version, check_kiln_config, rank_file
from kiln.runtime.cuda_graphs import cuda_graph_batch_sizes, prefill_graph_token_counts
from kiln.version import FORMAT_VERSION, __version__

ENGINE_KEYS = ("build_config", "plan", "fingerprint", "kiln_version", "format_version")
REBUILD = "Rebuild it: `kiln build --checkpoint-dir CKPT --output-dir ENGINE --overwrite` (or `kiln convert` first)."

log = logging.getLogger("kiln")


def _sibling(name: str, module: str) -> str:
    """`...mlp.fc.weight` -> `...mlp.<module>.weight` (same parent, same leaf)."""
    parent, _, rest = name.rpartition(".fc.") if ".fc." in name else name.rpartition(".gate.")
    return f"{parent}.{module}.{rest}"


def engine_weight_name(name: str, gated: bool = True) -> str | None:
    """Checkpoint name -> runtime name; None for the second half of a fused pair. A gated MLP's `fc` (also
    in experts and shared experts) becomes `fc_gate`; a plain MLP (no gate: GPT-2, GPT-NeoX) keeps `fc`."""
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
    if module == "fc" and gated:
        return _sibling(name, "fc_gate")
    if module == "gate" and gated:
        return None
    return name


def engine_weights(model: PretrainedModel):
    """(runtime name, tensor) of one rank, read lazily: fc and gate are concatenated into fc_gate.

    Both are this rank's column shards, so the fused tensor is [fc_r; gate_r] on the output dim (dim -2 of a
    weight, also of stacked expert weights; dim -1 of a bias) and the runtime's chunk(2) splits it back on
    every rank.
    """
    names = model.weight_specs()
    for name in names:
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
        gated = module in ("fc", "gate") and _sibling(name, "gate" if module == "fc" else "fc") in names
        runtime = engine_weight_name(name, gated)
        if runtime is None:
            continue
        tensor = model.read_weight(name)
        if runtime != name and not name.endswith((".prequant_scaling_factor", ".activation_scaling_factor",
                                                  ".input_permutation")):
            # Weights, packed int4 codes, group scales and zero points are [out, ...]: join on the output dim
            # (-2; stacked experts too); biases and per-channel scales are [out]: join on -1. fc and gate
            # share their input, so an AWQ prequant scale [in], a static activation scale [1] and a GPTQ
            # act-order input permutation [in] are one for both (fc's is kept).
            dim = -1 if tensor.dim() == 1 or name.endswith(".bias") else -2  # (stacked experts' [experts, out])
            tensor = torch.cat([tensor, model.read_weight(_sibling(name, "gate"))], dim=dim)
        yield runtime, tensor


@dataclasses.dataclass
class Engine:
    """A built engine for one rank. `weights()` yields its runtime-layout tensors one at a time (from the
    checkpoint model just built, or from an engine dir), so saving streams and loading is one path."""

    config: PretrainedConfig
    build_config: BuildConfig
    plan: dict
    weights: Callable[[], Iterable[tuple[str, torch.Tensor]]]
    tokenizer_writer: Callable[[Path], None] | None = None
    fingerprint: dict = dataclasses.field(default_factory=dict)
    weight_file: SafetensorsFile | None = None  # an engine dir's rank file: loaded several tensors at a time

    def runtime_model(self, device: str | torch.device = "cpu") -> PretrainedModel:
        """The model in the runtime layout (fused MLP), weights loaded onto `device`."""
        start = time.perf_counter()
        device = torch.device(device)
        runtime = self._empty_runtime()
        if self.weight_file is not None:
            runtime.load(self.weight_file.load_all(device))
        else:
            runtime.load({name: t.to(device) for name, t in self.weights()})
        runtime = runtime.to(device)
        log.info("loaded %s weights onto %s in %.1fs", self.config.architecture, device, time.perf_counter() - start)
        return runtime

    def _empty_runtime(self) -> PretrainedModel:
        from kiln.models import model_class

        return model_class(self.config.architecture).empty_runtime(self.config)

    def manifest(self) -> dict:
        return {**self.config.to_dict(), "kiln_version": __version__, "format_version": FORMAT_VERSION,
                "build_config": self.build_config.to_dict(), "plan": self.plan, "fingerprint": self.fingerprint}

    def write_rank(self, out_dir: Path) -> None:
        """Stream this rank's runtime weights to disk, hashing them on the way (the fingerprint)."""
        path = Path(out_dir) / rank_file(self.config.mapping.rank)
        digest = hashlib.sha256()
        with SafetensorsWriter(path, self._empty_runtime().weight_specs(), {"format": "pt"}) as writer:
            for name, tensor in self.weights():
                writer.write(name, tensor)
                digest.update(name.encode())
                digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.fingerprint = {"kiln_version": __version__, "format_version": FORMAT_VERSION,
                            "torch_version": torch.__version__,
                            f"rank{self.config.mapping.rank}_sha256": digest.hexdigest()}

    def write_metadata(self, out_dir: Path, build_seconds: float) -> None:
        out_dir = Path(out_dir)
        write_json_atomic(out_dir / CONFIG_FILE, self.manifest())
        if self.tokenizer_writer is not None:
            self.tokenizer_writer(out_dir)
        specs = self._empty_runtime().weight_specs().values()
        report = {"build_seconds": round(build_seconds, 3), "plan": self.plan,
                  "build_config": self.build_config.to_dict(),
                  "parameters_per_rank": sum(math.prod(shape) for _, shape in specs),
                  "bytes_per_rank": sum(math.prod(shape) * dtype.itemsize for dtype, shape in specs)}
        write_json_atomic(out_dir / "build_report.json", report)

    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write the engine dir atomically (this rank's weights, manifest, tokenizer, build report)."""
        if self.config.mapping.world_size > 1:
            raise ConfigError("Engine.save writes single-rank engines; build all ranks with "
                              "kiln.builder.build_checkpoint (or `kiln build`)")
        start = time.perf_counter()
        with atomic_dir(out_dir, overwrite) as tmp:
            self.write_rank(tmp)
            self.write_metadata(tmp, time.perf_counter() - start)
        return Path(out_dir)

    @classmethod
    def from_dir(cls, engine_dir: str | Path, rank: int = 0) -> "Engine":
        """Open an engine dir, checking its manifest first; weights are read when used."""
        engine_dir = Path(engine_dir)
        d = read_json(engine_dir / CONFIG_FILE, "engine config")
        if "build_config" not in d:
            raise CheckpointError(f"{engine_dir}: is not an engine (no build_config in config.json); "
                                  f"build it with `kiln build --checkpoint-dir {engine_dir} --output-dir ENGINE`")
        check_format_version(d, engine_dir / CONFIG_FILE, "this engine", REBUILD)
        config = PretrainedConfig.from_dict({k: v for k, v in d.items() if k not in ENGINE_KEYS}, rank)
        engine = cls(config=config, build_config=BuildConfig.from_dict(d["build_config"]), plan=d["plan"],
                     weights=lambda: iter(()), fingerprint=d.get("fingerprint", {}),
                     tokenizer_writer=lambda dst: copy_tokenizer_files(engine_dir, dst))
        file = SafetensorsFile(engine_dir / rank_file(rank))
        engine._empty_runtime().check_file_matches(file)
        engine.weights = lambda: ((name, file.get(name)) for name in file.keys())
        engine.weight_file = file
        return engine


def resolve_build_config(config: PretrainedConfig, build_config: BuildConfig | None) -> BuildConfig:
    """Fill unset limits from the model and check them against it (all up front, before any work)."""
    bc = build_config or BuildConfig()
    max_seq_len = bc.max_seq_len or config.max_position_embeddings
    if max_seq_len > config.max_position_embeddings and config.rotary_scaling is None:
        raise ConfigError(f"BuildConfig.max_seq_len ({max_seq_len}) exceeds the model's max_position_embeddings "
                          f"({config.max_position_embeddings}); lower --max-seq-len")
    max_input_len = min(bc.max_input_len or max_seq_len, max_seq_len)
    return dataclasses.replace(bc, max_seq_len=max_seq_len, max_input_len=max_input_len)


def plan_for(build_config: BuildConfig, quant_algo: str | None = None) -> dict:
    """What the runtime runs: on CUDA the Triton kernels, decode CUDA graphs at these batch sizes and
    single-sequence prefill graphs at these token counts, elsewhere the torch references of the same kernels; for
    quantized linears, which kernels."""
    return {"kv_cache": "paged", "tokens_per_block": build_config.tokens_per_block, "mlp_layout": "fused_fc_gate",
            "kernels_cuda": "triton", "kernels_other": "torch_reference",
            "cuda_graph_batch_sizes": cuda_graph_batch_sizes(build_config.max_batch_size),
            "cuda_graph_prefill_tokens": prefill_graph_token_counts(build_config), **linear_plan(quant_algo)}


def build(model: PretrainedModel, build_config: BuildConfig | None = None) -> Engine:
    """Check the limits against the model and return the Engine of this rank (weights stay lazy)."""
    bc = resolve_build_config(model.config, build_config)
    algo = model.config.quantization.quant_algo
    return Engine(config=model.config, build_config=bc, plan=plan_for(bc, algo and algo.value),
                  weights=lambda: engine_weights(model), tokenizer_writer=model.tokenizer_writer)


def build_all_ranks(load_rank: Callable[[int], PretrainedModel], world_size: int, out_dir: str | Path,
                    build_config: BuildConfig | None = None, overwrite: bool = False, progress=None) -> Path:
    """Build every rank (load_rank(rank) gives its model) into one engine dir, atomically. Ranks are built
    in parallel threads (reading, fusing and writing release the GIL); each holds one tensor at a time,
    so memory grows with the number of threads, not with the model."""
    start = time.perf_counter()
    done = 0

    def build_rank(tmp: Path, rank: int) -> Engine:
        nonlocal done
        engine = build(load_rank(rank), build_config)
        engine.write_rank(tmp)
        done += 1
        if progress:
            progress(done, world_size)
        return engine

    with atomic_dir(out_dir, overwrite) as tmp:
        with ThreadPoolExecutor(max_workers=min(world_size, os.cpu_count() or 1)) as pool:
            engines = list(pool.map(functools.partial(build_rank, tmp), range(world_size)))
        engine = engines[-1]
        engine.fingerprint = {k: v for e in engines for k, v in e.fingerprint.items()}
        engine.write_metadata(tmp, time.perf_counter() - start)
    return Path(out_dir)


def build_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, build_config: BuildConfig | None = None,
                     overwrite: bool = False, progress=None) -> Path:
    """Build every rank of a kiln checkpoint into an engine dir."""
    ckpt_dir = Path(ckpt_dir)
    world = read_json(ckpt_dir / CONFIG_FILE, "kiln checkpoint config").get("mapping", {}).get("world_size", 1)
    return build_all_ranks(lambda rank: PretrainedModel.from_checkpoint(ckpt_dir, rank), world, out_dir,
                           build_config, overwrite, progress)


def describe(path: str | Path) -> dict:
    """What a checkpoint or engine dir holds: its manifest and, per rank file, tensor shapes and sizes; for a .gguf
    file, what `kiln convert` makes of it (describe_gguf)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return describe_gguf(path)
    if path.exists() and not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path}: not a kiln checkpoint or engine dir (no {CONFIG_FILE}); convert a source model "
                              f"first: `kiln convert --model-dir {path} --output-dir CKPT`")
    d = read_json(path / CONFIG_FILE, "kiln config")
    check_kiln_config(d, path / CONFIG_FILE)
    ranks = {}
    for f in sorted(path.glob("rank*.safetensors")):
        st = SafetensorsFile(f)
        ranks[f.name] = {"tensors": {n: list(st.shape(n)) for n in st.keys()}, "bytes": f.stat().st_size}
    return {"kind": "engine" if "build_config" in d else "checkpoint", "config": d, "ranks": ranks}


def describe_gguf(path: Path) -> dict:
    """A GGUF file: the config `kiln convert` gives it (metadata only, no weight read), how many tensors it holds of
    each GGML type, and what `--keep-quantization` would keep (the linears it keeps at 4 bits, or why none)."""
    from collections import Counter

    from kiln.checkpoint.convert import load_source_model
    from kiln.checkpoint.gguf_source import GGUFFile
    from kiln.quantization.methods import quantized_linears

    gguf = GGUFFile(path)
    config = load_source_model(path).config.to_dict()
    try:
        kept = load_source_model(path, keep_quantization=True)
        keep = {"kept_linears": len(quantized_linears(kept)),
                "full_precision": list(kept.config.quantization.exclude_modules)}
    except ConfigError as e:
        keep = {"error": str(e)}
    types = Counter(gguf.type_name(name) for name in gguf.tensors)
    return {"kind": "gguf", "config": config, "tensor_types": dict(types.most_common()), "keep_quantization": keep,
            "ranks": {}}

