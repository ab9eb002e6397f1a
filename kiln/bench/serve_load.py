"""`kiln bench --serve URL`: drive a running OpenAI-compatible server at a fixed concurrency and report
throughput, time to first token and inter-token latency percentiles (streaming completions), for each workload
(--workloads, --workload-file, --dataset, or one of --num-requests x --input-len / --output-len) in the table, JSON
and plot of an offline run. The gaps are between the chunks a client receives (a chunk may carry several tokens);
TPOT is per token. Peak GPU memory is the server's to know, so it is left out."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time

from kiln.errors import ConfigError


def percentiles(values: list[float], points=(50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{p}": float("nan") for p in points}
    ordered = sorted(values)
    return {f"p{p}": ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] for p in points}


async def _one_request(session, url: str, body: dict, headers: dict) -> dict:
    start = time.perf_counter()
    times, tokens = [], 0
    async with session.post(f"{url}/v1/completions", json=body, headers=headers) as response:
        if response.status != 200:
            return {"error": f"HTTP {response.status}: {(await response.text())[:200]}"}
        async for line in response.content:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                times.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    itl = [b - a for a, b in zip(times, times[1:])]
    # after the first token, per token (a chunk may carry several: the usage count is the token count)
    tpot = (times[-1] - times[0]) / (tokens - 1) if times and tokens > 1 else None
    return {"ttft": times[0] - start if times else float("nan"), "itl": itl, "tpot": tpot, "tokens": tokens,
            "latency": time.perf_counter() - start}


def arrival_gaps(num_requests: int, request_rate: float | None) -> list[float]:
    """Seconds to wait after sending each request: Poisson arrivals at request_rate a second (exponential gaps,
    seeded, so every run sends at the same moments); None or inf sends them all at once."""
    if request_rate is None or request_rate == float("inf"):
        return [0.0] * num_requests
    rng = random.Random(1)
    return [rng.expovariate(request_rate) for _ in range(num_requests - 1)] + [0.0]


def workload_requests(workload, token_ids: bool = False) -> list[tuple[list[int] | str, int]]:
    """(prompt, max_tokens) of each request of `workload`. A dataset sends its own token ids (the completions API
    takes a list of ints as a prompt; the server checks them against its vocabulary). Otherwise input_len words a
    prompt, or with token_ids that many random token ids (a model with no tokenizer, such as random weights of a
    real shape; ids 3-99, which every vocabulary has); every prompt starts with the same shared_prefix_len of them."""
    from kiln.bench.workloads import DatasetWorkload

    if isinstance(workload, DatasetWorkload):
        return [(list(ids), output) for ids, output in zip(workload.input_ids, workload.output_tokens)]
    rng = random.Random(0)
    words = ["alpha", "river", "stone", "light", "garden", "music", "paper", "winter", "cloud", "signal"]
    draw = (lambda: rng.randrange(3, 100)) if token_ids else (lambda: rng.choice(words))  # noqa: E731
    prefix = [draw() for _ in range(workload.shared_prefix_len)]
    requests = []
    for _ in range(workload.num_requests):
        parts = prefix + [draw() for _ in range(workload.input_len - workload.shared_prefix_len)]
        requests.append((parts if token_ids else " ".join(parts), workload.output_len))
    return requests


async def drive(url: str, requests: list[tuple[list[int] | str, int]], concurrency: int, api_key: str | None,
                model: str | None, temperature: float = 0.0, request_rate: float | None = None) -> dict:
    """Send each (prompt, max_tokens) of `requests` (workload_requests), streaming: at most `concurrency` in
    flight; with request_rate, they arrive as arrival_gaps says (TTFT counts from when a request is sent)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    semaphore = asyncio.Semaphore(concurrency)

    async def bounded(session, prompt, max_tokens):
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}, **({"model": model} if model else {})}
        async with semaphore:
            return await _one_request(session, url, body, headers)

    async def arriving(session):
        tasks = []
        for (prompt, max_tokens), gap in zip(requests, arrival_gaps(len(requests), request_rate)):
            tasks.append(asyncio.create_task(bounded(session, prompt, max_tokens)))
            await asyncio.sleep(gap)
        return await asyncio.gather(*tasks)

    start = time.perf_counter()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            results = await arriving(session)
    except aiohttp.ClientConnectorError as e:
        raise ConfigError(f"cannot reach a server at {url} ({e.os_error.strerror or e}); start one there (`kiln "
                          "serve MODEL --port N`) or point --serve at it") from None
    seconds = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(requests), "succeeded": len(ok), "concurrency": concurrency, "temperature": temperature,
        "request_rate": request_rate,
        "seconds": seconds,
        "output_tokens_per_s": tokens / seconds, "requests_per_s": len(ok) / seconds,
        "ttft_s": percentiles([r["ttft"] for r in ok]),
        "itl_s": percentiles([x for r in ok for x in r["itl"]]),
        "tpot_s": percentiles([r["tpot"] for r in ok if r["tpot"] is not None]),
        "mean_latency_s": statistics.fmean(r["latency"] for r in ok) if ok else float("nan"),
        "errors": [r["error"] for r in results if "error" in r][:5],
    }


def served_workloads(args) -> list:
    from kiln.bench.workloads import custom_workload, select

    if args.workloads or args.workload_file or args.dataset:
        return select(args.workloads, args.workload_file, args.num_requests, args.input_len, args.output_len,
                      args.dataset, args.tokenizer)
    return [custom_workload(args.num_requests, args.input_len, args.output_len)]


def run(args) -> list:
    from kiln.bench.offline import TABLE_HEADER, BenchResult, print_results, run_report, save_report

    url = args.serve.rstrip("/")
    system = f"server {args.served_model_name or url}"
    workloads = served_workloads(args)
    results = []
    print(TABLE_HEADER, flush=True)
    for w in workloads:
        r = asyncio.run(drive(url, workload_requests(w, args.token_id_prompts), args.concurrency, args.api_key,
                              args.served_model_name, args.temperature, args.request_rate))
        extra = {"concurrency": args.concurrency, "mean_latency_s": r["mean_latency_s"], **w.length_notes()}
        if r["succeeded"] < r["requests"]:
            extra["failed"] = r["requests"] - r["succeeded"]
            print(f"# {w.name}: {extra['failed']} requests failed, the first: {r['errors']}", file=sys.stderr)
        scenario = w.name if args.request_rate is None else f"{w.name} @{args.request_rate:g}/s"
        results.append(BenchResult(system, scenario, w.num_requests, w.input_len, w.output_len, r["seconds"],
                                   r["output_tokens_per_s"], r["requests_per_s"], r["ttft_s"], r["itl_s"],
                                   r["tpot_s"], None, extra))
        print(results[-1].row(), flush=True)
    print_results(results)
    save_report(args, run_report(f"the server at {url}", results, concurrency=args.concurrency,
                                 request_rate=args.request_rate, temperature=args.temperature,
                                 token_id_prompts=args.token_id_prompts))
    return results
