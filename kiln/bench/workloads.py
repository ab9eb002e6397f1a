"""Benchmark workloads: how many requests, of what prompt and output lengths, sharing what prefix.

The named ones are the lines of docs/performance.md (and of the GPU runtime's targets); a JSON file
(a list of objects with these fields) adds any other: `kiln bench --workload-file mine.json`. A dataset, requests
of their own lengths as JSON lines in TensorRT-LLM's trtllm-bench format, is one more: `kiln bench --dataset FILE`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.errors import ConfigError


@dataclass(frozen=True)
class Workload:
    name: str
    num_requests: int
    input_len: int  # prompt tokens, the shared prefix included
    output_len: int
    shared_prefix_len: int = 0  # the first request runs alone, then the others reuse its cached prefix
    baseline_requests: int = 64  # transformers runs at most this many of them (at that batch size)

    def __post_init__(self):
        for name in ("num_requests", "input_len", "output_len", "baseline_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"workload {self.name!r}: {name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.shared_prefix_len < self.input_len:
            raise ConfigError(f"workload {self.name!r}: shared_prefix_len must be in [0, input_len "
                              f"{self.input_len}), got {self.shared_prefix_len!r}")

    def prompts(self, vocab_size: int, seed: int = 0) -> list[list[int]]:
        """Random token ids; with a shared prefix, every prompt starts with the same prefix_len tokens."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (self.num_requests, self.input_len), generator=g)
        ids[:, : self.shared_prefix_len] = ids[0, : self.shared_prefix_len]
        return ids.tolist()

    def request_lengths(self) -> list[tuple[int, int]]:
        """(prompt tokens, output tokens) of each request."""
        return [(self.input_len, self.output_len)] * self.num_requests

    def output_lens(self) -> list[int]:
        return [output for _, output in self.request_lengths()]

    @property
    def max_input_len(self) -> int:
        """The longest prompt: what an engine's max_input_len must hold."""
        return max(prompt for prompt, _ in self.request_lengths())

    @property
    def max_seq_len(self) -> int:
        """The longest request, prompt and output together: what an engine's max_seq_len must hold."""
        return max(prompt + output for prompt, output in self.request_lengths())

    def warm_up_prompts(self, vocab_size: int, seed: int, count: int = 64) -> list[list[int]]:
        """Random ids of the lengths of the first `count` requests, the shared prefix shared among them: the
        warm-up meets the run's shapes, but never its prompts, so the prefix cache cannot serve the run from it."""
        g = torch.Generator().manual_seed(seed)
        draw = lambda n: torch.randint(0, vocab_size, (n,), generator=g).tolist()  # noqa: E731
        prefix = draw(self.shared_prefix_len)
        return [prefix + draw(prompt - self.shared_prefix_len) for prompt, _ in self.request_lengths()[:count]]

    def length_notes(self) -> dict:
        """What the table's notes say of the lengths: nothing, when every request has the same."""
        return {}


@dataclass(frozen=True)
class DatasetWorkload(Workload):
    """Requests of their own lengths, read from a file by read_dataset. input_len and output_len are the means
    (rounded), for the table's columns; the rest of kiln asks request_lengths() or the max_* properties."""
    path: str = ""
    input_ids: tuple[tuple[int, ...], ...] = field(default=(), repr=False)
    output_tokens: tuple[int, ...] = field(default=(), repr=False)
    line_numbers: tuple[int, ...] = field(default=(), repr=False)  # each request's line in the file, for errors

    def request_lengths(self) -> list[tuple[int, int]]:
        return [(len(ids), output) for ids, output in zip(self.input_ids, self.output_tokens)]

    def prompts(self, vocab_size: int, seed: int = 0) -> list[list[int]]:
        """The file's token ids (`seed` is for random prompts: a dataset has none)."""
        for ids, line in zip(self.input_ids, self.line_numbers):
            if max(ids) >= vocab_size:
                raise ConfigError(f"{self.path} line {line}: input_ids holds token id {max(ids)}, but the model's "
                                  f"vocabulary has {vocab_size} ids (0 to {vocab_size - 1}); tokenize the dataset "
                                  "with this model's tokenizer")
        return [list(ids) for ids in self.input_ids]

    def length_notes(self) -> dict:
        return {"lengths": "mean", "input_max": self.max_input_len, "output_max": max(self.output_tokens)}


NAMED_WORKLOADS = {w.name: w for w in (
    Workload("decode-1", 1, 128, 256),  # batch-1 decode: bandwidth-bound
    Workload("offline-64", 64, 128, 128),
    Workload("offline-3000", 3000, 128, 128),  # throughput, decode-heavy
    Workload("prefill-1000", 1000, 2048, 128, baseline_requests=16),  # throughput, prefill-heavy
    Workload("long-1000", 1000, 1000, 1000, baseline_requests=16),  # long generations (TensorRT-LLM's 1000/1000)
    Workload("ttft-2048", 1, 2048, 1),  # time to first token of one long prompt
    Workload("prefix-64", 64, 1056, 16, shared_prefix_len=1024),  # followers reuse a 1024-token prefix
)}


def custom_workload(num_requests: int, input_len: int, output_len: int) -> Workload:
    return Workload(f"custom-{num_requests}x{input_len}-{output_len}", num_requests, input_len, output_len)


def read_workload_file(path: str | Path) -> list[Workload]:
    path = Path(path)
    fields = {f.name for f in dataclasses.fields(Workload)}
    required = sorted(f.name for f in dataclasses.fields(Workload) if f.default is dataclasses.MISSING)
    try:
        items = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the workload file ({e}); it must be a JSON list of objects "
                          f"with fields {sorted(fields)}") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"{path}: must be a JSON list of objects with fields {sorted(fields)}")
    workloads = []
    for n, item in enumerate(items):
        unknown, missing = sorted(set(item) - fields), [f for f in required if f not in item]
        wrong = [f"unknown fields {unknown}"] * bool(unknown) + [f"missing fields {missing}"] * bool(missing)
        if wrong:
            raise ConfigError(f"{path}: workload {n} has {' and '.join(wrong)}; required: {required}, optional: "
                              f"{sorted(fields - set(required))}")
        workloads.append(Workload(**item))
    return workloads


