"""Layer-by-layer streaming of a source model, shared by every calibration (AWQ, activation statistics,
KV-cache scales): only the embedding, then one decoder layer at a time, holds real weights, read from the
lazy source; so a model larger than memory can be calibrated.
"""

from __future__ import annotations

import torch
from torch import nn


def load_module(module: nn.Module, prefix: str, model, device) -> nn.Module:
    """Give a freshly built (meta) submodule its weights, read one by one from `model` (lazy or loaded)."""
    for name, _ in list(module.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        setattr(owner, leaf, nn.Parameter(model.read_weight(prefix + name).to(device), requires_grad=False))
    return module.to(device)


def load_layer(model, index: int, device) -> nn.Module:
    """Decoder layer `index` of `model` (unfused MLP, as the source names it), its weights on `device`."""
    from kiln.models.base import DecoderLayer

    with torch.device("meta"):
        layer = DecoderLayer(model.config, index, fused_mlp=False)
    return load_module(layer, f"transformer.layers.{index}.", model, device).eval()


def embed(model, tokens: torch.Tensor, positions: torch.Tensor, device) -> torch.Tensor:
    """The first layer's input for `tokens`; the embedding table is dropped again afterwards."""
    emb = model.transformer
    parts = [m for m in ("vocab_embedding", "position_embedding") if getattr(emb, m) is not None]
    for m in parts:
        load_module(getattr(emb, m), f"transformer.{m}.", model, device)
    with torch.no_grad():
        x = emb.embed(tokens.reshape(-1).to(device), positions)
    for m in parts:  # back to shapes only: the embedding table need not stay in memory
        getattr(emb, m).to_empty(device="meta")
    model.tie_weights()
    return x
