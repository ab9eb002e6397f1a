"""Tool calling for `kiln serve`'s chat completions: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`.

- **The prompt.** A chat template that renders tools in a format kiln reads (TEMPLATE_FORMATS) gets them as
  transformers passes them (`tools=`). Any other template gets them from kiln, in a system message that asks for
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes format, which Qwen's templates use too).
- **tool_choice "auto"** (the default with tools): the model answers as it likes; its calls are read out of the
  text in the prompt's format (PARSERS), and the text before them is the message's content.
- **tool_choice "required" or a function by name**: the output is held to a JSON array of calls (structured output,
  kiln.runtime.json_schema), each {"name": one of the functions, "arguments": that function's parameters}, one call
  at most with `parallel_tool_calls: false` or a named function. Every call then parses and validates, whatever the
  model; a parameters schema kiln cannot hold to is refused (400) with its path.
- **tool_choice "none"**: no tools in the prompt, no calls read.
Calls come back as `message.tool_calls` (arguments the JSON text the model wrote), with finish_reason "tool_calls"; a
stream holds back the text that may be a call and sends each call as it is written (calls_begun): its id and name
once the name is whole, then the arguments' text piece by piece. Their ids are OpenAI's form
(`call_...`), or 9 letters and digits where the template is Mistral's: its templates refuse any other id when the
calls come back in the history.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid

from kiln.errors import ConfigError
from kiln.runtime.json_schema import schema_grammar

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's function names
# The start of a Mistral answer that may still be a call: a JSON array, or a function name before its arguments
MISTRAL_HEAD = re.compile(r"\s*([A-Za-z0-9_-]{0,64}(\{|\[|$)|\[)")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_CALLS, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
# Markers of a chat template's own tool-call format -> the parser that reads it (the first found wins)
TEMPLATE_FORMATS = ((HERMES_OPEN, "hermes"), ("<|python_tag|>", "llama3_json"), (MISTRAL_CALLS, "mistral"),
                    ('"parameters": ', "llama3_json"))
KILN_TOOL_PROMPT = (
    "You can call functions. To call one, answer with a line <tool_call>{{\"name\": <its name>, \"arguments\": <its "
    "arguments as a JSON object>}}</tool_call> for each call, and nothing else. Call one only when it helps; "
    "otherwise answer as usual. The functions, as JSON:\n{functions}")


class ToolsError(ValueError):
    """A tools field that cannot be served: the server answers 400 with `param` named."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class Tools:
    """A request's tools: its functions ({"name", "description"?, "parameters"?}), the choice ("auto", "required"
    or the name of the function it must call) and whether several calls may come in one answer."""

    functions: tuple[dict, ...]
    choice: str
    parallel: bool

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    def function(self, name: str) -> dict | None:
        return next((f for f in self.functions if f["name"] == name), None)

    @property
    def allowed(self) -> tuple[dict, ...]:
        """The functions an answer may call: all of them, or the one tool_choice names."""
        return self.functions if self.choice in ("auto", "required") else (self.function(self.choice),)

    def call_schema(self) -> dict:
        """The JSON Schema a forced answer is held to: an array of calls of the allowed functions."""
        calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                   "arguments": _parameters(f)},
                  "required": ["name", "arguments"]} for f in self.allowed]
        one = not self.parallel or self.choice != "required"
        return {"type": "array", "items": {"anyOf": calls}, "minItems": 1, **({"maxItems": 1} if one else {})}


def _parameters(function: dict) -> dict:
    """A function's parameters schema; none means no arguments, {}."""
    return function.get("parameters") or {"type": "object", "properties": {}}


def tools_request(body: dict) -> Tools | None:
    """The request's tools, validated, or None (no tools, or tool_choice "none")."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ToolsError(f"'parallel_tool_calls' must be a boolean, got {parallel!r}", "parallel_tool_calls")
    if tools in (None, []):
        if choice not in (None, "none"):
            raise ToolsError("'tool_choice' needs 'tools': send the functions the model may call", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise ToolsError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
    functions = tuple(_function(t, i) for i, t in enumerate(tools))
    names = [f["name"] for f in functions]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ToolsError(f"'tools' names {twice[0]!r} more than once; function names must be unique", "tools")
    choice = _choice(choice if choice is not None else "auto", names)
    if choice == "none":
        return None
    result = Tools(functions, choice, parallel)
    if result.forced:  # (held to a schema: one kiln cannot hold to is named now, not mid-answer)
        for f in result.allowed:
            try:
                schema_grammar(_parameters(f))
            except ConfigError as e:
                raise ToolsError(f"tool {f['name']!r} parameters: {e}", "tools") from None
    return result


def _function(tool, i: int) -> dict:
    where = f"'tools[{i}]'"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
            not isinstance(tool.get("function"), dict):
        raise ToolsError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": "
                         f"...}}}}, got {tool!r}", "tools")
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ToolsError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}", "tools")
    if not isinstance(function.get("parameters", {}), dict):
        raise ToolsError(f"{where}.function.parameters must be a JSON Schema object", "tools")
    return {k: v for k, v in function.items() if k in ("name", "description", "parameters")}


def _choice(choice, names: list[str]) -> str:
    if choice in ("none", "auto", "required"):
        return choice
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if name in names:
        return name
    raise ToolsError(f"'tool_choice' must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", "
                     f"\"function\": {{\"name\": one of {names}}}}}, got {choice!r}", "tool_choice")


# ---- the prompt ---------------------------------------------------------------------------------

def template_format(chat_template: str | None) -> str | None:
    """The tool-call format a chat template renders tools for (a PARSERS key), or None: kiln's prompt then."""
    if not chat_template or "tools" not in chat_template:
        return None
    return next((fmt for marker, fmt in TEMPLATE_FORMATS if marker in chat_template), None)


