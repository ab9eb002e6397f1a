"""The tokenizer and chat template that travel with a checkpoint or engine."""

from __future__ import annotations

from pathlib import Path

from kiln.checkpoint.tokenizer_files import has_tokenizer
from kiln.errors import CheckpointError


def load_tokenizer(directory: str | Path):
    """The Hugging Face tokenizer saved in `directory`, or None when it holds none."""
    if not has_tokenizer(directory):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    if tokenizer is None:
        raise CheckpointError("this model has no tokenizer files; pass token ids instead of text")
    return tokenizer.encode(prompt)


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Apply the model's chat template (with the assistant's turn opened) and tokenize."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise CheckpointError("this model has no chat template; use a plain prompt instead")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def decode(tokenizer, ids: list[int]) -> str:
    return "" if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=True)
