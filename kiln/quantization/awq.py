"""AWQ: activation-aware weight quantization (Lin et al. 2023, arXiv:2306.00978), W4A16.

A few input channels carry much larger activations than the rest, and the weights they multiply matter most.
Scaling those weight columns up by s before quantizing (and the activations down by 1/s, which leaves the
float product unchanged) gives them finer steps. Per input channel s = mean|x|^alpha (normalised so
max(s) * min(s) = 1), with alpha searched on a grid over [0, 1] to minimise the mean squared error of the
quantized layer's output on calibration activations (the paper's section 3.2). alpha = 0 is s = 1, plain
round-to-nearest, so the search never does worse than RTN on its calibration data.

Then, as the paper's released code does, the weight clipping search: per output channel and input group of
the scaled weight, a bound on |W s| shrunk from the group's max by up to half (in 1/20 steps), chosen to
minimise that group's share of the output error on the calibration activations. The bound 1.0 x max is in
the grid, so clipping never does worse either. Like AutoAWQ, the fused QKV projection is not clipped (its
errors move attention scores, which a per-group output error does not see).

Where the layer's input is a norm's output (QKV after input_layernorm; fc and gate after post_layernorm, one
s for both since they share the input) 1/s folds into the norm's weight; the attention output and mlp.proj
follow no norm, so they keep 1/s as `prequant_scaling_factor`.

Latent attention's query up projection (DeepSeek, kiln.layers.mla) folds its scale into q_a_norm (kv_b stays in
the model dtype, folded into attention). A mixture of experts follows AutoAWQ's Mixtral recipe (`_search_experts`):
one scale for every expert's fc and gate (and a shared expert's) folds into post_layernorm and into the other
modules reading it (the router and a shared expert's gate stay float and exact), and each expert's proj scale
folds into the rows of that expert's gate.

Calibration streams layer by layer: only one decoder layer's weights and the activations of the calibration
batch live in memory at a time. Each layer's inputs come from the float layers before it.
"""

from __future__ import annotations

import logging

import torch

from kiln.config import QuantConfig
from kiln.errors import ConfigError
from kiln.quantization import streaming
from kiln.quantization.weight_only import dequantize_int4, quantize_int4_groups

log = logging.getLogger("kiln")

# The norm whose output feeds a column-parallel linear of a decoder layer (relative names).
NORM_BEFORE = {"attention.qkv": "input_layernorm", "mlp.fc": "post_layernorm", "mlp.gate": "post_layernorm",
               # latent attention's (kiln.layers.mla): the query's up projection reads its own norm
               "attention.q_b": "attention.q_a_norm"}
ALPHA_GRID = 20
CLIP_GRID, CLIP_MAX_SHRINK, CLIP_TOKENS, CLIP_ROWS = 20, 0.5, 512, 256  # AutoAWQ's grid; rows per pass bound memory
NOT_CLIPPED = ("attention.qkv",)
# A mixture of experts' modules besides the experts that read post_layernorm's output (relative to the MLP), and
# the shared expert's linears among them (relative to the layer)
NORM_READERS = ("router", "shared_expert.fc", "shared_expert.gate", "shared_expert_gate")
SHARED_EXPERT_INPUTS = ("mlp.shared_expert.fc", "mlp.shared_expert.gate")


def check_w4a8_awq_supported(config) -> None:
    if config.moe_num_experts:
        raise ConfigError("QuantConfig.quant_algo W4A8_AWQ does not support mixture-of-experts models yet (there is "
                          "no W4A8 expert kernel); use W4A16_AWQ, W4A16 or W8A16")