def prompt_messages(messages: list[dict], tools: Tools | None, chat_template: str | None):
    """(messages for the chat template, its `tools` argument or None): assistant turns' tool_calls with their
    arguments as objects, as templates expect them; kiln's tool prompt where the template has no format kiln reads."""
    messages = [_template_message(m) for m in messages]
    if tools is None:
        return messages, None
    if template_format(chat_template) is not None:
        return messages, [{"type": "function", "function": f} for f in tools.functions]
    text = KILN_TOOL_PROMPT.format(functions="\n".join(json.dumps(f, ensure_ascii=False) for f in tools.functions))
    if messages and messages[0]["role"] in ("system", "developer"):
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]], None
    return [{"role": "system", "content": text}, *messages], None


def _template_message(message: dict) -> dict:
    calls = message.get("tool_calls")
    if not calls:
        return message
    out = []
    for call in calls:
        function = dict(call.get("function") or {}) if isinstance(call, dict) else {}
        try:  # OpenAI sends arguments as a JSON string; templates write them out as an object
            function["arguments"] = json.loads(function.get("arguments") or "{}")
        except (TypeError, ValueError):
            pass
        out.append({**call, "function": function})
    return {**message, "tool_calls": out}


# ---- reading the answer -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ToolReader:
    """How a request's answers are read: its tools, the format their calls come in (a PARSERS key), and whether
    their ids must be Mistral's (9 letters and digits)."""

    tools: Tools
    parser: str
    mistral_ids: bool = False

    @classmethod
    def of(cls, tools: Tools, chat_template: str | None) -> ToolReader:
        template = template_format(chat_template)
        return cls(tools, "forced" if tools.forced else template or "hermes", template == "mistral")

    def read(self, text: str) -> tuple[str, list[dict]]:
        return read_calls(text, self.tools, self.parser, self.mistral_ids)

    def sendable(self, text: str) -> int:
        return sendable(text, self.parser)

    def begun(self, text: str) -> list[tuple[str, str]]:
        """The calls a streaming answer has begun, up to the first that names no offered function (calls_begun)."""
        calls = calls_begun(text, self.parser)
        known = [self.tools.function(name) is not None for name, _ in calls]
        return calls[:known.index(False)] if False in known else calls

    def new_id(self) -> str:
        return call_id(self.mistral_ids)


def read_calls(text: str, tools: Tools, parser: str, mistral_ids: bool = False) -> tuple[str, list[dict]]:
    """(the message's content, its calls as OpenAI tool_calls, each call's arguments the JSON text the model wrote,
    as a stream sends them). An answer whose calls do not all parse, or name a function the request did not offer,
    is content only, as the model wrote it."""
    content, calls = PARSERS[parser](text)
    if calls is None or not calls or any(not _known(c, tools) for c in calls):
        return text, []
    written = calls_begun(text, parser)
    return content, [{"id": call_id(mistral_ids), "type": "function",
                      "function": {"name": c["name"], "arguments": _arguments_text(c, written[i:i + 1])}}
                     for i, c in enumerate(calls)]


def call_id(mistral_ids: bool) -> str:
    """A new call's id: OpenAI's form, or 9 letters and digits for Mistral's templates."""
    return uuid.uuid4().hex[:9] if mistral_ids else f"call_{uuid.uuid4().hex[:24]}"


def _arguments_text(call: dict, written: list[tuple[str, str]]) -> str:
    """A call's arguments as the model wrote them (`written`: the call as calls_begun read it), where that text is
    the same object; else as JSON writes them (a call calls_begun cannot follow)."""
    arguments = _arguments(call)
    if written:
        try:
            if json.loads(written[0][1]) == arguments:
                return written[0][1]
        except ValueError:
            pass
    return json.dumps(arguments, ensure_ascii=False)


