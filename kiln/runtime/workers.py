"""Tensor- and pipeline-parallel ranks as processes of torch.distributed (NCCL on GPUs, gloo on CPU).

Rank 0 drives: it broadcasts each step's inputs to every rank, runs its own shard, and collects the
logits from the last pipeline stage (`DriverRunner`). Every other rank loops in `serve_worker`.

Two ways to start the ranks:
- `torchrun --nproc-per-node N -m kiln run ...`: every process is a rank; rank 0 also runs the front end.
- `LLM(path, tensor_parallel_size=N)`: the front end stays free and starts N worker processes
  (`WorkerGroup`). It talks to rank 0 through a pipe and watches every worker while it waits, so a
  dead worker fails the caller within a fraction of a second and the others are stopped.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import time
import traceback

import torch
import torch.distributed as dist

from kiln.errors import KilnError
from kiln.runtime.distributed import leave_process_group
from kiln.runtime.model_runner import ModelRunner, StepInputs

SHUTDOWN = "shutdown"
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)  # a stuck collective errors instead of hanging forever
START_TIMEOUT_S = 600


class WorkerError(KilnError):
    """A worker process died or failed; the whole group has been stopped."""


def init_distributed(rank: int, world_size: int, init_method: str = "env://",
                     device_type: str | None = None) -> torch.device:
    """Join the process group; each rank takes the GPU of its local rank (or the CPU, over gloo). device_type
    "cpu" keeps the ranks on the CPU on a GPU machine too; by default they take GPUs where there are any."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts
    if (device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    return device


def _logits_rank(runner: ModelRunner) -> int:
    """The rank that hands the logits to rank 0: the first tensor-parallel rank of the last stage."""
    m = runner.mapping
    return (m.pp_size - 1) * m.tp_size


class DriverRunner:
    """Rank 0's runner: the same interface as ModelRunner, for the whole group."""

    def __init__(self, local: ModelRunner, vocab_size: int):
        self.local = local
        self.vocab_size = vocab_size
        self.num_blocks = local.num_blocks  # agreed by every rank

    def execute(self, inp: StepInputs) -> torch.Tensor:
        dist.broadcast_object_list([inp], src=0)
        logits = self.local.execute(inp)
        source = _logits_rank(self.local)
        if source != 0:
            rows = inp.logit_rows()
            logits = torch.empty(len(inp.query_lens) if rows is None else len(rows), self.vocab_size,
                                 dtype=self.local.dtype, device=self.local.device)
            dist.recv(logits, src=source)
        return logits

    def shutdown(self) -> None:
        dist.broadcast_object_list([SHUTDOWN], src=0)


def serve_worker(runner: ModelRunner) -> None:
    """The loop of every rank but 0: run each broadcast step until told to stop."""
    sends_logits = _logits_rank(runner) == runner.mapping.rank
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] == SHUTDOWN:
            return
        logits = runner.execute(message[0])
        if sends_logits:
            dist.send(logits.contiguous(), dst=0)


def _worker_main(rank: int, world_size: int, port: int, engine_dir: str, build_config, device_type: str | None,
                 conn) -> None:
    """Entry point of a spawned worker process."""
    from kiln.builder import Engine

    try:
        device = init_distributed(rank, world_size, f"tcp://127.0.0.1:{port}", device_type)
        engine = Engine.from_dir(engine_dir, rank)
        runner = ModelRunner(engine.runtime_model(device), device, build_config, engine.plan)
        if rank != 0:
            serve_worker(runner)
            return
        driver = DriverRunner(runner, engine.config.vocab_size)
        conn.send(("ready", runner.num_blocks))
        while True:
            kind, payload = conn.recv()
            if kind == SHUTDOWN:
                driver.shutdown()
                return
            conn.send(("logits", driver.execute(payload).cpu()))
    except EOFError:  # the front end went away
        return
    except Exception as e:
        if conn is not None:
            conn.send(("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
        raise
    finally:
        leave_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerGroup:
    """world_size worker processes serving one engine dir; the same interface as ModelRunner."""

    def __init__(self, engine_dir: str, world_size: int, build_config, device_type: str | None = None):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        port = _free_port()
        self.processes = [ctx.Process(target=_worker_main, args=(r, world_size, port, str(engine_dir), build_config,
                                                                 device_type, child if r == 0 else None),
                                      name=f"kiln-rank{r}", daemon=True) for r in range(world_size)]
        for p in self.processes:
            p.start()
        self.num_blocks = self._receive("ready", START_TIMEOUT_S)

    def _dead_worker(self):
        return next((p for p in self.processes if not p.is_alive()), None)

    def _fail(self, reason: str):
        """Stop the group and raise, naming a dead worker first (the usual root cause)."""
        deadline = time.monotonic() + 1.0
        while self._dead_worker() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # a peer's crash reaches rank 0 before its exit is visible here
        dead = self._dead_worker()
        self.close()
        if dead is not None:
            reason = f"worker {dead.name} (pid {dead.pid}) exited with code {dead.exitcode}; {reason}"
        raise WorkerError(f"{reason} (all workers were stopped)")

    def _receive(self, expected: str, timeout_s: float | None = None):
        """Wait for rank 0's answer, checking every worker's pulse while waiting."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.conn.poll(0.05):
            if self._dead_worker() is not None:
                self._fail("the group cannot go on")
            if deadline is not None and time.monotonic() > deadline:
                self._fail(f"workers did not answer within {timeout_s:.0f}s")
        kind, payload = self.conn.recv()
        if kind == "error":
            self._fail(f"rank 0 reported: {payload.strip().splitlines()[0]}")
        assert kind == expected, kind
        return payload

    def execute(self, inp: StepInputs) -> torch.Tensor:
        if not self.processes:
            raise WorkerError("the worker group was shut down")
        self.conn.send(("step", inp))
        return self._receive("logits")

    def close(self) -> None:
        """Stop every worker: politely if rank 0 still listens, then by force; leaves no process behind."""
        if not self.processes:
            return
        if all(p.is_alive() for p in self.processes):
            try:
                self.conn.send((SHUTDOWN, None))
            except (BrokenPipeError, OSError):
                pass
            for p in self.processes:
                p.join(timeout=5)
        for p in self.processes:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        self.processes = []

    shutdown = close


def torchrun_rank() -> int | None:
    """This process's rank when torchrun started several, else None."""
    return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def join_torchrun(engine_dir: str, build_config=None):
    """Under torchrun: join the group and open this rank's engine. Ranks other than 0 serve until rank 0
    shuts them down and return None; rank 0 returns its device, for LLM(engine_dir, device=...)."""
    from kiln.builder import Engine

    rank = torchrun_rank()
    device = init_distributed(rank, int(os.environ["WORLD_SIZE"]))
    if engine_dir is None:
        raise KilnError("under torchrun, name an engine dir (--engine-dir) built with the same --tp-size/--pp-size")
    engine = Engine.from_dir(engine_dir, rank)
    if rank == 0:
        return device
    try:
        serve_worker(ModelRunner(engine.runtime_model(device), device,
                                 engine.build_config.with_runtime_options(build_config), engine.plan))
    finally:
        leave_process_group()
    return None
