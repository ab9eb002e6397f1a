"""The tokenizer, chat template and generation config travel with every checkpoint and engine."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def copy_tokenizer_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy whichever tokenizer files src_dir has; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copyfile(Path(src_dir) / name, Path(dst_dir) / name)
            copied.append(name)
    return copied


# Any one of these makes a directory's tokenizer (the rest of TOKENIZER_FILES complete it).
TOKENIZER_MAIN_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_MAIN_FILES)
