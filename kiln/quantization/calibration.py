"""Calibration and evaluation text -> token batches.

The default is the public-domain text shipped in kiln.quantization.calib_text (calibration and held-out parts);
a user file replaces the calibration part: plain text (paragraphs) or JSONL with a `text` field per line.
A source without tokenizer files (the tests' tiny random models) falls back to UTF-8 bytes modulo the
vocabulary, which exercises the same code with no tokenizer.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from kiln.errors import CheckpointError, ConfigError
from kiln.quantization import calib_text

log = logging.getLogger("kiln")


def read_texts(path: str | Path | None, default: str = calib_text.CALIBRATION,
               what: str = "calibration dataset") -> list[str]:
    """The calibration (or evaluation) texts: the shipped default, or a user's .txt / .jsonl file."""
    if path is None:
        return [default]
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found (plain text or JSONL with a 'text' field)")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not UTF-8 text ({e})") from None
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CheckpointError(f"{path}:{n}: each JSONL line needs a string 'text' field")
            texts.append(record["text"])
    else:
        texts = [raw]
    if not any(t.strip() for t in texts):
        raise CheckpointError(f"{path}: {what} holds no text")
    return texts


def source_tokenizer(model):
    """The source model's tokenizer (written out by its tokenizer_writer), or None when it has none."""
    from kiln.llmapi.tokenizer import load_tokenizer

    if model.tokenizer_writer is None:
        return None
    with tempfile.TemporaryDirectory(prefix="kiln-tok-") as tmp:
        model.tokenizer_writer(Path(tmp))
        return load_tokenizer(tmp)


def encode(texts: list[str], tokenizer, vocab_size: int) -> list[int]:
    ids: list[int] = []
    for text in texts:
        if tokenizer is not None:
            ids += tokenizer.encode(text, add_special_tokens=False)
        else:
            ids += [b % vocab_size for b in text.encode("utf-8")]
    return ids


def token_batches(texts: list[str], tokenizer, vocab_size: int, num_samples: int, seq_len: int) -> torch.Tensor:
    """[n, seq_len] windows cut back to back from the concatenated text, n <= num_samples (as many as fit;
    one shorter window when the text is shorter than seq_len)."""
    for name, value in (("calib_size", num_samples), ("calib_max_seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    ids = encode(texts, tokenizer, vocab_size)
    if len(ids) < 2:
        raise CheckpointError("calibration text is too short (fewer than 2 tokens)")
    seq_len = min(seq_len, len(ids))
    n = min(num_samples, len(ids) // seq_len)
    if n < num_samples:
        log.info("calibration text gives %d windows of %d tokens (asked for %d)", n, seq_len, num_samples)
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


def heldout_windows(tokenizer, vocab_size: int, seq_len: int, texts: list[str] | None = None) -> list[torch.Tensor]:
    """All of the held-out texts (default: the shipped one) as windows of at most seq_len tokens (the last may be
    shorter)."""
    ids = torch.tensor(encode(texts or [calib_text.HELDOUT], tokenizer, vocab_size))
    return [w for w in ids.split(seq_len) if len(w) >= 2]
