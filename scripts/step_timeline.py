"""Where the engine's slow calls go: `kiln bench` with every engine step timed on the host, phase by phase.

    python scripts/step_timeline.py [--sync-debug | --count-launches | --api-calls] [kiln bench arguments]
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
With `--api-calls` each generate runs under torch's profiler, and for the timed run's slowest engine calls the
CUDA runtime and driver calls the host spent longest in are listed: which call waits (a kernel launch, a copy, an
event), and at which of the engine call's launches (is it held by a full launch queue, partway through the step,
or by one call that waits for the GPU?). It also sums the time the GPU ran nothing at all, and where: the host's
share of a throughput gap. The three options are meant for separate runs.
"""

from __future__ import annotations

import bisect
import gc
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

import kiln.runtime.model_runner as model_runner
from kiln.cli import main as kiln_main
from kiln.llmapi.llm import LLM
from kiln.runtime.cuda_graphs import DecodeGraphs, PrefillGraphs
from kiln.runtime.engine import GenerationEngine
from kiln.runtime.executor import Executor
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.scheduler import Scheduler

PHASES = ("schedule", "launch", "forward", "sample", "collect", "append", "gc", "compile", "autotune")
VIEW_OPS = {"view", "_unsafe_view", "_reshape_alias", "slice", "select", "t", "transpose", "permute", "expand",
            "as_strided", "alias", "detach", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "narrow",
            "empty", "empty_strided", "empty_like", "lift_fresh", "is_same_size"}  # no GPU work of their own
calls: list[dict] = []  # one per GenerationEngine.step: start, seconds, tokens, and seconds per phase
current: dict | None = None
generate_starts: list[int] = []  # index into `calls` where each LLM.generate began
gc_started: float | None = None
syncs: Counter = Counter()  # (kiln frames that called it, the warning) -> times, in the timed run
sync_calls: defaultdict = defaultdict(set)  # the same key -> the engine calls it happened in
traces: list = []  # with --api-calls: the profiler of each generate, the last one's kept
# CUDA API calls that queue work on a stream (each takes a slot of its launch queue), by the names torch's
# profiler gives the runtime's and the driver's calls
QUEUEING_CALLS = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
                  "cudaMemcpyAsync", "cudaMemsetAsync", "cudaEventRecord", "cudaStreamWaitEvent"}


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
        current["compiled"] = []  # (Triton kernel, ms, specialization) of each compile or cache load in this call
        allocator = torch.cuda.memory_stats()
        current["start"] = time.perf_counter()
        with record_function(f"engine_call_{len(calls)}"):  # (recorded only under a profiler: --api-calls)
            got = original(self)
        current["seconds"] = time.perf_counter() - current["start"]
        after = torch.cuda.memory_stats()
        # cudaMalloc calls in this call (new segments of torch's caching allocator) and retries (a failed
        # cudaMalloc, then cudaFree of the cached blocks: a whole-device synchronization)
        current["mallocs"] = after.get("segment.all.allocated", 0) - allocator.get("segment.all.allocated", 0)
        current["retries"] = after.get("num_alloc_retries", 0) - allocator.get("num_alloc_retries", 0)
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
    watch_triton()


def watch_triton() -> None:
    """Triton compiles a kernel anew for each new specialization of its arguments (each integer's divisibility by
    16 and equality to 1, each pointer's alignment), inside the launch: from its disk cache in milliseconds, or
    from source in a second. An autotuned kernel also times its configs at a new key, waiting for the GPU. Both
    land in `forward`; here they are also timed apart (`compile`, `autotune`), with the kernels' names."""
    try:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
    except ImportError:
        return
    do_compile = JITFunction._do_compile

    def timed_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        start = time.perf_counter()
        try:
            return do_compile(self, key, signature, device, constexprs, options, attrs, warmup)
        finally:
            if current is not None:
                seconds = time.perf_counter() - start
                current["compile"] += seconds
                current["compiled"].append((self.__name__, seconds * 1e3, specialized(self, constexprs, attrs)))
    JITFunction._do_compile = timed_compile
    timed(Autotuner, "_bench", "autotune")


