"""OpenAI's Responses API (`POST /v1/responses`) over the chat pipeline: a request becomes a chat completion's body
(its `input` items as messages, `instructions` as the system message, function tools and `text.format` as chat's
tools and response_format), and the answer becomes output items: the reasoning, the message, the function calls.
https://platform.openai.com/docs/api-reference/responses

kiln keeps no state between requests: `previous_response_id` and `conversation` are refused (send the earlier
items in `input`), and every response says `"store": false`. Fields that only steer OpenAI's hosting (`store`,
`include`, `truncation`, `service_tier`, `user`, `prompt_cache_key`, `reasoning`) are taken and change nothing, so
that clients which always send them (the Agents SDK sends `include` with `store: false`) work."""

from __future__ import annotations

from kiln.serve import protocol
from kiln.serve.protocol import APIError, field

# Fields kiln refuses unless they ask for nothing: it stores no responses and runs no background jobs.
STATEFUL_FIELDS = {"previous_response_id": (None,), "conversation": (None,), "background": (None, False)}
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text", "text")


def chat_body(body: dict) -> dict:
    """The chat completion body a Responses request asks for (400 naming the field that cannot be served)."""
    for name, unused in STATEFUL_FIELDS.items():
        if body.get(name) not in unused:
            raise APIError(400, f"'{name}' needs responses kept on the server, which kiln serve does not keep; send "
                           "the earlier turns' items in 'input' instead", param=name)
    messages = [{"role": "system", "content": field(body, "instructions", str)}] if body.get("instructions") else []
    messages += input_messages(body.get("input"))
    chat = {"messages": messages, "stream": False}
    if "max_output_tokens" in body:
        chat["max_tokens"] = field(body, "max_output_tokens", int, None, lambda v: v >= 1, ">= 1")
    for name in ("temperature", "top_p", "parallel_tool_calls", "seed", "top_k", "min_p", "repetition_penalty",
                 "stop", "priority"):
        if body.get(name) is not None:  # (clients send null for "not given")
            chat[name] = body[name]
    if body.get("tools"):
        chat["tools"] = [chat_tool(t, i) for i, t in enumerate(field(body, "tools", list))]
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = chat_tool_choice(body["tool_choice"])
    text_format = (field(body, "text", dict, {}) or {}).get("format")
    if text_format is not None:
        chat["response_format"] = chat_response_format(text_format)
    return chat


def input_messages(items) -> list[dict]:
    """`input` (a string, or a list of message and function-call items) as chat messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise APIError(400, "'input' must be a string or a non-empty list of items", param="input")
    messages: list[dict] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = ROLES.get(item.get("role"))
            if role is None:
                raise APIError(400, f"input[{i}].role must be one of {list(ROLES)}, got {item.get('role')!r}",
                               param="input")
            messages.append({"role": role, "content": message_text(item.get("content"), i)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
            last = messages[-1] if messages else {}
            if last.get("role") == "assistant" and "tool_calls" in last:  # several calls of one turn
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": message_text(item.get("output"), i)})
        elif kind == "reasoning":  # an earlier turn's reasoning: chat templates drop it from history too
            continue
        else:
            raise APIError(400, f"input[{i}] has type {kind!r}; kiln serve takes message, function_call, "
                           "function_call_output and reasoning items", param="input")
    return messages


def message_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in TEXT_PARTS for p in content):
        return "".join(p.get("text", "") for p in content)
    raise APIError(400, f"input[{i}]'s content must be a string or a list of text parts ({', '.join(TEXT_PARTS)})",
                   param="input")


def chat_tool(tool, i: int) -> dict:
    """A Responses function tool ({"type": "function", "name", "description", "parameters"}) as chat's."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else tool
        raise APIError(400, f"tools[{i}] has type {kind!r}: kiln serve runs no built-in tools, only function tools",
                       param="tools")
    return {"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters") if k in tool}}


def chat_tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice  # "auto", "none", "required"; anything else is refused by the chat path, naming tool_choice


def chat_response_format(text_format) -> dict:
    """`text.format` ({"type": "text" | "json_object" | "json_schema", "schema": ...}) as chat's response_format."""
    if not isinstance(text_format, dict):
        raise APIError(400, "'text.format' must be an object with a 'type'", param="text")
    if text_format.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": text_format.get("name", "answer"),
                                                       "schema": text_format.get("schema")}}
    return {"type": text_format.get("type")}


def output_items(reasoning: str | None, text: str, calls: list[dict], new_id) -> list[dict]:
    """A finished answer's output items (its reasoning, its message where it has text or calls nothing, its function
    calls): the items a stream of the whole answer at once ends with, so both build them one way."""
    stream = EventStream(new_id)
    stream.events(reasoning, text, calls, finished=True)
    return stream.items