def rtn_error(x: torch.Tensor, weights: list[torch.Tensor], refs: list[torch.Tensor], qc: QuantConfig, dtype,
              s=None) -> float:
    """Mean squared output error of the group's layers quantized with input scale s (None: plain RTN); refs: their
    float outputs x w^T, computed once for every s."""
    err, count = 0.0, 0
    xs = x if s is None else x / s
    for w, ref in zip(weights, refs):
        ws = w if s is None else w * s
        packed, scale, zero = quantize_int4_groups(ws, qc.group_size, qc.has_zero_point, dtype)
        q = dequantize_int4(packed, scale, zero, qc.group_size, torch.float32)
        err += (xs @ q.T - ref).pow(2).sum().item()
        count += ref.numel()
    return err / count


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], qc: QuantConfig, dtype) -> tuple:
    """(s [in], mse with s, mse of plain RTN) for the linears `weights` [out_j, in] sharing the input x [N, in]."""
    x = x.float()
    weights = [w.float() for w in weights]
    x_mean = x.abs().mean(0)
    refs = [x @ w.T for w in weights]
    best = (float("inf"), None)
    rtn = None
    for step in range(ALPHA_GRID + 1):
        alpha = step / ALPHA_GRID
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = rtn_error(x, weights, refs, qc, dtype, s)
        if step == 0:
            rtn = err
        if err < best[0]:
            best = (err, s)
    return best[1], best[0], rtn


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[rows, in] -> [rows, groups, group_size], a short last group padded with zeros."""
    groups = -(-t.shape[1] // group_size)
    return torch.nn.functional.pad(t, (0, groups * group_size - t.shape[1])).reshape(t.shape[0], groups, group_size)


def search_clip(x: torch.Tensor, w: torch.Tensor, qc: QuantConfig, dtype) -> torch.Tensor:
    """The |w| bound [out, groups] of each output channel's input group that minimises that group's part of
    the output error x w^T after quantization; x [n, in] and w [out, in] are in the scaled domain."""
    xg = _grouped(x[:CLIP_TOKENS].float(), qc.group_size)  # [n, groups, g]
    bounds = []
    for rows in w.float().split(CLIP_ROWS):
        wg = _grouped(rows, qc.group_size)
        ref = torch.einsum("ngk,ogk->nog", xg, wg)
        full = wg.abs().amax(-1)
        best, best_err = full.clone(), torch.full_like(full, float("inf"))
        for step in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
            bound = full * (1 - step / CLIP_GRID)
            clipped = torch.maximum(torch.minimum(rows, _expand(bound, rows.shape[1], qc.group_size)),
                                    -_expand(bound, rows.shape[1], qc.group_size))
            packed, scale, zero = quantize_int4_groups(clipped, qc.group_size, qc.has_zero_point, dtype)
            q = _grouped(dequantize_int4(packed, scale, zero, qc.group_size, torch.float32), qc.group_size)
            err = (torch.einsum("ngk,ogk->nog", xg, q) - ref).pow(2).mean(0)
            better = err < best_err
            best, best_err = torch.where(better, bound, best), torch.where(better, err, best_err)
        bounds.append(best)
    return torch.cat(bounds)


def _expand(per_group: torch.Tensor, columns: int, group_size: int) -> torch.Tensor:
    return per_group.repeat_interleave(group_size, dim=1)[:, :columns]


def clip_weight(weight: torch.Tensor, bound: torch.Tensor, s: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """The source weight with |W s| clipped to `bound` per (output, group): clamp(W, -b / s, b / s), so the
    method's own W * s sees the clipped values."""
    limit = _expand(bound.float(), weight.shape[1], group_size)
    if s is not None:
        limit = limit / s.float()
    w = weight.float()
    return torch.maximum(torch.minimum(w, limit), -limit).to(weight.dtype)


def calibrate(model, tokens: torch.Tensor, qc: QuantConfig, device="cpu") -> tuple[dict, dict, dict, dict]:
    """AWQ scales and clipping bounds of every quantized linear of a TP=1 source model (lazy weights), layer by
    layer. Returns (input_scales {linear: s}, norm_scales {norm: s}, errors {linear: (awq, rtn) mse},
    clips {linear: bound [out, groups] on |W s|}, experts {module: its tensors, a mixture of experts' stacked
    weights quantized with their scales and its router's weight with the norm's scale folded in}).
    """
    config = model.config
    input_scales, norm_scales, errors, clips, experts = {}, {}, {}, {}, {}
    for prefix, layer, inputs in streaming.layer_inputs(model, tokens, qc, device, experts=True):
        routed = {name: inputs.pop(name) for name, x in list(inputs.items()) if isinstance(x, tuple)}
        shared = {name: inputs.pop(name) for name in SHARED_EXPERT_INPUTS if routed and name in inputs}
        _search_layer(layer, prefix, inputs, qc, config.torch_dtype, input_scales, norm_scales, errors)
        for name, (x, picked) in routed.items():
            _search_experts(layer, prefix, name, x, picked, tuple(shared), qc, config.torch_dtype, input_scales,
                            norm_scales, errors, experts)
        inputs.update(shared)  # (a shared expert's fc and gate are clipped as any dense linear, on the norm's s)
        for name, x_in in inputs.items():
            if name not in NOT_CLIPPED:
                s = input_scales[prefix + name].to(device)
                w = layer.get_submodule(name).weight.detach()
                clips[prefix + name] = search_clip(x_in.float() / s, w.float() * s, qc, config.torch_dtype).cpu()
        log.debug("AWQ %s: %s", prefix, {k: v for k, v in errors.items() if k.startswith(prefix)})
    return input_scales, norm_scales, errors, clips, experts


