"""Layer-by-layer streaming of a source model, shared by every calibration (AWQ, activation statistics,
KV-cache scales): only the embedding, then one decoder layer at a time, holds real weights, read from the
lazy source; so a model larger than memory can be calibrated.

`layer_inputs` walks the decoder layers with the inputs of their quantized linears sampled, for the calibrations
that search on those inputs (AWQ's scales and clipping, SmoothQuant's migration strength).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

MAX_SEARCH_TOKENS = 4096  # calibration rows kept per linear input for the searches


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


def layer_inputs(model, tokens: torch.Tensor, qc, device):
    """Yield (prefix, layer, {linear: its input [<= MAX_SEARCH_TOKENS rows, in]}) for each decoder layer of a TP=1
    source model (lazy weights), for the linears `qc` quantizes; tokens [n, t]. The rows are the same random sample
    of the calibration tokens for every linear; each layer's input comes from the float layers before it."""
    from kiln.layers.attention import AttentionBatch
    from kiln.layers.linear import Linear
    from kiln.quantization.methods import quant_method_for

    config = model.config
    n, t = tokens.shape
    positions = torch.arange(t, device=device).repeat(n)
    batch = AttentionBatch.uncached(n, t)
    x = embed(model, tokens, positions, device)
    pick = torch.randperm(n * t, generator=torch.Generator().manual_seed(0))[:MAX_SEARCH_TOKENS].to(device)
    for i in model.mapping.pp_layers(config.num_hidden_layers):
        prefix = f"transformer.layers.{i}."
        layer = load_layer(model, i, device)
        inputs, hooks = {}, []
        for name, m in layer.named_modules():
            if isinstance(m, Linear) and quant_method_for(prefix + name, m, qc) is not None:
                hooks.append(m.register_forward_pre_hook(functools.partial(_capture_input, inputs, name, pick)))
        with torch.no_grad():
            y = layer.full_output(x, positions, batch)
        for h in hooks:
            h.remove()
        yield prefix, layer, inputs
        x = y
        del layer, inputs


def _capture_input(inputs: dict, name: str, pick: torch.Tensor, module, args) -> None:
    """A forward pre-hook: keep the `pick` rows of a linear's input under `name` (None: the input goes on)."""
    inputs[name] = args[0].detach()[pick]
