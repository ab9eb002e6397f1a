"""LLM: the one entry point to run a model. Accepts an engine dir, a kiln checkpoint dir, or a source
model (HF dir, Meta dir, GGUF file: converted and built in-process, the engine cached)."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from kiln.builder import Engine, build_all_ranks
from kiln.checkpoint.convert import detect_source_format, load_source_model
from kiln.config import BuildConfig, read_json, resolve_device
from kiln.errors import ConfigError, EngineVersionError
from kiln.llmapi import tokenizer as tok
from kiln.llmapi.engine_cache import engine_cache_dir
from kiln.llmapi.sampling_params import CompletionOutput, RequestOutput, SamplingParams
from kiln.mapping import Mapping
from kiln.models.base import CONFIG_FILE, PretrainedModel
from kiln.runtime.engine import GenerationEngine
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.sequence import Sequence
from kiln.runtime.workers import DriverRunner, WorkerGroup

log = logging.getLogger(__name__)


def _check_world(engine_dir: Path, mapping: dict, tp: int | None, pp: int | None) -> None:
    for name, wanted, have in (("tensor_parallel_size", tp, mapping["tp_size"]),
                               ("pipeline_parallel_size", pp, mapping["pp_size"])):
        if wanted is not None and wanted != have:
            raise ConfigError(f"{engine_dir} was built for tp_size={mapping['tp_size']}, pp_size={mapping['pp_size']} "
                              f"but {name}={wanted} was asked for; pass {name}={have}, or convert and build "
                              f"again with --tp-size/--pp-size")


def open_engine_dir(model: str | Path, dtype: str = "auto", build_config: BuildConfig | None = None,
                    tp_size: int | None = None, pp_size: int | None = None, keep_quantization: bool = False) -> Path:
    """An engine dir for `model`: itself if it is one, else built (all ranks) into the engine cache from a
    kiln checkpoint or a source model. tp/pp None take the engine's or checkpoint's own (1 for sources).
    keep_quantization: a GGUF source's 4-bit linears stay int4 (kiln.quantization.gguf_import)."""
    path = Path(model)
    manifest = read_json(path / CONFIG_FILE, "config") if (path / CONFIG_FILE).is_file() else {}
    if "format_version" in manifest and dtype not in ("auto", manifest.get("dtype")):
        log.warning("%s is a kiln %s of %s: dtype %s applies only when a source model is converted; convert the "
                    "source again with --dtype %s to change it", path,
                    "engine" if "build_config" in manifest else "checkpoint", manifest.get("dtype"), dtype, dtype)
    if "build_config" in manifest:
        _check_world(path, manifest["mapping"], tp_size, pp_size)
        _warn_fixed_limits(path, manifest["build_config"], build_config)
        return path
    if "format_version" in manifest:  # a kiln checkpoint: its mapping is fixed
        _check_world(path, manifest["mapping"], tp_size, pp_size)
        world = manifest["mapping"]["world_size"]
        load = lambda rank: PretrainedModel.from_checkpoint(path, rank)  # noqa: E731
    else:
        detect_source_format(path)  # names a missing or unrecognised source before any work
        mapping = Mapping.of(tp_size or 1, pp_size or 1)
        world = mapping.world_size
        load = lambda rank: load_source_model(path, dtype, mapping.with_rank(rank), keep_quantization)  # noqa: E731
    cached = engine_cache_dir(path, dtype, build_config, (tp_size, pp_size), keep_quantization)
    if (cached / CONFIG_FILE).is_file():
        try:
            Engine.from_dir(cached)
            return cached
        except EngineVersionError:
            log.info("rebuilding the cached engine %s (written by another kiln)", cached)
    log.info("building %s into the engine cache %s", path, cached)
    return build_all_ranks(load, world, cached, build_config, overwrite=True)


def _warn_fixed_limits(path: Path, built: dict, asked: BuildConfig | None) -> None:
    """Name the limits asked for (BuildConfig.fields_set) that a built engine cannot take (its RUNTIME_FIELDS
    apply at load)."""
    if asked is None:
        return
    differ = {name: (built.get(name), value) for name, value in asked.fields_set(asked.engine_fields()).items()
              if built.get(name) != value}
    if differ:
        log.warning("%s is a built engine: %s fixed when it was built; build it again to change %s", path,
                    ", ".join(f"{name} {have} (asked: {want})" for name, (have, want) in differ.items()),
                    "it" if len(differ) == 1 else "them")


