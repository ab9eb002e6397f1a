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
Calls come back as `message.tool_calls` (arguments a JSON string), with finish_reason "tool_calls"; a stream holds
back the text that may be a call and sends the calls in one delta at the end. Their ids are OpenAI's form
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


def read_calls(text: str, tools: Tools, parser: str, mistral_ids: bool = False) -> tuple[str, list[dict]]:
    """(the message's content, its calls as OpenAI tool_calls). An answer whose calls do not all parse, or name a
    function the request did not offer, is content only, as the model wrote it."""
    content, calls = PARSERS[parser](text)
    if calls is None or not calls or any(not _known(c, tools) for c in calls):
        return text, []
    return content, [{"id": uuid.uuid4().hex[:9] if mistral_ids else f"call_{uuid.uuid4().hex[:24]}",
                      "type": "function",
                      "function": {"name": c["name"], "arguments": json.dumps(_arguments(c), ensure_ascii=False)}}
                     for c in calls]


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
    start = text.find(HERMES_OPEN)
    if start < 0:
        return text, None
    blocks, calls = text[start:].split(HERMES_OPEN)[1:], []
    for i, block in enumerate(blocks):
        body, closed, rest = block.partition(HERMES_CLOSE)
        if rest.strip() or not closed and i < len(blocks) - 1:  # text after a call, or a call left open
            return text, None
        try:  # (the last call may end at the end of the answer, its tag unclosed)
            calls.append(json.loads(body))
        except ValueError:
            return text, None
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
    the same."""
    start = text.find(MISTRAL_CALLS)
    content, body = (text[:start], text[start:]) if start >= 0 else ("", text)
    body = body.replace(MISTRAL_CALLS, " ").replace(MISTRAL_ARGS, "").strip()
    if body.startswith("["):
        calls = _forced(body)[1]
        return (content, calls) if calls is not None else (text, None)
    calls, decoder = [], json.JSONDecoder()
    while body:
        name = NAME.match(body)
        if name is None:
            return text, None
        try:
            arguments, end = decoder.raw_decode(body, name.end())
        except ValueError:
            return text, None
        calls.append({"name": name.group(), "arguments": arguments})
        body = body[end:].strip()
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
