"""The OpenAI protocol: request bodies -> SamplingParams (400 on a bad field, naming it) and
RequestOutputs -> response and stream-chunk JSON. https://platform.openai.com/docs/api-reference"""

from __future__ import annotations

import dataclasses
import time
import uuid

from kiln.errors import ConfigError
from kiln.llmapi.sampling_params import RequestOutput, SamplingParams
from kiln.llmapi.tokenizer import decode
from kiln.runtime.json_schema import schema_grammar
from kiln.serve import tools as tool_calls
from kiln.serve.reasoning import Thinking

# apply_chat_template's own arguments, which chat_template_kwargs may not set
TEMPLATE_ARGUMENTS = ("conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                      "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                      "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")


class APIError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, error_type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def field(body: dict, name: str, types, default=None, check=None, allowed: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)) or \
            not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise APIError(400, f"'{name}' must be of type {names}, got {type(value).__name__}", param=name)
    if check is not None and not check(value):
        raise APIError(400, f"'{name}' must be {allowed}, got {value!r}", param=name)
    return value


RESPONSE_FORMATS = ("text", "json_object", "json_schema")
MAX_CHOICES = 16  # the most choices (n) or best_of candidates a request may ask for
PLAIN_TEXT = {"json_object": False}  # (_response_format's SamplingParams fields for "text": no JSON asked for)


def legacy_functions(body: dict) -> tuple[dict, bool]:
    """A chat body in OpenAI's legacy function-calling form (`functions`, `function_call`, `function` messages and
    assistant messages with a `function_call`) as the tools form, and whether it was one: one call an answer, as
    that API has. Answers go back in its form (legacy_choice)."""
    if isinstance(body.get("messages"), list):  # (a history may hold legacy calls whatever this request offers)
        body = body | {"messages": legacy_messages(body["messages"])}
    functions = body.get("functions")
    if functions is None or functions == []:
        return body, False
    if body.get("tools"):
        raise APIError(400, "'functions' and 'tools' both offer functions; send one ('functions' is the legacy "
                       "form of 'tools')", param="functions")
    if not isinstance(functions, list):
        raise APIError(400, "'functions' must be a list of {name, description?, parameters?}", param="functions")
    choice = body.get("function_call")
    if isinstance(choice, dict):
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    chat = {k: v for k, v in body.items() if k not in ("functions", "function_call")}
    chat |= {"tools": [{"type": "function", "function": f} for f in functions], "parallel_tool_calls": False}
    if choice is not None:
        chat["tool_choice"] = choice
    return chat, True


def legacy_messages(messages: list) -> list:
    """Legacy function calls and results as tool calls and tool messages, each result paired with the call before
    it by an id made up here (the legacy form has none)."""
    out, call_id = [], None
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("function_call"), dict):
            call_id = f"call_{i}"
            call = {"id": call_id, "type": "function", "function": m["function_call"]}
            m = {k: v for k, v in m.items() if k != "function_call"} | {"tool_calls": [call]}
        elif isinstance(m, dict) and m.get("role") == "function":
            m = {"role": "tool", "tool_call_id": call_id or f"call_{i}", "name": m.get("name"),
                 "content": m.get("content")}
        out.append(m)
    return out


def legacy_choice(choice: dict) -> dict:
    """A chat choice (a message, or a stream chunk's delta) in the legacy form: its one tool call as
    `function_call` (in a stream: the name and arguments so far, then the arguments' pieces), and finish_reason
    "function_call" for "tool_calls"."""
    key = "message" if "message" in choice else "delta"
    part = dict(choice[key])
    calls = part.pop("tool_calls", None)
    reason = "function_call" if choice.get("finish_reason") == "tool_calls" else choice.get("finish_reason")
    return choice | {key: part | ({"function_call": calls[0]["function"]} if calls else {}), "finish_reason": reason}


def tools(body: dict) -> tool_calls.Tools | None:
    """A chat request's tools (kiln.serve.tools), or None."""
    try:
        return tool_calls.tools_request(body)
    except tool_calls.ToolsError as e:
        raise APIError(400, str(e), param=e.param) from None


def chat_template_kwargs(body: dict) -> dict:
    """vLLM's `chat_template_kwargs`: extra variables for the chat template (Qwen3's enable_thinking, ...)."""
    kwargs = field(body, "chat_template_kwargs", dict, {})
    taken = sorted(k for k in kwargs if k in TEMPLATE_ARGUMENTS)
    if taken:
        raise APIError(400, f"'chat_template_kwargs' may not set {taken}: the request's own fields set those",
                       param="chat_template_kwargs")
    return kwargs


