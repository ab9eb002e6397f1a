"""Trace the decode run-ahead's choices on the requests of tests/runtime/test_gpu_runtime.py's burst test (a tiny
random Llama, five requests ending mid-burst at 5, 7, 13, 40 and 22 tokens, four steps a burst), with step
run-ahead off and then on: each burst's rows as (cached tokens, length limit), whether the next burst was queued
ahead ("tokens"), only watched ("watch") or not (None), and the counts of bursts, bursts run ahead and steps
queued ahead.

    PYTHONPATH=. python scripts/decode_burst_trace.py [cuda|cpu]

The thirty-sixth session ran it on an H100 to tell a run-ahead fault from the test's (docs/performance.md).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_hf_model  # noqa: E402  (the tests' tiny random Llama)

import kiln.runtime.executor as executor  # noqa: E402
from kiln.llmapi.llm import LLM  # noqa: E402
from kiln.llmapi.sampling_params import SamplingParams  # noqa: E402
from kiln.config import BuildConfig  # noqa: E402

PROMPTS = [[1, 5, 9, 20, 3], [7, 8, 9], list(range(10, 80)), [3] * 33, [4, 4]]
OUTPUTS = (5, 7, 13, 40, 22)


def traced(queue_next_burst):
    def trace(self, layout, steps):
        ahead = queue_next_burst(self, layout, steps)
        rows = [None if seq is None else (seq.num_cached, seq.max_len) for seq in layout]
        print("burst rows", rows, "->", None if ahead is None else "tokens" if ahead.tokens is not None else "watch")
        return ahead
    return trace


def main(device: str = "cuda") -> None:
    executor.Executor._queue_next_burst = traced(executor.Executor._queue_next_burst)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["KILN_CACHE_DIR"] = str(Path(tmp) / "cache")
        make_hf_model(Path(tmp) / "hf")
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in OUTPUTS]
        for step_run_ahead in ("0", "1"):
            os.environ.update(KILN_DECODE_RUN_AHEAD="1", KILN_STEP_RUN_AHEAD=step_run_ahead)
            bc = BuildConfig(max_batch_size=8, max_seq_len=128, decode_steps_per_sync=4)
            with LLM(Path(tmp) / "hf", device=device, build_config=bc) as llm:
                lengths = [len(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]
                ex = llm.generator.executor
                print(f"KILN_STEP_RUN_AHEAD={step_run_ahead}: bursts {ex.bursts}, run ahead {ex.bursts_run_ahead}, "
                      f"steps queued ahead {ex.steps_queued_ahead}, output lengths {lengths}")


if __name__ == "__main__":
    main(*sys.argv[1:])
