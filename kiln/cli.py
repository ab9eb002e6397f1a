"""The `kiln` command: each sub-command parses flags into the API's config objects and calls the API.

Flags are named after the config fields they set. Errors print as one line (a traceback with --debug).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time

from kiln.version import __version__

DEFAULT_QUESTION = "What is the capital of France?"


@contextlib.contextmanager
def _tqdm_progress(desc: str):
    """A progress callback (step, total) drawing a bar on stderr (a terminal only). The bar is cleared on
    the way out, so the result or the one-line error that follows starts a clean line."""
    from tqdm import tqdm

    bar = None

    def progress(step: int, total: int):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="rank", file=sys.stderr, leave=False, disable=None)
        bar.n = step
        bar.refresh()
    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def cmd_convert(args) -> None:
    from kiln.checkpoint.convert import convert_checkpoint

    start = time.perf_counter()
    with _tqdm_progress("converting") as progress:
        out = convert_checkpoint(args.model_dir, args.output_dir, args.dtype, args.tp_size, args.pp_size,
                                 args.overwrite, progress=progress, moe_tp_size=args.moe_tp_size,
                                 moe_ep_size=args.moe_ep_size, keep_quantization=args.keep_quantization)
    print(f"wrote kiln checkpoint {out} in {time.perf_counter() - start:.1f}s")


def cmd_quantize(args) -> None:
    from kiln.checkpoint.convert import source_model_class
    from kiln.config import QuantConfig
    from kiln.mapping import Mapping
    from kiln.quantization.evaluate import REPORT_FILE, algo_label, format_report

    quant_config = QuantConfig(quant_algo=args.quant_algo, kv_cache_quant_algo=args.kv_cache_quant_algo,
                               group_size=args.group_size, has_zero_point=args.has_zero_point,
                               exclude_modules=_exclude_modules(args),
                               smoothquant_alpha=args.smoothquant_alpha,
                               keep_sensitive_layers=args.keep_sensitive_layers,
                               weight_rounding=args.weight_rounding)
    evaluate = args.eval or args.eval_dataset is not None
    start = time.perf_counter()
    model_class = source_model_class(args.model_dir)  # (its quantize: an architecture may override it)
    out = model_class.quantize(args.model_dir, args.output_dir, quant_config, Mapping.of(args.tp_size),
                              calib_dataset=args.calib_dataset, calib_size=args.calib_size,
                              calib_max_seq_len=args.calib_max_seq_len, dtype=args.dtype, overwrite=args.overwrite,
                              evaluate=evaluate, eval_dataset=args.eval_dataset, device=args.device)
    print(f"wrote {algo_label(quant_config.to_dict())} kiln checkpoint {out} in {time.perf_counter() - start:.1f}s")
    if evaluate:
        print(format_report(json.loads((out / REPORT_FILE).read_text())) + f" ({out / REPORT_FILE})")


def _alpha(text: str) -> float | str:
    """--smoothquant-alpha: a number (QuantConfig checks its range) or "auto"."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number in [0, 1] nor 'auto'") from None


def _exclude_modules(args) -> tuple[str, ...]:
    """lm_head (unless --quantize-lm-head), then the --exclude-modules patterns."""
    from kiln.errors import ConfigError
    from kiln.config import exclusions
    from kiln.quantization.methods import is_excluded

    extra = tuple(args.exclude_modules or ())
    if args.quantize_lm_head and is_excluded("lm_head", extra):
        raise ConfigError("--quantize-lm-head and --exclude-modules contradict: a pattern of --exclude-modules "
                          "keeps lm_head in full precision; drop one of them")
    return exclusions(args.quantize_lm_head, extra)


# BuildConfig's fields that have a flag, each None unless given (BuildConfig's default then). A built engine
# keeps the limits it was built with (kiln.llmapi.llm names one asked for) and takes the RUNTIME_FIELDS.
BUILD_CONFIG_FLAGS = ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "tokens_per_block",
                      "kv_cache_free_gpu_mem_fraction", "kv_cache_max_tokens", "decode_steps_per_sync",
                      "max_draft_len", "capacity_scheduler_policy")