DATASET_FORMAT = ('one JSON object a line, {"input_ids": [token ids], "output_tokens": N} (or a text "prompt", '
                  'with --tokenizer or a --model dir that has one; and an optional "task_id"), as trtllm-bench reads')
DATASET_FIELDS = {"task_id", "input_ids", "prompt", "output_tokens"}  # task_id is ignored: kiln numbers by line


def read_dataset(path: str | Path, tokenizer_dir: str | Path | None = None) -> DatasetWorkload:
    """A JSON-lines dataset (DATASET_FORMAT) as one workload, named after the file; blank lines are skipped. Text
    prompts are tokenized as LLM.generate tokenizes text, by the tokenizer saved in tokenizer_dir (the model's)."""
    path = Path(path)
    tokenizer = _DatasetTokenizer(tokenizer_dir)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the dataset ({e.strerror or e}); pass a file of "
                          f"{DATASET_FORMAT}") from None
    requests = [(n, *_dataset_request(path, n, line, tokenizer)) for n, line in enumerate(lines, 1) if line.strip()]
    if not requests:
        raise ConfigError(f"{path}: the dataset holds no requests; write {DATASET_FORMAT}")
    line_numbers, input_ids, output_tokens = zip(*requests)
    mean = lambda lengths: round(sum(lengths) / len(lengths))  # noqa: E731
    return DatasetWorkload(f"dataset:{path.stem}", len(requests), mean([len(ids) for ids in input_ids]),
                           mean(output_tokens), path=str(path), input_ids=input_ids, output_tokens=output_tokens,
                           line_numbers=line_numbers)


def _dataset_request(path: Path, n: int, line: str, tokenizer) -> tuple[tuple[int, ...], int]:
    """(input_ids, output_tokens) of line n, or a ConfigError naming the line, the field and the fix."""
    where = f"{path} line {n}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not JSON ({e.msg}); write {DATASET_FORMAT}") from None
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: a JSON {type(item).__name__}, not an object; write {DATASET_FORMAT}")
    unknown = sorted(set(item) - DATASET_FIELDS)
    missing = sorted({"output_tokens"} - set(item)) + (["input_ids"] if not {"input_ids", "prompt"} & set(item) else [])
    if unknown or missing:
        wrong = [f"unknown fields {unknown}"] * bool(unknown) + [f"missing fields {missing}"] * bool(missing)
        raise ConfigError(f"{where}: {' and '.join(wrong)}; write {DATASET_FORMAT}")
    if "input_ids" in item and "prompt" in item:
        raise ConfigError(f'{where}: has both "input_ids" and a text "prompt"; write one of them')
    ids = item["input_ids"] if "input_ids" in item else tokenizer.encode(where, item["prompt"])
    output = item["output_tokens"]
    if not isinstance(ids, list) or not ids or not all(_is_int(i) and i >= 0 for i in ids):
        raise ConfigError(f"{where}: input_ids must be a non-empty list of token ids (integers >= 0), got "
                          f"{str(ids)[:80]}; write the prompt's ids from the model's tokenizer")
    if not _is_int(output) or output < 1:
        raise ConfigError(f"{where}: output_tokens must be an integer >= 1, got {output!r}; write how many tokens "
                          "the request generates")
    return tuple(ids), output


class _DatasetTokenizer:
    """The model's tokenizer for a dataset's text prompts, loaded at the first one; where there is none (random
    weights of --synthetic, a remote --serve, a model saved without tokenizer files) a text prompt is refused."""

    def __init__(self, directory: str | Path | None):
        self.directory, self._tokenizer = directory, None

    def encode(self, where: str, prompt) -> list[int]:
        from kiln.llmapi.tokenizer import encode_prompt, load_tokenizer

        if not isinstance(prompt, str) or not prompt:
            raise ConfigError(f'{where}: "prompt" must be non-empty text, got {str(prompt)[:80]!r}; write the '
                              'request\'s text')
        if self._tokenizer is None and self.directory is not None and Path(self.directory).is_dir():
            self._tokenizer = load_tokenizer(self.directory)
        if self._tokenizer is None:
            raise ConfigError(f'{where}: has a text "prompt", but this run has no tokenizer for it (--synthetic '
                              'weights and --serve have none); tokenize the prompts into "input_ids" (as '
                              'TensorRT-LLM\'s prepare_dataset.py writes them), or pass --tokenizer DIR, a dir with '
                              'the model\'s tokenizer files')
        return encode_prompt(self._tokenizer, prompt)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def select(names: str | None, path: str | None, num_requests: int, input_len: int, output_len: int,
           dataset: str | None = None, tokenizer_dir: str | None = None) -> list[Workload]:
    """The workloads a bench run measures: named ones, a file's, a dataset, or one from the length flags."""
    chosen = []
    for name in (names.split(",") if names else []):
        if name not in NAMED_WORKLOADS:
            raise ConfigError(f"unknown workload {name!r}; named workloads: {sorted(NAMED_WORKLOADS)}")
        chosen.append(NAMED_WORKLOADS[name])
    if path:
        chosen += read_workload_file(path)
    if dataset:
        chosen.append(read_dataset(dataset, tokenizer_dir))
    return chosen or [Workload("decode-1", 1, input_len, output_len), custom_workload(num_requests, input_len,
                                                                                       output_len)]
