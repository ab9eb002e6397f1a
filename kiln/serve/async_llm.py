"""AsyncLLM: the bridge between many concurrent HTTP requests and one generation loop.

One engine thread owns the LLM (scheduler, runner, tokenizer) and steps it while any request is
active; request handlers on the asyncio loop hand it work through an inbox and get each new output
back on a per-request asyncio queue. So every request joins the running batch as it arrives, with no
lock around generation, and a request that goes away (client disconnect, timeout) is aborted
between two steps, its KV cache freed at once.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from kiln.errors import ConfigError, KilnError
from kiln.llmapi.llm import LLM
from kiln.serve.metrics import Metrics


class QueueFullError(KilnError):
    """Too many requests are waiting; the client should retry later."""


@dataclass(eq=False)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt_ids: list[int]
    params: object
    arrived: float = field(default_factory=time.monotonic)
    request: object = None  # the LLM's _Request, once the engine thread has added it
    tokens_seen: int = 0
    last_token_at: float | None = None
    done: bool = False

    def post(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLM:
    def __init__(self, llm: LLM, max_waiting: int = 256):
        self.llm = llm
        self.max_waiting = max_waiting
        self.metrics = Metrics()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.active: list[_Stream] = []
        self.pending = 0  # requests handed in but not yet added (guarded by _pending_lock)
        self._pending_lock = threading.Lock()
        self.error: Exception | None = None
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
        self.thread.start()

    # ---- the request side (asyncio loop) -------------------------------------------------------

    def check(self, prompt_ids: list[int], params) -> None:
        """Refuse a request the engine cannot serve, before it queues (limits in the message)."""
        if self.error is not None:
            raise KilnError(f"the engine has failed: {self.error}")
        bc = self.llm.build_config
        if len(prompt_ids) > bc.max_input_len:
            raise ConfigError(f"the prompt has {len(prompt_ids)} tokens, more than this engine's max_input_len "
                              f"({bc.max_input_len})")
        if len(prompt_ids) + params.max_tokens > bc.max_seq_len:
            raise ConfigError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                              f"exceeds this engine's max_seq_len ({bc.max_seq_len})")
        waiting = self.num_waiting()
        if waiting >= self.max_waiting:
            raise QueueFullError(f"{waiting} requests are already waiting (limit {self.max_waiting}); retry later")

    async def generate(self, prompt_ids: list[int], params):
        """Yield the request's RequestOutput after every step that changed it; the last one is finished."""
        self.check(prompt_ids, params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), list(prompt_ids), params)
        with self._pending_lock:
            self.pending += 1
        self._send(("add", stream))
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    stream.done = True
                    return
        finally:
            if not stream.done:  # cancelled, disconnected or timed out: free it now
                self._send(("abort", stream))

    def _send(self, message) -> None:
        self.inbox.put(message)
        self._wakeup.set()

    def shutdown(self) -> None:
        """Stop the engine thread (aborting what runs) and the LLM's workers."""
        self._stop.set()
        self._wakeup.set()
        self.thread.join(timeout=30)
        self.llm.shutdown()

    # ---- the engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.active:
                self._wakeup.wait(0.5)
                self._wakeup.clear()
                continue
            try:
                self.llm.generator.step()
            except Exception as e:  # the engine cannot go on: fail every request and report unhealthy
                self.error = e
                for stream in self.active:
                    stream.post(e)
                self.active = []
                return
            self._publish()
        for stream in list(self.active):
            self._abort(stream)
            stream.post(KilnError("the server is shutting down"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, stream = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._pending_lock:
                    self.pending -= 1
                try:
                    stream.request = self.llm._submit(stream.prompt_ids, stream.params)
                except KilnError as e:
                    stream.post(e)
                    continue
                self.active.append(stream)
                self.metrics.request_started(len(stream.prompt_ids))
            elif stream in self.active:
                self._abort(stream)

    def _abort(self, stream: _Stream) -> None:
        self.metrics.request_finished("abort")  # first: whoever sees the blocks freed sees it counted
        self.active.remove(stream)
        for seq in stream.request.seqs:
            self.llm.generator.abort(seq)

    def _publish(self) -> None:
        now = time.monotonic()
        for stream in list(self.active):
            for seq in stream.request.seqs:
                self.llm._check_stop_strings(stream.request, seq)
            output = self.llm._output(stream.request)
            tokens = sum(len(o.token_ids) for o in output.outputs)
            changed = tokens != stream.tokens_seen
            if changed:
                self.metrics.tokens_generated(tokens - stream.tokens_seen)
                if stream.last_token_at is None:
                    self.metrics.observe_ttft(now - stream.arrived)
                else:
                    self.metrics.observe_itl(now - stream.last_token_at)
                stream.tokens_seen, stream.last_token_at = tokens, now
            if output.finished:  # counted before the client hears of it, so its next /metrics read includes it
                self.active.remove(stream)
                self.metrics.request_finished(output.outputs[0].finish_reason)
            if changed or output.finished:
                stream.post(output)

    # ---- observability -------------------------------------------------------------------------

    def num_waiting(self) -> int:
        """Requests not yet in the running batch: handed in, or queued in the scheduler."""
        return self.pending + sum(not s.finished for s in list(self.llm.generator.scheduler.waiting))

    def gauges(self) -> dict[str, float]:
        running = sum(not s.finished for s in list(self.llm.generator.scheduler.running))
        blocks = self.llm.generator.blocks
        return {"kiln_requests_running": running, "kiln_requests_waiting": self.num_waiting(),
                "kiln_kv_cache_sequences": len(blocks.tables), "kiln_kv_cache_usage_ratio": blocks.usage(),
                "kiln_prefix_cache_hit_rate": blocks.hit_rate()}

    def counters(self) -> dict[str, int]:
        executor = self.llm.generator.executor
        return {"kiln_decode_bursts_total": executor.bursts,
                "kiln_decode_bursts_run_ahead_total": executor.bursts_run_ahead,
                "kiln_speculative_steps_total": executor.speculative_steps,
                "kiln_speculative_draft_tokens_total": executor.draft_tokens,
                "kiln_speculative_accepted_tokens_total": executor.accepted_draft_tokens}
