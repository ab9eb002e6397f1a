"""Run under torchrun: every rank loads its engine shard; rank 0 drives one prefill and one decode step
of a batch through DriverRunner and saves the last-token logits of each step to OUT.

    torchrun --nproc-per-node N dist_logits_main.py ENGINE_DIR OUT.pt
"""

import os
import sys

import torch

from kiln.builder import Engine
from kiln.runtime.distributed import leave_process_group
from kiln.runtime.model_runner import ModelRunner, StepInputs
from kiln.runtime.workers import DriverRunner, init_distributed, serve_worker, torchrun_rank

PROMPTS = [[1, 5, 9, 20, 3], [7, 8, 9], [100, 3, 4, 5, 6, 7, 8, 9, 10]]


def steps():
    """A prefill of three prompts of different lengths, then one decode token each."""
    ids = [t for p in PROMPTS for t in p]
    positions = [i for p in PROMPTS for i in range(len(p))]
    lens = [len(p) for p in PROMPTS]
    yield StepInputs([0, 1, 2], ids, positions, lens, [0, 0, 0], [32, 32, 32])
    yield StepInputs([0, 1, 2], [11, 12, 13], lens, [1, 1, 1], lens, [32, 32, 32])


def main(engine_dir: str, out: str) -> None:
    rank = torchrun_rank()
    device = init_distributed(rank, int(os.environ["WORLD_SIZE"]))
    engine = Engine.from_dir(engine_dir, rank)
    runner = ModelRunner(engine.runtime_model(device), device)
    if rank != 0:
        serve_worker(runner)
    else:
        driver = DriverRunner(runner, engine.config.vocab_size)
        torch.save([driver.execute(step) for step in steps()], out)
        driver.shutdown()
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