def _make_runner(engine_dir: Path, engine: Engine, build_config: BuildConfig, device: torch.device):
    """In-process for one rank; rank 0's driver under torchrun; else a group of spawned workers."""
    world = engine.config.mapping.world_size
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_world_size() != world or dist.get_rank() != 0:
            raise ConfigError(f"torchrun started {dist.get_world_size()} ranks but {engine_dir} has {world}; "
                              f"use --nproc-per-node {world} (LLM runs on rank 0, see kiln.runtime.workers)")
        return DriverRunner(ModelRunner(engine.runtime_model(device), device, build_config, engine.plan),
                            engine.config.vocab_size)
    if world > 1:
        gpus = torch.cuda.device_count() if device.type == "cuda" else world
        if gpus < world:  # (NCCL would refuse two ranks on one GPU, and only after every rank loaded its weights)
            raise ConfigError(f"{engine_dir} has {world} ranks, one a GPU, but this machine has {gpus} GPU(s); run "
                              f"it where there are {world}, or on the CPU with device='cpu' (gloo)")
        return WorkerGroup(str(engine_dir), world, build_config, device.type)
    return ModelRunner(engine.runtime_model(device), device, build_config, engine.plan)


@dataclass(eq=False)
class _Request:
    request_id: int
    prompt: str | None
    prompt_ids: list[int]
    seqs: list[Sequence]
    stop_at: dict[int, int] = field(default_factory=dict)  # seq_id -> end of text at the stop string


