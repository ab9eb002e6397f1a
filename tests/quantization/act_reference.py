"""Float math written out for the weight-and-activation formats (FP8, FP8_BLOCK_SCALES, W8A8 SmoothQuant, W4A8 AWQ;
W4A16 AWQ too, its activations as they are), independent of kiln.quantization: each linear's input is
fake-quantized as docs/quantization.md describes (per token, per token and group, or with the checkpoint's static
scale), then multiplied in float64 by the dequantized checkpoint weight. `fake_quant_hf` is a transformers model
whose linears do exactly that, with the checkpoint's norms (SmoothQuant folds into them). `runtime_model` is kiln's
own engine model of a checkpoint, its input quantization fused or not."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from reference import HF_LINEARS, copy_dequantized_experts, linear_tensors, unpack
from safetensors.torch import load_file
from torch import nn

E4M3_MAX, INT8_MAX = 448.0, 127.0


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e4m3fn value (saturating at 448), returned as float64."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).double()


def searched_scale_candidates(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., 16]: the scales kiln's weight search picks one from, per group of max |w| `amax`: max|w| / 448 times
    2^(j / 16), rounded to `dtype` (kiln.quantization.fp8.search_scales)."""
    return torch.stack([(amax.float() / E4M3_MAX * 2.0 ** (j / 16)).to(dtype) for j in range(16)], -1)


def is_searched_scale(scale: torch.Tensor, amax: torch.Tensor) -> bool:
    return bool((scale[..., None] == searched_scale_candidates(amax, scale.dtype)).any(-1).all())


def fake_quant_input(x: torch.Tensor, t: dict, group: int) -> torch.Tensor:
    """x (float64 [M, K]) after the format's activation quantization, dequantized."""
    if _groupwise_fp8(t):  # FP8_BLOCK_SCALES: per token and group of `group` inputs (the last may be short)
        m, k = x.shape
        groups = -(-k // group)
        padded = torch.nn.functional.pad(x, (0, groups * group - k)).view(m, groups, group)
        s = padded.abs().amax(-1, keepdim=True) / E4M3_MAX
        return (e4m3(padded / s) * s).view(m, groups * group)[:, :k]
    if "prequant_scaling_factor" in t:
        x = x * t["prequant_scaling_factor"].double()
    if t["weight"].dtype == torch.int8:  # SmoothQuant: per-token int8
        s = x.abs().amax(-1, keepdim=True) / INT8_MAX
        return torch.round(x / s).clamp(-INT8_MAX, INT8_MAX) * s
    if "activation_scaling_factor" in t:  # FP8 / W4A8: one static scale
        s = t["activation_scaling_factor"].double()
        return e4m3(x / s) * s
    if t["weight"].dtype == torch.uint8:  # W4A16_AWQ: int4 weights alone, the activations as they are
        return x
    s = x.abs().amax(-1, keepdim=True) / E4M3_MAX  # FP8 per token
    return e4m3(x / s) * s


def _groupwise_fp8(t: dict) -> bool:
    return t["weight"].dtype == torch.float8_e4m3fn and t["weights_scaling_factor"].dim() == 2


def dequantized_weight(t: dict, group: int) -> torch.Tensor:
    w, s = t["weight"], t["weights_scaling_factor"].double()
    if _groupwise_fp8(t):
        return w.double() * s[:, torch.arange(w.shape[1]) // group]
    if w.dtype == torch.uint8:  # int4 groups, symmetric (W4A8_AWQ here)
        codes = unpack(w).double()
        z = t["zero_point"].double() if "zero_point" in t else torch.full_like(s, 8.0)
        g = torch.arange(codes.shape[1]) // group
        return (codes - z[:, g]) * s[:, g]
    return w.double() * s[:, None]


class FakeQuantLinear(nn.Module):
    def __init__(self, tensors: dict, rows: slice, group: int):
        super().__init__()
        self.t, self.w, self.group = tensors, dequantized_weight(tensors, group)[rows], group

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1]).double()
        return (fake_quant_input(flat, self.t, self.group) @ self.w.T).to(x.dtype).reshape(*x.shape[:-1], -1)


