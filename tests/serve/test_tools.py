"""Tool calling's parts (kiln.serve.tools): the request's validation, the prompt, the answer's calls read in each
format, what a stream may send, and the schema forced calls are held to (against the jsonschema validator). The
server end to end, with the openai client, is in test_server.py."""

from __future__ import annotations

import json
import random

import jinja2
import jsonschema
import pytest

from kiln.runtime.json_mode import DONE, walk
from kiln.runtime.json_schema import schema_grammar
from kiln.serve.protocol import call_deltas
from kiln.serve.tools import KILN_TOOL_PROMPT, ToolReader, Tools, ToolsError, calls_begun, prompt_messages, \
    read_calls, sendable, template_format, tools_request

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
HERMES_TEMPLATE = ("{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools> Answer with "
                   "<tool_call>...</tool_call>.{% endif %}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
                   "{% endfor %}<|assistant|>")

# The shape of Mistral's templates (v0.3 on): tools in [AVAILABLE_TOOLS], calls after [TOOL_CALLS], ids of 9
# characters
MISTRAL_TEMPLATE = ("{% for m in messages %}{% if m.role == 'user' %}{% if tools %}[AVAILABLE_TOOLS]"
                    "{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST]{{ m.content }}[/INST]"
                    "{% elif m.tool_calls %}[TOOL_CALLS]"
                    "{% for c in m.tool_calls %}{% if c.id | length != 9 %}{{ raise_exception('Tool call IDs should "
                    "be alphanumeric strings with length 9!') }}{% endif %}{% endfor %}{{ m.tool_calls | tojson }}"
                    "{% else %}{{ m.content }}{% endif %}{% endfor %}")


def tools(*defs, choice=None, parallel=True) -> Tools:
    body = {"tools": list(defs), "parallel_tool_calls": parallel} | ({"tool_choice": choice} if choice else {})
    return tools_request(body)


