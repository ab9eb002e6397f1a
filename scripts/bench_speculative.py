"""Speculative decoding by n-gram lookup (BuildConfig.max_draft_len) beside plain greedy decoding, one request
at a time, in one process: tokens/s, draft tokens accepted, and whether the tokens are plain decoding's.

Drafts come three ways (--drafts):
- ngram: kiln's own n-gram lookup, on the prompts given (--prompts: a JSONL of {"prompt": text}, through the
  model's chat template). Real text on a real model says what speculation gives there.
- oracle: each request's plain greedy continuation (from the plain run): every draft token right, the most a
  step of 1 + k tokens can make. With random weights (--synthetic) this is the ceiling, and
- wrong: the same tokens shifted by one: every draft refused, what checking them costs. The floor.

    python scripts/bench_speculative.py --model M.gguf --prompts P.jsonl --draft-lens 2,4 --drafts ngram
    python scripts/bench_speculative.py --synthetic llama-3-8b --dtype bfloat16 --drafts oracle,wrong

A probe: the drafts' source is swapped in by patching kiln.runtime.speculative.NgramIndex.draft, and the draft
length is set on the running engine's executor, so one engine serves every line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

import kiln.runtime.speculative as speculative
from kiln.llmapi.llm import LLM
from kiln.llmapi.sampling_params import SamplingParams
from kiln.llmapi.tokenizer import encode_chat

ngram_draft = speculative.NgramIndex.draft


def _prompts(llm: LLM, args) -> list[list[int]]:
    if args.prompts:
        with open(args.prompts) as f:
            texts = [json.loads(line)["prompt"] for line in f if line.strip()]
        return [encode_chat(llm.tokenizer, [{"role": "user", "content": t}]) for t in texts]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, llm.engine.config.vocab_size, (args.input_len,), generator=g).tolist()
            for _ in range(args.requests)]


def _counts(executor) -> tuple[int, int, int]:
    return executor.speculative_steps, executor.draft_tokens, executor.accepted_draft_tokens


def _run(llm: LLM, prompts, max_tokens: int) -> tuple[float, list[list[int]], tuple[int, int, int]]:
    """Seconds, each request's tokens, and the speculative (steps, drafted, accepted) of the timed requests."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))  # shapes warmed
    if llm.device.type == "cuda":
        torch.cuda.synchronize(llm.device)
    executor = llm.generator.executor
    before, start, outputs = _counts(executor), time.perf_counter(), []
    for prompt in prompts:
        outputs.append(llm.generate(prompt, params)[0].outputs[0].token_ids)
    if llm.device.type == "cuda":
        torch.cuda.synchronize(llm.device)
    seconds = time.perf_counter() - start
    return seconds, outputs, tuple(now - then for now, then in zip(_counts(executor), before))


def _set_drafts(kind: str, plain: dict, vocab_size: int) -> None:
    def known(self, ids, max_len):
        full = plain.get(tuple(ids[:16]))
        draft = [] if full is None else full[len(ids):len(ids) + max_len]
        return draft if kind == "oracle" else [(t + 1) % vocab_size for t in draft]

    speculative.NgramIndex.draft = ngram_draft if kind == "ngram" else known


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model LLM() opens (HF dir, .gguf, engine dir)")
    source.add_argument("--synthetic", help="random weights of this shape (kiln.bench.synthetic)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompts", help="JSONL of {\"prompt\": text}, each through the chat template")
    p.add_argument("--requests", type=int, default=3, help="random prompts (without --prompts)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--draft-lens", default="2,4,8")
    p.add_argument("--drafts", default="ngram", help="of ngram, oracle, wrong (comma-separated)")
    args = p.parse_args()
    model = args.model
    if args.synthetic:
        from kiln.bench.synthetic import write_synthetic_hf

        dtype = "bfloat16" if args.dtype == "auto" else args.dtype
        model = str(write_synthetic_hf(tempfile.mkdtemp() + "/hf", args.synthetic, dtype))
    llm = LLM(model, dtype=args.dtype)
    prompts = _prompts(llm, args)
    executor, vocab = llm.generator.executor, llm.engine.config.vocab_size
    plain_seconds, plain_outputs, _ = _run(llm, prompts, args.output_len)
    tokens = sum(map(len, plain_outputs))
    print(f"plain greedy: {tokens / plain_seconds:.1f} tok/s ({tokens} tokens, {len(prompts)} requests)", flush=True)
    plain = {tuple(q[:16]): q + o for q, o in zip(prompts, plain_outputs)}
    executor.run_ahead = False  # (as an engine made with max_draft_len has it)
    for kind in args.drafts.split(","):
        _set_drafts(kind, plain, vocab)
        for k in map(int, args.draft_lens.split(",")):
            executor.max_draft_len = k
            seconds, outputs, (steps, drafted, accepted) = _run(llm, prompts, args.output_len)
            same = sum(o == q for o, q in zip(outputs, plain_outputs))
            print(f"{kind:6s} k={k}: {tokens / seconds:8.1f} tok/s, {plain_seconds / seconds:.2f}x plain; "
                  f"{steps} speculative steps, {accepted}/{drafted} draft tokens accepted "
                  f"({accepted / max(drafted, 1):.0%}); {same}/{len(prompts)} requests' tokens equal plain's",
                  flush=True)

if __name__ == "__main__":
    main()
