"""Meta-format checkpoints (params.json + consolidated.NN.pth) convert to the same model transformers runs.

The Meta copy is written here from a tiny HF Llama: names mapped back, q/k rows permuted back to
Meta's interleaved rotary layout, and for the 2-file case split the way Meta's fairscale layers
split them (column-parallel on dim 0, row-parallel on dim 1, norms replicated, embedding on dim 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import half_to_interleaved, make_hf_model
from kiln.checkpoint.convert import convert_checkpoint
from kiln.checkpoint.safetensors_io import SafetensorsFile
from kiln.models.base import PretrainedModel
from kiln.models.llama.model import LLaMAForCausalLM

ATOL = 1e-4
# Meta name -> dim its model-parallel pieces are split on (None: replicated), per fairscale's layers.
SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def meta_state_dict(hf) -> dict[str, torch.Tensor]:
    c = hf.config
    sd = hf.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        h = f"model.layers.{i}."
        m = f"layers.{i}."
        out[m + "attention.wq.weight"] = half_to_interleaved(sd[h + "self_attn.q_proj.weight"], c.num_attention_heads)
        out[m + "attention.wk.weight"] = half_to_interleaved(sd[h + "self_attn.k_proj.weight"], c.num_key_value_heads)
        out[m + "attention.wv.weight"] = sd[h + "self_attn.v_proj.weight"]
        out[m + "attention.wo.weight"] = sd[h + "self_attn.o_proj.weight"]
        out[m + "feed_forward.w1.weight"] = sd[h + "mlp.gate_proj.weight"]
        out[m + "feed_forward.w2.weight"] = sd[h + "mlp.down_proj.weight"]
        out[m + "feed_forward.w3.weight"] = sd[h + "mlp.up_proj.weight"]
        out[m + "attention_norm.weight"] = sd[h + "input_layernorm.weight"]
        out[m + "ffn_norm.weight"] = sd[h + "post_attention_layernorm.weight"]
    return {k: v.clone() for k, v in out.items()}


def write_meta(hf, meta_dir: Path, parts: int, embedding_dim: int = 1) -> None:
    """`embedding_dim`: 1 as Llama 2's ParallelEmbedding splits it, 0 as Llama 3's VocabParallelEmbedding."""
    c = hf.config
    meta_dir.mkdir(parents=True)
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "norm_eps": c.rms_norm_eps,
              "rope_theta": c.rope_parameters["rope_theta"], "multiple_of": 32}
    (meta_dir / "params.json").write_text(json.dumps(params))
    sd = meta_state_dict(hf)
    for p in range(parts):
        piece = {}
        for name, t in sd.items():
            dim = embedding_dim if name == "tok_embeddings.weight" else SPLIT_DIM.get(name.split(".")[-2])
            piece[name] = t if dim is None or parts == 1 else t.chunk(parts, dim=dim)[p].clone()
        torch.save(piece, meta_dir / f"consolidated.{p:02d}.pth")


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("meta") / "hf"
    return make_hf_model(hf_dir, seed=3)


def test_interleave_helper_is_the_inverse_of_hf_permute():
    # transformers' convert_llama_weights_to_hf.py: Meta (interleaved) -> HF (rotate-half)
    def hf_permute(w, n_heads):
        return w.view(n_heads, w.shape[0] // n_heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    w = torch.randn(64, 8)
    assert torch.equal(hf_permute(half_to_interleaved(w, 4), 4), w)
    assert not torch.equal(half_to_interleaved(w, 4), w)


@pytest.mark.parametrize("parts, embedding_dim", [(1, 1), (2, 1), (2, 0)], ids=["one_file", "two_files",
                                                                                  "two_files_vocab_split"])
def test_from_meta_ckpt_matches_transformers(hf_llama, tmp_path, parts, embedding_dim):
    meta_dir = tmp_path / "meta"
    write_meta(hf_llama, meta_dir, parts, embedding_dim)
    assert len(list(meta_dir.glob("consolidated.*.pth"))) == parts
    if parts == 2:  # the split really is a split
        piece = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
        assert piece["tok_embeddings.weight"].shape == ((128, 32) if embedding_dim == 1 else (64, 64))
        assert piece["layers.0.attention.wo.weight"].shape == (64, 32)
        assert piece["layers.0.attention.wk.weight"].shape == (16, 64)

    model = LLaMAForCausalLM.from_meta_ckpt(meta_dir, dtype="float32")
    c = model.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.vocab_size) == \
        (64, 4, 2, 96, 128)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_llama(ids, use_cache=False).logits
        assert (model(ids) - expected).abs().max().item() <= ATOL

        # the same through convert_checkpoint (format detected from params.json) and from_checkpoint
        out = convert_checkpoint(meta_dir, tmp_path / "ckpt", dtype="float32")
        assert json.loads((out / "config.json").read_text())["architecture"] == "LlamaForCausalLM"
        loaded = PretrainedModel.from_checkpoint(out)
        assert (loaded(ids) - expected).abs().max().item() <= ATOL


def test_one_and_two_file_meta_checkpoints_give_identical_tensors(hf_llama, tmp_path):
    tensors = []
    for parts in (1, 2):
        write_meta(hf_llama, tmp_path / f"meta{parts}", parts)
        out = convert_checkpoint(tmp_path / f"meta{parts}", tmp_path / f"ckpt{parts}", dtype="float32")
        f = SafetensorsFile(out / "rank0.safetensors")
        tensors.append({n: f.get(n) for n in f.keys()})
    assert sorted(tensors[0]) == sorted(tensors[1])
    for name in tensors[0]:
        assert torch.equal(tensors[0][name], tensors[1][name]), name


def test_meta_auto_dtype_is_bfloat16(hf_llama, tmp_path):
    write_meta(hf_llama, tmp_path / "meta", 1)
    model = LLaMAForCausalLM.from_meta_ckpt(tmp_path / "meta")
    assert model.config.dtype == "bfloat16"
    assert model.read_weight("transformer.layers.0.attention.qkv.weight").dtype == torch.bfloat16
