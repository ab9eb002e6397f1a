"""Where the engine's slow calls go: `kiln bench` with every engine step timed on the host, phase by phase.

    python scripts/step_timeline.py [--sync-debug] [--count-launches] [kiln bench arguments]
    e.g. python scripts/step_timeline.py --synthetic llama-3-8b --dtype bfloat16 --baseline none \
             --workloads prefill-1000

Runs the bench in this process with the engine's methods wrapped in timers (nothing in kiln changes). For the last
`LLM.generate` call (the timed run) it prints the distribution of each phase a step, then the slowest engine calls
with their phases:

- `schedule`: the scheduler's choice of the next step (host only);
- `launch`: the runner's kernel launches and input copies (`execute`, `execute_ahead`, `decode_burst`); a long
  one has waited for the GPU somewhere (a synchronizing call). Within it, `forward` (the model's launches, eager
  or a graph's replay) and `sample` (sampling's launches);
- `collect`: waiting for a step queued ahead to finish and reading its tokens: the GPU's time past the host's;
- `append`: appending the tokens, stop checks, freeing finished sequences' blocks;
- `gc`: Python's garbage collector running inside the call (any generation), from `gc.callbacks`.

Made to find the doubled inter-token p99 of prefill-1000 with step run-ahead: whether the late reads are host
work (a phase past its usual) or a GPU step held up (a long `collect`).

With `--sync-debug` the timed run also runs under torch.cuda.set_sync_debug_mode("warn"): every operation torch
knows to wait for the GPU (a read of a device value, a copy from pageable memory, ...) is counted by the place in
kiln that called it, and listed with the engine calls it happened in. With `--count-launches` each call also counts
the work it queued on the GPU: Triton kernels, and torch operations on CUDA tensors other than views (each one a
kernel or a copy, cuBLAS's GEMMs included); a driver lets a stream hold only so many launches pending, and past
that a launch waits for the GPU. (Counting costs the host a few µs an operation, so it can change the timing.)
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kiln.runtime.model_runner as model_runner
from kiln.cli import main as kiln_main
from kiln.llmapi.llm import LLM
from kiln.runtime.cuda_graphs import DecodeGraphs, PrefillGraphs
from kiln.runtime.engine import GenerationEngine
from kiln.runtime.executor import Executor
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.scheduler import Scheduler

PHASES = ("schedule", "launch", "forward", "sample", "collect", "append", "gc")
VIEW_OPS = {"view", "_unsafe_view", "_reshape_alias", "slice", "select", "t", "transpose", "permute", "expand",
            "as_strided", "alias", "detach", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "narrow",
            "empty", "empty_strided", "empty_like", "lift_fresh", "is_same_size"}  # no GPU work of their own
calls: list[dict] = []  # one per GenerationEngine.step: start, seconds, tokens, and seconds per phase
current: dict | None = None
generate_starts: list[int] = []  # index into `calls` where each LLM.generate began
gc_started: float | None = None
syncs: Counter = Counter()  # (kiln frames that called it, the warning) -> times, in the timed run
sync_calls: defaultdict = defaultdict(set)  # the same key -> the engine calls it happened in


def timed(owner, name: str, phase: str) -> None:
    """owner.name (a class's method or a module's function) timed into the running engine call's phase."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if current is not None:
                current[phase] += time.perf_counter() - start
    setattr(owner, name, wrapper)


def engine_step(original):
    def wrapper(self):
        global current
        current = dict.fromkeys(PHASES, 0.0)
        current["launches"] = 0
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
    for graphs in (DecodeGraphs, PrefillGraphs):
        timed(graphs, "run", "forward")
    timed(ModelRunner, "_forward", "forward")
    timed(model_runner, "sample_tokens", "sample")
    timed(Executor, "collect", "collect")
    timed(GenerationEngine, "_append_all", "append")
    original_generate = LLM.generate

    def generate(self, *args, **kwargs):
        generate_starts.append(len(calls))
        syncs.clear()  # (only the last generate's, the timed run's, are reported)
        sync_calls.clear()
        return original_generate(self, *args, **kwargs)
    LLM.generate = generate
    gc.callbacks.append(on_gc)