def fake_quant_hf(hf_model, ckpt: dict, config):
    model = copy.deepcopy(hf_model)
    q, kv = config.num_attention_heads * config.head_size, config.num_key_value_heads * config.head_size
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            prefix = f"transformer.layers.{i}."
            layer.input_layernorm.weight.copy_(ckpt[prefix + "input_layernorm.weight"])
            layer.post_attention_layernorm.weight.copy_(ckpt[prefix + "post_layernorm.weight"])
            for kiln_name, hf_names in HF_LINEARS.items():
                t = linear_tensors(ckpt, prefix + kiln_name)
                if not t:  # a mixture of experts: no dense MLP
                    continue
                bounds = [0, q, q + kv, q + 2 * kv] if len(hf_names) == 3 else [0, None]
                for j, hf_name in enumerate(hf_names):
                    parent, _, leaf = hf_name.rpartition(".")
                    linear = FakeQuantLinear(t, slice(bounds[j], bounds[j + 1]), config.quantization.group_size)
                    setattr(layer.get_submodule(parent), leaf, linear)
            copy_dequantized_experts(layer, ckpt, prefix, config)  # (experts are weight-only)
        head = linear_tensors(ckpt, "lm_head")
        if "weights_scaling_factor" in head:  # a quantized lm_head (its own tensors, even if tied)
            model.lm_head = FakeQuantLinear(head, slice(None), config.quantization.group_size)
    return model


def assert_logits_equal_fake_quant_hf(hf_model, ckpt_dir, ids: torch.Tensor) -> None:
    """kiln's logits from a quantized checkpoint equal `fake_quant_hf`'s within float32 summation (1e-4 of the
    largest logit; the reference sums in float64), and differ from the float model's, so the comparison would
    see a model that was not quantized. (An activation on a rounding tie could flip one step; none here does.)"""
    from kiln.models.base import PretrainedModel

    model = PretrainedModel.from_checkpoint(ckpt_dir)
    ckpt = load_file(Path(ckpt_dir) / "rank0.safetensors")
    with torch.no_grad():
        ours, ref, full = model(ids), fake_quant_hf(hf_model, ckpt, model.config)(ids).logits, hf_model(ids).logits
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (ours - full).abs().max() > 1e-3


def assert_engine_greedy_equals_fake_quant_hf(hf_model, ckpt_dir, engine_dir, prompt=(1, 17, 5, 99, 42),
                                             tokens: int = 6) -> None:
    """An engine built from the quantized checkpoint generates, greedily through `LLM` on the CPU, the tokens
    `fake_quant_hf` generates: the whole build -> load -> run path, against float math written out."""
    import kiln
    from conftest import hf_greedy
    from kiln.models.base import PretrainedModel

    model = PretrainedModel.from_checkpoint(ckpt_dir)
    kiln.build(model, kiln.BuildConfig(max_batch_size=2, max_seq_len=64)).save(engine_dir)
    ref = fake_quant_hf(hf_model, load_file(Path(ckpt_dir) / "rank0.safetensors"), model.config)
    with kiln.LLM(engine_dir, device="cpu") as llm:
        out = llm.generate(list(prompt), kiln.SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(ref, list(prompt), tokens)


def runtime_model(ckpt_dir, fused: bool):
    """The engine's runtime model of a quantized checkpoint (CPU), with its input quantization fused into the
    kernels before each linear (prepare_runtime: DecoderLayer.fuse_input_quantization) or each linear's own."""
    import kiln
    from kiln.models.base import PretrainedModel

    model = kiln.build(PretrainedModel.from_checkpoint(ckpt_dir)).runtime_model()
    if fused:
        model.prepare_runtime()
    return model