def given_build_fields(args) -> dict:
    """The BuildConfig fields whose flags were given."""
    return {name: getattr(args, name) for name in BUILD_CONFIG_FLAGS if getattr(args, name, None) is not None}


def _build_config(args):
    """A BuildConfig of the flags given, the rest at their defaults."""
    from kiln.config import BuildConfig

    return BuildConfig(**given_build_fields(args))


def cmd_build(args) -> None:
    from kiln.builder import build_checkpoint

    start = time.perf_counter()
    with _tqdm_progress("building") as progress:
        out = build_checkpoint(args.checkpoint_dir, args.output_dir, _build_config(args), args.overwrite,
                               progress=progress)
    print(f"wrote engine {out} in {time.perf_counter() - start:.1f}s")


def cmd_run(args) -> None:
    from kiln.llmapi.llm import LLM
    from kiln.runtime.workers import join_torchrun, torchrun_rank

    params = _sampling_params(args)  # (bad settings or a bad schema file refused before the model loads)
    device = args.device
    if torchrun_rank() is not None:  # one of several ranks started by torchrun
        device = join_torchrun(args.engine_dir, _build_config(args))
        if device is None:  # a rank other than 0: it served until rank 0 was done
            return
    with LLM(args.engine_dir, dtype=args.dtype, device=device, build_config=_build_config(args),
             keep_quantization=args.keep_quantization, chat_template=args.chat_template) as llm:
        _generate_to_stdout(llm, args, params)
    if torchrun_rank() is not None:
        from kiln.runtime.distributed import leave_process_group

        leave_process_group()


def _sampling_params(args):
    from kiln.config import read_json
    from kiln.llmapi.sampling_params import SamplingParams

    schema = None if args.json_schema is None else read_json(args.json_schema, "JSON Schema file")
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=args.stop or [],
                          repetition_penalty=args.repetition_penalty, ignore_eos=args.ignore_eos,
                          json_object=args.json, json_schema=schema)


def _generate_to_stdout(llm, args, params) -> None:
    if args.prompt_ids is not None:
        stream = llm.generate_stream(args.prompt_ids, params)
    elif args.prompt is not None:
        stream = llm.generate_stream(args.prompt, params)
    else:
        chat = args.chat if args.chat is not None else DEFAULT_QUESTION
        if args.chat is None:
            print(f"> {chat}", file=sys.stderr)
        stream = llm.generate_stream(None, params, chat=[{"role": "user", "content": chat}])
    shown = ""
    for output in stream:
        text = output.outputs[0].text
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    completion = output.outputs[0]
    if args.prompt_ids is not None:
        print(" ".join(map(str, completion.token_ids)))
    print(f"[{len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}]", file=sys.stderr)


def cmd_serve(args) -> None:
    import asyncio
    from pathlib import Path

    from kiln.llmapi.tokenizer import read_chat_template
    from kiln.serve.server import serve

    template = None if args.chat_template is None else read_chat_template(args.chat_template)  # (before listening)

    def load_engine():
        from kiln.llmapi.llm import LLM
        from kiln.serve.async_llm import AsyncLLM

        llm = LLM(args.path, dtype=args.dtype, device=args.device, build_config=_build_config(args),
                  tensor_parallel_size=args.tp_size, pipeline_parallel_size=args.pp_size,
                  keep_quantization=args.keep_quantization, chat_template=template)
        return AsyncLLM(llm, max_waiting=args.max_waiting)

    if args.served_model_name:
        name = args.served_model_name
    elif args.path:
        name = Path(args.path).name
    else:
        from kiln.default_model import default_model_path

        name = default_model_path().stem
    asyncio.run(serve(load_engine, name, args.host, args.port, args.api_key, args.request_timeout))


def cmd_bench(args) -> None:
    if args.serve:
        from kiln.bench import serve_load

        serve_load.run(args)
    else:
        from kiln.bench import offline

        offline.run(args)


