"""`kiln bench`: throughput and latency of an engine on named workloads, side by side with Hugging Face
transformers on the same weights and the hardware's ceilings, in the same run.

    kiln bench --synthetic llama-3-8b --dtype bfloat16 --workloads decode-1,offline-3000   # random weights (GPU)
    kiln bench --synthetic llama-3-8b --dtype bfloat16 --quant-algo W8A16,FP8 --workloads decode-1
    kiln bench --model PATH --num-requests 32 --input-len 128 --output-len 128

Prompts are random token ids and every request generates exactly output_len tokens (ignore_eos), so
runs are comparable across engines. `--dataset FILE` adds a workload of requests of their own lengths, JSON
lines of {"input_ids": [...], "output_tokens": N} as TensorRT-LLM's trtllm-bench reads (or a text "prompt", which
the tokenizer of --tokenizer or the --model dir tokenizes). The table gives its mean lengths; transformers, which
gives a batch one output length, does not run it. Each kiln system is timed from opening its engine dir to the
first token (load, CUDA-graph capture, one prefill), then on every workload. Results: a table, JSON (--output-json)
and a PNG plot (--plot, needs matplotlib).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kiln.bench.shapes import FAMILY_SHAPES, LLAMA_SHAPES
from kiln.bench.workloads import DatasetWorkload, Workload, select
from kiln.checkpoint.atomic import write_json_atomic
from kiln.config import KV_CACHE_ALGOS, BuildConfig, QuantConfig, exclusions, resolve_device
from kiln.errors import ConfigError
from kiln.kernels import choices
from kiln.quantization.methods import quantizes_lm_head


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
    itl_s: dict | None = None  # gaps between arrivals of new tokens (a decode burst's arrive together)
    tpot_s: dict | None = None  # time per output token after the first, per request: the decode speed seen
    peak_gpu_gb: float | None = None
    extra: dict = field(default_factory=dict)  # workload-specific: prefix TTFTs, roofline fractions

    def row(self) -> str:
        ms = lambda d: "—" if d is None else " / ".join(f"{v * 1000:.1f}" for v in d.values())  # noqa: E731
        peak = "—" if self.peak_gpu_gb is None else f"{self.peak_gpu_gb:.1f}"
        return (f"| {self.system} | {self.scenario} | {self.requests} | {self.input_len} | {self.output_len} | "
                f"{self.seconds:.2f} | {self.output_tokens_per_s:,.1f} | {self.requests_per_s:.2f} | "
                f"{ms(self.ttft_s)} | {ms(self.itl_s)} | {ms(self.tpot_s)} | {peak} | {format_extra(self.extra)} |")


TABLE_HEADER = ("| system | workload | requests | input | output | seconds | output tokens/s | requests/s | "
                "TTFT ms p50/p90/p99 | ITL ms p50/p90/p99 | TPOT ms p50/p90/p99 | peak GPU GB | notes |\n"
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


RATIO_HEADER = ("# output tokens/s over a reference's, same run and workload:\n"
                "| system | workload | over | ratio |\n| --- | --- | --- | --- |")
# The systems a ratio is taken over: transformers (--baseline hf) and kiln's unquantized engine, the references the
# issues' speed targets are stated against (kiln over transformers; a quantized engine over bf16).
RATIO_REFERENCES = ("transformers", "kiln")


def speed_ratios(results: list[BenchResult]) -> list[dict]:
    """Each kiln system's output tokens/s over each reference's (RATIO_REFERENCES) on the same workload, where
    the run has that reference: computed once here, so that no report divides by hand."""
    speed = {(r.system, r.scenario): r.output_tokens_per_s for r in results}
    return [{"system": r.system, "workload": r.scenario, "over": reference,
             "ratio": r.output_tokens_per_s / speed[(reference, r.scenario)]}
            for r in results if r.system != "transformers"
            for reference in RATIO_REFERENCES
            if reference != r.system and speed.get((reference, r.scenario))]


def format_extra(extra: dict) -> str:
    """The notes column: seconds as ms, counts and words as they are, fractions as percentages."""
    parts = []
    for key, value in extra.items():
        if key.endswith("_s"):
            parts.append(f"{key[:-2]} {value * 1000:.1f} ms")
        elif isinstance(value, (int, str)):
            parts.append(f"{key} {value}")
        else:
            parts.append(f"{key} {value:.0%}")
    return ", ".join(parts) or "—"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device memory bandwidth in bytes/s (a copy reads and writes every byte): the best of five
    rounds, since a GPU that has just woken up copies at a fraction of its speed for a moment (seen: 2.1
    against 2.9 TB/s on an H100)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(5):
        dst.copy_(src)
        sync(device)
        start = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        sync(device)
        best = max(best, 5 * 2 * src.numel() / (time.perf_counter() - start))
    return best


def kiln_offline(llm, workload: Workload, label: str, around=contextlib.nullcontext) -> BenchResult:
    """Run every request of `workload` through the engine. With a shared prefix, the first request runs
    alone (filling the cache), then one follower alone, then the others together; `extra` holds the TTFTs.
    The timed part, not the warm-up, runs inside the context manager `around()` (profile_workload's profiler)."""
    from kiln.bench.serve_load import percentiles
    from kiln.llmapi.sampling_params import SamplingParams

    w = workload
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in w.output_lens()]
    seed = zlib.crc32(w.name.encode())
    prompts = w.prompts(llm.engine.config.vocab_size, seed=seed)
    # Warm-up on other prompts of the run's first lengths (no prefix of the run's to reuse), up to a batch of 64,
    # in the run's order (with a shared prefix: the first alone, one follower alone, then the rest): the run's
    # steps find their kernels compiled and tuned for every shape they meet.
    warm_prompts = w.warm_up_prompts(llm.engine.config.vocab_size, seed=seed + 1)
    for part in ([warm_prompts[:1], warm_prompts[1:2], warm_prompts[2:]] if w.shared_prefix_len else [warm_prompts]):
        if part:
            llm.generate(part, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    sync(llm.device)
    if llm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(llm.device)
    executor, scheduler = llm.generator.executor, llm.generator.scheduler
    bursts, bursts_run_ahead, queued_ahead = executor.bursts, executor.bursts_run_ahead, executor.steps_queued_ahead
    drafted, accepted = executor.draft_tokens, executor.accepted_draft_tokens
    preempted = scheduler.num_preemptions
    blocks = llm.generator.blocks
    queried, hits = blocks.prefix_queried_tokens, blocks.prefix_hit_tokens
    allocator = allocator_counts(llm.device)
    with around():
        start = time.perf_counter()
        extra = {}
        if w.shared_prefix_len:  # the first fills the cache; one follower alone; then the others together
            outputs = llm.generate(prompts[:1], params[:1])
            outputs += llm.generate(prompts[1:2], params[1:2])
            outputs += llm.generate(prompts[2:], params[2:])
            first, alone = outputs[0].ttft(), outputs[1].ttft()
            together = percentiles([o.ttft() for o in outputs[2:]])["p50"] if len(outputs) > 2 else float("nan")
            extra = {"first_ttft_s": first, "follower_alone_ttft_s": alone, "alone_over_first": alone / first,
                     "followers_together_ttft_p50_s": together, "together_over_first": together / first}
        else:
            outputs = llm.generate(prompts, params)
        sync(llm.device)
        seconds = time.perf_counter() - start
    # Prompt tokens found in the prefix cache, of those looked up (the block manager's counts): the point of a
    # shared prefix, and noted for any other run that hit it (a dataset's prompts may share a system prompt).
    if w.shared_prefix_len or blocks.prefix_hit_tokens > hits:
        extra["prefix_cache_hit_rate"] = (blocks.prefix_hit_tokens - hits) / max(1, blocks.prefix_queried_tokens
                                                                                  - queried)
    extra.update(w.length_notes())
    if executor.bursts > bursts:  # decode bursts, and the share queued before the host read the one before
        extra["bursts"] = executor.bursts - bursts
        extra["bursts_run_ahead"] = (executor.bursts_run_ahead - bursts_run_ahead) / (executor.bursts - bursts)
    if executor.draft_tokens > drafted:  # speculative decoding (max_draft_len): the share of draft tokens taken
        extra["draft_tokens"] = executor.draft_tokens - drafted
        extra["draft_acceptance"] = (executor.accepted_draft_tokens - accepted) / extra["draft_tokens"]
    if scheduler.num_preemptions > preempted:  # sequences sent back to wait for KV-cache room (recomputed later)
        extra["preemptions"] = scheduler.num_preemptions - preempted
    if executor.steps_queued_ahead > queued_ahead:  # steps queued ahead (KILN_STEP_RUN_AHEAD=1)
        extra["steps_queued_ahead"] = executor.steps_queued_ahead - queued_ahead
    extra.update(long_gap_notes([o.outputs[0].token_times for o in outputs]))
    # the caching allocator's calls to the driver in the timed run (each can wait for the whole GPU): noted if any
    extra.update({key: n - allocator[key] for key, n in allocator_counts(llm.device).items() if n > allocator[key]})
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    peak = torch.cuda.max_memory_allocated(llm.device) / 1e9 if llm.device.type == "cuda" else None
    tpot = [t for o in outputs if (t := o.time_per_output_token()) is not None]
    return BenchResult(label, w.name, len(prompts), w.input_len, w.output_len, seconds, tokens / seconds,
                       len(prompts) / seconds, percentiles([o.ttft() for o in outputs]),
                       percentiles([x for o in outputs for x in o.inter_token_latencies()]),
                       percentiles(tpot) if tpot else None, peak, extra)


def allocator_counts(device: torch.device) -> dict[str, int]:
    """The CUDA caching allocator's device allocations, frees, and retries (a free of every cached block, then the
    allocation again) so far, and the pinned host allocations (`host_allocs`; each waits for the whole GPU, see
    kiln.runtime.host_tensors); none off CUDA."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    return {"device_allocs": stats.get("num_device_alloc", 0), "device_frees": stats.get("num_device_free", 0),
            "alloc_retries": stats.get("num_alloc_retries", 0), "host_allocs": host.get("num_host_alloc", 0)}


def long_gap_notes(token_times: list[list[float]]) -> dict:
    """Where the long inter-token gaps are, from each request's token times: the gaps longer than 1.5x the median
    nonzero one (`long_gaps`, a count); the share of them that are a request's first gap, between its first and
    second token (`long_gaps_first`); and at how many distinct moments they ended (`long_gap_ends`). Tokens read
    in one engine step share a time, so a few ends for many gaps means a few slow steps held every request back,
    and about as many ends as gaps means single requests skipped steps. Nothing when no gap is that long."""
    gaps = [[(b - a, b) for a, b in zip(times, times[1:])] for times in token_times]
    positive = sorted(gap for g in gaps for gap, _ in g if gap > 0)
    if not positive:
        return {}
    limit = 1.5 * positive[len(positive) // 2]
    long = [(i, end) for g in gaps for i, (gap, end) in enumerate(g) if gap > limit]
    if not long:
        return {}
    return {"long_gaps": len(long), "long_gaps_first": sum(i == 0 for i, _ in long) / len(long),
            "long_gap_ends": len({end for _, end in long})}


def hf_offline(hf_model, workload: Workload) -> BenchResult:
    """transformers' generate, greedy, on the first baseline_requests prompts at that batch size (equal
    lengths: no padding needed). Its tokens/s is comparable; its request count is said in the table."""
    w = workload
    prompts = w.prompts(hf_model.config.vocab_size, seed=zlib.crc32(w.name.encode()))[: w.baseline_requests]
    device = hf_model.device
    warm = torch.tensor([prompts[0][:8]], device=device)
    hf_model.generate(warm, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    sync(device)
    start = time.perf_counter()
    ids = torch.tensor(prompts, device=device)
    hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=w.output_len,
                      min_new_tokens=w.output_len, do_sample=False, pad_token_id=0)
    sync(device)
    seconds = time.perf_counter() - start
    return BenchResult("transformers", w.name, len(prompts), w.input_len, w.output_len, seconds,
                       len(prompts) * w.output_len / seconds, len(prompts) / seconds)


def synthetic_dtype(device: torch.device) -> str:
    """--synthetic's weights under --dtype auto: the real checkpoints' bfloat16 on a GPU; float32 elsewhere, where
    the torch reference path computes."""
    return "bfloat16" if device.type == "cuda" else "float32"


def decode_weight_bytes(model, config) -> int:
    """The weight bytes the batch-1 decode roofline counts: every weight (issue 3's definition, the embedding
    included), except that a mixture of experts reads only its top-k share of the stacked experts a token."""
    total = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        total += size * config.moe_top_k // config.moe_num_experts if ".experts." in name else size
    return total


def synthetic_hf_model(shape: str, dtype: torch.dtype, device: torch.device, layers: int | None = None):
    """A transformers model of a named real shape (LLAMA_SHAPES or FAMILY_SHAPES) with random weights,
    built directly on the device; `layers` keeps only the first decoder layers (a shape too big for the device's
    memory or disk, which holds the saved source and one engine at a time)."""
    import transformers

    if shape in LLAMA_SHAPES:
        fields = dict(LLAMA_SHAPES[shape], rms_norm_eps=1e-5)
        model_cls = transformers.LlamaForCausalLM
    else:
        fields = dict(FAMILY_SHAPES[shape])
        model_cls = getattr(transformers, fields.pop("architecture"))
    if layers is not None:  # (given to the config, which derives its per-layer lists from it: gpt-oss's layer_types)
        fields["num_hidden_layers"] = layers
        if "layer_types" in fields:
            fields["layer_types"] = fields["layer_types"][:layers]
    config = model_cls.config_class(**fields)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


# The format of the GEMMs an engine's linears run in prefill, by quantization algorithm: FP8 engines multiply e4m3
# codes (torch._scaled_mm), SmoothQuant engines int8 codes (torch._int_mm); every other algorithm dequantizes to
# the model dtype first, so its linears run at the bf16 rate.
GEMM_FORMAT = {"FP8": "fp8", "FP8_PER_CHANNEL_PER_TOKEN": "fp8", "FP8_BLOCK_SCALES": "fp8",
               "W8A8_SQ_PER_CHANNEL": "int8"}


def _square_matmul(fmt: str, n: int, device: torch.device):
    """A function multiplying two random n x n matrices in `fmt`, as the engine's GEMMs of that format do: the
    weight operand transposed (column-major), FP8 with float32 row-wise scales and a bf16 output."""
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    a, w = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    if fmt == "fp8":
        a, w = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        rows, cols = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
        return lambda: torch._scaled_mm(a, w.T, scale_a=rows, scale_b=cols, out_dtype=torch.bfloat16)
    if fmt == "int8":
        a, w = ((x * 32).clamp(-127, 127).to(torch.int8) for x in (a, w))
        return lambda: torch._int_mm(a, w.T)
    return lambda: a @ w.T


def matmul_flops(device: torch.device, fmt: str = "bf16", n: int = 8192) -> float:
    """Measured dense matmul rate in FLOP/s: of `fmt` (bf16, fp8 or int8) on a GPU; float32 on a CPU, whatever
    the format (a CPU has no faster low-precision GEMM for kiln to use)."""
    if device.type != "cuda":
        fmt, n = "fp32", 512
    multiply = _square_matmul(fmt, n, device)
    multiply()
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        multiply()
    sync(device)
    return 10 * 2 * n ** 3 / (time.perf_counter() - start)


def prefill_flops_by_part(config, tokens: int) -> dict[str, float]:
    """FLOPs of one forward over a prompt of `tokens`: the decoder layers' linears and lm_head at 2 per weight per
    token (lm_head counted at every token, as the usual 2-per-parameter count does; a mixture of experts' top-k
    experts, shared expert and router), and causal attention."""
    h, layers = config.hidden_size, config.num_hidden_layers
    attention_weights, score_width = _attention_shape(config)
    mlp_weights = sum(_mlp_weights_a_token(config, i) for i in range(layers))
    return {"linears": 2 * (layers * attention_weights + mlp_weights) * tokens,
            "lm_head": 2 * h * config.vocab_size * tokens,
            "attention": layers * 2 * score_width * tokens * tokens / 2}  # QK^T and PV over the causal half


def _attention_shape(config) -> tuple[int, int]:
    """(weights a token multiplies in one layer's attention, widths its scores and values span per key: q.k plus
    p.v over the heads). Latent attention (kiln.layers.mla) counts its absorbed form: the query and output fold kv_b
    in, and every head attends the kv_lora + rope wide latent row and reads kv_lora of it."""
    h, heads, d = config.hidden_size, config.num_attention_heads, config.head_size
    if not config.mla_kv_lora_rank:
        q, kv = heads * d, config.num_key_value_heads * d
        return h * (q + 2 * kv) + q * h, 2 * q
    lora, rope, v = config.mla_kv_lora_rank, config.mla_rope_head_dim, config.mla_v_head_dim
    q_lora = config.mla_q_lora_rank
    q = h * q_lora + q_lora * heads * d if q_lora else h * heads * d
    absorbed = heads * (d - rope + v) * lora  # K_h into each query, V_h onto each output
    return q + h * (lora + rope) + absorbed + heads * v * h, heads * (2 * lora + rope)


def _mlp_weights_a_token(config, layer: int) -> int:
    """Weights a token multiplies in one layer's MLP: the dense one's, or its top-k experts', a shared expert's
    and the router's."""
    h = config.hidden_size
    if not config.is_moe_layer(layer):
        return h * config.intermediate_size * (3 if config.gated_mlp else 2)
    experts = config.moe_top_k * 3 * h * config.moe_intermediate_size  # (experts are gated MLPs)
    return experts + 3 * h * config.moe_shared_expert_intermediate_size + h * config.moe_num_experts


