"""`kiln serve`: OpenAI-compatible HTTP on aiohttp.

aiohttp because it is one well-kept package that does async HTTP/1.1 serving and server-sent
events natively, cancels a handler when its client disconnects (so the request is aborted and its KV
cache freed at once), and needs no ASGI stack or validation framework on top.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import signal
import time

from aiohttp import web

from kiln.errors import ConfigError, KilnError
from kiln.llmapi import tokenizer as tok
from kiln.llmapi.sampling_params import RequestOutput
from kiln.serve import protocol
from kiln.serve import reasoning, responses
from kiln.serve import tools as tool_calls
from kiln.serve.async_llm import AsyncLLM, QueueFullError
from kiln.serve.protocol import APIError

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 4 * 1024 * 1024
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}  # OpenAI's (a chat template may know fewer)
# On SIGTERM aiohttp lets running requests finish for this long, waits as long again for those it could not
# stop, then cancels them: at most ~10 s. (Its default of 60 s, twice, outlasts the 30 s a process manager
# usually waits before SIGKILL, and a client that stalls mid-stream would hold all of it.)
SHUTDOWN_GRACE_S = 5.0
SETTINGS = web.AppKey("settings", dict)  # model_name, api_key, request_timeout, engine (None while loading)


def get_engine(request: web.Request) -> AsyncLLM:
    engine = request.app[SETTINGS]["engine"]
    if engine is None:
        raise APIError(503, "the model is still loading; retry when /health says ok", error_type="server_error",
                       headers={"Retry-After": "5"})
    return engine


# ---- errors, auth, body size -----------------------------------------------------------------------

def error_response(e: APIError) -> web.Response:
    return web.json_response(e.body(), status=e.status, headers=e.headers)


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    settings = request.app[SETTINGS]
    try:
        if settings["api_key"] and request.path.startswith("/v1/"):
            if request.headers.get("Authorization", "") != f"Bearer {settings['api_key']}":
                raise APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer KEY'.",
                               code="invalid_api_key", error_type="authentication_error")
        return await handler(request)
    except APIError as e:
        return error_response(e)
    except web.HTTPRequestEntityTooLarge:
        return error_response(APIError(413, f"request body over {MAX_BODY_BYTES} bytes", code="body_too_large"))
    except web.HTTPException as e:
        if e.status >= 400:
            return error_response(APIError(e.status, e.reason, error_type="invalid_request_error"))
        raise


async def read_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    if body.get("model") is not None:
        check_model(request, body["model"])
    return body


def check_model(request: web.Request, model: str) -> None:
    served = request.app[SETTINGS]["model_name"]
    if model != served:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{served}`.", param="model",
                       code="model_not_found", error_type="not_found_error")


# ---- prompts ------------------------------------------------------------------------------------

def completion_prompts(engine: AsyncLLM, body: dict) -> list[list[int]]:
    """'prompt' as token ids: one prompt (a string or token ids), or a batch (a list of either); with a 'suffix',
    each (text) prompt asks a code model for what goes between it and the suffix."""
    prompt = body.get("prompt")
    is_batch = isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt)
    suffix = protocol.suffix(body)
    return [completion_prompt(engine, p, suffix) for p in (prompt if is_batch else [prompt])]


def completion_prompt(engine: AsyncLLM, prompt, suffix: str | None = None) -> list[int]:
    if suffix is not None:
        if not isinstance(prompt, str):
            raise APIError(400, "'suffix' fills in the middle of a text prompt: send 'prompt' as text", param="prompt")
        try:
            return tok.encode_fill_in_middle(engine.llm.tokenizer, prompt, suffix)
        except KilnError as e:
            raise APIError(400, str(e), param="suffix") from None
    if isinstance(prompt, str):
        return _encode(engine, lambda t: tok.encode_prompt(t, prompt))
    if prompt and _is_token_ids(prompt):
        return in_vocabulary(engine, prompt, "prompt")
    raise APIError(400, "'prompt' must be a string, a list of token ids, or a list of either (a batch)",
                   param="prompt")


def _is_token_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def in_vocabulary(engine: AsyncLLM, ids: list[int], param: str) -> list[int]:
    """ids, each checked to be one of the model's tokens (an id past the embedding would fail the engine)."""
    vocab_size = engine.llm.engine.config.vocab_size
    if not all(0 <= t < vocab_size for t in ids):
        raise APIError(400, f"'{param}' token ids must be in [0, {vocab_size}) for this model", param=param)
    return ids