def cmd_inspect(args) -> None:
    from kiln.builder import describe

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    c = info["config"]
    print(f"{info['kind']}: {args.path}")
    kiln_format = f"  kiln format {c['format_version']}" if "format_version" in c else ""
    print(f"  architecture  {c['architecture']}  dtype {c['dtype']}{kiln_format}")
    print(f"  layers {c['num_hidden_layers']}  hidden {c['hidden_size']}  heads {c['num_attention_heads']} "
          f"(kv {c['num_key_value_heads']}, head size {c['head_size']})  ffn {c['intermediate_size']}  "
          f"vocab {c['vocab_size']}")
    print(f"  mapping       {c['mapping']}")
    print(f"  quantization  {c['quantization']}")
    print(f"  lm_head       {_lm_head_format(c['quantization'])}")
    if info["kind"] == "gguf":
        print(f"  tensor types  {info['tensor_types']}")
        keep = info["keep_quantization"]
        print("  --keep-quantization  " + (f"keeps {keep['kept_linears']} linears at 4 bits (W4A16 g32); "
                                          f"{len(keep['full_precision'])} modules stay in full precision"
                                          if "error" not in keep else f"keeps nothing: {keep['error']}"))
    if "build_config" in c:
        print(f"  build_config  {c['build_config']}")
        print(f"  plan          {c['plan']}")
    for name, rank in info["ranks"].items():
        print(f"  {name}: {len(rank['tensors'])} tensors, {rank['bytes'] / 2**20:.1f} MiB")
        if args.tensors:
            for tensor, shape in rank["tensors"].items():
                print(f"    {tensor} {shape}")


def _lm_head_format(quantization: dict) -> str:
    from kiln.config import QuantConfig
    from kiln.quantization.methods import quantizes_lm_head

    qc = QuantConfig.from_dict(quantization)
    return f"quantized ({qc.quant_algo.value})" if quantizes_lm_head(qc) else "full precision"


def _add_keep_quantization_flag(p) -> None:
    p.add_argument("--keep-quantization", action="store_true",
                   help="a .gguf source: keep the linears stored in Q4_0, Q4_1 or Q4_K as int4 (W4A16, group 32, "
                        "their own codes) instead of dequantizing them; an MXFP4 checkpoint (gpt-oss): keep its "
                        "experts as e4m3 codes over their groups' exponents (FP8_BLOCK_SCALES, group 32; exact)")


