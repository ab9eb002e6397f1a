"""Host (Python) time per engine step, by phase, on the CPU with a tiny model whose compute is negligible.

On a GPU the offline workload (hundreds of sequences at once) spends part of every engine step in Python:
scheduling, building the step's tensors, sampling, appending tokens, the LLM's output handling. That code
is the same on the CPU, so this runs the offline shape (by default 1024 requests of 128 in / 128 out, batch
512, greedy, ignore_eos) through `LLM.generate` on a random Llama of hidden size 16 and reports the mean
milliseconds of each phase per engine step (one host sync), for full-batch decode steps and for mixed steps
(new prompts joining running sequences) separately, and the whole run's wall time. Phases are wall time, or
with --clock cpu this thread's CPU time (steadier when other processes share the cores); --stub-forward
replaces the model by zero logits, so the whole run is host work.

Phases are exclusive (a phase called inside another counts only for itself): `forward` is the model alone
(tiny here, and on the GPU the kernels' time), `burst` the eager loop of a decode burst around it (on the
GPU a CUDA graph replays instead), `inputs` StepInputs and the step's tensors (slot mapping, block tables,
positions, cu_seqlens, PagedAttentionBatch._parts), `engine` appending tokens and stop checks, `executor`
its bookkeeping around the forward (cached counts, prefix registration), `llm` LLM.generate's own loop.

On a GPU (--device cuda --synthetic llama-3-8b --dtype bfloat16) the same phases split a real run: the
forward (eager, or the decode burst's CUDA-graph replays with their input copies) is synchronized, so its GPU
time counts as `forward` and not in the phase that happens to wait for it.

    python -m kiln.bench.host_overhead [--requests 1024] [--batch 512] [--clock cpu] [--stub-forward] [--profile]
    python -m kiln.bench.host_overhead --device cuda --synthetic llama-3-8b --dtype bfloat16 --requests 3000
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from collections import defaultdict
from functools import cached_property

import torch

PHASES = ("schedule", "inputs", "forward", "burst", "sampling", "executor", "engine", "llm")


class PhaseClock:
    """Exclusive time per phase for each engine step, from wrappers around the functions of each phase."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.steps: list[dict] = []  # per engine step: phase -> seconds, plus "kind" and "batch"
        self._stack: list[list[float]] = []  # per open call: [time spent in nested wrapped calls]
        self._last_end: float | None = None

    def wrap(self, owner, name: str, phase: str, sync=None) -> None:
        setattr(owner, name, self.timed(getattr(owner, name), phase, sync))

    def timed(self, original, phase: str, sync=None):
        """`original` timed as `phase`; `sync` (torch.cuda.synchronize) waits for the GPU work it queued."""
        def timed(*args, **kwargs):
            start = self.clock()
            self._stack.append([0.0])
            try:
                return original(*args, **kwargs)
            finally:
                if sync is not None:
                    sync()
                elapsed = self.clock() - start
                nested = self._stack.pop()[0]
                if self.steps:
                    self.steps[-1][phase] += elapsed - nested
                if self._stack:
                    self._stack[-1][0] += elapsed

        return timed

    def wrap_engine_step(self, generator) -> None:
        """Each call of GenerationEngine.step opens a step; the time until the next call is the LLM's."""
        original = generator.step

        def step():
            start = self.clock()
            if self.steps and self._last_end is not None:
                self.steps[-1]["llm"] += start - self._last_end
            self.steps.append(defaultdict(float))
            self._stack.append([0.0])
            try:
                return original()
            finally:
                self._last_end = self.clock()
                self.steps[-1]["engine"] += self._last_end - start - self._stack.pop()[0]

        generator.step = step

    def classify(self, step: list) -> None:
        """Label the open step by what the scheduler gave it."""
        record = self.steps[-1]
        record["batch"] = len(step)
        record["kind"] = "decode" if all(n == 1 for _, n in step) else "mixed"
        record["prefill_tokens"] = sum(n for _, n in step if n > 1)