@dataclasses.dataclass(frozen=True)
class AnswerReader:
    """How a chat answer's text becomes the message: a reasoning model's thinking apart (kiln.serve.reasoning),
    then tool calls read out of the rest (kiln.serve.tools); either may be None."""

    thinking: Thinking | None
    tools: tool_calls.ToolReader | None

    def read(self, text: str, finished: bool = True) -> tuple[str | None, str, list[dict]]:
        """(reasoning or None, content, tool calls); while the answer is still coming, only what is known."""
        reasoning, content = self.thinking.split(text, finished) if self.thinking else (None, text)
        if self.tools is None:
            return reasoning, content, []
        if not finished:
            return reasoning, content[:self.tools.sendable(content)], []
        return reasoning, *self.tools.read(content)

    def calls_begun(self, text: str, finished: bool) -> list[tuple[str, str]]:
        """The tool calls the answer has begun so far, (name, arguments text) each (ToolReader.begun): what a stream
        sends as it comes."""
        if self.tools is None:
            return []
        return self.tools.begun(self.thinking.split(text, finished)[1] if self.thinking else text)


def sampling_params(body: dict, default_max_tokens: int, chat: bool, tools: tool_calls.Tools | None = None,
                    json_after: str | None = None) -> SamplingParams:
    """Map an OpenAI request body onto SamplingParams (kiln and vLLM extensions: top_k, repetition_penalty,
    ignore_eos, stop_token_ids, min_tokens, priority).
    Forced tool calls (`tools`) hold the output to their schema; JSON of any kind comes after `json_after` (a
    reasoning model's "</think>") where given."""
    echo = echoes(body, chat)
    output_format = _response_format(body)
    if tools is not None and tools.forced:
        if output_format != PLAIN_TEXT:
            raise APIError(400, "'response_format' and a forced 'tool_choice' both shape the answer; send one",
                           param="response_format")
        output_format = {"json_schema": tools.call_schema()}
    stop = field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a string or a list of non-empty strings", param="stop")
    if chat:
        want = field(body, "logprobs", bool, False)
        top = field(body, "top_logprobs", int, 0, lambda v: 0 <= v <= 20, "in [0, 20]")
        logprobs = top if want else None
    else:
        logprobs = field(body, "logprobs", int, None, lambda v: 0 <= v <= 20, "in [0, 20]")
    n = field(body, "n", int, 1, lambda v: 1 <= v <= MAX_CHOICES, f"in [1, {MAX_CHOICES}]")
    candidates = best_of(body, chat, n)
    max_tokens = field(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                        int, default_max_tokens, lambda v: v >= 1 or echo and v == 0,
                        ">= 1 (0 only with echo: the prompt scored, nothing generated)")
    try:
        return SamplingParams(
            max_tokens=max(max_tokens, 1),  # (scoring only: one token made, and dropped, see scores_only)
            temperature=field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "in [0, 2]"),
            top_p=field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "in (0, 1]"),
            top_k=max(0, field(body, "top_k", int, 0)),
            min_p=field(body, "min_p", (int, float), 0.0, lambda v: 0 <= v <= 1, "in [0, 1]"),
            seed=field(body, "seed", int),
            stop=stop,
            stop_token_ids=field(body, "stop_token_ids", list, []),
            repetition_penalty=field(body, "repetition_penalty", (int, float), 1.0, lambda v: v > 0, "> 0"),
            presence_penalty=field(body, "presence_penalty", (int, float), 0.0, lambda v: -2 <= v <= 2, "in [-2, 2]"),
            frequency_penalty=field(body, "frequency_penalty", (int, float), 0.0, lambda v: -2 <= v <= 2,
                                     "in [-2, 2]"),
            ignore_eos=field(body, "ignore_eos", bool, False),
            n=candidates,
            # (best_of ranks its candidates by their tokens' logprobs: asked for whether the client wants them or not)
            logprobs=0 if candidates > n and logprobs is None else logprobs,
            prompt_logprobs=logprobs if echo else None,  # (echo's prompt tokens come with theirs)
            logit_bias=_logit_bias(body),
            min_tokens=field(body, "min_tokens", int, 0, lambda v: v >= 0, ">= 0"),
            priority=field(body, "priority", int, 0),
            **output_format,
            json_after=json_after if output_format != PLAIN_TEXT else None,
        )
    except ConfigError as e:  # SamplingParams names the field
        raise APIError(400, str(e)) from None


