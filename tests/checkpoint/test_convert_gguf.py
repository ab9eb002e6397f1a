"""GGUF (llama.cpp) -> kiln: a file written here with gguf.GGUFWriter from a tiny HF Llama converts to the
same model transformers runs; Q8_0 weights match HF weights quantized and dequantized the same way."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import add_gguf_shape, finish_gguf, half_to_interleaved, make_hf_model
from kiln.checkpoint.convert import convert_checkpoint
from kiln.errors import ConfigError
from kiln.models.base import PretrainedModel
from kiln.models.llama.model import LLaMAForCausalLM

ATOL = 1e-4
Q8_0 = gguf.GGMLQuantizationType.Q8_0

# HF name (after "model.layers.{i}.") -> llama.cpp name (after "blk.{i}.")
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def gguf_tensors(hf) -> dict[str, torch.Tensor]:
    """llama.cpp's names and layout (q/k rows permuted as convert_hf_to_gguf.py's LlamaModel.permute does)."""
    c = hf.config
    sd = hf.state_dict()
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        for hf_name, name in LAYER_NAMES.items():
            t = sd[f"model.layers.{i}.{hf_name}"]
            if name == "attn_q.weight":
                t = half_to_interleaved(t, c.num_attention_heads)
            elif name == "attn_k.weight":
                t = half_to_interleaved(t, c.num_key_value_heads)
            out[f"blk.{i}.{name}"] = t
    return {k: v.detach().clone() for k, v in out.items()}


def q8_roundtrip(t: torch.Tensor) -> torch.Tensor:
    data = t.numpy().astype(np.float32)
    return torch.from_numpy(np.array(gguf.quants.dequantize(gguf.quants.quantize(data, Q8_0), Q8_0),
                                     dtype=np.float32).reshape(t.shape))


def write_gguf(hf, path: Path, quantize: bool, extra: dict[str, torch.Tensor] | None = None) -> None:
    """`extra`: more float32 tensors, written as they are (rope_freqs.weight)."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    add_gguf_shape(w, c)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)
    finish_gguf(w, {**gguf_tensors(hf), **(extra or {})}, "Q8_0" if quantize else None, decoder_only=False)


VARIANTS = {"untied": dict(tie_word_embeddings=False), "tied": dict(tie_word_embeddings=True),
            "head_dim": dict(head_dim=32)}  # head_dim != embedding_length / head_count: read from key_length


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_llama(request, tmp_path_factory):
    model = make_hf_model(tmp_path_factory.mktemp("gguf") / "hf", seed=5, **VARIANTS[request.param])
    model.variant = request.param
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids) if not hasattr(model, "generation_config") else model(ids, use_cache=False).logits


IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))


def test_f32_gguf_matches_transformers(hf_llama, tmp_path):
    path = tmp_path / "tiny-f32.gguf"
    write_gguf(hf_llama, path, quantize=False)
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert ("output.weight" in names) == (not hf_llama.config.tie_word_embeddings)

    model = LLaMAForCausalLM.from_gguf(path, dtype="float32")
    c = model.config
    assert c.tie_word_embeddings == hf_llama.config.tie_word_embeddings
    assert (c.vocab_size, c.num_key_value_heads, c.intermediate_size) == (128, 2, 96)
    assert c.head_size == hf_llama.config.head_dim
    expected = _logits(hf_llama, IDS)
    assert (_logits(model, IDS) - expected).abs().max().item() <= ATOL

    out = convert_checkpoint(path, tmp_path / "ckpt", dtype="float32")
    assert json.loads((out / "config.json").read_text())["architecture"] == "LlamaForCausalLM"
    assert (_logits(PretrainedModel.from_checkpoint(out), IDS) - expected).abs().max().item() <= ATOL


def test_q8_0_gguf_matches_hf_with_the_same_quantization_error(hf_llama, tmp_path):
    path = tmp_path / "tiny-q8_0.gguf"
    write_gguf(hf_llama, path, quantize=True)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == Q8_0 and types["token_embd.weight"] == Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32

    # The reference: the HF model with every 2-D weight quantized then dequantized with gguf.quants.
    # Q8_0 blocks run along a row, so permuting q/k rows commutes with the round trip.
    reference = make_hf_model(tmp_path / "ref", seed=5, **VARIANTS[hf_llama.variant])
    with torch.no_grad():
        for p in reference.parameters():  # tied weights are one parameter: quantized once
            if p.dim() == 2:
                p.copy_(q8_roundtrip(p))
    float_logits = _logits(hf_llama, IDS)
    expected = _logits(reference, IDS)
    assert (expected - float_logits).abs().max().item() > 10 * ATOL  # the quantization error is visible

    model = LLaMAForCausalLM.from_gguf(path, dtype="float32")
    assert (_logits(model, IDS) - expected).abs().max().item() <= ATOL


# Llama 3.1's rope scaling, with an original context short enough that the tiny model's 8 frequencies fall in all
# three of its bands (kept, smoothed, divided by the factor).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def llama_cpp_rope_freqs(head_dim: int, theta: float, rope: dict) -> torch.Tensor:
    """The divisors llama.cpp's convert_hf_to_gguf.py writes as rope_freqs.weight for a llama3-scaled model: 1
    above the high-frequency band, the factor below the low one, and the smoothed ratio between (in float64)."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    divisors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            divisors.append(1.0)
        elif wavelen > old / low:
            divisors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(divisors, dtype=torch.float32)


def test_llama3_rope_freqs_gguf_matches_transformers_llama3_scaling(tmp_path):
    """GGUF files of Llama 3.1 and later carry llama3's rope scaling as rope_freqs.weight, one divisor a frequency;
    kiln reads it as `freq_factors` and matches transformers running the llama3 parameters it came from."""
    theta = 10000.0
    hf = make_hf_model(tmp_path / "hf", seed=6, rope_parameters={"rope_theta": theta, **LLAMA3_ROPE})
    plain = make_hf_model(tmp_path / "plain", seed=6)  # the same weights, unscaled
    freqs = llama_cpp_rope_freqs(hf.config.head_dim, theta, LLAMA3_ROPE)
    assert {1.0, 8.0} < set(freqs.tolist())  # every band present
    path = tmp_path / "llama31.gguf"
    write_gguf(hf, path, quantize=False, extra={"rope_freqs.weight": freqs})

    model = LLaMAForCausalLM.from_gguf(path, dtype="float32")
    assert model.config.rotary_scaling == {"type": "freq_factors", "factors": freqs.tolist()}
    expected = _logits(hf, IDS)
    assert (_logits(plain, IDS) - expected).abs().max().item() > 10 * ATOL  # the scaling shows in the logits
    assert (_logits(model, IDS) - expected).abs().max().item() <= ATOL
    out = convert_checkpoint(path, tmp_path / "ckpt", dtype="float32")
    assert (_logits(PretrainedModel.from_checkpoint(out), IDS) - expected).abs().max().item() <= ATOL


def test_rope_freqs_of_the_wrong_length_is_refused(tmp_path):
    hf = make_hf_model(tmp_path / "hf", seed=6)
    path = tmp_path / "bad.gguf"
    write_gguf(hf, path, quantize=False, extra={"rope_freqs.weight": torch.ones(hf.config.head_dim)})
    with pytest.raises(ConfigError, match=r"rotary_scaling.factors must be one value per rotary frequency \(8\)"):
        LLaMAForCausalLM.from_gguf(path, dtype="float32")