def tiny_llama(out_dir: str, hidden: int, vocab: int, max_positions: int) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=max_positions, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(out_dir)


def stub_forward(model, vocab: int) -> None:
    """Replace the model by zero logits, so a run is host work alone. It still asks a mixed step's batch
    for its parts (`_parts`), as attention would."""
    def forward(tokens, positions, batch, hidden_states=None, last_token_only=True):
        if not batch.decode_only and not batch.fresh_prefill:
            _ = batch._parts
        return torch.zeros(len(batch.query_lens), vocab, device=batch.slot_mapping.device)

    model.forward = forward


def instrument(llm, clock: PhaseClock) -> None:
    from kiln.runtime import executor, model_runner, paged_batch

    gen = llm.generator
    schedule = gen.scheduler.schedule

    def scheduled():
        step = schedule()
        if step:
            clock.classify(step)
        return step

    gen.scheduler.schedule = scheduled
    clock.wrap(gen.scheduler, "schedule", "schedule")
    clock.wrap(gen.executor, "_burst_steps", "schedule")  # reserving the burst's blocks
    clock.wrap(gen.executor, "step", "executor")
    clock.wrap(executor, "step_inputs", "inputs")
    clock.wrap(executor, "sample_batch", "sampling")
    clock.wrap(model_runner, "sample_tokens", "sampling")  # a step queued ahead (KILN_STEP_RUN_AHEAD) samples there
    clock.wrap(model_runner.ModelRunner, "_batch", "inputs")
    clock.wrap(model_runner.ModelRunner, "_forward", "inputs")  # its own part: the token and position tensors
    clock.wrap(model_runner.ModelRunner, "_eager_burst", "burst")
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else None  # GPU time counts where it is queued
    clock.wrap(llm.runner.model, "forward", "forward", sync)
    if getattr(llm.runner, "graphs", None) is not None:  # a burst of CUDA-graph replays, with their inputs' copies
        clock.wrap(llm.runner.graphs, "run", "forward", sync)
        clock.wrap(llm.runner.graphs, "run_burst", "forward", sync)
        clock.wrap(llm.runner.graphs, "continue_burst", "forward", sync)  # a run-ahead burst
    if getattr(llm.runner, "prefill_graphs", None) is not None:  # a continuing prefill replayed from a graph
        clock.wrap(llm.runner.prefill_graphs, "run", "forward", sync)
    parts = cached_property(clock.timed(paged_batch.PagedAttentionBatch.__dict__["_parts"].func, "inputs"))
    parts.__set_name__(paged_batch.PagedAttentionBatch, "_parts")
    paged_batch.PagedAttentionBatch._parts = parts
    clock.wrap_engine_step(gen)


def summarize(clock: PhaseClock, batch: int) -> list[str]:
    lines = []
    groups = {"decode at full batch": [s for s in clock.steps if s.get("kind") == "decode" and s["batch"] == batch],
              "decode, smaller batches": [s for s in clock.steps if s.get("kind") == "decode" and s["batch"] < batch],
              "mixed (prefill + decode)": [s for s in clock.steps if s.get("kind") == "mixed"]}
    lines.append(f"{'ms per engine step':28}" + "".join(f"{p:>9}" for p in PHASES) + f"{'host':>9}{'total':>9}"
                 + f"{'steps':>7}")
    for name, steps in groups.items():
        if not steps:
            continue
        mean = {p: sum(s[p] for s in steps) / len(steps) * 1000 for p in PHASES}
        total = sum(mean.values())
        lines.append(f"{name:28}" + "".join(f"{mean[p]:9.2f}" for p in PHASES) + f"{total - mean['forward']:9.2f}"
                     + f"{total:9.2f}{len(steps):7d}")
    mixed = groups["mixed (prefill + decode)"]
    if mixed:
        lines.append(f"mixed steps: mean batch {sum(s['batch'] for s in mixed) / len(mixed):.0f}, mean prefill "
                     f"tokens {sum(s['prefill_tokens'] for s in mixed) / len(mixed):.0f}")
    totals = {p: sum(s[p] for s in clock.steps) for p in PHASES}
    lines.append("whole run, s per phase: " + ", ".join(f"{p} {totals[p]:.2f}" for p in PHASES)
                 + f"; host (all but forward) {sum(totals.values()) - totals['forward']:.2f}")
    return lines


