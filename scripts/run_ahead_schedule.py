"""Whether step run-ahead changes which step produces each token, on the CPU: prefill-1000's dynamics scaled down
(a tiny random Llama, prompts chunked under a token budget, a KV cache small enough to preempt), run with
KILN_STEP_RUN_AHEAD=0 and then 1.

    PYTHONPATH=. python scripts/run_ahead_schedule.py [--prompt 120 --output 128 --requests 300 --budget 480
                                                       --kv-tokens 40000]

Each token is stamped with the index of the runner launch (a step, or each step of a decode burst) that produced
it, so a request's gaps are counted in launches. Where the two settings print the same gaps, the scheduler gives
every token to the same launch either way, and a difference on the GPU lies in when the host reads the tokens,
not in the schedule. Prints, per setting, the gaps' counts (launches: how many gaps) and those of each request's
first gap.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_hf_model  # noqa: E402  (the tests' tiny random Llama)

from kiln.builder import build  # noqa: E402
from kiln.config import BuildConfig  # noqa: E402
from kiln.llmapi.sampling_params import SamplingParams  # noqa: E402
from kiln.models.llama.model import LLaMAForCausalLM  # noqa: E402
from kiln.runtime.engine import GenerationEngine  # noqa: E402
from kiln.runtime.model_runner import ModelRunner  # noqa: E402


def counting_launches(runner: ModelRunner) -> list[int]:
    """Wrap the runner's launches so that they count themselves (a burst as its steps); returns the counter."""
    clock = [0]
    for name, steps_of in (("execute", lambda a: 1), ("execute_ahead", lambda a: 1),
                           ("decode_burst", lambda a: a[1])):
        launch = getattr(runner, name, None)
        if launch is None:
            continue

        def counted(*args, launch=launch, steps_of=steps_of, **kwargs):
            clock[0] += steps_of(args)
            return launch(*args, **kwargs)
        setattr(runner, name, counted)
    return clock


def gaps_in_launches(engine: GenerationEngine, clock: list[int], prompts, params) -> tuple[dict, dict]:
    """Run the prompts to the end; the counts of their gaps between tokens, and of their first gaps, in launches."""
    seqs = [engine.add_request(p, params) for p in prompts]
    events = collections.defaultdict(list)  # seq_id -> [(launch index, outputs so far)]
    while any(not s.finished for s in seqs):
        queued = engine.executor.steps_queued_ahead
        produced = engine.step()
        # a call that queued a step ahead returns the tokens of the launch before it
        stamp = clock[0] - (engine.executor.steps_queued_ahead > queued)
        for seq in produced:
            events[seq.seq_id].append((stamp, len(seq.output_ids)))
    gaps, first = collections.Counter(), collections.Counter()
    for seq_events in events.values():
        times, count = [], 0
        for stamp, outputs in seq_events:
            times += [stamp] * (outputs - count)
            count = outputs
        for i, (a, b) in enumerate(zip(times, times[1:])):
            gaps[b - a] += 1
            first[b - a] += i == 0
    return dict(sorted(gaps.items())), {k: v for k, v in sorted(first.items()) if v}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=120)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--budget", type=int, default=480, help="max_num_tokens: 4 prompts a step, as 8192 / 2048")
    parser.add_argument("--kv-tokens", type=int, default=40000)
    args = parser.parse_args()
    hf_dir = Path(tempfile.mkdtemp()) / "hf"
    make_hf_model(hf_dir)
    engine = build(LLaMAForCausalLM.from_hugging_face(hf_dir),
                   BuildConfig(max_seq_len=args.prompt + args.output, max_input_len=args.prompt))
    model = engine.runtime_model()
    config = BuildConfig(**{**engine.build_config.to_dict(), "max_num_tokens": args.budget,
                            "kv_cache_max_tokens": args.kv_tokens, "max_batch_size": 512})
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 90, (args.prompt,), generator=g).tolist() for _ in range(args.requests)]
    params = SamplingParams(temperature=0, max_tokens=args.output, ignore_eos=True)
    for setting in ("0", "1"):
        os.environ["KILN_STEP_RUN_AHEAD"] = setting
        runner = ModelRunner(model, torch.device("cpu"), config)
        clock = counting_launches(runner)
        generation = GenerationEngine(runner, config, ())
        gaps, first = gaps_in_launches(generation, clock, prompts, params)
        print(f"KILN_STEP_RUN_AHEAD={setting}: {clock[0]} launches, {generation.executor.steps_queued_ahead} queued "
              f"ahead, {generation.scheduler.num_preemptions} preemptions\n  gaps {gaps}\n  first gaps {first}",
              flush=True)


if __name__ == "__main__":
    main()