def _add_build_flags(p) -> None:
    p.add_argument("--max-batch-size", type=int, default=None, help="most sequences in one step (default: 8)")
    p.add_argument("--max-input-len", type=int, default=None, help="longest prompt (default: max_seq_len)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="longest prompt + output (default: the model's max_position_embeddings)")
    p.add_argument("--max-num-tokens", type=int, default=None, help="most tokens in one step (default: 8192)")
    p.add_argument("--tokens-per-block", type=int, default=None, help="tokens in a KV-cache block, a power of two "
                   "(default: 32)")
    _add_runtime_flags(p)


def _add_runtime_flags(p) -> None:
    """BuildConfig's RUNTIME_FIELDS: read when an engine is loaded, so they apply to a built engine too."""
    p.add_argument("--kv-cache-free-gpu-mem-fraction", type=float, default=None, metavar="FRACTION",
                   help="share of the GPU memory left free by the weights that the KV cache takes, in (0, 1] "
                        "(default: 0.9)")
    p.add_argument("--kv-cache-max-tokens", type=int, default=None, metavar="TOKENS",
                   help="size the KV cache for this many tokens instead of by the memory fraction")
    p.add_argument("--decode-steps-per-sync", type=int, default=None,
                   help="greedy decode steps run back to back on the GPU before the host reads their tokens "
                        "(default: 4; 1: token by token)")
    p.add_argument("--max-draft-len", type=int, default=None, metavar="TOKENS",
                   help="speculative decoding by n-gram lookup: greedy requests check up to this many draft tokens, "
                        "copied from their own prompt and output, in each decode step (default: 0, off)")
    # (checked by BuildConfig, whose error names the allowed values: no torch import for --help)
    p.add_argument("--capacity-scheduler-policy", default=None,
                   help="max_utilization (the default): admit a request when its prompt fits, preempt the newest "
                        "when the cache runs out; guaranteed_no_evict: admit one only when its whole output fits "
                        "too, so none is ever preempted")


def port_number(text: str) -> int:
    """--port's type: an integer in 0-65535."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: give an integer in 0-65535")
    return int(text)


def token_ids(text: str) -> list[int]:
    """--prompt-ids' type: comma-separated integers."""
    parts = [t.strip() for t in text.split(",")]
    if not all(t.lstrip("-").isdigit() for t in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of token ids: give integers separated by commas, "
                                         "such as 1,2,3")
    return [int(t) for t in parts]


def make_parser() -> argparse.ArgumentParser:
    from kiln.bench.shapes import FAMILY_SHAPES, LLAMA_SHAPES  # plain tables: cheap to import
    from kiln.bench.workloads import NAMED_WORKLOADS

    parser = argparse.ArgumentParser(prog="kiln", description="Convert, build and run LLM inference engines.")
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("convert", help="convert an HF dir, Meta dir or GGUF file into a kiln checkpoint")
    p.add_argument("--model-dir", required=True, help="source: HF dir, Meta dir or .gguf file (detected)")
    p.add_argument("--output-dir", required=True, help="kiln checkpoint dir to write")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks")
    p.add_argument("--pp-size", type=int, default=1, help="pipeline-parallel stages")
    p.add_argument("--moe-tp-size", type=int, default=None,
                   help="MoE: ranks splitting each expert's intermediate dim (default: tp-size / moe-ep-size)")
    p.add_argument("--moe-ep-size", type=int, default=None,
                   help="MoE: expert-parallel groups the experts are dealt out to (default: tp-size / moe-tp-size, "
                        "else 1); moe-tp-size * moe-ep-size must equal tp-size")
    _add_keep_quantization_flag(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="quantize a source model into a kiln checkpoint (weight-only int8/int4, AWQ, "
                                        "GPTQ, FP8, SmoothQuant W8A8, W4A8 AWQ; KV cache INT8/FP8)")
    p.add_argument("--model-dir", required=True, help="source: HF dir, Meta dir or .gguf file (detected)")
    p.add_argument("--output-dir", required=True, help="kiln checkpoint dir to write")
    p.add_argument("--quant-algo", type=str.upper,
                   metavar="{W8A16,W4A16,W4A16_AWQ,W4A16_GPTQ,W4A8_AWQ,W8A8_SQ_PER_CHANNEL,FP8,"
                           "FP8_PER_CHANNEL_PER_TOKEN,FP8_BLOCK_SCALES}",
                   help="W8A16: per-channel int8; W4A16: group-wise int4 round-to-nearest; W4A16_AWQ: "
                        "int4 with activation-aware scales searched on calibration text; W4A16_GPTQ: int4 rounded "
                        "column by column in act order, each rounding error passed on to the columns left "
                        "(GPTQ, on calibration text); W4A8_AWQ: those AWQ int4 "
                        "weights with FP8 activations; W8A8_SQ_PER_CHANNEL: SmoothQuant int8 weights and per-token "
                        "int8 activations; FP8: e4m3 weights and activations, per-tensor scales from calibration; "
                        "FP8_PER_CHANNEL_PER_TOKEN: per-channel weight and per-token activation scales; "
                        "FP8_BLOCK_SCALES: e4m3 with a scale per group of --group-size inputs, for weights (per "
                        "row) and activations (per token)")
    p.add_argument("--kv-cache-quant-algo", type=str.upper, metavar="{INT8,FP8}",
                   help="KV cache of int8 or float8 (e4m3) codes with per-layer scales calibrated on the "
                        "calibration text: twice the tokens in the same memory; with or without --quant-algo")
    p.add_argument("--group-size", type=int, default=128,
                   help="inputs per scale of int4 and FP8_BLOCK_SCALES: 32, 64 or 128")
    p.add_argument("--has-zero-point", action="store_true", help="int4 with a zero point per group (asymmetric)")
    p.add_argument("--smoothquant-alpha", type=_alpha, default=0.5,
                   help="W8A8_SQ_PER_CHANNEL migration strength in [0, 1]: how much of the activations' range "
                        "moves into the weights; 'auto' searches it per layer input on the calibration text")
    p.add_argument("--exclude-modules", nargs="+", default=None, metavar="PATTERN",
                   help="modules kept in full precision besides lm_head (fnmatch on names or their suffixes)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="quantize lm_head too (by default it stays in full precision): W8A16 int8; W4A16 and "
                        "W4A16_AWQ int4 round-to-nearest (no AWQ search for lm_head); FP8, "
                        "FP8_PER_CHANNEL_PER_TOKEN and FP8_BLOCK_SCALES per-channel weights with per-token "
                        "activations. A tied "
                        "embedding stays in full precision. Not with W8A8_SQ_PER_CHANNEL or W4A8_AWQ")
    p.add_argument("--keep-sensitive-layers", type=int, default=0, metavar="N",
                   help="keep the N decoder layers whose quantization costs the most (KL on the calibration text) "
                        "in full precision; they are added to exclude_modules")
    p.add_argument("--weight-rounding", choices=["nearest", "gptq"], default="nearest",
                   help="FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_BLOCK_SCALES, W4A16_AWQ, W4A8_AWQ: round the weights "
                        "to the nearest code, or by GPTQ's error feedback on the calibration text (the same format "
                        "and scales; less error: docs/quantization.md)")
    p.add_argument("--calib-dataset", default=None,
                   help="calibration text: .txt, or .jsonl with a 'text' field (default: text shipped with kiln)")
    p.add_argument("--calib-size", type=int, default=32, help="calibration windows")
    p.add_argument("--calib-max-seq-len", type=int, default=256, help="tokens per calibration / eval window")
    p.add_argument("--eval", action="store_true", help="report perplexity, KL and top-1 agreement against the "
                   "unquantized model on held-out text (quant_report.json)")
    p.add_argument("--eval-dataset", default=None,
                   help="--eval's held-out text (implies --eval): .txt, or .jsonl with a 'text' field (default: text "
                        "shipped with kiln)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks")
    p.add_argument("--device", default=None,
                   help="torch device that calibrates and quantizes (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("build", help="build an engine from a kiln checkpoint")
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--output-dir", required=True, help="engine dir to write")
    _add_build_flags(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("run", help="generate text (default: SmolLM2-135M-Instruct answers a question)")
    p.add_argument("--engine-dir", "--model", dest="engine_dir", default=None,
                   help="engine dir, kiln checkpoint, HF dir, Meta dir or .gguf (default: the built-in model)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--prompt", help="plain text to continue")
    text.add_argument("--chat", help="a user message, sent through the model's chat template")
    text.add_argument("--prompt-ids", type=token_ids,
                      help="comma-separated token ids; the output's ids are printed too")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than this times the most likely one (0 = off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--ignore-eos", action="store_true")
    structured = p.add_mutually_exclusive_group()
    structured.add_argument("--json", action="store_true",
                            help="JSON mode: the output is one JSON object (tokens that would break it are never "
                                 "sampled)")
    structured.add_argument("--json-schema", metavar="FILE",
                            help="structured output: the output is one value of the JSON Schema in FILE")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype when converting a source model in-process")
    _add_keep_quantization_flag(p)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template (a file, or its text) in place of the model's, for --chat")
    _add_runtime_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="serve a model over the OpenAI API (completions, chat, streaming)")
    p.add_argument("path", nargs="?", default=None,
                   help="engine dir, kiln checkpoint, HF dir, Meta dir or .gguf (default: the built-in model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port, 0-65535 (0: any free one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: PATH's name)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template (a file, or its text) in place of the model's")
    p.add_argument("--tp-size", type=int, default=None, help="tensor-parallel worker processes")
    p.add_argument("--pp-size", type=int, default=None, help="pipeline-parallel stages")
    _add_build_flags(p)
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests allowed to wait for a slot; more are answered 429 with Retry-After")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds before a request is cancelled")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    _add_keep_quantization_flag(p)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="measure throughput and latency (offline, or of a running server)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", "--engine-dir", dest="model", default=None,
                        help="engine dir, checkpoint, HF dir, Meta dir or .gguf")
    source.add_argument("--synthetic", default=None, choices=sorted({**LLAMA_SHAPES, **FAMILY_SHAPES}),
                        help="random weights of a real model shape, built on the device")
    p.add_argument("--synthetic-layers", type=int, default=None, metavar="N",
                   help="with --synthetic: keep the shape's first N decoder layers (a model too big for the GPU "
                        "or its disk, which holds the saved model and one engine at a time)")
    source.add_argument("--serve", default=None, metavar="URL", help="drive a running kiln serve (or any "
                        "OpenAI-compatible server) at --concurrency")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128,
                   help="prompt tokens (words with --serve, unless --token-id-prompts)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (--serve)")
    p.add_argument("--request-rate", type=float, default=None, metavar="PER_S",
                   help="with --serve: requests arrive as a Poisson process at this rate, up to --concurrency in "
                        "flight (default: all at once)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="the requests' sampling temperature (--serve; 0 = greedy, as every offline run)")
    p.add_argument("--token-id-prompts", action="store_true",
                   help="with --serve: prompts of --input-len random token ids, not words (for a model without a "
                        "tokenizer, such as random weights)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto: the checkpoint's dtype; with --synthetic, bfloat16 on a GPU and float32 elsewhere")
    p.add_argument("--device", default=None)
    p.add_argument("--baseline", default="hf", choices=["hf", "none"],
                   help="hf: also run transformers' generate on the same model and workloads (default); none: "
                        "kiln only")
    p.add_argument("--no-baseline", dest="baseline", action="store_const", const="none",
                   help="the same as --baseline none")
    p.add_argument("--workloads", default=None, metavar="NAME[,NAME]",
                   help=f"named workloads: {', '.join(NAMED_WORKLOADS)} (default: batch-1 decode and one of "
                   "--num-requests x --input-len / --output-len)")
    p.add_argument("--workload-file", default=None, help="JSON list of workloads (kiln/bench/workloads.py)")
    p.add_argument("--dataset", default=None, metavar="FILE",
                   help='JSON lines of requests, {"input_ids": [...] or "prompt": TEXT, "output_tokens": N}, as '
                        "trtllm-bench reads (one more workload, of each request's own lengths)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a dir with the model's tokenizer files, for a --dataset of text prompts (default: --model's; "
                        "--serve and --synthetic have none)")
    p.add_argument("--quant-algo", default=None, metavar="ALGO[,ALGO]",
                   help="also bench the model quantized with each algorithm (kiln quantize's --quant-algo)")
    p.add_argument("--kv-cache-quant-algo", default=None, type=str.upper, metavar="KV[,KV]",
                   help="KV cache formats of the quantized systems, each of INT8, FP8 or NONE (the model's "
                        "dtype): one system per --quant-algo and format (alone: one KV-only system per format)")
    p.add_argument("--skip-unquantized", action="store_true", help="bench only the quantized systems")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="quantize lm_head too in the quantized systems (kiln quantize's --quantize-lm-head)")
    p.add_argument("--calib-size", type=int, default=32,
                   help="calibration windows for the quantized systems that calibrate (kiln quantize's --calib-size); "
                        "speed does not depend on them, and fewer make AWQ's and GPTQ's searches on 8B shapes quicker")
    p.add_argument("--max-batch-size", type=int, default=512, help="the engine's running batch ceiling")
    p.add_argument("--max-num-tokens", type=int, default=8192, help="the engine's per-step token budget")
    _add_runtime_flags(p)
    p.add_argument("--profile", action="store_true",
                   help="run each kiln workload again under torch.profiler and print its kernels by GPU time")
    p.add_argument("--output-json", default=None, help="also write the results here")
    p.add_argument("--plot", default=None, metavar="PNG", help="also plot the results (needs matplotlib)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("inspect", help="show what a checkpoint or engine holds")
    p.add_argument("path")
    p.add_argument("--tensors", action="store_true", help="list every tensor and its shape")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kiln.errors import KilnError

    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="kiln: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.func(args)
    except KilnError as e:
        if args.debug:
            raise
        print(f"kiln: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