def specialized(kernel, constexprs: dict, attrs: dict) -> str:
    """The arguments Triton specialized this compile on, beyond the declared constexprs: integers equal to 1 or
    None (as `name=value`) and integers or pointers divisible by 16 (as `name/16`). Two compiles of one kernel
    differ in these; the timed run's compiles print them, so the argument that made a new one shows."""
    declared = {p.num for p in kernel.params if p.is_constexpr}
    names = kernel.arg_names
    ones = [f"{names[k[0]]}={v}" for k, v in constexprs.items() if len(k) == 1 and k[0] not in declared]
    aligned = [f"{names[k[0]]}/16" for k, v in attrs.items() if len(k) == 1 and any("divisib" in str(a) for a in v)]
    return " ".join(sorted(ones) + sorted(aligned))


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


def trace_api_calls() -> None:
    """Each generate under torch's profiler (CPU side: torch's operations and the CUDA API calls; the kernels
    too), keeping the last one's."""
    generate = LLM.generate

    def traced_generate(self, *args, **kwargs):
        traces.clear()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
            out = generate(self, *args, **kwargs)
        traces.append(trace)
        return out
    LLM.generate = traced_generate


def engine_call_marks(events, first: int) -> list[tuple[float, float, int]]:
    """(start µs, end µs, index from the timed run's first) of each engine call in the trace, by start."""
    return sorted((e.time_range.start, e.time_range.end, int(e.name.rsplit("_", 1)[1]) - first)
                  for e in events if e.name.startswith("engine_call_"))


def call_at(marks: list, starts: list, t: float) -> int | None:
    """The engine call running at t (µs), if any."""
    i = bisect.bisect_right(starts, t) - 1
    return marks[i][2] if i >= 0 and t <= marks[i][1] else None


def launched_by(event) -> str:
    """The torch operation that made a CUDA API call, and the first kernel it ran: which work a slow call was
    for (a cuBLAS GEMM of a new shape loads its kernel at first use, which may wait for the whole GPU)."""
    parent = getattr(event, "cpu_parent", None)
    if parent is None or parent.name.startswith("engine_call_"):
        return "(no torch operation: a Triton kernel or a graph)"
    kernels = getattr(parent, "kernels", None) or []
    return parent.name + (f" -> {kernels[0].name[:60]}" if kernels else "")


def api_calls_by_engine_call(events, marks: list) -> dict[int, list[tuple[str, float, int, object]]]:
    """The CUDA API calls each engine call made: (name, ms, how many queueing calls it had made before, the
    event), in order."""
    starts = [m[0] for m in marks]
    by_call: dict[int, list] = defaultdict(list)
    queued: Counter = Counter()  # engine call -> queueing calls so far
    for e in sorted((e for e in events if e.name.startswith("cu") and e.device_type.name == "CPU"),
                    key=lambda e: e.time_range.start):
        call = call_at(marks, starts, e.time_range.start)
        if call is None:
            continue  # outside every engine call
        by_call[call].append((e.name, (e.time_range.end - e.time_range.start) / 1e3, queued[call], e))
        queued[call] += e.name in QUEUEING_CALLS
    return by_call


def gpu_idle_gaps(events, marks: list) -> list[tuple[float, float]]:
    """(start µs, ms) of each moment in the timed run (first engine call's start to last's end) when the GPU ran
    nothing, no kernel and no copy on any stream: what the host costs the throughput, unlike a wait that only
    delays the tokens' reading."""
    window_start, window_end = marks[0][0], max(m[1] for m in marks)
    gaps, t = [], window_start
    for start, end in sorted((e.time_range.start, e.time_range.end) for e in events
                             if e.device_type.name == "CUDA"):
        if start >= window_end:
            break
        if start > t:
            gaps.append((t, (start - t) / 1e3))
        t = max(t, end)
    if t < window_end:
        gaps.append((t, (window_end - t) / 1e3))
    return gaps