def _known(call, tools: Tools) -> bool:
    return isinstance(call, dict) and tools.function(call.get("name")) is not None and \
        isinstance(_arguments(call), dict)


def _arguments(call: dict):
    return call.get("arguments", call.get("parameters", {}))


def _forced(text: str):
    try:
        calls = json.loads(text)
    except ValueError:
        return text, None
    return "", calls if isinstance(calls, list) else None


def _hermes(text: str):
    """Hermes calls: <tool_call>{...}</tool_call> each, whitespace between them; the last may end with the answer,
    its tag unclosed. Each call is read as JSON, so a string in it may hold a tag."""
    start = text.find(HERMES_OPEN)
    if start < 0:
        return text, None
    calls, i, decoder = [], start, json.JSONDecoder()
    while i < len(text):
        if not text.startswith(HERMES_OPEN, i):  # text after a call, or a call left open before another
            return text, None
        try:
            call, end = decoder.raw_decode(text, _skip_space(text, i + len(HERMES_OPEN)))
        except ValueError:
            return text, None
        calls.append(call)
        i = _skip_space(text, end)
        i = _skip_space(text, i + len(HERMES_CLOSE)) if text.startswith(HERMES_CLOSE, i) else i
    return text[:start], calls


def _llama3_json(text: str):
    """Llama 3.1's JSON calls: {"name": ..., "parameters": {...}}, several split by ';' (its <|python_tag|> is a
    special token, gone from the decoded text)."""
    rest, calls, decoder = text.strip(), [], json.JSONDecoder()
    if not rest.startswith("{"):
        return text, None
    while rest:
        try:
            call, end = decoder.raw_decode(rest)
        except ValueError:
            return text, None
        calls.append(call)
        rest = rest[end:].strip()
        if rest.startswith(";"):
            rest = rest[1:].strip()
        elif rest:
            return text, None
    return "", calls


def _mistral(text: str):
    """Mistral's calls after [TOOL_CALLS]: a JSON array of {"name", "arguments"} (the templates from v0.3 to Small
    3.1), or name[ARGS]{...} for each (Magistral's and Devstral's, several joined by [TOOL_CALLS]). Both markers are
    special tokens in Mistral's tokenizers, gone from the decoded text: an answer that is a call without them is read
    the same. The arguments are read as JSON, so a string in them may hold a marker."""
    start = text.find(MISTRAL_CALLS)
    content, i = (text[:start], start + len(MISTRAL_CALLS)) if start >= 0 else ("", 0)
    i, decoder = _skip_space(text, i), json.JSONDecoder()
    if text.startswith("[", i) and not text.startswith(MISTRAL_ARGS, i):
        try:
            calls, end = decoder.raw_decode(text, i)
        except ValueError:
            return text, None
        return (content, calls) if isinstance(calls, list) and not text[end:].strip() else (text, None)
    calls = []
    while i < len(text):
        name = NAME.match(text, i)
        if name is None:
            return text, None
        i = name.end() + (len(MISTRAL_ARGS) if text.startswith(MISTRAL_ARGS, name.end()) else 0)
        try:
            arguments, end = decoder.raw_decode(text, i)
        except ValueError:
            return text, None
        calls.append({"name": name.group(), "arguments": arguments})
        i = _skip_space(text, end)
        i = _skip_space(text, i + len(MISTRAL_CALLS)) if text.startswith(MISTRAL_CALLS, i) else i
    return content, calls


PARSERS = {"forced": _forced, "hermes": _hermes, "llama3_json": _llama3_json, "mistral": _mistral}


def sendable(text: str, parser: str) -> int:
    """How much of a streaming answer's text can go out as content now: none of a forced answer, none of what may
    become a JSON call, and in the Hermes and Mistral formats nothing from where a call's tag begins or may be
    beginning (nor, in Mistral's, an answer that may be a call whose tag the decode dropped)."""
    if parser == "forced":
        return 0
    if parser == "llama3_json":
        return 0 if text.strip() == "" or text.lstrip().startswith("{") else len(text)
    tag = MISTRAL_CALLS if parser == "mistral" else HERMES_OPEN
    start = text.find(tag)
    if start >= 0:
        return start
    if parser == "mistral" and MISTRAL_HEAD.match(text):  # (a call whose [TOOL_CALLS] the decode dropped)
        return 0
    return len(text) - tag_start(text, tag)


