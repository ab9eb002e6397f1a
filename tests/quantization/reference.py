"""Float math written out for the tests, independent of kiln.quantization: the formats as docs/quantization.md
describes them, and a transformers model whose weights are replaced by the dequantized ones."""

from __future__ import annotations

import copy

import pytest
import torch

HF_LINEARS = {"attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "attention.dense": ("self_attn.o_proj",), "mlp.fc": ("mlp.gate_proj",),
              "mlp.gate": ("mlp.up_proj",), "mlp.proj": ("mlp.down_proj",)}
# multi-head latent attention's quantized linears (DeepSeek; its o_proj is attention.dense)
MLA_LINEARS = {"attention.q": ("self_attn.q_proj",), "attention.q_b": ("self_attn.q_b_proj",),
               "attention.kv_b": ("self_attn.kv_b_proj",)}
MLA_NORMS = {"attention.q_a_norm.weight": "self_attn.q_a_layernorm",
             "attention.kv_a_norm.weight": "self_attn.kv_a_layernorm"}


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Byte j holds input column 2j (low nibble) and 2j + 1 (high nibble)."""
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.int64)
    out[:, 0::2] = packed.to(torch.int64) % 16
    out[:, 1::2] = packed.to(torch.int64) // 16
    return out


def dequantize(tensors: dict, group: int = 0) -> torch.Tensor:
    """A quantized linear's checkpoint tensors (leaf -> tensor) -> its effective float weight [out, in] (int8 or
    e4m3 codes times a scale a row or a row's group, int4 codes by group), with the AWQ prequant scale multiplied
    into the input columns. Input column c is in group c // group."""
    w, s = tensors["weight"], tensors["weights_scaling_factor"].double()
    if w.dtype in (torch.int8, torch.float8_e4m3fn):
        full = w.double() * (s[:, None] if s.dim() == 1 else s[:, torch.arange(w.shape[1]) // group])
    else:
        codes = unpack(w).double()
        z = tensors["zero_point"].double() if "zero_point" in tensors else torch.full_like(s, 8.0)
        group_of = torch.arange(codes.shape[1]) // group
        full = (codes - z[:, group_of]) * s[:, group_of]
    if "prequant_scaling_factor" in tensors:
        full = full * tensors["prequant_scaling_factor"].double()[None, :]
    return full.float()


def dequantize_experts(tensors: dict, group: int = 0) -> torch.Tensor:
    """Stacked experts' checkpoint tensors -> [experts, out, in] float: each expert as `dequantize` reads a dense
    layer's (W8A16's and FP8's scales [experts, out, 1]), or the float weight as it is."""
    if tensors["weight"].dtype not in (torch.int8, torch.uint8, torch.float8_e4m3fn):
        return tensors["weight"].float()
    experts = tensors["weight"].shape[0]
    int8 = tensors["weight"].dtype != torch.uint8  # (int8 or e4m3: a scale a row, [experts, out, 1], or a group)
    squeezed = {leaf: t.flatten(-2) if int8 and leaf == "weights_scaling_factor" and t.shape[-1] == 1 else t
                for leaf, t in tensors.items()}
    return torch.stack([dequantize({leaf: t[e] for leaf, t in squeezed.items()}, group) for e in range(experts)])


def copy_dequantized_experts(layer, ckpt: dict, prefix: str, config) -> None:
    """A transformers decoder layer's stacked experts ([w1 | w3] and w2 in transformers 5) set to the checkpoint's
    dequantized experts at `prefix`, where it has them, its router to the checkpoint's (AWQ folds its scale into
    the router as into the norm before it), and a shared expert (Qwen2-MoE, GLM-4.5) to its dequantized weights."""
    if prefix + "mlp.experts.fc.weight" not in ckpt:
        return
    router = layer.mlp.router if hasattr(layer.mlp, "router") else layer.mlp.gate  # (gpt-oss's has a bias)
    router.weight.copy_(ckpt[prefix + "mlp.router.weight"])
    if prefix + "mlp.shared_expert.fc.weight" in ckpt:  # a shared expert, a dense gated MLP (Qwen2-MoE's, GLM-4.5's)
        shared = getattr(layer.mlp, "shared_expert", None) or layer.mlp.shared_experts
        for kiln_name, hf_name in (("fc", "gate_proj"), ("gate", "up_proj"), ("proj", "down_proj")):
            t = linear_tensors(ckpt, f"{prefix}mlp.shared_expert.{kiln_name}")
            w = dequantize(t, config.quantization.group_size) if "weights_scaling_factor" in t else t["weight"]
            getattr(shared, hf_name).weight.copy_(w)
        if prefix + "mlp.shared_expert_gate.weight" in ckpt:  # Qwen2-MoE's sigmoid gate on it
            layer.mlp.shared_expert_gate.weight.copy_(ckpt[prefix + "mlp.shared_expert_gate.weight"])
    fc, gate, proj = (dequantize_experts(linear_tensors(ckpt, f"{prefix}mlp.experts.{p}"),
                                         config.quantization.group_size) for p in ("fc", "gate", "proj"))
    experts = layer.mlp.experts
    if hasattr(experts, "gate_up_proj_bias"):  # gpt-oss: [experts, in, out], gate and up interleaved on out
        experts.gate_up_proj.copy_(torch.stack([fc, gate], dim=2).flatten(1, 2).transpose(1, 2))
        experts.down_proj.copy_(proj.transpose(1, 2))
        return
    experts.gate_up_proj.copy_(torch.cat([fc, gate], dim=1))
    experts.down_proj.copy_(proj)


def is_decoder_linear(name: str) -> bool:
    """A saved checkpoint's decoder linear weight, as hub checkpoints name them: `*_proj`, and Mixtral's experts'
    `w1`, `w2`, `w3` (one tensor per expert; routers are not linears here)."""
    last = name.rsplit(".", 2)[-2]
    return name.startswith("model.layers.") and name.endswith(".weight") and (
        last.endswith("_proj") or last in ("w1", "w2", "w3"))


def rtn_int4(w: torch.Tensor, group: int, zero_point: bool, dtype=torch.float32):
    """Round-to-nearest int4 of w [out, in] -> (codes [out, in] in 0..15, scale, zero) per group, in float32
    with the scale rounded to `dtype` first."""
    out, inp = w.shape
    groups = -(-inp // group)  # a short last group: pad with zeros (they change neither max |w| nor the range)
    padded = torch.zeros(out, groups * group)
    padded[:, :inp] = w.float()
    g = padded.reshape(out, groups, group)
    if zero_point:
        hi, lo = g.amax(-1).clamp(min=0), g.amin(-1).clamp(max=0)
        s = ((hi - lo) / 15).to(dtype).float()
        z = torch.round(-lo / s).clamp(0, 15)
    else:
        s = (g.abs().amax(-1) / 7).to(dtype).float()
        z = torch.full_like(s, 8.0)
    codes = (torch.round(g / s[..., None]) + z[..., None]).clamp(0, 15)
    return codes.reshape(out, groups * group)[:, :inp].long(), s.to(dtype), z.to(dtype)


def linear_tensors(ckpt: dict, module: str) -> dict:
    return {k.rsplit(".", 1)[1]: v for k, v in ckpt.items() if k.rsplit(".", 1)[0] == module}


def dequantized_hf(hf_model, ckpt: dict, config):
    """A copy of the transformers model with every kiln linear (lm_head too, when quantized; a mixture of experts'
    stacked weights) replaced by its dequantized checkpoint weight and the norms by the checkpoint's (AWQ folds
    scales into them)."""
    model = copy.deepcopy(hf_model)
    q, kv = config.num_attention_heads * config.head_size, config.num_key_value_heads * config.head_size
    with torch.no_grad():
        for i in range(config.num_hidden_layers):
            layer = model.model.layers[i]
            prefix = f"transformer.layers.{i}."
            layer.input_layernorm.weight.copy_(ckpt[prefix + "input_layernorm.weight"])
            layer.post_attention_layernorm.weight.copy_(ckpt[prefix + "post_layernorm.weight"])
            for kiln_name, hf_name in MLA_NORMS.items():  # (AWQ folds latent attention's scales into them)
                if prefix + kiln_name in ckpt:
                    layer.get_submodule(hf_name).weight.copy_(ckpt[prefix + kiln_name])
            for kiln_name, hf_names in {**HF_LINEARS, **MLA_LINEARS}.items():
                if prefix + kiln_name + ".weight" not in ckpt:  # a mixture of experts: no dense MLP (and so on)
                    continue
                w = dequantize(linear_tensors(ckpt, prefix + kiln_name), config.quantization.group_size) \
                    if ckpt[prefix + kiln_name + ".weight"].dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn) \
                    else ckpt[prefix + kiln_name + ".weight"]
                parts = w.split([q, kv, kv]) if len(hf_names) == 3 else (w,)
                for hf_name, part in zip(hf_names, parts):
                    layer.get_submodule(hf_name).weight.copy_(part)
            copy_dequantized_experts(layer, ckpt, prefix, config)
        head = linear_tensors(ckpt, "lm_head")
        if head and head["weight"].dtype in (torch.int8, torch.uint8):  # quantized: its own tensor, even if tied
            model.lm_head.weight = torch.nn.Parameter(dequantize(head, config.quantization.group_size))
    return model


# ---- the shared tiny model -------------------------------------------------------------------------------

# hidden 128 and ffn 256 hold whole groups of 32, 64 and 128 (the default TINY_LLAMA's ffn 96 does not).
QUANT_LLAMA = dict(hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def quant_llama(tmp_path_factory):
    """(hf_dir, transformers model) of a tiny Llama whose shapes fit every group size; tests must not change it."""
    from conftest import make_hf_model  # tests/conftest.py

    hf_dir = tmp_path_factory.mktemp("quant_llama") / "hf"
    return hf_dir, make_hf_model(hf_dir, **QUANT_LLAMA)