def _response_format(body: dict) -> dict:
    """OpenAI's response_format as SamplingParams fields: {"type": "text"}, {"type": "json_object"} (JSON mode), or
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}} (structured output)."""
    fmt = field(body, "response_format", dict, {"type": "text"})
    kind = fmt.get("type")
    if kind not in RESPONSE_FORMATS:
        raise APIError(400, f"'response_format.type' must be one of {list(RESPONSE_FORMATS)}, got {kind!r}",
                       param="response_format")
    if kind != "json_schema":
        return {"json_object": kind == "json_object"}
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise APIError(400, "'response_format.json_schema.schema' must be a JSON Schema object",
                       param="response_format")
    try:
        schema_grammar(schema)  # (a schema kiln cannot hold to: its path named)
    except ConfigError as e:
        raise APIError(400, str(e), param="response_format") from None
    return {"json_schema": schema}


def _logit_bias(body: dict) -> dict[int, float]:
    """OpenAI's logit_bias: token ids as JSON object keys (strings) -> a bias in [-100, 100]."""
    bias = field(body, "logit_bias", dict, {})
    try:
        return {int(token): float(value) for token, value in bias.items()}
    except (TypeError, ValueError):
        raise APIError(400, "'logit_bias' must map token ids (integers, as strings) to numbers, got "
                       f"{bias!r}", param="logit_bias") from None


def best_of(body: dict, chat: bool, n: int) -> int:
    """The legacy completions' `best_of`: how many candidates each prompt samples, of which the `n` with the highest
    log probability per token are returned (OpenAI's rule; vLLM ranks by the sum), n when absent. Like OpenAI's, an
    answer that ranks candidates is not streamed."""
    candidates = field(body, "best_of", int, n, lambda v: n <= v <= MAX_CHOICES, f"in [n, {MAX_CHOICES}] (n is {n})")
    if candidates > n and chat:
        raise APIError(400, "'best_of' is a /v1/completions field; chat completions do not take it (send n)",
                       param="best_of")
    if candidates > n and body.get("stream"):
        raise APIError(400, "'best_of' greater than 'n' ranks whole answers, so it is not streamed: send 'stream': "
                       "false", param="best_of")
    return candidates


def best_choices(output: RequestOutput, n: int, candidates: int, with_logprobs: bool) -> RequestOutput:
    """best_of's answer: of each prompt's `candidates` outputs (choices i * candidates + j), the n with the highest
    mean logprob per token (ties in sampling order), as choices i * n + rank; their logprobs dropped unless the
    client asked for them."""
    def score(o) -> float:
        return sum(lp for lp, _ in o.logprobs) / len(o.logprobs) if o.logprobs else float("-inf")

    kept = []
    for i in range(len(output.outputs) // candidates):
        group = [o for o in output.outputs if o.index // candidates == i]
        kept += [dataclasses.replace(o, index=i * n + rank, logprobs=o.logprobs if with_logprobs else None)
                 for rank, o in enumerate(sorted(group, key=score, reverse=True)[:n])]
    return dataclasses.replace(output, outputs=kept)


def suffix(body: dict) -> str | None:
    """The legacy completions' `suffix`, the text after the hole a code model fills in (kiln.llmapi.tokenizer's
    FIM_FORMATS); None where absent or empty."""
    value = field(body, "suffix", str, "")
    if value and body.get("echo"):
        raise APIError(400, "'echo' returns the prompt before the answer, which a 'suffix' puts elsewhere: send one",
                       param="suffix")
    return value or None


def echoes(body: dict, chat: bool) -> bool:
    """The legacy completions' `echo`: the answer's text (and logprobs) begin with the prompt's."""
    echo = field(body, "echo", bool, False)
    if echo and chat:
        raise APIError(400, "'echo' is a /v1/completions field; chat completions do not take it", param="echo")
    if echo and body.get("stream") and (body.get("logprobs") is not None or body.get("max_tokens") == 0):
        raise APIError(400, "'echo' with 'logprobs' or 'max_tokens': 0 is answered whole: send 'stream': false",
                       param="echo")
    return echo


def scores_only(body: dict) -> bool:
    """`echo` with `max_tokens: 0` (the legacy API's way to score a prompt): the answer is the prompt alone."""
    return bool(body.get("echo")) and body.get("max_tokens") == 0


def include_usage(body: dict) -> bool:
    options = field(body, "stream_options", dict, {})
    if options and not body.get("stream"):
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
    return bool(options.get("include_usage", False))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(output: RequestOutput) -> dict:
    completion = sum(len(o.token_ids) for o in output.outputs)
    prompt = len(output.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token]) if tokenizer is not None else str(token)


def completion_logprobs(tokenizer, entries, start: int = 0) -> dict:
    """The legacy completions logprobs object for entries[start:] (an echoed prompt's first token: null)."""
    entries = entries[start:]
    return {
        "tokens": [_token_text(tokenizer, t) for t, _ in entries],
        "token_logprobs": [None if e is None else e[0] for _, e in entries],
        "top_logprobs": [None if e is None else {_token_text(tokenizer, i): v for i, v in e[1]} for _, e in entries],
        "text_offset": [],
    }


def chat_logprobs(tokenizer, entries, start: int = 0) -> dict:
    def item(token, lp):
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in alts]}
                        for t, (lp, alts) in entries[start:]]}