def tag_start(text: str, tag: str) -> int:
    """The length of text's longest ending that begins `tag`: what a stream holds back."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-k:])), 0)


# ---- calls as they stream -----------------------------------------------------------------------
# A stream sends each call as the model writes it, as OpenAI's does: the call's id and name once the name is whole
# and its arguments have begun, then each piece of the arguments' JSON text as it comes. The text is read again
# from the start at every chunk (answers are short), by a scanner that knows where a JSON value ends but builds
# nothing.

_WHITESPACE = " \t\r\n"
_SCALAR = re.compile(r"-?[0-9][0-9.eE+-]*|true|false|null")


def calls_begun(text: str, parser: str) -> list[tuple[str, str]]:
    """(name, the arguments' JSON text so far) of each call the answer has begun, in order, up to the first whose name
    is not whole yet or whose arguments (a JSON object) have not begun."""
    calls = []
    for name, start, end in CALL_SCANNERS[parser](text):
        if name is None or start is None or text[start] != "{":
            break
        calls.append((name, text[start:end if end is not None else len(text)]))
    return calls


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _value_end(text: str, i: int) -> int | None:
    """Where the JSON value at text[i] ends (the index after it), or None where the text ends first."""
    if i >= len(text):
        return None
    if text[i] == '"':
        j = i + 1
        while j < len(text) and text[j] != '"':
            j += 2 if text[j] == "\\" else 1
        return j + 1 if j < len(text) else None
    if text[i] in "{[":
        depth, j = 0, i
        while j < len(text):
            if text[j] == '"':
                j = _value_end(text, j)
                if j is None:
                    return None
                continue
            depth += (text[j] in "{[") - (text[j] in "}]")
            j += 1
            if depth == 0:
                return j
        return None
    scalar = _SCALAR.match(text, i)
    return scalar.end() if scalar and scalar.end() < len(text) else None  # (at the text's end it may go on)


def _call_object(text: str, i: int) -> tuple[str | None, int | None, int | None, int | None]:
    """The call object at text[i], '{"name": ..., "arguments": {...}}' ("parameters" in Llama's): (its name, where
    its arguments begin and end, where the object ends), each None where the text has not come that far."""
    name = start = end = None
    i = _skip_space(text, i + 1)
    while i < len(text) and text[i] == '"':
        key_end = _value_end(text, i)
        colon = _skip_space(text, key_end) if key_end is not None else len(text)
        if colon >= len(text) or text[colon] != ":":
            break
        value = _skip_space(text, colon + 1)
        value_end = _value_end(text, value)
        key = json.loads(text[i:key_end])
        if key in ("arguments", "parameters") and value < len(text):
            start, end = value, value_end
        elif key == "name" and value_end is not None:
            name = json.loads(text[value:value_end])
        if value_end is None:
            break
        i = _skip_space(text, value_end)
        if i < len(text) and text[i] == "}":
            return name, start, end, i + 1
        i = _skip_space(text, i + 1) if i < len(text) and text[i] == "," else len(text)
    return name, start, end, None


def _objects(text: str, i: int, separator: str):
    """(name, arguments start, arguments end) of each call object from text[i] on, objects split by `separator`."""
    i = _skip_space(text, i)
    while i < len(text) and text[i] == "{":
        name, start, end, i = _call_object(text, i)
        yield name, start, end
        if i is None:
            return
        i = _skip_space(text, i)
        if i >= len(text) or text[i] != separator:
            return
        i = _skip_space(text, i + 1)


def _array_scanner(text: str, i: int = 0):
    """A JSON array of call objects from text[i] (forced calls; Mistral's older templates)."""
    i = _skip_space(text, i)
    if i < len(text) and text[i] == "[":
        yield from _objects(text, i + 1, ",")


def _hermes_scanner(text: str):
    at = text.find(HERMES_OPEN)
    while at >= 0:
        i = _skip_space(text, at + len(HERMES_OPEN))
        if i >= len(text) or text[i] != "{":
            return
        name, start, end, i = _call_object(text, i)
        yield name, start, end
        if i is None:
            return
        at = text.find(HERMES_OPEN, i)


def _mistral_scanner(text: str):
    """After [TOOL_CALLS] (or from the start, the marker dropped): an array, or name[ARGS]{...} for each call."""
    at = text.find(MISTRAL_CALLS)
    i = _skip_space(text, at + len(MISTRAL_CALLS) if at >= 0 else 0)
    if text.startswith("[", i) and not text.startswith(MISTRAL_ARGS, i):
        yield from _array_scanner(text, i)
        return
    while (name := NAME.match(text, i)) is not None:
        i = name.end()
        if text.startswith(MISTRAL_ARGS, i):
            i += len(MISTRAL_ARGS)
        elif MISTRAL_ARGS.startswith(text[i:]):  # (the marker still coming, or the name)
            return
        if i >= len(text) or text[i] != "{":
            return
        end = _value_end(text, i)
        yield name.group(), i, end
        if end is None:
            return
        i = _skip_space(text, end)
        i = _skip_space(text, i + len(MISTRAL_CALLS)) if text.startswith(MISTRAL_CALLS, i) else i


CALL_SCANNERS = {"forced": _array_scanner, "hermes": _hermes_scanner,
                 "llama3_json": lambda text: _objects(text, 0, ";"), "mistral": _mistral_scanner}
