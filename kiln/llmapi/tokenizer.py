"""The tokenizer and chat template that travel with a checkpoint or engine."""

from __future__ import annotations

from pathlib import Path

from kiln.checkpoint.tokenizer_files import TOKENIZER_MAIN_FILES, has_tokenizer
from kiln.errors import CheckpointError


def load_tokenizer(directory: str | Path):
    """The Hugging Face tokenizer saved in `directory`, or None when it holds none."""
    if not has_tokenizer(directory):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    if tokenizer is None:
        raise CheckpointError(
            f"this model has no tokenizer files (none of {', '.join(TOKENIZER_MAIN_FILES)} beside its weights); pass "
            "token ids instead of text (LLM.generate([[1, 2, 3]]), `kiln run --prompt-ids 1,2,3`, or a list of ids as "
            "the server's 'prompt'), or convert the model from a directory that holds its tokenizer")
    return tokenizer.encode(prompt)


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Apply the model's chat template (with the assistant's turn opened) and tokenize."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(
            "this model has no chat template (a 'chat_template' in tokenizer_config.json, or chat_template.jinja); "
            "send a plain prompt instead (LLM.generate(text), `kiln run --prompt`, or /v1/completions)")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def decode(tokenizer, ids: list[int]) -> str:
    return "" if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=True)