def prefill_flops(config, tokens: int) -> float:
    """All of prefill_flops_by_part."""
    return sum(prefill_flops_by_part(config, tokens).values())


def prefill_floor_s(config, tokens: int, rates: dict[str, float]) -> float:
    """Seconds one prompt's forward needs at the measured matmul rates: the linears (and a quantized lm_head) at
    the rate of the format the engine's GEMMs run in, the rest at bf16's."""
    quant = config.quantization
    fmt = GEMM_FORMAT.get(quant.quant_algo.value if quant.quant_algo else None, "bf16")
    head_fmt = fmt if quantizes_lm_head(quant) else "bf16"
    parts = prefill_flops_by_part(config, tokens)
    return parts["linears"] / rates[fmt] + parts["lm_head"] / rates[head_fmt] + parts["attention"] / rates["bf16"]


def decode_kv_bytes(config, input_len: int, output_len: int, kv_element_bytes: int) -> float:
    """Bytes of cached keys and values that one request's decode steps read: the first output token comes from the
    prefill, and the token at position p then attends p + 1 cached tokens (itself included) in every layer. Decode
    attention streams them from memory, so on a long prompt they are a floor of their own beside the FLOPs."""
    layout = config.kv_cache_layout(tp_size=1)  # the whole model's cache, as on one GPU
    per_token = config.num_hidden_layers * layout.tensors * layout.heads * layout.width * kv_element_bytes
    steps = output_len - 1
    return per_token * (steps * (input_len + 1) + steps * (steps - 1) / 2)


