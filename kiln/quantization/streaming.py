"""Layer-by-layer streaming of a source model, shared by every calibration (AWQ, activation statistics, GPTQ's
Hessians, KV-cache scales): only the embedding, then one decoder layer at a time, holds real weights, read from the
lazy source; so a model larger than memory can be calibrated.

`walk_layers` is the walk itself: each layer runs over the float layers' output, the caller's hooks on it.
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


def walk_layers(model, tokens: torch.Tensor, device, batch=None):
    """Yield (prefix, layer, run) for each decoder layer of a TP=1 source model (lazy weights); tokens [n, t].
    The caller calls run(pre_hooks) once, {module: forward pre-hook}: it runs the layer, with those hooks, over its
    input, the output of the float layers before it; the layer's output is the next layer's input. `batch`: the
    attention batch the layers run (default: uncached attention over the n sequences)."""
    from kiln.layers.attention import AttentionBatch

    n, t = tokens.shape
    positions = torch.arange(t, device=device).repeat(n)
    batch = AttentionBatch.uncached(n, t) if batch is None else batch
    hidden = {"output": embed(model, tokens, positions, device)}  # the only reference to the hidden states
    for i in model.mapping.pp_layers(model.config.num_hidden_layers):
        layer = load_layer(model, i, device)
        hidden["input"] = hidden.pop("output")
        yield f"transformer.layers.{i}.", layer, functools.partial(_run_layer, layer, hidden, positions, batch)
        if "output" not in hidden:
            raise RuntimeError(f"walk_layers: layer {i} was not run before the walk went on")
        del layer


def _run_layer(layer, hidden: dict, positions, batch, pre_hooks: dict | None = None) -> None:
    """walk_layers' run: the layer over hidden["input"], {module: forward pre-hook} on; its output replaces it."""
    hooks = [m.register_forward_pre_hook(hook) for m, hook in (pre_hooks or {}).items()]
    try:
        with torch.no_grad():
            hidden["output"] = layer.full_output(hidden.pop("input"), positions, batch)
    finally:
        for h in hooks:
            h.remove()


def quantized_linears(layer: nn.Module, prefix: str, qc) -> dict[str, nn.Module]:
    """{name: linear} of a decoder layer's linears that `qc` quantizes; prefix: the layer's own."""
    from kiln.layers.linear import Linear
    from kiln.quantization.methods import quant_method_for

    return {name: m for name, m in layer.named_modules()
            if isinstance(m, Linear) and quant_method_for(prefix + name, m, qc) is not None}


def layer_inputs(model, tokens: torch.Tensor, qc, device, experts: bool = False):
    """Yield (prefix, layer, {linear: its input [<= MAX_SEARCH_TOKENS rows, in]}) for each decoder layer of a TP=1
    source model (lazy weights), for the linears `qc` quantizes; tokens [n, t]. The rows are the same random sample
    of the calibration tokens for every linear; each layer's input comes from the float layers before it. With
    `experts`, a mixture of experts whose stacked weights `qc` quantizes adds {its name: (input rows, the experts
    the router picked for each [rows, top_k])}."""
    pick = torch.randperm(tokens.numel(), generator=torch.Generator().manual_seed(0))[:MAX_SEARCH_TOKENS].to(device)
    for prefix, layer, run in walk_layers(model, tokens, device):
        inputs = {}
        hooks = {m: functools.partial(_capture_input, inputs, name, pick)
                 for name, m in quantized_linears(layer, prefix, qc).items()}
        if experts:
            hooks.update({m: functools.partial(_capture_routed, inputs, name, pick)
                          for name, m in quantized_experts(layer, prefix, qc).items()})
        run(hooks)
        yield prefix, layer, inputs
        del inputs


def quantized_experts(layer: nn.Module, prefix: str, qc) -> dict[str, nn.Module]:
    """{name: Experts module} of a decoder layer whose stacked weights `qc` quantizes."""
    from kiln.layers.moe import Experts
    from kiln.quantization.methods import quant_method_for

    return {name: m for name, m in layer.named_modules()
            if isinstance(m, Experts) and quant_method_for(f"{prefix}{name}.fc", m.fc, qc) is not None}


def _capture_input(inputs: dict, name: str, pick: torch.Tensor, module, args) -> None:
    """A forward pre-hook: keep the `pick` rows of a linear's input under `name` (None: the input goes on)."""
    inputs[name] = args[0].detach()[pick]


def _capture_routed(inputs: dict, name: str, pick: torch.Tensor, module, args) -> None:
    """A forward pre-hook on Experts (x, experts, weights): keep the `pick` rows of x and of their experts."""
    inputs[name] = (args[0].detach()[pick], args[1][pick])
