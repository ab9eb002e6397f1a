"""SamplingParams (how to pick tokens and when to stop) and the outputs of a request."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.errors import ConfigError
from kiln.runtime.json_mode import JSON_OBJECT, after_text
from kiln.runtime.json_schema import schema_grammar


@dataclass
class SamplingParams:
    """temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 turn those filters off; seed makes sampling
    repeatable."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (after top-k and top-p)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely
    # None: none; k: each prompt token's logprob given the tokens before it, with the k most likely there (vLLM's;
    # kiln serve's `echo` with `logprobs`). Such a prompt is computed whole: no prefix is taken from the cache.
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI's, +-100)
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the output before this many tokens (vLLM's)
    # The output is one JSON object (OpenAI's response_format json_object): at each step the tokens that would break
    # it are masked, and once it closes only EOS (or a stop token) may follow (kiln.runtime.json_mode). A cut at
    # max_tokens still leaves an unclosed object (finish_reason "length").
    json_object: bool = False
    # The output is one value of this JSON Schema (OpenAI's response_format json_schema), masked as json_object is;
    # the keywords it holds to and the ones it refuses: kiln.runtime.json_schema.
    json_schema: dict | None = None
    # With json_object or json_schema: the output is free text until it has written this, and the JSON follows it
    # (a reasoning model's "</think>": it thinks, then answers in JSON; kiln serve sets it for such models).
    json_after: str | None = None
    # Lower first (vLLM's): a waiting request of lower priority joins the batch before older ones of higher, and
    # when blocks run out the running request of the highest priority (the newest among equals) is preempted.
    priority: int = 0

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop, self.stop_token_ids = list(self.stop or []), list(self.stop_token_ids or [])
        self.logit_bias = self.logit_bias or {}  # (None: no bias)
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", isinstance(self.temperature, (int, float)) and self.temperature >= 0, ">= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("top_p", isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1, "in [0, 1] (0 = off)"),
            ("repetition_penalty", isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0,
             "> 0 (1 = off)"),
            ("n", isinstance(self.n, int) and self.n >= 1, "an integer >= 1"),
            ("seed", self.seed is None or isinstance(self.seed, int), "None or an integer"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "a list of non-empty strings"),
            ("presence_penalty", isinstance(self.presence_penalty, (int, float)) and -2 <= self.presence_penalty <= 2,
             "in [-2, 2]"),
            ("frequency_penalty", isinstance(self.frequency_penalty, (int, float))
             and -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("logprobs", self.logprobs is None or isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20,
             "None or an integer in [0, 20]"),
            ("logit_bias", isinstance(self.logit_bias, dict) and all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 and isinstance(b, (int, float))
                and -100 <= b <= 100 for t, b in self.logit_bias.items()),
             "a dict of token id (an integer >= 0) -> bias in [-100, 100]"),
            ("prompt_logprobs", self.prompt_logprobs is None or isinstance(self.prompt_logprobs, int)
             and 0 <= self.prompt_logprobs <= 20, "None or an integer in [0, 20]"),
            ("min_tokens", isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
             f"an integer in [0, max_tokens ({self.max_tokens})]"),
            ("json_object", isinstance(self.json_object, bool) and not (self.json_object and self.ignore_eos),
             "True or False, and not True with ignore_eos (the output ends with EOS once the object closes)"),
            ("json_schema", self.json_schema is None or isinstance(self.json_schema, dict)
             and not self.json_object and not self.ignore_eos,
             "None or a JSON Schema (a dict), without json_object (it asks for JSON already) or ignore_eos"),
            ("priority", isinstance(self.priority, int) and not isinstance(self.priority, bool), "an integer"),
            ("json_after", self.json_after is None or isinstance(self.json_after, str) and self.json_after
             and (self.json_object or self.json_schema is not None),
             "None or a non-empty string, with json_object or json_schema (the JSON it comes before)"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"SamplingParams.{name} must be {allowed}, got {getattr(self, name)!r}")
        if self.json_schema is not None:
            schema_grammar(self.json_schema)  # (a schema kiln cannot hold to is refused here, its path named)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def json_grammar(self):
        """The grammar the output is held to (json_object's or json_schema's, after json_after's text), or None."""
        grammar = schema_grammar(self.json_schema) if self.json_schema is not None else \
            JSON_OBJECT if self.json_object else None
        return after_text(grammar, self.json_after.encode()) if grammar and self.json_after else grammar


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS, stop token or stop string) or "length"
    stop_reason: int | str | None = None  # the EOS/stop token id or the stop string that ended it
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # per token: (logprob, top alternatives)
    token_times: list[float] = field(default_factory=list)  # time.monotonic() when each token was ready


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    arrival_time: float | None = None  # time.monotonic() when the request was added
    # With SamplingParams.prompt_logprobs: per prompt token, (logprob, top alternatives), None for the first (as vLLM)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None

    def ttft(self, index: int = 0) -> float | None:
        """Seconds from arrival to the first token of output `index`."""
        times = self.outputs[index].token_times
        return times[0] - self.arrival_time if times and self.arrival_time is not None else None

    def time_per_output_token(self, index: int = 0) -> float | None:
        """Seconds per output token after the first: (last token's time - first's) / (tokens - 1). The decode
        speed one request saw; unlike the gaps between tokens it is not zero inside a burst of decode steps that
        the host reads at once."""
        times = self.outputs[index].token_times
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None

    def inter_token_latencies(self, index: int = 0) -> list[float]:
        """Seconds between the moments new tokens of output `index` arrived, as a streaming client sees them.
        Tokens read together (a burst of decode_steps_per_sync steps) arrive together and make one gap: counting
        the zeros between them once made the offline p50 0.0 ms. The decode speed per token is
        time_per_output_token."""
        arrivals = sorted(set(self.outputs[index].token_times))
        return [b - a for a, b in zip(arrivals, arrivals[1:])]