def build_engine(source, args, quant: QuantConfig | None, build_config: BuildConfig, device, scratch: list) -> Path:
    """The engine dir of one kiln system: the source as is, or quantized first into a temp checkpoint. The dirs to
    delete after it go on `scratch` as they are made (so a failed build leaves none behind): the checkpoint, and with
    a synthetic source the engine too, since 8B-shaped copies fill a disk fast."""
    import tempfile

    from kiln.llmapi.llm import open_engine_dir
    from kiln.quantization.workflow import quantize_checkpoint

    if quant is not None:
        ckpt = Path(tempfile.mkdtemp(prefix="kiln-bench-quant-")) / "ckpt"
        scratch.append(ckpt.parent)
        start = time.perf_counter()
        source = quantize_checkpoint(source, ckpt, quant, dtype=args.dtype, device=str(device),
                                     calib_size=args.calib_size)
        print(f"# quantized to {quant.quant_algo and quant.quant_algo.value} / KV "
              f"{quant.kv_cache_quant_algo and quant.kv_cache_quant_algo.value} in {time.perf_counter() - start:.0f}s")
    engine_dir = open_engine_dir(source, args.dtype, build_config)
    if args.synthetic:
        scratch.append(engine_dir)
    return engine_dir


def quant_systems(args) -> list[tuple[str, QuantConfig | None]]:
    """("kiln", None) for the unquantized engine, then one system per --quant-algo (and KV-cache algo)."""
    systems = [] if args.skip_unquantized else [("kiln", None)]
    kvs = kv_cache_formats(args.kv_cache_quant_algo)
    exclude, head = exclusions(args.quantize_lm_head), " lm_head" * args.quantize_lm_head
    for algo in (args.quant_algo.split(",") if args.quant_algo else []):
        for kv in kvs:
            systems.append((f"kiln {algo}{head}" + (f" KV {kv}" if kv else ""),
                            QuantConfig(quant_algo=algo, kv_cache_quant_algo=kv, exclude_modules=exclude)))
    if not args.quant_algo:
        systems += [(f"kiln KV {kv}", QuantConfig(kv_cache_quant_algo=kv)) for kv in kvs if kv]
    return systems