def reasoning_item(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def message_item(item_id: str, text: str | None, status: str) -> dict:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def response_object(response_id: str, body: dict, model: str, created: int, output: list[dict], status: str,
                    finish_reason: str | None = None, counts: dict | None = None) -> dict:
    """The Response: its output items and status ("in_progress", "completed", or "incomplete" where the answer ran
    out of max_output_tokens), the request's settings, and usage in the Responses API's names."""
    usage = None if counts is None else {
        "input_tokens": counts["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": counts["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": counts["total_tokens"]}
    incomplete = status == "completed" and finish_reason == "length"
    return {"id": response_id, "object": "response", "created_at": created, "model": model,
            "status": "incomplete" if incomplete else status,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None, "error": None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools", []),
            "text": body.get("text", {"format": {"type": "text"}}), "metadata": body.get("metadata") or {},
            "store": False, "usage": usage}


class EventStream:
    """The Responses API's stream events for one answer as it grows: each output item added, its text (reasoning
    or message) in deltas, done, then the next; a function call's item once its name is whole, then its arguments
    as the model writes them (the calls begun, kiln.serve.tools), done when the answer ends. `events(...)` gives the
    events an update adds, in order."""

    def __init__(self, new_id, new_call_id=None):
        self.new_id, self.new_call_id = new_id, new_call_id
        self.items: list[dict] = []  # output items opened, in order
        self.calls: list[dict] = []  # the function-call items among them
        self.open: dict | None = None  # the reasoning or message item receiving deltas
        self.sent = 0  # characters of the open item's text sent
        self.sequence = 0

    def event(self, kind: str, **fields) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def events(self, reasoning: str | None, text: str, calls: list[dict], finished: bool,
               begun: list[tuple[str, str]] = ()) -> list[dict]:
        """The events of an update: the answer's reasoning and text so far, the calls begun so far ((name,
        arguments text) each) and, once `finished`, the calls read from the whole answer."""
        events = []
        if reasoning and (self.open is None and not self.items):
            events += self._open(reasoning_item(self.new_id("rs"), ""))
        if self.open is not None and self.open["type"] == "reasoning":
            events += self._grow(reasoning or "")
            if text or begun or finished:
                events += self._close()
        if text and self.open is None and not self.calls and not any(i["type"] == "message" for i in self.items):
            events += self._open(message_item(self.new_id("msg"), "", "in_progress"))
        if self.open is not None and self.open["type"] == "message":
            events += self._grow(text)
        if begun or finished:
            events += self._close()
        for i, (name, arguments) in enumerate(begun):
            events += self._grow_call(i, name, arguments)
        if finished:
            if not calls and not self.calls and not any(i["type"] == "message" for i in self.items):
                events += self._open(message_item(self.new_id("msg"), "", "in_progress")) + self._close()
            for i, call in enumerate(calls):  # (the scanner may not have followed every call: those come whole)
                events += self._grow_call(i, call["function"]["name"], call["function"]["arguments"], call["id"])
            for item in self.calls:
                events += self._call_done(item)
        return events

    def _open(self, item: dict) -> list[dict]:
        self.items.append(item)
        self.open, self.sent = item, 0
        index = len(self.items) - 1
        events = [self.event("response.output_item.added", output_index=index, item=dict(item, content=[]))]
        if item["type"] == "message":
            events.append(self.event("response.content_part.added", item_id=item["id"], output_index=index,
                                     content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        return events

    def _grow(self, text: str) -> list[dict]:
        delta, self.sent = text[self.sent:], len(text)
        if not delta:
            return []
        item, index = self.open, len(self.items) - 1
        item["content"][0]["text"] += delta
        kind = "response.output_text.delta" if item["type"] == "message" else "response.reasoning_text.delta"
        return [self.event(kind, item_id=item["id"], output_index=index, content_index=0, delta=delta)]

    def _close(self) -> list[dict]:
        if self.open is None:
            return []
        item, index, self.open = self.open, len(self.items) - 1, None
        part = item["content"][0]
        if item["type"] == "message":
            item["status"] = "completed"
            events = [self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                 content_index=0, text=part["text"]),
                      self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                 content_index=0, part=part)]
        else:
            events = [self.event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                 content_index=0, text=part["text"])]
        return events + [self.event("response.output_item.done", output_index=index, item=item)]

    def _grow_call(self, i: int, name: str, arguments: str, call_id: str | None = None) -> list[dict]:
        """Call i's item added (when it is new) and its arguments' new text."""
        events = []
        if i == len(self.calls):
            call_id = call_id or (self.new_call_id() if self.new_call_id else self.new_id("call"))
            item = {"type": "function_call", "id": self.new_id("fc"), "call_id": call_id, "name": name,
                    "arguments": "", "status": "in_progress"}
            self.calls.append(item)
            self.items.append(item)
            events.append(self.event("response.output_item.added", output_index=len(self.items) - 1,
                                     item=dict(item)))
        item = self.calls[i]
        if arguments.startswith(item["arguments"]) and len(arguments) > len(item["arguments"]):
            delta, item["arguments"] = arguments[len(item["arguments"]):], arguments
            events.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                     output_index=self.items.index(item), delta=delta))
        return events

    def _call_done(self, item: dict) -> list[dict]:
        item["status"] = "completed"
        index = self.items.index(item)
        return [self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                           arguments=item["arguments"]),
                self.event("response.output_item.done", output_index=index, item=item)]


def new_item_id(prefix: str) -> str:
    return protocol.new_id(prefix).replace("-", "_")
