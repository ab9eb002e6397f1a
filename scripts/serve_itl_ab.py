"""Serving latency under each value of a setting, an environment variable or a `kiln serve` flag: `kiln serve`
started once per value, then driven by `kiln bench --serve`'s client, streaming, at a fixed concurrency. On an
NVIDIA GPU:

    python scripts/serve_itl_ab.py KILN_STEP_RUN_AHEAD 0,1 [--synthetic llama-3-8b] [--concurrency 64]
        [--requests 512] [--input-len 1024] [--output-len 128] [--rounds 1]
    python scripts/serve_itl_ab.py max-num-tokens 2048,4096,8192    # kiln serve --max-num-tokens: an engine each

A server's batch is always filling: prompts join while others decode, as in the ramp-up of prefill-1000, where
step run-ahead once doubled the inter-token p99 (docs/performance.md; served, on an H200, run-ahead gave 3.4% more
throughput and no longer gaps). Offline runs cannot show what a client sees; this does. With --synthetic the
model is random weights of a real shape, written once to a temporary folder (bf16, no tokenizer, so the prompts
are random token ids); --model takes any model folder instead. The engine is built into an engine cache in the
run's temporary folder by the first server, and each later one loads it; a flag that changes the engine (say
--max-num-tokens) builds one per value, each deleted after its server (16 GB each at Llama-3-8B's shapes). The
folder goes when the run ends, by SIGTERM too. Each server first answers an untimed round of `--concurrency`
short requests. Prints a row a run: output tokens/s, TTFT and ITL percentiles, and writes the reports to
--output-json if given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "serve"))
from server_process import ServerProcess  # noqa: E402  (the tests' real-subprocess server, reused)

from kiln.bench.offline import scratch_dirs  # noqa: E402
from kiln.bench.serve_load import drive, workload_requests  # noqa: E402
from kiln.bench.synthetic import write_synthetic_hf  # noqa: E402
from kiln.bench.workloads import Workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variable", help="an environment variable (upper case: KILN_STEP_RUN_AHEAD) or a kiln "
                        "serve flag without its dashes (max-num-tokens)")
    parser.add_argument("values", help="its values, comma-separated, e.g. 0,1")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--synthetic", default="llama-3-8b", help="random weights of this shape (the default)")
    source.add_argument("--model", default=None, help="a model folder instead (words as prompts if it has a "
                        "tokenizer)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1, help="times through the values, alternating")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    with scratch_dirs(), tempfile.TemporaryDirectory(prefix="kiln-serve-ab-") as tmp:
        model = Path(args.model) if args.model else write_synthetic_hf(Path(tmp) / args.synthetic, args.synthetic,
                                                                        "bfloat16")
        token_ids = not args.model or not any(model.glob("tokenizer*"))
        reports = []
        for _ in range(args.rounds):
            for value in args.values.split(","):
                reports.append({args.variable: value, **serve_and_drive(model, Path(tmp), args, value, token_ids)})
                print_row(args.variable, reports[-1])
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(reports, indent=2))


def serve_and_drive(model: Path, workdir: Path, args, value: str, token_ids: bool) -> dict:
    flags = ["--dtype", args.dtype, "--max-batch-size", str(args.max_batch_size),
             "--max-seq-len", str(args.input_len + args.output_len), "--max-waiting", str(args.requests)]
    if args.device:
        flags += ["--device", args.device]
    cache = workdir / "cache"  # kiln's engine cache for this run, in its temporary folder
    env = {"KILN_CACHE_DIR": str(cache)}
    is_flag = not args.variable.isupper()
    if is_flag:
        flags += [f"--{args.variable}", value]
    else:
        env[args.variable] = value
    server = ServerProcess(model, workdir / "server", *flags, env=env)
    server.start(timeout=1800)  # (the first one builds the engine)
    try:
        # Untimed first: a round of the same shape, so Triton's compiles (a fresh machine's first server) and
        # the first GEMM at each row count land outside the timed run.
        warm = Workload("warm-up", args.concurrency, args.input_len, 8)
        asyncio.run(drive(server.url, workload_requests(warm, token_ids), args.concurrency, None, None))
        timed = Workload("timed", args.requests, args.input_len, args.output_len)
        return asyncio.run(drive(server.url, workload_requests(timed, token_ids), args.concurrency, None, None))
    finally:
        server.stop()
        if is_flag:  # an engine of this value's own: one on the disk at a time
            shutil.rmtree(cache / "engines", ignore_errors=True)


def print_row(variable: str, report: dict) -> None:
    ms = lambda p: " / ".join(f"{p[k] * 1e3:.1f}" for k in ("p50", "p90", "p99"))  # noqa: E731
    print(f"{variable}={report[variable]}: {report['succeeded']}/{report['requests']} requests, "
          f"{report['output_tokens_per_s']:,.1f} output tokens/s, TTFT ms {ms(report['ttft_s'])}, "
          f"ITL ms {ms(report['itl_s'])}, TPOT ms {ms(report['tpot_s'])}"
          + (f", errors {report['errors']}" if report["errors"] else ""), flush=True)


if __name__ == "__main__":
    main()