@pytest.mark.parametrize("body,param,words", [
    ({"tools": {"name": "x"}}, "tools", "must be a list"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "letters, digits"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "'get_weather' more than once"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", "'always'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     "one of ['get_weather']"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
    ({"tools": [{"type": "function", "function": {"name": "n", "parameters": {
        "type": "object", "properties": {"k": {"type": "array", "uniqueItems": True}}}}}], "tool_choice": "required"},
     "tools", "tool 'n' parameters: json_schema at #/properties/k: 'uniqueItems'"),
])
def test_bad_tools_fields_are_refused_naming_the_field(body, param, words):
    with pytest.raises(ToolsError, match=words.replace("[", r"\[").replace("]", r"\]")) as e:
        tools_request(body)
    assert e.value.param == param


def test_choices():
    assert tools_request({}) is None and tools_request({"tools": [WEATHER], "tool_choice": "none"}) is None
    assert tools(WEATHER).choice == "auto" and not tools(WEATHER).forced
    named = tools(WEATHER, TIME, choice={"type": "function", "function": {"name": "get_time"}})
    assert named.choice == "get_time" and named.forced
    # a schema kiln cannot hold to is fine where nothing is held to it
    loose = {"type": "function", "function": {"name": "n", "parameters": {"type": "object", "properties": {
        "k": {"type": "array", "uniqueItems": True}}}}}
    assert tools(loose).functions[0]["name"] == "n"


@pytest.mark.parametrize("choice,parallel", [("required", True), ("required", False),
                                             ({"type": "function", "function": {"name": "get_time"}}, True)])
def test_forced_calls_schema_takes_valid_calls_of_the_allowed_functions_only(choice, parallel):
    t = tools(WEATHER, TIME, choice=choice, parallel=parallel)
    schema, grammar = t.call_schema(), schema_grammar(t.call_schema())
    rng = random.Random(0)
    allowed = ["get_weather", "get_time"] if choice == "required" else ["get_time"]
    for _ in range(200):
        calls = [{"name": "get_weather", "arguments": {"city": rng.choice(["Oslo", "Lima"])} | (
                     {"unit": "c"} if rng.random() < 0.5 else {})} if rng.random() < 0.5 else
                 {"name": "get_time", "arguments": {"zone": "UTC"}} for _ in range(rng.randint(0, 3))]
        valid = bool(calls) and all(c["name"] in allowed for c in calls) and (parallel and choice == "required"
                                                                              or len(calls) == 1)
        assert (walk(grammar.start, json.dumps(calls).encode(), grammar.step) == DONE) == valid, calls
        if valid:
            jsonschema.validate(calls, schema)
    wrong = [{"name": "get_time", "arguments": {"city": "Oslo"}}]  # (another function's arguments)
    assert walk(grammar.start, json.dumps(wrong).encode(), grammar.step) != DONE


def test_calls_are_read_in_each_format():
    t = tools(WEATHER, TIME)
    content, calls = read_calls('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                                '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}',
                                t, "hermes")  # (the last tag unclosed: the answer ended there)
    assert content == "Let me look.\n"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "CET"})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    _, calls = read_calls('{"name": "get_time", "parameters": {"zone": "a;b"}}; {"name": "get_weather", '
                          '"parameters": {"city": "X"}}', t, "llama3_json")
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"zone": "a;b"}, {"city": "X"}]
    _, calls = read_calls('[{"name":"get_time","arguments":{"zone":"Z"}}]', t, "forced")
    assert calls[0]["function"] == {"name": "get_time", "arguments": '{"zone":"Z"}'}  # (as the model wrote them)
    # Mistral's: a JSON array after [TOOL_CALLS], or name[ARGS]{...} each; the markers (special tokens) may be gone
    two = [("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "CET"})]
    for text, content in [('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": '
                           '"get_time", "arguments": {"zone": "CET"}}]', ""),
                          (' [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", '
                           '"arguments": {"zone": "CET"}}]', ""),
                          ('One moment.[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]get_time[ARGS]'
                           '{"zone": "CET"}', "One moment."),
                          ('get_weather{"city": "Oslo"}get_time{"zone": "CET"}', "")]:
        got, calls = read_calls(text, t, "mistral")
        assert got == content and [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                   for c in calls] == two, text


def test_a_mistral_template_gets_ids_of_9_characters_in_every_mode():
    """Mistral's templates refuse a history whose call ids are not 9 letters and digits: kiln's answers to such a
    template have those ids, forced or not, and its history then renders."""
    assert template_format(MISTRAL_TEMPLATE) == "mistral"
    for t, text in [(tools(WEATHER), '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]'),
                    (tools(WEATHER, choice="required"), '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]')]:
        _, calls = ToolReader.of(t, MISTRAL_TEMPLATE).read(text)
        assert len(calls) == 1 and len(calls[0]["id"]) == 9 and calls[0]["id"].isalnum()
        history = [{"role": "user", "content": "Oslo?"}, {"role": "assistant", "content": "", "tool_calls": calls}]
        messages, template_tools = prompt_messages(history, t, MISTRAL_TEMPLATE)
        rendered = jinja2.Environment().from_string(MISTRAL_TEMPLATE).render(
            messages=messages, tools=template_tools, raise_exception=_raise)
        assert f'"id": "{calls[0]["id"]}"' in rendered and "[AVAILABLE_TOOLS]" in rendered
    _, calls = ToolReader.of(tools(WEATHER), HERMES_TEMPLATE).read('<tool_call>{"name": "get_weather", "arguments": '
                                                                  '{"city": "Oslo"}}</tool_call>')
    assert calls[0]["id"].startswith("call_")  # (other templates: OpenAI's form)


def _raise(message: str):
    raise ValueError(message)


@pytest.mark.parametrize("text,parser", [
    ("The weather is fine.", "hermes"),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call> and more text', "hermes"),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', "hermes"),
    ('<tool_call>{"name": "send_mail", "arguments": {}}</tool_call>', "hermes"),  # (a function not offered)
    ('<tool_call>{"name": "get_weather", "arguments": "Oslo"}</tool_call>', "hermes"),
    ('{"name": "get_time", "parameters": {"zone": "Z"}} then prose', "llama3_json"),
    ("Hello there", "llama3_json"),
    ('[{"name":"get_time","arguments":{"zone":"Z"', "forced"),  # (cut by max_tokens)
    ("Hello there", "mistral"), ("get_weather is a function", "mistral"), ("[1, 2]", "mistral"),
    ('Note: {"city": "Oslo"}', "mistral"), ('[TOOL_CALLS]get_weather[ARGS]{"city": ', "mistral"),
])
def test_an_answer_that_is_not_all_calls_is_content_as_written(text, parser):
    assert read_calls(text, tools(WEATHER, TIME), parser) == (text, [])


@pytest.mark.parametrize("text,parser,n", [
    ("Sure", "hermes", 4), ("Sure <tool", "hermes", 5), ("Sure <tool_call>{", "hermes", 5), ("a < b", "hermes", 5),
    ("x<", "hermes", 1), ("  ", "llama3_json", 0), (' {"name"', "llama3_json", 0), ("Hi {", "llama3_json", 4),
    ('[{"name"', "forced", 0), ("Sure", "mistral", 0), ("Sure ", "mistral", 5), ("Sure [TOOL", "mistral", 5),
    ("Hi.[TOOL_CALLS]", "mistral", 3), (" [", "mistral", 0), ("get_weather{", "mistral", 0),
    ("Hello, world", "mistral", 12),
])
def test_a_stream_holds_back_what_may_become_a_call(text, parser, n):
    assert sendable(text, parser) == n


# One answer of two calls in each format, their arguments with a quote, braces, the format's separators and its
# tags inside their strings: what neither the parsers nor a stream's scanner may stop at.
STREAMED = {
    "hermes": 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "O\\"slo}"}}\n</tool_call>\n'
              '<tool_call>{"arguments": {"zone": "C{E}T</tool_call>"}, "name": "get_time"}</tool_call>',
    "forced": '[{"name":"get_time","arguments":{"zone":"Z"}}, {"name":"get_weather","arguments":{"city":"a]}, b"}}]',
    "llama3_json": '{"name": "get_time", "parameters": {"zone": "a;b"}}; {"name": "get_weather", "parameters": '
                   '{"city": "X", "unit": "c"}}',
    "mistral": 'One moment.[TOOL_CALLS]get_weather[ARGS]{"city": "a[ARGS]{[TOOL_CALLS]"}[TOOL_CALLS]get_time[ARGS]'
               '{"zone": "{"}',
}