def kv_cache_formats(arg: str | None) -> list[str | None]:
    """--kv-cache-quant-algo "FP8,NONE" -> ["FP8", None]; unset -> [None] (the model's dtype)."""
    if not arg:
        return [None]
    formats = arg.upper().split(",")
    valid = [algo.value for algo in KV_CACHE_ALGOS]
    bad = [f for f in formats if f not in (*valid, "NONE")]
    if bad:
        raise ConfigError(f"--kv-cache-quant-algo: {', '.join(bad)} is not a KV cache format; "
                          f"use {', '.join(valid)} or NONE (the model's dtype), comma-separated")
    return [None if f == "NONE" else f for f in formats]


def open_to_first_token(engine_dir, device: torch.device):
    """(the engine at `engine_dir`, seconds from LLM(...) to its first generated token)."""
    from kiln.llmapi.llm import LLM
    from kiln.llmapi.sampling_params import SamplingParams

    sync(device)
    start = time.perf_counter()
    llm = LLM(engine_dir, device=str(device))
    prompt = [1] * min(16, llm.build_config.max_input_len)  # (a bench of shorter prompts builds for them)
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    sync(device)
    return llm, time.perf_counter() - start


def restart_to_first_token(engine_dir, device: torch.device) -> dict:
    """open_to_first_token in a new Python process, as a redeployed server starts (`python -m kiln.bench.restart`):
    {"load_to_first_token_s", "kernel_choices": {"from_disk", "timed"}}. In the bench's own process, Triton's
    compiled kernels and kiln's kernel choices would still be in memory."""
    done = subprocess.run([sys.executable, "-m", "kiln.bench.restart", str(engine_dir), str(device)],
                          stdout=subprocess.PIPE, text=True)  # (its log goes to this process's stderr)
    if done.returncode != 0:
        raise RuntimeError(f"the engine at {engine_dir} failed to open in a new process (its log is above)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def profile_workload(llm, workload: Workload, label: str, device: torch.device, floor_s: float | None) -> None:
    """Run `workload` again under torch.profiler and print where its time went: the wall time, the GPU's total
    kernel time and the compute floor where there is one, then the kernels by total GPU time (on a CPU, the
    operators by CPU time). A second run, so the measured row above is not slowed by the profiler."""
    cuda = device.type == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    prof = torch.profiler.profile(activities=[activity])
    wall = kiln_offline(llm, workload, label, around=lambda: prof).seconds
    events = prof.key_averages()
    busy = sum(e.device_time_total if cuda else e.self_cpu_time_total for e in events) / 1e6
    floor = f", compute floor {floor_s:.2f} s" if floor_s else ""
    print(f"# profile of {label} {workload.name}: {wall:.2f} s under the profiler, "
          f"{'GPU kernels' if cuda else 'CPU operators'} {busy:.2f} s{floor}")
    print(events.table(sort_by="device_time_total" if cuda else "self_cpu_time_total", row_limit=25), flush=True)


def bench_system(label, engine_dir, workloads, device, ceilings,
                 profile: bool = False) -> tuple[list[BenchResult], dict]:
    """Open the engine (timed to its first token), then run every workload (and with `profile` run each again
    under the profiler, profile_workload); the engine is closed after."""
    # Timed twice: the first open compiles kernels (and times the candidates of the tuned ones) into their disk
    # caches; the second, in a new process, is a restart with warm caches, as a redeployed server would see. Then
    # this process opens the engine again for the workloads. The JSON records the kernel choices the first open made
    # (the tiles each tuner kept; one an earlier system of the run made already is not repeated).
    held_before = choices.held()
    llm, first_load_s = open_to_first_token(engine_dir, device)
    made = {key: value for key, value in choices.held().items() if key not in held_before}
    llm.shutdown()
    del llm  # (this frame's reference: the engine's GPU memory must be free before the next open)
    _release(device)
    restart = restart_to_first_token(engine_dir, device)
    llm, _ = open_to_first_token(engine_dir, device)
    try:
        weight_bytes = sum(p.numel() * p.element_size() for p in llm.runner.model.parameters())
        read_bytes = decode_weight_bytes(llm.runner.model, llm.engine.config)
        kv_element_bytes = next(iter(llm.runner.kv.k.values())).element_size()
        load_s, picked = restart["load_to_first_token_s"], restart["kernel_choices"]
        info = {"load_to_first_token_s": load_s, "first_load_to_first_token_s": first_load_s,
                "kernel_choices_at_restart": picked, "kernel_choices_made": made, "weight_bytes": weight_bytes,
                "decode_weight_bytes": read_bytes, "kv_cache_tokens": getattr(llm.runner, "kv_token_capacity", None),
                "decode_roofline_tokens_per_s": ceilings["bandwidth"] / read_bytes}
        read = f" ({read_bytes / 1e9:.2f} GB of them a batch-1 token)" if read_bytes != weight_bytes else ""
        print(f"# {label}: weights {weight_bytes / 1e9:.2f} GB{read}, KV cache {info['kv_cache_tokens']} tokens, "
              f"engine load to first token {load_s:.1f}s in a new process (first open {first_load_s:.1f}s; kernel "
              f"choices at the restart: {picked['from_disk']} from disk, {picked['timed']} timed), batch-1 decode "
              f"roofline {info['decode_roofline_tokens_per_s']:,.1f} tokens/s", flush=True)
        rates = gemm_rates(ceilings, llm.engine.config, device)
        results = []
        for w in workloads:
            r = kiln_offline(llm, w, label)
            if w.num_requests == 1 and w.output_len > 1:
                r.extra["of_decode_roofline"] = r.output_tokens_per_s / info["decode_roofline_tokens_per_s"]
            # Prefill-bound: short outputs or long prompts, by the mean lengths for a dataset (its input_len and
            # output_len), as its bulk is what sets the run's time; then floors against the measured rates.
            if w.output_len <= 16 or w.input_len >= 1024:
                r.extra.update(floor_notes(llm.engine.config, w, rates, ceilings["bandwidth"], kv_element_bytes))
                # The floor's rate comes from a short burst on a cool GPU; lent GPUs of one kind then sustain
                # different clocks (the same GEMMs 5-7% apart between sessions). The rate again, right after the
                # run, says how this GPU held up, so lines from different machines can be read side by side.
                r.extra["matmul_after_tflops"] = round(matmul_flops(device) / 1e12)
            print(r.row(), flush=True)
            results.append(r)
            if profile:
                profile_workload(llm, w, label, device, r.extra.get("compute_floor_s"))
    finally:
        llm.shutdown()
        del llm
        _release(device)
    return results, info


def floor_notes(config, workload: Workload, rates: dict[str, float], bandwidth: float, kv_element_bytes: int) -> dict:
    """The workload's prefill FLOPs at the measured matmul rates (`compute_floor_s`), and its decode steps' reads
    of the KV cache at the measured bandwidth (`kv_read_floor_s`, where any request decodes past its first
    token): summed over its requests, each length counted once and multiplied (offline-3000 has one)."""
    lengths = Counter(workload.request_lengths())
    notes = {"compute_floor_s": sum(n * prefill_floor_s(config, prompt, rates) for (prompt, _), n in lengths.items())}
    kv_bytes = sum(n * decode_kv_bytes(config, prompt, output, kv_element_bytes)
                   for (prompt, output), n in lengths.items())
    if kv_bytes:
        notes["kv_read_floor_s"] = kv_bytes / bandwidth
    return notes


def gemm_rates(ceilings: dict, config, device: torch.device) -> dict[str, float]:
    """The measured matmul rates (FLOP/s by format) with the format of this engine's GEMMs among them: measured
    the first time an engine of that format is benched, then kept for the run."""
    algo = config.quantization.quant_algo
    fmt = GEMM_FORMAT.get(algo.value if algo else None)
    if fmt and fmt not in ceilings["flops"]:
        ceilings["flops"][fmt] = matmul_flops(device, fmt)
        print(f"# matmul {fmt} {ceilings['flops'][fmt] / 1e12:.0f} TFLOP/s", flush=True)
    return ceilings["flops"]


def _release(device: torch.device) -> None:
    """Give a closed engine's GPU memory back: the next engine plans its KV cache from what is free."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args) -> list[BenchResult]:
    """Measure the ceilings, run the transformers baseline (synthetic or HF sources), then each kiln system."""
    device = resolve_device(args.device)
    if args.synthetic_layers is not None and (not args.synthetic or args.synthetic_layers < 1):
        raise ConfigError(f"--synthetic-layers {args.synthetic_layers}: keeps the first N >= 1 layers of a "
                          f"--synthetic shape; give both, or neither")
    if args.synthetic and args.dtype == "auto":
        args.dtype = synthetic_dtype(device)
    workloads = select(args.workloads, args.workload_file, args.num_requests, args.input_len, args.output_len,
                       args.dataset, args.tokenizer or args.model)
    # (checked before any work: a bad --quant-algo or build flag fails now, not after the baseline's run)
    system_configs, build_config = quant_systems(args), bench_build_config(args, workloads)
    bandwidth, bf16_flops = copy_bandwidth(device), matmul_flops(device)
    ceilings = {"bandwidth": bandwidth, "flops": {"bf16": bf16_flops}}  # (other formats' rates join as needed)
    print(f"# {describe_device(device)}; measured copy bandwidth {bandwidth / 1e12:.2f} TB/s, "
          f"matmul {bf16_flops / 1e12:.0f} TFLOP/s; settings {kiln_settings() or 'the defaults'}", flush=True)
    with scratch_dirs() as scratch:
        source, hf_model = prepare_source(args, device)
        if args.synthetic:
            scratch.append(source)
        return _bench_source(args, device, workloads, ceilings, source, hf_model, system_configs, build_config,
                             scratch)


@contextlib.contextmanager
def scratch_dirs():
    """A list of dirs to delete when the run ends, however it ends: a synthetic model's checkpoint and engine are
    copies of random weights (16 GB each at Llama-3-8B's shapes, 4 a disk of 64 GB) that no later run reuses. A
    SIGTERM (`timeout`'s) becomes SystemExit here, so a killed run deletes them too."""
    scratch: list = []
    installed = _main_thread()  # (signal handlers are the main thread's to set)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if installed else None
    try:
        yield scratch
    finally:
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def bench_build_config(args, workloads) -> BuildConfig:
    """The engines' limits: every workload fits, under the run's batch, token budget and runtime flags."""
    runtime = {name: getattr(args, name) for name in BuildConfig.RUNTIME_FIELDS if getattr(args, name) is not None}
    max_input_len = max(w.max_input_len for w in workloads)
    return BuildConfig(max_batch_size=min(args.max_batch_size, max(w.num_requests for w in workloads)),
                       max_seq_len=max(w.max_seq_len for w in workloads), max_input_len=max_input_len,
                       max_num_tokens=max(args.max_num_tokens, max_input_len), **runtime)


def _bench_source(args, device, workloads, ceilings, source, hf_model, system_configs: list,
                  build_config: BuildConfig, scratch: list) -> list[BenchResult]:
    """The baseline and each kiln system on one source; dirs to delete at the end go on `scratch`."""
    results = []
    print(TABLE_HEADER, flush=True)
    if hf_model is not None:
        for w in workloads:
            if isinstance(w, DatasetWorkload):
                print(f"# no transformers baseline for {w.name}: transformers' generate gives every request of a "
                      "batch the same output length, and a dataset's requests each have their own", flush=True)
                continue
            results.append(hf_offline(hf_model, w))
            print(results[-1].row(), flush=True)
        del hf_model
        _release(device)
    systems = {}
    for label, quant in system_configs:
        first_own = len(scratch)
        try:
            engine_dir = build_engine(source, args, quant, build_config, device, scratch)
            system_results, systems[label] = bench_system(label, engine_dir, workloads, device, ceilings,
                                                          args.profile)
            results += system_results
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            print(f"# {label}: not run, the disk filled while its checkpoint or engine was written ({error}). A "
                  "quantized system writes both, each up to the model's size, beside the source; bench fewer layers "
                  "(--synthetic-layers) or point TMPDIR and KILN_CACHE_DIR at a larger disk", flush=True)
        for path in scratch[first_own:]:  # (before the next system's engine takes the disk)
            shutil.rmtree(path, ignore_errors=True)
    ratios = speed_ratios(results)
    print_results(results, ratios)
    save_report(args, run_report(describe_device(device), results, bandwidth_bytes_per_s=ceilings["bandwidth"],
                                 matmul_flops_per_s=ceilings["flops"]["bf16"],
                                 matmul_flops_per_s_by_format=ceilings["flops"], systems=systems, ratios=ratios))
    return results


def print_results(results: list[BenchResult], ratios: list[dict] = ()) -> None:
    """The closing table, and the speed ratios."""
    print(TABLE_HEADER)
    for r in results:
        print(r.row())
    if ratios:
        print(RATIO_HEADER)
        for ratio in ratios:
            print(f"| {ratio['system']} | {ratio['workload']} | {ratio['over']} | {ratio['ratio']:.2f}x |")


def run_report(device: str, results: list[BenchResult], **fields) -> dict:
    """The JSON report of a run: where, when, which commit and command, the results, and `fields`."""
    return {"device": device, "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
            "command": "kiln " + " ".join(sys.argv[1:]), "settings": kiln_settings(), **fields,
            "results": [asdict(r) for r in results]}


def save_report(args, report: dict) -> None:
    """--output-json and --plot."""
    if args.output_json:
        write_json_atomic(Path(args.output_json), report)
    if args.plot:
        from kiln.bench.plot import plot_results

        plot_results(report, args.plot)


def prepare_source(args, device):
    """(source path, transformers model or None): a synthetic model is built on the device and saved."""
    import tempfile

    if args.synthetic:
        hf_model = synthetic_hf_model(args.synthetic, getattr(torch, args.dtype), device, args.synthetic_layers)
        source = tempfile.mkdtemp(prefix=f"kiln-bench-{args.synthetic}-")
        hf_model.save_pretrained(source)
        return source, None if args.baseline == "none" else hf_model
    source = Path(args.model)
    is_hf = (source / "config.json").is_file() and "format_version" not in json.loads(
        (source / "config.json").read_text())
    if args.baseline == "none":
        return source, None
    if not is_hf:  # (the default asks for the baseline: say why there is none rather than leave it out in silence)
        print(f"# no transformers baseline: {source} is not a Hugging Face dir (transformers runs only those); "
              "bench the HF dir the engine was built from to get one, or pass --baseline none", flush=True)
        return source, None
    import transformers

    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    return source, transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)


def kiln_settings() -> dict[str, str]:
    """The KILN_* environment variables of this run (runtime switches such as KILN_STEP_RUN_AHEAD): a result
    says what it ran with."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("KILN_")}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}"
