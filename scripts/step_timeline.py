"""Where the engine's slow calls go: `kiln bench` with every engine step timed on the host, phase by phase.

    python scripts/step_timeline.py [kiln bench arguments]
    e.g. python scripts/step_timeline.py --synthetic llama-3-8b --dtype bfloat16 --baseline none \
             --workloads prefill-1000

Runs the bench in this process with the engine's methods wrapped in timers (nothing in kiln changes). For the last
`LLM.generate` call (the timed run) it prints the distribution of each phase a step, then the slowest engine calls
with their phases:

- `schedule`: the scheduler's choice of the next step (host only);
- `launch`: the runner's kernel launches and input copies (`execute`, `execute_ahead`, `decode_burst`); a long
  one has waited for the GPU somewhere (a synchronizing call);
- `collect`: waiting for a step queued ahead to finish and reading its tokens: the GPU's time past the host's;
- `append`: appending the tokens, stop checks, freeing finished sequences' blocks;
- `gc`: Python's garbage collector running inside the call (any generation), from `gc.callbacks`.

Made to find the doubled inter-token p99 of prefill-1000 with step run-ahead: whether the late reads are host
work (a phase past its usual) or a GPU step held up (a long `collect`).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time

from kiln.cli import main as kiln_main
from kiln.llmapi.llm import LLM
from kiln.runtime.engine import GenerationEngine
from kiln.runtime.executor import Executor
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.scheduler import Scheduler

PHASES = ("schedule", "launch", "collect", "append", "gc")
calls: list[dict] = []  # one per GenerationEngine.step: start, seconds, tokens, and seconds per phase
current: dict | None = None
generate_starts: list[int] = []  # index into `calls` where each LLM.generate began
gc_started: float | None = None


def timed(cls, name: str, phase: str) -> None:
    original = getattr(cls, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if current is not None:
                current[phase] += time.perf_counter() - start
    setattr(cls, name, wrapper)


def engine_step(original):
    def wrapper(self):
        global current
        current = dict.fromkeys(PHASES, 0.0)
        current["start"] = time.perf_counter()
        got = original(self)
        current["seconds"] = time.perf_counter() - current["start"]
        current["tokens"] = len(got)
        current["ahead"] = self.executor.in_flight is not None
        calls.append(current)
        current = None
        return got
    return wrapper


def on_gc(phase: str, info: dict) -> None:
    global gc_started
    if phase == "start":
        gc_started = time.perf_counter()
    elif gc_started is not None and current is not None:
        current["gc"] += time.perf_counter() - gc_started


def install() -> None:
    GenerationEngine.step = engine_step(GenerationEngine.step)
    timed(Scheduler, "schedule", "schedule")
    for name in ("execute", "execute_ahead", "decode_burst", "continue_burst"):
        timed(ModelRunner, name, "launch")
    timed(Executor, "collect", "collect")
    timed(GenerationEngine, "_append_all", "append")
    original_generate = LLM.generate

    def generate(self, *args, **kwargs):
        generate_starts.append(len(calls))
        return original_generate(self, *args, **kwargs)
    LLM.generate = generate
    gc.callbacks.append(on_gc)


def report() -> None:
    timed_run = calls[generate_starts[-1]:] if generate_starts else calls
    if not timed_run:
        return
    print(f"\n# step timeline of the last generate: {len(timed_run)} engine calls, "
          f"{sum(c['seconds'] for c in timed_run):.2f} s in them")
    for phase in ("seconds", *PHASES):
        values = sorted(c[phase] for c in timed_run)
        q = statistics.quantiles(values, n=100)
        print(f"{phase:>8}: total {sum(values):8.3f} s  p50 {q[49] * 1e3:7.2f} ms  p90 {q[89] * 1e3:7.2f} ms  "
              f"p99 {q[98] * 1e3:7.2f} ms  max {values[-1] * 1e3:7.2f} ms")
    t0 = timed_run[0]["start"]
    slowest = sorted(range(len(timed_run)), key=lambda i: timed_run[i]["seconds"], reverse=True)[:40]
    print("\ncall  at s  ms  tokens  queued-ahead  " + "  ".join(PHASES) + "  (ms; the 40 slowest calls, by time)")
    for i in sorted(slowest):
        c = timed_run[i]
        phases = "  ".join(f"{c[p] * 1e3:7.2f}" for p in PHASES)
        print(f"{i:5d} {c['start'] - t0:7.2f} {c['seconds'] * 1e3:7.2f} {c['tokens']:5d} {c['ahead']!s:>5}  {phases}")


if __name__ == "__main__":
    install()
    try:
        code = kiln_main(["bench", *sys.argv[1:]])
    finally:
        report()
    sys.exit(code)