def report_api_calls(timed_run: list[dict], first: int) -> None:
    events = traces[-1].events()
    marks = engine_call_marks(events, first)
    by_call = api_calls_by_engine_call(events, marks)
    if not by_call:
        print("\nno CUDA API call recorded (no GPU?)")
        return
    totals: defaultdict = defaultdict(lambda: [0, 0.0, 0.0])  # name -> [calls, ms, longest ms]
    for made in by_call.values():
        for name, ms, *_ in made:
            total = totals[name]
            total[0], total[1], total[2] = total[0] + 1, total[1] + ms, max(total[2], ms)
    print("\nCUDA API calls of the timed run (calls, total ms, longest ms):")
    for name, (n, ms, longest) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        print(f"{n:8d} {ms:10.1f} {longest:9.2f}  {name}")
    gaps = gpu_idle_gaps(events, marks)
    starts = [m[0] for m in marks]
    idle_in: Counter = Counter()  # engine call -> GPU idle ms that began in it
    for at, ms in gaps:
        idle_in[call_at(marks, starts, at)] += ms
    window_s = (max(m[1] for m in marks) - marks[0][0]) / 1e6
    print(f"\nGPU idle in the timed run: {sum(ms for _, ms in gaps) / 1e3:.3f} s of {window_s:.3f} s, "
          f"{len(gaps)} gaps; the longest (s from the first call, ms, engine call):")
    for at, ms in sorted(gaps, key=lambda g: -g[1])[:12]:
        print(f"  {(at - marks[0][0]) / 1e6:8.3f} {ms:8.2f}  {call_at(marks, starts, at)}")
    slowest = sorted(range(len(timed_run)), key=lambda i: timed_run[i]["seconds"], reverse=True)[:40]
    print("\ncall  ms  gpu-idle-ms  queueing-calls  | its three longest API calls: name ms @ queueing calls made "
          "before it")
    for i in sorted(slowest):
        made = by_call.get(i, [])
        longest = sorted(made, key=lambda m: -m[1])[:3]
        queued = sum(name in QUEUEING_CALLS for name, *_ in made)
        print(f"{i:5d} {timed_run[i]['seconds'] * 1e3:7.2f} {idle_in[i]:7.2f} {queued:6d}  | "
              + "   ".join(f"{name} {ms:.2f} @ {before}" for name, ms, before, _ in longest)
              + (f"\n        the longest for: {launched_by(longest[0][3])}" if longest else ""))


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
    print(f" mallocs: {sum(c['mallocs'] for c in timed_run)} cudaMalloc calls in "
          f"{sum(c['mallocs'] > 0 for c in timed_run)} engine calls, {sum(c['retries'] for c in timed_run)} retries")
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
          + "  launches  mallocs  retries  (ms; the 40 slowest calls, by time)")
    for i in sorted(slowest):
        c = timed_run[i]
        phases = "  ".join(f"{c[p] * 1e3:7.2f}" for p in PHASES)
        print(f"{i:5d} {c['start'] - t0:7.2f} {c['seconds'] * 1e3:7.2f} {c['tokens']:5d} {c['ahead']!s:>5}  {phases}"
              f"  {c['launches']:6d}  {c['mallocs']:4d} {c['retries']:3d}")
    if syncs:
        first = generate_starts[-1] if generate_starts else 0
        print("\nsynchronizing operations in the timed run (times; engine calls; where):")
        for key, n in syncs.most_common():
            at = sorted(i - first for i in sync_calls[key])
            print(f"{n:6d}  calls {at[:12]}{' ...' if len(at) > 12 else ''}\n        {key[1]}\n        {key[0]}")
    compiled = [(i, *record) for i, c in enumerate(timed_run) for record in c["compiled"]]
    if compiled:
        print(f"\nTriton compiles in the timed run: {len(compiled)}, {sum(r[2] for r in compiled):.1f} ms "
              "(engine call, kernel, ms, specialized on; then the same kernel's earlier compiles; the first 60):")
        earlier = [r for c in calls[:len(calls) - len(timed_run)] for r in c["compiled"]]
        for i, name, ms, spec in compiled[:60]:
            print(f"{i:6d}  {name}  {ms:.1f}\n        {spec}")
            for other in {s for n, _, s in earlier if n == name}:
                print(f"  was   {other}")
    if traces:
        report_api_calls(timed_run, generate_starts[-1] if generate_starts else 0)


if __name__ == "__main__":
    install()
    args = sys.argv[1:]
    if "--sync-debug" in args:
        args.remove("--sync-debug")
        watch_syncs()
    if "--count-launches" in args:
        args.remove("--count-launches")
        count_launches()
    if "--api-calls" in args:
        args.remove("--api-calls")
        trace_api_calls()
    try:
        code = kiln_main(["bench", *args])
    finally:
        report()
    sys.exit(code)
