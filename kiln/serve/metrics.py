"""Server metrics in the Prometheus text format (https://prometheus.io/docs/instrumenting/exposition_formats/).

Written by the engine thread, read by /metrics; each update is a few integer additions, so no lock.
"""

from __future__ import annotations

import bisect
from collections import Counter

# Seconds. TTFT on a CPU reference path can be long; inter-token latency on a GPU very short.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        lines += [f"{name}_sum {self.total}", f"{name}_count {cumulative}"]
        return lines


class Metrics:
    def __init__(self):
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_finished: Counter[str] = Counter()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def request_started(self, prompt_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens

    def request_finished(self, reason: str | None) -> None:
        self.requests_finished[reason or "unknown"] += 1

    def tokens_generated(self, n: int) -> None:
        self.generation_tokens += n

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def render(self, gauges: dict[str, float], counters: dict[str, int]) -> str:
        """Prometheus text: the engine's gauges and counters (read off it when scraped), then this object's own."""
        lines = []
        for name, value in gauges.items():
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        for name, value in counters.items():
            lines += [f"# TYPE {name} counter", f"{name} {value}"]
        lines += ["# TYPE kiln_prompt_tokens_total counter", f"kiln_prompt_tokens_total {self.prompt_tokens}",
                  "# TYPE kiln_generation_tokens_total counter",
                  f"kiln_generation_tokens_total {self.generation_tokens}",
                  "# TYPE kiln_requests_finished_total counter"]
        lines += [f'kiln_requests_finished_total{{finish_reason="{r}"}} {n}'
                  for r, n in sorted(self.requests_finished.items())]
        lines += self.ttft.render("kiln_time_to_first_token_seconds", "Time from arrival to the first token.")
        lines += self.itl.render("kiln_inter_token_latency_seconds", "Time between consecutive tokens.")
        return "\n".join(lines) + "\n"