class LLM:
    """Generate from a model: `LLM(path).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str | Path | None = None, *, dtype: str = "auto", device: str | None = None,
                 build_config: BuildConfig | None = None, tensor_parallel_size: int | None = None,
                 pipeline_parallel_size: int | None = None, keep_quantization: bool = False,
                 chat_template: str | None = None):
        """model: an engine dir, a kiln checkpoint dir, an HF dir, a Meta dir or a .gguf file (default: the
        built-in model). build_config: the limits to build with; a built engine takes only its RUNTIME_FIELDS
        (the KV cache's size, decode bursts, admission policy). With tensor/pipeline_parallel_size > 1 the ranks
        run as worker processes. keep_quantization: a .gguf's Q4_0/Q4_1/Q4_K linears stay int4 (W4A16) instead of
        being dequantized (`kiln convert --keep-quantization`). chat_template: a Jinja chat template (its text, or a
        file's path) in place of the model's, for chat() and kiln serve's chats."""
        template = None if chat_template is None else tok.read_chat_template(chat_template)  # (checked first)
        if model is None:
            from kiln.default_model import default_model_path

            model = default_model_path()
        self.device = resolve_device(device)
        self.engine_dir = open_engine_dir(model, dtype, build_config, tensor_parallel_size, pipeline_parallel_size,
                                          keep_quantization)
        self.engine = Engine.from_dir(self.engine_dir)
        self.tokenizer = tok.load_tokenizer(self.engine_dir)
        if template is not None:
            tok.set_chat_template(self.tokenizer, template)
        # An engine dir keeps its runtime options but those asked for; one from the engine cache (built from a
        # source or checkpoint, whose cache key leaves them out) takes this call's, not those of the call that built it.
        self.build_config = self.engine.build_config.with_runtime_options(
            build_config, every=self.engine_dir != Path(model))
        # Python's cycle collector walks every tracked object at each full collection, and the ~400,000 that
        # importing torch and transformers made would be walked again and again as requests come and go (0.25 s
        # of the 0.3 s it took to submit 3,000 prompts). They live as long as the process: leave them out of
        # collections, as vLLM does. Done before the model and its KV cache exist, so those are still collected
        # with a dropped LLM whatever cycles they are in, but for cycles through this object itself, frozen too: nothing
        # made below may refer back to it (a closure over self kept a closed engine's GPU memory to the process's end).
        gc.collect()
        gc.freeze()
        self.runner = _make_runner(self.engine_dir, self.engine, self.build_config, self.device)
        self.generator = GenerationEngine(self.runner, self.build_config, self.engine.config.eos_token_ids,
                                          self.engine.config.vocab_size, partial(tok.token_bytes, self.tokenizer))
        self._next_request = 0

    def shutdown(self) -> None:
        """Stop worker processes (and, under torchrun, release the other ranks)."""
        if hasattr(self.runner, "shutdown"):
            self.runner.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # ---- requests ------------------------------------------------------------------------------

    def _submit(self, prompt: str | list[int], params: SamplingParams, chat: list[dict] | None = None,
                template_kwargs: dict | None = None) -> _Request:
        if chat is not None:
            text, ids = None, tok.encode_chat(self.tokenizer, chat, template_kwargs=template_kwargs)
        elif isinstance(prompt, str):
            text, ids = prompt, tok.encode_prompt(self.tokenizer, prompt)
        else:
            text, ids = None, list(prompt)
        seqs = [self.generator.add_request(ids, params, seed_offset=i) for i in range(params.n)]
        request = _Request(self._next_request, text, ids, seqs)
        self._next_request += 1
        return request

    def _check_stop_strings(self, request: _Request, seq) -> None:
        if seq.finished or not seq.params.stop:
            return
        text = tok.decode(self.tokenizer, seq.output_ids)
        hits = [(text.find(s), s) for s in seq.params.stop if s in text]
        if hits:
            end, stop = min(hits)
            request.stop_at[seq.seq_id] = end
            self.generator.finish(seq, "stop", stop)

    def _output(self, request: _Request) -> RequestOutput:
        outputs = []
        for index, seq in enumerate(request.seqs):
            text = tok.decode(self.tokenizer, seq.output_ids)
            if seq.seq_id in request.stop_at:
                text = text[: request.stop_at[seq.seq_id]]
            elif not seq.finished:
                text = _stable_prefix(text, seq.params.stop)
            outputs.append(CompletionOutput(index, text, list(seq.output_ids), seq.finish_reason, seq.stop_reason,
                                            list(seq.logprobs) if seq.params.logprobs is not None else None,
                                            list(seq.token_times)))
        first = request.seqs[0]
        return RequestOutput(request.request_id, request.prompt, request.prompt_ids, outputs,
                             finished=all(s.finished for s in request.seqs), arrival_time=first.arrival_time,
                             prompt_logprobs=[None, *first.prompt_logprobs] if first.params.prompt_logprobs is not None
                             else None)

    def _run(self, requests: list[_Request]) -> Iterator[None]:
        """Step the engine until these requests finish, yielding after every step."""
        request_of = {seq.seq_id: r for r in requests for seq in r.seqs}
        unfinished = {seq.seq_id for r in requests for seq in r.seqs if not seq.finished}
        try:
            while unfinished:
                produced = self.generator.step()
                for seq in produced:  # only they can have changed (a sweep when nothing ran, to be sure)
                    if seq.seq_id in request_of:
                        self._check_stop_strings(request_of[seq.seq_id], seq)
                for seq in produced if produced else (s for r in requests for s in r.seqs):
                    if seq.finished:
                        unfinished.discard(seq.seq_id)
                yield
        finally:  # an abandoned stream or an error frees the caches of what is left
            for request in requests:
                for seq in request.seqs:
                    self.generator.abort(seq)

    # ---- public API ----------------------------------------------------------------------------

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Prompts: a string, a list of token ids, or a list of either. One RequestOutput per prompt."""
        prompts = [prompts] if isinstance(prompts, str) or _is_token_ids(prompts) else list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ConfigError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one for all of "
                              "them, or a list of one per prompt")
        requests = []
        try:
            for p, sp in zip(prompts, params):
                requests.append(self._submit(p, sp or SamplingParams()))
        except BaseException:  # a bad prompt fails the call alone: withdraw the ones already queued
            for seq in (s for r in requests for s in r.seqs):
                self.generator.abort(seq)
            raise
        for _ in self._run(requests):
            pass
        return [self._output(r) for r in requests]

    def generate_stream(self, prompt, sampling_params: SamplingParams | None = None,
                        chat: list[dict] | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every new token (text so far); the last one is finished. (A step
        queued ahead gives its tokens at the next step: nothing is yielded until something is new.)"""
        request = self._submit(prompt, sampling_params or SamplingParams(), chat)
        seen = 0
        for _ in self._run([request]):
            output = self._output(request)
            tokens = sum(len(o.token_ids) for o in output.outputs)
            if tokens != seen or output.finished:
                seen = tokens
                yield output

    def chat(self, messages: str | list[dict], sampling_params: SamplingParams | None = None,
             chat_template_kwargs: dict | None = None) -> RequestOutput:
        """Answer a conversation (or one user message) through the model's chat template; `chat_template_kwargs`
        are the template's extra variables (Qwen3's enable_thinking, say)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        request = self._submit(None, sampling_params or SamplingParams(), chat=messages,
                               template_kwargs=chat_template_kwargs)
        for _ in self._run([request]):
            pass
        return self._output(request)


def _is_token_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(t, int) for t in prompt)


def _stable_prefix(text: str, stops: list[str]) -> str:
    """Text safe to show mid-generation: no half-decoded character, nothing that may start a stop string."""
    text = text.rstrip("\ufffd")
    hold = max((len(s) - 1 for s in stops), default=0)
    return text[: len(text) - hold] if hold else text
