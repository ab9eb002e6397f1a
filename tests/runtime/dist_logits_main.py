"""Run under torchrun: every rank loads its engine shard; rank 0 drives one prefill and one decode step
of a batch through DriverRunner and saves the last-token logits of each step to OUT.

    torchrun --nproc-per-node N dist_logits_main.py ENGINE_DIR OUT.pt
"""

import os
import sys

import torch

from kiln.builder import Engine
from kiln.runtime.block_manager import BlockManager
from kiln.runtime.distributed import leave_process_group
from kiln.runtime.model_runner import ModelRunner, StepInputs
from kiln.runtime.workers import DriverRunner, init_distributed, serve_worker, torchrun_rank

PROMPTS = [[1, 5, 9, 20, 3], [7, 8, 9], [100, 3, 4, 5, 6, 7, 8, 9, 10]]


def steps(block_size: int = 32):
    """A prefill of three prompts of different lengths, then one decode token each."""
    blocks = BlockManager(num_blocks=16, block_size=block_size)
    for i, p in enumerate(PROMPTS):
        blocks.allocate(i, p + [0])  # room for the decode token
    tables = [blocks.tables[i] for i in range(len(PROMPTS))]
    lens = [len(p) for p in PROMPTS]
    yield StepInputs([t for p in PROMPTS for t in p], [i for p in PROMPTS for i in range(len(p))], lens,
                     [0] * len(PROMPTS), [blocks.slot(i, t) for i, p in enumerate(PROMPTS) for t in range(len(p))],
                     tables)
    yield StepInputs([11, 12, 13], lens, [1] * len(PROMPTS), lens, [blocks.slot(i, n) for i, n in enumerate(lens)],
                     tables)


def main(engine_dir: str, out: str) -> None:
    rank = torchrun_rank()
    device = init_distributed(rank, int(os.environ["WORLD_SIZE"]))
    engine = Engine.from_dir(engine_dir, rank)
    runner = ModelRunner(engine.runtime_model(device), device, engine.build_config)
    if rank != 0:
        serve_worker(runner)
    else:
        driver = DriverRunner(runner, engine.config.vocab_size)
        torch.save([driver.execute(step) for step in steps()], out)
        driver.shutdown()
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
