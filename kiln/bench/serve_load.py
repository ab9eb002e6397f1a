"""`kiln bench --serve URL`: drive a running OpenAI-compatible server at a fixed concurrency and report
throughput, time to first token and inter-token latency percentiles (streaming completions)."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
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


async def drive(url: str, num_requests: int, concurrency: int, prompt_len: int, output_len: int,
                api_key: str | None, model: str | None, temperature: float = 0.0, token_ids: bool = False) -> dict:
    """prompt_len words a prompt, or with token_ids that many random token ids (a model with no tokenizer, such as
    random weights of a real shape; ids 3-99, which every vocabulary has)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(0)
    words = ["alpha", "river", "stone", "light", "garden", "music", "paper", "winter", "cloud", "signal"]
    semaphore = asyncio.Semaphore(concurrency)

    async def bounded(session):
        prompt = ([rng.randrange(3, 100) for _ in range(prompt_len)] if token_ids
                  else " ".join(rng.choice(words) for _ in range(prompt_len)))
        body = {"prompt": prompt, "max_tokens": output_len, "temperature": temperature, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}, **({"model": model} if model else {})}
        async with semaphore:
            return await _one_request(session, url, body, headers)

    start = time.perf_counter()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            results = await asyncio.gather(*(bounded(session) for _ in range(num_requests)))
    except aiohttp.ClientConnectorError as e:
        raise ConfigError(f"cannot reach a server at {url} ({e.os_error.strerror or e}); start one there (`kiln "
                          "serve MODEL --port N`) or point --serve at it") from None
    seconds = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": num_requests, "succeeded": len(ok), "concurrency": concurrency, "temperature": temperature,
        "seconds": seconds,
        "output_tokens_per_s": tokens / seconds, "requests_per_s": len(ok) / seconds,
        "ttft_s": percentiles([r["ttft"] for r in ok]),
        "itl_s": percentiles([x for r in ok for x in r["itl"]]),
        "tpot_s": percentiles([r["tpot"] for r in ok if r["tpot"] is not None]),
        "mean_latency_s": statistics.fmean(r["latency"] for r in ok) if ok else float("nan"),
        "errors": [r["error"] for r in results if "error" in r][:5],
    }


def run(args) -> dict:
    report = asyncio.run(drive(args.serve.rstrip("/"), args.num_requests, args.concurrency, args.input_len,
                               args.output_len, args.api_key, args.served_model_name, args.temperature,
                               args.token_id_prompts))
    print(json.dumps(report, indent=2))
    return report