@pytest.mark.parametrize("parser", sorted(STREAMED))
def test_a_stream_reads_each_call_as_it_comes_and_ends_with_the_calls_read_whole(parser):
    """calls_begun on every prefix of an answer: each prefix's calls extend the last prefix's (a call's name never
    changes, its arguments only grow), and the whole answer's are the calls read_calls reads, their arguments the
    text the model wrote. call_deltas then sends each call's name once and the arguments' new text."""
    text, t = STREAMED[parser], tools(WEATHER, TIME)
    _, calls = read_calls(text, t, parser)
    whole = [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    assert len(whole) == 2 and [json.loads(a) for _, a in whole] == [json.loads(a) for _, a in calls_begun(text,
                                                                                                           parser)]
    before, sent, joined = [], [], {}
    for n in range(len(text) + 1):
        now = calls_begun(text[:n], parser)
        assert len(now) >= len(before), (n, now, before)
        for (name, arguments), (name_now, arguments_now) in zip(before, now):
            assert name_now == name and arguments_now.startswith(arguments), (n, before, now)
        for d in call_deltas(now, sent, lambda: "id"):
            name, arguments = joined.get(d["index"], (None, ""))
            assert ("id" in d) == (name is None)
            joined[d["index"]] = (name or d["function"]["name"], arguments + d["function"]["arguments"])
        before = now
    assert before == whole and [joined[i] for i in sorted(joined)] == whole


def test_a_stream_sends_no_call_of_a_function_not_offered():
    """ToolReader.begun stops at the first call naming a function the request did not offer (read whole, such an
    answer is content), and calls_begun waits for a name to be whole and for the arguments to begin."""
    reader = ToolReader(tools(WEATHER), "hermes")
    text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call><tool_call>{"name": "send_mail", ' \
           '"arguments": {"to": "x"}}</tool_call><tool_call>{"name": "get_weather", "arguments": {}}'
    assert reader.begun(text) == [("get_weather", "{}")]
    assert calls_begun('<tool_call>{"name": "get_wea', "hermes") == []
    assert calls_begun('<tool_call>{"name": "get_weather", "arguments": ', "hermes") == []
    assert calls_begun('<tool_call>{"name": "get_weather", "arguments": "Oslo"}', "hermes") == []  # (no object)
    assert calls_begun("get_weather[AR", "mistral") == [] and calls_begun("Hello there", "mistral") == []


def test_the_prompt_gets_the_tools_from_the_template_or_from_kiln():
    t = tools(WEATHER)
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "12 C"}]
    assert template_format(HERMES_TEMPLATE) == "hermes" and template_format("{{ messages }}") is None
    llama = "{% for t in tools %}{{ t | tojson }}{% endfor %}{{- '{\"name\": \"' + c.name + '\", \"parameters\": ' }}"
    assert template_format(llama) == "llama3_json"
    out, template_tools = prompt_messages(messages, t, HERMES_TEMPLATE)
    assert template_tools == [{"type": "function", "function": WEATHER["function"]}]
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}  # (an object, as templates want)
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'  # (the request's untouched)
    # a template with no tool format kiln reads: kiln's own prompt, in a system message first
    out, template_tools = prompt_messages(messages, t, "{{ messages }}")
    assert template_tools is None and out[0]["role"] == "system"
    assert out[0]["content"] == KILN_TOOL_PROMPT.format(functions=json.dumps(WEATHER["function"]))
    out, _ = prompt_messages([{"role": "system", "content": "Be brief."}, *messages], t, None)
    assert out[0]["content"].startswith("Be brief.\n\nYou can call functions.") and out[1]["role"] == "user"
    assert prompt_messages(messages, None, HERMES_TEMPLATE)[1] is None