def chat_prompt(engine: AsyncLLM, body: dict, tools: tool_calls.Tools | None = None) -> list[int]:
    """The chat's prompt ids: the messages (and tools) through the model's chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    unknown = sorted({m["role"] for m in messages} - CHAT_ROLES)
    if unknown:
        raise APIError(400, f"unknown message roles {unknown}; the roles are {sorted(CHAT_ROLES)}", param="messages")
    messages = [{**m, "content": text_content(m.get("content") or "")} for m in messages]  # (None with tool_calls)
    messages, template_tools = tool_calls.prompt_messages(messages, tools, _chat_template(engine))
    kwargs = protocol.chat_template_kwargs(body)
    return _encode(engine, lambda t: tok.encode_chat(t, messages, template_tools, kwargs))


def answer_reader(engine: AsyncLLM, tools: tool_calls.Tools | None, prompt_ids: list[int]):
    """The AnswerReader of a chat whose prompt is prompt_ids, or None where the answer is all content."""
    template = _chat_template(engine)
    thinking = None
    if reasoning.reasons(template):  # (whether the prompt's last tokens opened the thinking block, or closed it)
        tail = engine.llm.tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False)
        thinking = reasoning.Thinking.of(tail)
    tool_reader = tool_calls.ToolReader.of(tools, template) if tools is not None else None
    return protocol.AnswerReader(thinking, tool_reader) if thinking or tool_reader else None


def _chat_template(engine: AsyncLLM) -> str | None:
    return getattr(engine.llm.tokenizer, "chat_template", None)


def text_content(content) -> str:
    """A message's content as the chat template takes it: a string, or OpenAI's list of text parts joined by
    newlines (as vLLM joins them). kiln serves text models: any other part is refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content} - {"text"}
        if kinds:
            raise APIError(400, f"message content parts of type {sorted(map(str, kinds))} are not supported: kiln "
                           "serves text models; send text parts ({'type': 'text', 'text': ...}) or a string",
                           param="messages")
        if all(isinstance(p.get("text"), str) for p in content):
            return "\n".join(p["text"] for p in content)
    raise APIError(400, "a message's 'content' must be a string or a list of {'type': 'text', 'text': str} parts",
                   param="messages")


def _encode(engine: AsyncLLM, encode) -> list[int]:
    try:
        return encode(engine.llm.tokenizer)
    except KilnError as e:
        raise APIError(400, str(e)) from None


# ---- generation ----------------------------------------------------------------------------------

def queue_full(e: QueueFullError) -> APIError:
    return APIError(429, str(e), code="queue_full", error_type="rate_limit_error", headers={"Retry-After": "1"})


def check(engine: AsyncLLM, prompt_ids: list[int], params) -> None:
    """Whether the engine takes this prompt now, as an API error if not."""
    try:
        engine.check(prompt_ids, params)
    except QueueFullError as e:
        raise queue_full(e) from None
    except ConfigError as e:
        raise APIError(400, str(e), code="context_length_exceeded") from None
    except KilnError as e:
        raise APIError(503, str(e), error_type="server_error") from None


async def generate_all(engine: AsyncLLM, prompts: list[list[int]], params, timeout_s: float | None):
    """generate() over a batch of prompts: after each change, one RequestOutput holding every prompt's latest
    choices, prompt i's choice j as index i * n + j (OpenAI's order), and all the prompts' ids (for the usage).
    Every prompt is checked before any starts; when one fails, or the client goes, the others are aborted."""
    if len(prompts) == 1:
        async for output in generate(engine, prompts[0], params, timeout_s):
            yield output
        return
    for prompt_ids in prompts:
        check(engine, prompt_ids, params)
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:  # puts (i, output) per change, then (i, None); or (i, the error)
        try:
            async for output in generate(engine, prompts[i], params, timeout_s):
                await queue.put((i, output))
            await queue.put((i, None))
        except Exception as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
    latest: dict[int, RequestOutput] = {}
    try:
        running = len(prompts)
        while running:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                running -= 1
                continue
            latest[i] = item
            yield joined(latest, params.n, len(prompts))
    finally:  # (cancelling a task closes its generate(), which aborts its request)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def joined(latest: dict[int, RequestOutput], n: int, prompts: int) -> RequestOutput:
    """The latest outputs of a batch's prompts as one RequestOutput (see generate_all); finished once all
    `prompts` have reported and finished."""
    first, order = latest[min(latest)], sorted(latest)
    logprobs = [lp for i in order for lp in latest[i].prompt_logprobs or []]
    return RequestOutput(first.request_id, None, [t for i in order for t in latest[i].prompt_token_ids],
                         [dataclasses.replace(o, index=i * n + o.index) for i in order for o in latest[i].outputs],
                         len(latest) == prompts and all(out.finished for out in latest.values()),
                         first.arrival_time, logprobs if first.prompt_logprobs is not None else None)


