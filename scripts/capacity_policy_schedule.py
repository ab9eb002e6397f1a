"""What each capacity scheduler policy does to a workload's schedule, in plain Python (kiln's Scheduler and
BlockManager, no model): steps, preemptions, prompt tokens computed again after a preemption, and the running
batch. Every request generates exactly its output length (ignore EOS), one token a step, as `kiln bench` runs.

    python scripts/capacity_policy_schedule.py [--requests 1000 --input-len 2048 --output-len 128
        --kv-tokens 833376 --max-batch-size 512 --max-num-tokens 8192]

The defaults are prefill-1000 on the H200 (its KV cache held 833,376 tokens in 32-token blocks). On a
compute-bound workload the tokens computed again are time lost: about their share of the run.
"""

from __future__ import annotations

import argparse
import statistics

from kiln.config import CAPACITY_SCHEDULER_POLICIES
from kiln.runtime.block_manager import BlockManager
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.sequence import Sequence


def simulate(args, policy: str) -> dict:
    blocks = BlockManager(args.kv_tokens // args.tokens_per_block, args.tokens_per_block, prefix_caching=False)
    scheduler = Scheduler(args.max_batch_size, args.max_num_tokens, blocks,
                          no_evict=policy == "guaranteed_no_evict")
    for i in range(args.requests):  # distinct prompts: nothing to share
        prompt = [(i * 7919 + j) % 50000 for j in range(args.input_len)]
        scheduler.add(Sequence(i, prompt, params=None, max_len=args.input_len + args.output_len, seed=i))
    steps, computed, batch = 0, 0, []
    while scheduler.has_unfinished():
        step = scheduler.schedule()
        steps += 1
        batch.append(len(step))
        for seq, n in step:
            seq.num_cached += n
            computed += n
            if seq.num_cached == len(seq.all_ids):  # the step samples its next token
                seq.append_tokens([1], 0.0)
                if len(seq.all_ids) == seq.max_len:
                    seq.finish("length")
                    scheduler.free(seq)
    needed = args.requests * (args.input_len + args.output_len - 1)  # the last token is sampled, not computed
    return {"steps": steps, "preemptions": scheduler.num_preemptions, "tokens computed": computed,
            "computed again": computed - needed, "share": (computed - needed) / needed,
            "mean batch": statistics.fmean(batch), "largest batch": max(batch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=2048)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--kv-tokens", type=int, default=833376)
    parser.add_argument("--tokens-per-block", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=512)
    parser.add_argument("--max-num-tokens", type=int, default=8192)
    args = parser.parse_args()
    for policy in CAPACITY_SCHEDULER_POLICIES:
        r = simulate(args, policy)
        print(f"{policy:>20}: {r['steps']} steps, {r['preemptions']} preemptions, {r['tokens computed']:,} tokens "
              f"computed, {r['computed again']:,} of them again ({r['share']:.2%}), running batch mean "
              f"{r['mean batch']:.1f}, largest {r['largest batch']}")


if __name__ == "__main__":
    main()
