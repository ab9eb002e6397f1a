"""Lazy access to a Meta checkpoint: params.json + consolidated.NN.pth.

Meta splits its larger models across model-parallel files. Reading a tensor joins its pieces the
way Meta's (fairscale) layers split them: column-parallel weights on dim 0, row-parallel on dim 1,
norms replicated, and the embedding on whichever dim was split (dim 1 in Llama 2, dim 0 in Llama 3).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.errors import CheckpointError

# Suffix of a Meta tensor name -> dim its model-parallel pieces are concatenated on (None: replicated).
MERGE_DIM = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1,
    "output.weight": 0, "attention_norm.weight": None, "ffn_norm.weight": None, "norm.weight": None,
}


class MetaWeights:
    def __init__(self, meta_dir: str | Path):
        self.dir = Path(meta_dir)
        self.files = sorted(self.dir.glob("consolidated.*.pth"))
        if not self.files:
            raise CheckpointError(f"{self.dir}: no consolidated.NN.pth files (is this a Meta checkpoint?)")
        self._parts: list[dict] | None = None

    @property
    def parts(self) -> list[dict]:
        if self._parts is None:
            self._parts = []
            for f in self.files:
                try:
                    self._parts.append(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
                except Exception as e:
                    raise CheckpointError(f"{f}: cannot read PyTorch weights ({type(e).__name__}: {e})") from None
        return self._parts

    def __contains__(self, name: str) -> bool:
        return all(name in part for part in self.parts)

    def get(self, name: str) -> torch.Tensor:
        if name not in self:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from some consolidated.*.pth file")
        pieces = [part[name] for part in self.parts]
        if len(pieces) == 1:
            return pieces[0]
        if name == "tok_embeddings.weight":
            hidden = self.parts[0]["norm.weight"].shape[0]
            return torch.cat(pieces, dim=1 if pieces[0].shape[1] * len(pieces) == hidden else 0)
        dim = MERGE_DIM[name.split(".", 2)[-1] if name.startswith("layers.") else name]
        return pieces[0] if dim is None else torch.cat(pieces, dim=dim)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get(name).shape)