async def generate(engine: AsyncLLM, prompt_ids: list[int], params, timeout_s: float | None):
    """Async generator of RequestOutputs with the server's limits turned into API errors."""
    check(engine, prompt_ids, params)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    stream = engine.generate(prompt_ids, params)
    try:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            try:
                output = await asyncio.wait_for(stream.__anext__(), remaining)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise APIError(408, f"request timed out after {timeout_s:.0f}s", code="timeout") from None
            except QueueFullError as e:  # others queued between the check above and generate's own
                raise queue_full(e) from None
            except ConfigError as e:  # the engine refused this request alone (say, an empty prompt)
                raise APIError(400, str(e)) from None
            except Exception as e:  # the engine failed: still an error JSON, not aiohttp's plain-text 500
                raise APIError(500, str(e), error_type="server_error") from None
            yield output
    finally:
        await stream.aclose()  # aborts the request if it did not finish


def default_max_tokens(engine: AsyncLLM, prompt_ids: list[int], chat: bool) -> int:
    """OpenAI's defaults: 16 for completions; for chat, whatever room the context leaves."""
    room = engine.llm.build_config.max_seq_len - len(prompt_ids)
    return max(1, room) if chat else 16


async def handle_completion(request: web.Request, chat: bool) -> web.StreamResponse:
    engine = get_engine(request)
    body = await read_body(request)
    body, legacy = protocol.legacy_functions(body) if chat else (body, False)
    tools = protocol.tools(body) if chat else None
    prompts = [chat_prompt(engine, body, tools)] if chat else completion_prompts(engine, body)
    reader = answer_reader(engine, tools, prompts[0]) if chat else None
    thinks = reader is not None and reader.thinking is not None  # (JSON asked for comes after the thinking)
    params = protocol.sampling_params(body, default_max_tokens(engine, prompts[0], chat), chat, tools,
                                      json_after=reasoning.THINK_CLOSE if thinks else None)
    stream = bool(protocol.field(body, "stream", bool, False))
    with_usage = protocol.include_usage(body)
    model = request.app[SETTINGS]["model_name"]
    request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
    outputs = generate_all(engine, prompts, params, request.app[SETTINGS]["request_timeout"])
    echo = prompts if protocol.echoes(body, chat) else None
    if stream:
        echoed = [tok.decode(engine.llm.tokenizer, p) for p in echo] if echo else None
        return await stream_response(request, outputs, chat, model, request_id, with_usage, reader,
                                     echoed and (lambda index: echoed[index // params.n]), legacy)
    final = None
    async for final in outputs:
        pass
    if chat:
        response = protocol.chat_response(final, model, request_id, engine.llm.tokenizer, reader)
        if legacy:
            response["choices"] = [protocol.legacy_choice(c) for c in response["choices"]]
        return web.json_response(response)
    n = protocol.field(body, "n", int, 1)
    answer = protocol.best_choices(final, n, params.n, body.get("logprobs") is not None) if params.n > n else final
    response = protocol.completion_response(answer, model, request_id, engine.llm.tokenizer, echo, n,
                                            generated=not protocol.scores_only(body))
    if answer is not final and not protocol.scores_only(body):  # every candidate's tokens count (OpenAI bills them)
        response["usage"] = protocol.usage(final)
    return web.json_response(response)


async def stream_response(request, outputs, chat: bool, model: str, request_id: str, with_usage: bool,
                          reader: protocol.AnswerReader | None = None, echoed=None, legacy: bool = False):
    """Server-sent events: a chunk per choice whenever it has new tokens, then usage (if asked), then [DONE].

    A chunk goes out for new tokens even when they add no text (a model served without a tokenizer, a character
    still incomplete, text held back as a possible stop string or tool call): clients see progress, and `kiln bench
    --serve` times every token's arrival, not only the arrivals that happened to carry text. Tool calls go out
    as the model writes them (protocol.call_deltas): a call's name once it is whole, then its arguments' JSON text
    piece by piece; the message's text stops where the first call begins. `echoed(index)`: the prompt text a
    completion choice's first chunk begins with (`echo`). `legacy`: a call goes out as the legacy
    `function_call` (protocol.legacy_functions)."""
    tokenizer = get_engine(request).llm.tokenizer
    first = await anext_or_none(outputs)  # errors before the first chunk still answer with a status
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    sent_text: dict[int, int] = {}
    sent_reasoning: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    sent_logprobs: dict[int, int] = {}
    sent_calls: dict[int, list[int]] = {}  # each choice's calls: the arguments' length sent of each
    ended: set[int] = set()  # choices whose finish_reason went out: later outputs still carry them

    async def send(payload: dict) -> None:
        await response.write(f"data: {json.dumps(payload)}\n\n".encode())

    async def send_choices(output) -> None:
        for o in output.outputs:
            start_text, start_lp = sent_text.get(o.index), sent_logprobs.get(o.index, 0)
            finished = o.finish_reason is not None
            thought, text, calls = protocol.read_answer(reader, o.text, finished)
            sent = sent_calls.setdefault(o.index, [])
            calls_went_out = bool(sent)  # (in an earlier chunk: the message's text stopped where they began)
            deltas = (protocol.call_deltas(reader.calls_begun(o.text, finished), sent, reader.tools.new_id)
                      if reader is not None and reader.tools is not None else [])
            delta_text = "" if calls_went_out else text[start_text or 0:]
            delta_thought = (thought or "")[sent_reasoning.get(o.index, 0):]
            no_new_tokens = len(o.token_ids) == sent_tokens.get(o.index)
            if o.index in ended or not delta_text and not deltas and no_new_tokens and not finished:
                continue
            if calls and not sent:  # calls the stream could not follow as they came: whole, at the end
                deltas = [{"index": i, **call} for i, call in enumerate(calls)]
            choice = {"index": o.index, "finish_reason": "tool_calls" if calls else o.finish_reason}
            entries = protocol.logprob_entries(o)
            if chat:
                choice["delta"] = protocol.chat_delta(start_text is None, delta_thought, delta_text, deltas)
                sent_reasoning[o.index] = len(thought or "")
                choice["logprobs"] = (protocol.chat_logprobs(tokenizer, entries, start_lp)
                                      if o.logprobs is not None else None)
            else:
                choice["text"] = (echoed(o.index) if echoed and start_text is None else "") + delta_text
                choice["logprobs"] = (protocol.completion_logprobs(tokenizer, entries, start_lp)
                                      if o.logprobs is not None else None)
            if not calls_went_out:
                sent_text[o.index] = len(text)
            sent_logprobs[o.index] = len(entries)
            sent_tokens[o.index] = len(o.token_ids)
            if finished:
                ended.add(o.index)
            if legacy:
                choice = protocol.legacy_choice(choice)
            await send({"id": request_id, "object": kind, "created": created, "model": model, "choices": [choice]})

    last = first
    try:
        if first is not None:
            await send_choices(first)
        async for last in outputs:
            await send_choices(last)
    except APIError as e:  # after the headers went out, an error travels in the stream
        await send(e.body())
    if with_usage and last is not None:
        await send({"id": request_id, "object": kind, "created": created, "model": model, "choices": [],
                    "usage": protocol.usage(last)})
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def create_response(request):
    """OpenAI's Responses API over the chat pipeline (kiln.serve.responses): one answer, as output items, or as the
    API's typed stream events."""
    engine = get_engine(request)
    body = await read_body(request)
    chat = responses.chat_body(body)
    tools = protocol.tools(chat)
    prompt = chat_prompt(engine, chat, tools)
    reader = answer_reader(engine, tools, prompt)
    thinks = reader is not None and reader.thinking is not None
    params = protocol.sampling_params(chat, default_max_tokens(engine, prompt, True), True, tools,
                                      json_after=reasoning.THINK_CLOSE if thinks else None)
    outputs = generate(engine, prompt, params, request.app[SETTINGS]["request_timeout"])
    answer = functools.partial(protocol.read_answer, reader)
    begun = reader.calls_begun if reader is not None else (lambda text, finished: [])  # ([] without tools too)
    meta = (responses.new_item_id("resp"), body, request.app[SETTINGS]["model_name"], int(time.time()))
    if protocol.field(body, "stream", bool, False):
        new_call_id = reader.tools.new_id if reader is not None and reader.tools is not None else None
        return await stream_response_events(request, outputs, answer, begun, new_call_id, meta)
    final = None
    async for final in outputs:
        pass
    o = final.outputs[0]
    items = responses.output_items(*answer(o.text), responses.new_item_id)
    return web.json_response(responses.response_object(*meta, items, "completed", o.finish_reason,
                                                       protocol.usage(final)))


async def stream_response_events(request, outputs, answer, begun, new_call_id, meta) -> web.StreamResponse:
    """The Responses API's server-sent events: response.created, each output item's events as the answer grows
    (responses.EventStream), then response.completed with the whole Response (or an error event)."""
    first = await anext_or_none(outputs)  # errors before the first event still answer with a status
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    stream = responses.EventStream(responses.new_item_id, new_call_id)

    async def send(event: dict) -> None:
        await response.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())

    await send(stream.event("response.created", response=responses.response_object(*meta, [], "in_progress")))
    last = first
    try:
        if first is not None:
            await send_answer_events(send, stream, answer, begun, first)
        async for last in outputs:
            await send_answer_events(send, stream, answer, begun, last)
        if last is not None:
            await send(stream.event("response.completed", response=responses.response_object(
                *meta, stream.items, "completed", last.outputs[0].finish_reason, protocol.usage(last))))
    except APIError as e:  # after the headers went out, an error travels in the stream
        await send(stream.event("error", code=e.code, message=e.message, param=e.param))
    await response.write_eof()
    return response


async def send_answer_events(send, stream, answer, begun, output) -> None:
    o = output.outputs[0]
    finished = o.finish_reason is not None
    reasoning_text, text, calls = answer(o.text, finished)
    for event in stream.events(reasoning_text, text, calls, finished, begun(o.text, finished)):
        await send(event)


async def anext_or_none(agen):
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return None


# ---- other endpoints --------------------------------------------------------------------------------

async def completions(request):
    return await handle_completion(request, chat=False)


async def chat_completions(request):
    return await handle_completion(request, chat=True)


async def tokenize(request):
    """vLLM's /tokenize: the token ids a completion's `prompt`, or a chat's `messages` (and `tools`), would be
    prompted with, their count, and the context length they share with the answer."""
    engine = get_engine(request)
    body = await read_body(request)
    ids = chat_prompt(engine, body, protocol.tools(body)) if "messages" in body else \
        completion_prompt(engine, body.get("prompt"), protocol.suffix(body))
    return web.json_response({"count": len(ids), "max_model_len": engine.llm.build_config.max_seq_len,
                              "tokens": ids})


async def detokenize(request):
    """vLLM's /detokenize: token ids -> their text, as an answer's text is decoded."""
    engine = get_engine(request)
    body = await read_body(request)
    tokens = body.get("tokens")
    if not _is_token_ids(tokens):
        raise APIError(400, "'tokens' must be a list of token ids", param="tokens")
    in_vocabulary(engine, tokens, "tokens")
    if engine.llm.tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so its token ids have no text", param="tokens")
    return web.json_response({"prompt": tok.decode(engine.llm.tokenizer, tokens)})


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "kiln"}


async def models(request):
    return web.json_response({"object": "list", "data": [model_card(request.app[SETTINGS]["model_name"])]})


async def retrieve_model(request):
    check_model(request, request.match_info["model"])
    return web.json_response(model_card(request.match_info["model"]))


async def health(request):
    engine = request.app[SETTINGS]["engine"]
    if engine is None or engine.error is not None:
        return web.json_response({"status": "unavailable"}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request):
    engine = get_engine(request)
    return web.Response(text=engine.metrics.render(engine.gauges(), engine.counters()), content_type="text/plain")


def make_app(model_name: str, api_key: str | None = None, request_timeout: float | None = None,
             engine: AsyncLLM | None = None) -> web.Application:
    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = {"model_name": model_name, "api_key": api_key, "request_timeout": request_timeout,
                     "engine": engine}
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", create_response)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", retrieve_model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(load_engine, model_name: str, host: str, port: int, api_key: str | None,
                request_timeout: float | None) -> None:
    """Listen at once (/health answers 503 while `load_engine()` runs in a thread), serve until SIGTERM
    or SIGINT, then stop taking requests, abort what runs, and stop the engine and its workers."""
    app = make_app(model_name, api_key, request_timeout)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:  # the port is taken, or the host is not this machine's
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port (or --host), or "
                          "stop the process that holds it") from None
    log.info("listening on http://%s:%d (OpenAI API under /v1); loading %s", host, port, model_name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = asyncio.ensure_future(asyncio.to_thread(load_engine))
    await asyncio.wait([loading, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if loading.done():
        app[SETTINGS]["engine"] = loading.result()  # raises the load error, if any
        log.info("ready: serving %s", model_name)
        await stop.wait()
    log.info("shutting down")
    await runner.cleanup()
    engine = app[SETTINGS]["engine"]
    if engine is not None:
        await asyncio.to_thread(engine.shutdown)