def _search_layer(layer, prefix, inputs, qc, dtype, input_scales, norm_scales, errors) -> None:
    groups: dict[str, list[str]] = {}  # one search per shared input: fc and gate together
    for name in inputs:
        key = NORM_BEFORE.get(name, name)
        if not layer.get_submodule(name).input_sharded and name not in NORM_BEFORE:
            raise ConfigError(f"W4A16_AWQ: no norm to fold the scale of {prefix + name} into; exclude it with "
                              "exclude_modules or use W4A16")
        groups.setdefault(key, []).append(name)
    for key, names in groups.items():
        x = inputs[names[0]]
        weights = [layer.get_submodule(n).weight.detach() for n in names]
        s, err, rtn = search_scale(x, weights, qc, dtype)
        for n in names:
            input_scales[prefix + n] = s.cpu()
            errors[prefix + n] = (err, rtn)
        if key in NORM_BEFORE.values():
            norm_scales[prefix + key] = s.cpu()


def _search_experts(layer, prefix: str, name: str, x: torch.Tensor, picked: torch.Tensor, quantized_shared: tuple,
                    qc: QuantConfig, dtype, input_scales: dict, norm_scales: dict, errors: dict,
                    experts: dict) -> None:
    """AWQ for a mixture of experts (AutoAWQ's Mixtral recipe): one scale s for every expert's fc and gate (and a
    shared expert's, Qwen2-MoE's), searched on the norm's output over all of them, folds into post_layernorm; the
    other modules reading that output take s in their weights (the router, a shared expert's sigmoid gate, and a
    shared expert's fc and gate: as their input scale where quantized, else in their float weights), so they stay
    exact (`quantized_shared`: the shared expert's linears the config quantizes); each expert's proj gets its own
    s_e, searched on act(fc x) * gate x over the tokens routed to it, folded into that expert's gate rows as 1 / s_e
    (h = act(fc x) * gate x is linear in gate). Then each expert's three scaled weights are clipped as a dense
    layer's are (search_clip, on the tokens routed to it). Adds the experts' W4A16 tensors and the float weights
    that took s to `experts`."""
    from kiln.layers.mlp import ACTIVATIONS
    from kiln.quantization.weight_only import Int4ExpertMethod

    m = layer.get_submodule(name)
    fc, gate, proj = (getattr(m, p).weight.detach().float() for p in ("fc", "gate", "proj"))
    mlp = name.rpartition(".")[0]
    readers = {n: layer.get_submodule(n) for n in (f"{mlp}.{r}" for r in NORM_READERS) if _has(layer, n)}
    shared = [r.weight.detach().float() for n, r in readers.items() if n in SHARED_EXPERT_INPUTS]
    s, err, rtn = search_scale(x, [*fc, *gate, *shared], qc, dtype)
    norm_scales[prefix + "post_layernorm"] = s.cpu()
    for n, reader in readers.items():
        if n in quantized_shared:  # (its method multiplies its weight by s, as any AWQ linear's)
            input_scales[prefix + n] = s.cpu()
        else:
            w = reader.weight.detach()
            experts[prefix + n] = {"weight": (w.float() * s).to(w.dtype).cpu()}
    errors[f"{prefix}{name}.fc"] = errors[f"{prefix}{name}.gate"] = (err, rtn)
    s_mid = torch.ones(fc.shape[:2], device=fc.device)  # [experts, inter]; 1: an expert no token reached
    routed, x = {}, x.float()  # routed: expert -> (its rows of x, their act(fc x) * gate x)
    for e in picked.unique().tolist():
        rows = x[(picked == e).any(-1)]
        routed[e] = rows, ACTIVATIONS[m.act](rows @ fc[e].T) * (rows @ gate[e].T)
        s_mid[e], err, rtn = search_scale(routed[e][1], [proj[e]], qc, dtype)
        errors[f"{prefix}{name}.proj.{e}"] = (err, rtn)
    scaled = {"fc": fc * s, "gate": gate / s_mid[..., None] * s, "proj": proj * s_mid[:, None, :]}
    for e, (rows, mid) in routed.items():  # (the scaled weights meet the scaled inputs)
        for proj_name, x_e in (("fc", rows / s), ("gate", rows / s), ("proj", mid / s_mid[e])):
            w = scaled[proj_name][e]
            scaled[proj_name][e] = clip_weight(w, search_clip(x_e, w, qc, dtype), None, qc.group_size)
    method = Int4ExpertMethod(qc.group_size, qc.has_zero_point)
    for proj_name, w in scaled.items():
        experts[f"{prefix}{name}.{proj_name}"] = {k: v.cpu() for k, v in method.quantize(w, dtype).items()}


def _has(module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def fold_into_norm(leaf: str, tensor: torch.Tensor, s: torch.Tensor, config) -> torch.Tensor:
    """A norm's weight (or LayerNorm bias) with 1/s folded in, so its output is the old output / s."""
    t = tensor.float()
    if leaf == "weight" and config.norm_unit_offset:  # Gemma's RMSNorm scales by (1 + w)
        return ((1.0 + t) / s - 1.0).to(tensor.dtype)
    return (t / s).to(tensor.dtype)