def on_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Counts torch's synchronizing-operation warnings by the kiln frames that led to them; shows the others."""
    text = str(message)
    if "synchroniz" not in text:
        return show_warning(message, category, filename, lineno, file, line)
    frames = [f for f in traceback.extract_stack()[:-1] if "/kiln/" in f.filename and "step_timeline" not in f.filename]
    key = (" <- ".join(f"{f.filename.rsplit('/kiln/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-4:])),
           text.splitlines()[0][:100])
    syncs[key] += 1
    sync_calls[key].add(len(calls))


show_warning = warnings.showwarning


class LaunchCounter(TorchDispatchMode):
    """Counts the torch operations on CUDA tensors that queue GPU work, into the engine call running them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if current is not None and func.overloadpacket.__name__ not in VIEW_OPS and any(
                isinstance(a, torch.Tensor) and a.is_cuda for a in (*args, *(kwargs or {}).values())):
            current["launches"] += 1
        return out


def count_launches() -> None:
    """Triton's launches (JITFunction.run) and torch's (LaunchCounter, entered around every generate)."""
    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def counted_run(self, *args, **kwargs):
        if current is not None and not kwargs.get("warmup", False):
            current["launches"] += 1
        return run(self, *args, **kwargs)
    JITFunction.run = counted_run
    generate = LLM.generate

    def counted_generate(self, *args, **kwargs):
        with LaunchCounter():
            return generate(self, *args, **kwargs)
    LLM.generate = counted_generate


def watch_syncs() -> None:
    torch.cuda.set_sync_debug_mode("warn")
    warnings.simplefilter("always")
    warnings.showwarning = on_warning


def report() -> None:
    timed_run = calls[generate_starts[-1]:] if generate_starts else calls
    if not timed_run:
        return
    print(f"\n# step timeline of the last generate: {len(timed_run)} engine calls, "
          f"{sum(c['seconds'] for c in timed_run):.2f} s in them")
    for phase in ("seconds", *PHASES, "launches"):
        values = sorted(c[phase] for c in timed_run)
        q = statistics.quantiles(values, n=100, method="inclusive")
        if phase == "launches":
            if values[-1]:
                print(f"launches: total {sum(values):8d}    p50 {q[49]:7.0f}     p90 {q[89]:7.0f}     "
                      f"p99 {q[98]:7.0f}     max {values[-1]:7d}")
            continue
        print(f"{phase:>8}: total {sum(values):8.3f} s  p50 {q[49] * 1e3:7.2f} ms  p90 {q[89] * 1e3:7.2f} ms  "
              f"p99 {q[98] * 1e3:7.2f} ms  max {values[-1] * 1e3:7.2f} ms")
    t0 = timed_run[0]["start"]
    slowest = sorted(range(len(timed_run)), key=lambda i: timed_run[i]["seconds"], reverse=True)[:40]
    print("\ncall  at s  ms  tokens  queued-ahead  " + "  ".join(PHASES)
          + "  launches  (ms; the 40 slowest calls, by time)")
    for i in sorted(slowest):
        c = timed_run[i]
        phases = "  ".join(f"{c[p] * 1e3:7.2f}" for p in PHASES)
        print(f"{i:5d} {c['start'] - t0:7.2f} {c['seconds'] * 1e3:7.2f} {c['tokens']:5d} {c['ahead']!s:>5}  {phases}"
              f"  {c['launches']:6d}")
    if syncs:
        first = generate_starts[-1] if generate_starts else 0
        print("\nsynchronizing operations in the timed run (times; engine calls; where):")
        for key, n in syncs.most_common():
            at = sorted(i - first for i in sync_calls[key])
            print(f"{n:6d}  calls {at[:12]}{' ...' if len(at) > 12 else ''}\n        {key[1]}\n        {key[0]}")


if __name__ == "__main__":
    install()
    args = sys.argv[1:]
    if "--sync-debug" in args:
        args.remove("--sync-debug")
        watch_syncs()
    if "--count-launches" in args:
        args.remove("--count-launches")
        count_launches()
    try:
        code = kiln_main(["bench", *args])
    finally:
        report()
    sys.exit(code)
