"""The tokenizer and chat template that travel with a checkpoint or engine."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kiln.checkpoint.tokenizer_files import TOKENIZER_MAIN_FILES, has_tokenizer
from kiln.errors import CheckpointError, ConfigError


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


def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                template_kwargs: dict | None = None) -> list[int]:
    """Apply the model's chat template (with the assistant's turn opened; `tools` for a template that renders
    them, kiln.serve.tools; `template_kwargs` its extra variables, Qwen3's enable_thinking, say) and tokenize."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(
            "this model has no chat template (a 'chat_template' in tokenizer_config.json, or chat_template.jinja); "
            "send a plain prompt instead (LLM.generate(text), `kiln run --prompt`, or /v1/completions)")
    from jinja2 import TemplateError  # (transformers renders chat templates with jinja2)

    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                             **(template_kwargs or {}))
    except TemplateError as e:  # (a template's raise_exception: roles out of order, a role it lacks, ...)
        raise ConfigError(f"the model's chat template refused these messages: {e}") from None
    return tokenizer.encode(text, add_special_tokens=False)


def read_chat_template(value: str) -> str:
    """A chat template given in place of the model's (`LLM(chat_template=...)`, `--chat-template`): a file's text,
    or the Jinja template itself; its syntax checked here, before any model loads."""
    from jinja2 import Environment, TemplateSyntaxError

    path = Path(value)
    looks_inline = "{{" in value or "{%" in value
    if not looks_inline and not path.is_file():
        raise ConfigError(f"chat template {value!r} is neither a file nor a Jinja template (no '{{{{' or '{{%'); give "
                          "the path of a .jinja file or the template's text")
    text, where = (value, "the chat template given") if looks_inline else (path.read_text(), str(path))
    try:
        Environment().parse(text)
    except TemplateSyntaxError as e:
        raise ConfigError(f"{where}, line {e.lineno}: {e.message}; fix the template's Jinja syntax") from None
    return text


def set_chat_template(tokenizer, template: str) -> None:
    """Replace the tokenizer's chat template (read_chat_template's text)."""
    if tokenizer is None:
        raise CheckpointError(f"this model has no tokenizer files (none of {', '.join(TOKENIZER_MAIN_FILES)}), so "
                              "there is nothing to apply a chat template to; convert it from a directory that holds "
                              "its tokenizer")
    tokenizer.chat_template = template


# Fill-in-the-middle prompts: each code-model family's special tokens in the order it was trained on them, PREFIX and
# SUFFIX standing for the text before and after the hole. A format applies when each of its tokens is one token of
# the tokenizer; the model then writes the middle.
PREFIX, SUFFIX = object(), object()
FIM_FORMATS = {
    "starcoder": ("<fim_prefix>", PREFIX, "<fim_suffix>", SUFFIX, "<fim_middle>"),  # StarCoder 1/2, Granite code
    "qwen": ("<|fim_prefix|>", PREFIX, "<|fim_suffix|>", SUFFIX, "<|fim_middle|>"),  # Qwen2.5-Coder, Qwen3-Coder
    "deepseek": ("<\uff5cfim\u2581begin\uff5c>", PREFIX, "<\uff5cfim\u2581hole\uff5c>", SUFFIX,
                 "<\uff5cfim\u2581end\uff5c>"),  # DeepSeek-Coder
    "codestral": ("[SUFFIX]", SUFFIX, "[PREFIX]", PREFIX),  # Mistral's Codestral: the suffix first
}


def fim_format(tokenizer) -> tuple | None:
    """The first of FIM_FORMATS whose special tokens are all single tokens of `tokenizer`, or None."""
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    for parts in FIM_FORMATS.values():
        if all(part in vocab for part in parts if isinstance(part, str)):
            return parts
    return None


def encode_fill_in_middle(tokenizer, prefix: str, suffix: str) -> list[int]:
    """The prompt ids that ask a code model for the text between `prefix` and `suffix` (its FIM_FORMATS entry; a
    tokenizer's BOS first, as its plain prompts have one)."""
    parts = fim_format(tokenizer)
    if parts is None:
        names = "; ".join(f"{name}: {' '.join(p for p in f if isinstance(p, str))}" for name, f in FIM_FORMATS.items())
        raise ConfigError(f"this model's tokenizer has no fill-in-the-middle tokens (kiln knows {names}); send the "
                          "prompt without a suffix")
    vocab = tokenizer.get_vocab()
    ids = tokenizer.encode("")  # (the BOS, for a tokenizer that adds one)
    for part in parts:
        if isinstance(part, str):
            ids.append(vocab[part])
        else:
            ids += tokenizer.encode(prefix if part is PREFIX else suffix, add_special_tokens=False)
    return ids


def decode(tokenizer, ids: list[int]) -> str:
    return "" if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=True)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte: the printable bytes stand for themselves, the others
    (space, control bytes, ...) for the characters from U+0100 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(0x100 + i): b for i, b in enumerate(others)}}


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_piece(piece: str) -> bytes | None:
    try:
        return bytes(_BYTE_LEVEL[c] for c in piece)
    except KeyError:  # (not a byte-level piece: never part of the JSON)
        return None


def _sentencepiece_piece(piece: str) -> bytes:
    fallback = _BYTE_FALLBACK.fullmatch(piece)
    return bytes([int(fallback.group(1), 16)]) if fallback else piece.replace("\u2581", " ").encode()


def _decoder_types(tokenizer) -> set[str]:
    """The types named in a fast tokenizer's decoder (nested ones too): "ByteLevel", "ByteFallback", ..."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
    return set(re.findall(r'"type":\s*"(\w+)"', json.dumps(decoder))) if decoder else set()


def token_bytes(tokenizer) -> list[bytes | None]:
    """Each token id's bytes in the text it decodes to (None: a special or added token, never inside the JSON):
    byte-level BPE pieces (GPT-2, Llama 3, Qwen, SmolLM2) through their alphabet, SentencePiece pieces (Llama 2,
    Mistral) with "\u2581" for a space and <0xNN> for a byte. JSON mode (kiln.runtime.json_mode) reads them."""
    if tokenizer is None:
        raise CheckpointError("this model has no tokenizer, and JSON mode (json_object) reads the tokens' text from "
                              "it: save the model's tokenizer files beside its weights and rebuild")
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    as_bytes = _byte_level_piece if "ByteLevel" in _decoder_types(tokenizer) else _sentencepiece_piece
    return [None if i in special or piece is None else as_bytes(piece) for i, piece in enumerate(pieces)]