def open_llm(args, work: str):
    """The tiny random Llama on the CPU, or (--synthetic) a real shape with random weights on the device."""
    from kiln.bench.offline import synthetic_hf_model
    from kiln.config import BuildConfig
    from kiln.llmapi.llm import LLM

    source = os.path.join(work, "hf")
    if args.synthetic:
        hf = synthetic_hf_model(args.synthetic, getattr(torch, args.dtype), torch.device(args.device))
        hf.save_pretrained(source)
        del hf
    else:
        tiny_llama(source, args.hidden, args.vocab, max(1024, args.input_len + args.output_len))
    bc = BuildConfig(max_batch_size=args.batch, max_num_tokens=args.max_num_tokens, max_input_len=args.input_len,
                     max_seq_len=args.input_len + args.output_len, decode_steps_per_sync=args.steps_per_sync)
    return LLM(source, dtype=args.dtype, device=args.device, build_config=bc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=512, help="max_batch_size")
    parser.add_argument("--max-num-tokens", type=int, default=8192)
    parser.add_argument("--steps-per-sync", type=int, default=4, help="decode_steps_per_sync (GPU default 4)")
    parser.add_argument("--hidden", type=int, default=16, help="of the tiny model")
    parser.add_argument("--vocab", type=int, default=1000, help="of the tiny model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--synthetic", help="a real shape (kiln.bench.shapes) instead of the tiny model, e.g. "
                        "llama-3-8b with --device cuda --dtype bfloat16")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="phases in wall time, or in this thread's CPU time (steadier on a shared machine)")
    parser.add_argument("--stub-forward", action="store_true",
                        help="zero logits instead of the model: the run is host work alone (every token 0)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions instead of phases")
    args = parser.parse_args()

    from kiln.llmapi.sampling_params import SamplingParams

    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="kiln-host-")
    os.environ.setdefault("KILN_CACHE_DIR", os.path.join(work, "cache"))
    llm = open_llm(args, work)
    vocab = llm.engine.config.vocab_size
    if args.stub_forward:
        stub_forward(llm.runner.model, vocab)
    # warm-up at the run's batch, so a GPU's kernels are compiled and tuned before the timed run
    warm = torch.randint(0, vocab, (min(args.requests, args.batch), args.input_len)).tolist()
    llm.generate(warm, SamplingParams(max_tokens=2 * args.steps_per_sync + 1, temperature=0, ignore_eos=True))
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (args.requests, args.input_len), generator=generator).tolist()
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        llm.generate(prompts, params)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return
    clock = PhaseClock(time.thread_time if args.clock == "cpu" else time.perf_counter)
    instrument(llm, clock)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    model = args.synthetic or f"tiny llama (hidden {args.hidden})"
    print(f"{model} on {args.device}: {args.requests} requests of {args.input_len} in / {args.output_len} out, "
          f"batch {args.batch}, {args.steps_per_sync} decode steps per sync: {wall:.2f} s wall, "
          f"{len(clock.steps)} engine steps, {tokens} output tokens ({tokens / wall:.0f} tok/s)")
    print("\n".join(summarize(clock, args.batch)))
    if args.clock == "wall":
        inside = sum(s[p] for s in clock.steps for p in PHASES)
        print(f"outside the engine steps (submitting the requests, the final outputs): {wall - inside:.2f} s")


if __name__ == "__main__":
    main()
