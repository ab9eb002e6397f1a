"""`kiln bench`: offline throughput and batch-1 decode speed of an engine, side by side with Hugging Face
transformers on the same weights and the memory-bandwidth roofline, in the same run.

    kiln bench --synthetic llama-3-8b --dtype bfloat16          # random weights of a real shape (GPU)
    kiln bench --model PATH --num-requests 32 --input-len 128 --output-len 128

Prompts are random token ids and every request generates exactly output_len tokens (ignore_eos),
so runs are comparable across engines.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kiln.bench.shapes import FAMILY_SHAPES, LLAMA_SHAPES


@dataclass
class BenchResult:
    system: str
    scenario: str
    requests: int
    input_len: int
    output_len: int
    seconds: float
    output_tokens_per_s: float
    requests_per_s: float = 0.0
    ttft_s: dict | None = None  # p50/p90/p99, kiln only (transformers' generate does not report it)
    itl_s: dict | None = None
    peak_gpu_gb: float | None = None

    def row(self) -> str:
        ms = lambda d: "—" if d is None else " / ".join(f"{v * 1000:.1f}" for v in d.values())  # noqa: E731
        peak = "—" if self.peak_gpu_gb is None else f"{self.peak_gpu_gb:.1f}"
        return (f"| {self.system} | {self.scenario} | {self.requests} | {self.input_len} | {self.output_len} | "
                f"{self.seconds:.2f} | {self.output_tokens_per_s:,.1f} | {self.requests_per_s:.2f} | "
                f"{ms(self.ttft_s)} | {ms(self.itl_s)} | {peak} |")


TABLE_HEADER = ("| system | scenario | requests | input | output | seconds | output tokens/s | requests/s | "
                "TTFT ms p50/p90/p99 | ITL ms p50/p90/p99 | peak GPU GB |\n"
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device memory bandwidth in bytes/s (a copy reads and writes every byte)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    sync(device)
    return 5 * 2 * src.numel() / (time.perf_counter() - start)


def kiln_offline(llm, prompts, output_len: int, label: str) -> BenchResult:
    from kiln.bench.serve_load import percentiles
    from kiln.llmapi.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up
    sync(llm.device)
    if llm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(llm.device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    sync(llm.device)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    peak = torch.cuda.max_memory_allocated(llm.device) / 1e9 if llm.device.type == "cuda" else None
    return BenchResult("kiln", label, len(prompts), len(prompts[0]), output_len, seconds, tokens / seconds,
                       len(prompts) / seconds, percentiles([o.ttft() for o in outputs]),
                       percentiles([x for o in outputs for x in o.inter_token_latencies()]), peak)


def hf_offline(hf_model, prompts, output_len: int, label: str, batch_size: int) -> BenchResult:
    """transformers' generate, greedy, in batches of equal-length prompts (no padding needed)."""
    device = hf_model.device
    warm = torch.tensor(prompts[:1], device=device)
    hf_model.generate(warm, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        ids = torch.tensor(prompts[i:i + batch_size], device=device)
        hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                          min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    sync(device)
    seconds = time.perf_counter() - start
    return BenchResult("transformers", label, len(prompts), len(prompts[0]), output_len, seconds,
                       len(prompts) * output_len / seconds, len(prompts) / seconds)


def synthetic_hf_model(shape: str, dtype: torch.dtype, device: torch.device):
    """A transformers model of a named real shape (LLAMA_SHAPES or FAMILY_SHAPES) with random weights,
    built directly on the device."""
    import transformers

    if shape in LLAMA_SHAPES:
        config = transformers.LlamaConfig(**LLAMA_SHAPES[shape], rms_norm_eps=1e-5)
        model_cls = transformers.LlamaForCausalLM
    else:
        fields = dict(FAMILY_SHAPES[shape])
        model_cls = getattr(transformers, fields.pop("architecture"))
        config = model_cls.config_class(**fields)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def run(args) -> list[BenchResult]:
    """Build (or open) the model, then time each scenario for kiln and for transformers."""
    from kiln.config import BuildConfig
    from kiln.llmapi.llm import LLM

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hf_model, source = None, args.model
    if args.synthetic:
        import tempfile

        hf_model = synthetic_hf_model(args.synthetic, getattr(torch, args.dtype), device)
        source = tempfile.mkdtemp(prefix=f"kiln-bench-{args.synthetic}-")
        hf_model.save_pretrained(source)
    elif not args.no_baseline and (Path(source) / "config.json").is_file() and \
            "format_version" not in json.loads((Path(source) / "config.json").read_text()):
        import transformers  # an HF dir: the same weights through transformers

        hf_model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, args.dtype)
                                                                     if args.dtype != "auto" else "auto").to(device)
    build_config = BuildConfig(max_batch_size=args.num_requests, max_seq_len=args.input_len + args.output_len,
                               max_num_tokens=max(8192, args.input_len))
    llm = LLM(source, dtype=args.dtype, device=str(device), build_config=build_config)
    config = llm.engine.config
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.runner.model.parameters())
    bandwidth = copy_bandwidth(device)
    print(f"# {describe_device(device)}; weights {weight_bytes / 1e9:.2f} GB ({config.dtype}); "
          f"measured copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"# batch-1 decode roofline (weights read once per token): {bandwidth / weight_bytes:,.1f} tokens/s")
    results = []
    scenarios = [("batch-1 decode", 1), ("offline", args.num_requests)]
    for label, n in scenarios:
        prompts = random_prompts(n, args.input_len, config.vocab_size)
        results.append(kiln_offline(llm, prompts, args.output_len, label))
        if hf_model is not None and not args.no_baseline:
            results.append(hf_offline(hf_model, prompts, args.output_len, label, batch_size=n))
    llm.shutdown()
    print(TABLE_HEADER)
    for r in results:
        print(r.row())
    batch1 = next(r for r in results if r.system == "kiln" and r.requests == 1)
    print(f"# kiln batch-1 decode: {batch1.output_tokens_per_s * weight_bytes / bandwidth:.0%} of the roofline "
          "(prefill included)")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": describe_device(device), "bandwidth_bytes_per_s": bandwidth,
                       "weight_bytes": weight_bytes, "results": [asdict(r) for r in results]}, f, indent=2)
    return results


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}"