def logprob_entries(completion) -> list:
    """(token, (logprob, alternatives)) per generated token."""
    return list(zip(completion.token_ids, completion.logprobs or []))


def completion_response(output: RequestOutput, model: str, request_id: str, tokenizer,
                        echo: list[list[int]] | None = None, n: int = 1, generated: bool = True) -> dict:
    """The completion; `echo`: the request's prompts (choice i holds prompt i // n's), echoed before each answer;
    not `generated` (scores_only): the prompts alone, their one generated token dropped."""
    prompt_logprobs = _per_prompt(output.prompt_logprobs, echo) if echo else None
    choices = []
    for o in output.outputs:
        text, entries = (o.text, logprob_entries(o)) if generated else ("", [])
        if echo:
            prompt = echo[o.index // n]
            text = decode(tokenizer, prompt) + text
            entries = list(zip(prompt, prompt_logprobs[o.index // n])) + entries if prompt_logprobs else entries
        choices.append({"index": o.index, "text": text, "finish_reason": o.finish_reason if generated else "length",
                        "logprobs": completion_logprobs(tokenizer, entries) if o.logprobs is not None else None})
    counts = usage(output) if generated else usage(dataclasses.replace(output, outputs=[]))
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": counts}


def _per_prompt(logprobs: list | None, prompts: list[list[int]]) -> list[list] | None:
    """A batch's prompt logprobs, one run after another, cut into each prompt's."""
    if logprobs is None:
        return None
    runs, start = [], 0
    for prompt in prompts:
        runs.append(logprobs[start:start + len(prompt)])
        start += len(prompt)
    return runs


def read_answer(reader: AnswerReader | None, text: str, finished: bool = True) -> tuple[str | None, str, list[dict]]:
    """AnswerReader.read, or the whole text as content where there is no reader (answer_reader's None)."""
    return reader.read(text, finished) if reader is not None else (None, text, [])


def chat_delta(first: bool, reasoning: str, content: str, calls: list[dict]) -> dict:
    """A chat stream chunk's delta: the role in a choice's first chunk (with its content, "" if none yet), then
    only the parts with something new; the tool calls' new parts, with their indices (call_deltas)."""
    return ({"role": "assistant"} if first else {}) | ({"reasoning_content": reasoning} if reasoning else {}) | (
        {"content": content} if content or first else {}) | ({"tool_calls": calls} if calls else {})


def call_deltas(begun: list[tuple[str, str]], sent: list[int], new_call_id) -> list[dict]:
    """A stream's tool-call deltas for the calls begun so far ((name, arguments text) each): a call's index, id,
    type, name and arguments so far when it first shows, then each new piece of its arguments. `sent` holds the
    arguments' length sent of each call, and grows; `new_call_id()` gives a new call's id."""
    deltas = []
    for i, (name, arguments) in enumerate(begun):
        if i == len(sent):
            deltas.append({"index": i, "id": new_call_id(), "type": "function",
                           "function": {"name": name, "arguments": arguments}})
            sent.append(len(arguments))
        elif len(arguments) > sent[i]:
            deltas.append({"index": i, "function": {"arguments": arguments[sent[i]:]}})
            sent[i] = len(arguments)
    return deltas


def chat_response(output: RequestOutput, model: str, request_id: str, tokenizer,
                  reader: AnswerReader | None = None) -> dict:
    """The chat completion; `reader` splits each choice's text into reasoning, content and tool calls."""
    choices = []
    for o in output.outputs:
        reasoning, content, calls = read_answer(reader, o.text)
        message = {"role": "assistant", "content": content if content or not calls else None} | (
            {"reasoning_content": reasoning} if reasoning is not None else {})
        choices.append({"index": o.index, "message": message | ({"tool_calls": calls} if calls else {}),
                        "finish_reason": "tool_calls" if calls else o.finish_reason,
                        "logprobs": chat_logprobs(tokenizer, logprob_entries(o)) if o.logprobs is not None else None})
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(output)}
