"""`kiln bench` end to end on a tiny model (CPU): workloads from a file, a dataset of requests of their own
lengths, the transformers baseline, a quantized system, the JSON report and the plot."""

import errno
import json
import logging
from pathlib import Path

import pytest

from kiln.bench.workloads import NAMED_WORKLOADS, Workload, read_dataset, read_workload_file, select
from kiln.cli import main, make_parser
from kiln.errors import ConfigError


def test_shared_prefix_prompts_share_exactly_the_prefix():
    w = Workload("p", 5, 40, 2, shared_prefix_len=32)
    prompts = w.prompts(vocab_size=1000, seed=3)
    assert all(p[:32] == prompts[0][:32] for p in prompts)
    assert len({tuple(p[32:]) for p in prompts}) == 5 and all(len(p) == 40 for p in prompts)


def test_long_gap_notes_count_the_gaps_past_one_and_a_half_medians_where_they_start_and_end():
    from kiln.bench.offline import long_gap_notes

    # three requests' token times in steps of 0.2 s: the first one's first gap is slow, and one slow step (ending
    # at 2.0) holds back the other two; tokens of a burst share a time (gap 0); 0.29 < 1.5 x 0.2 is not slow
    times = [[0.0, 0.4, 0.6, 0.8, 0.8, 1.0], [1.0, 1.2, 1.4, 2.0, 2.2], [1.2, 1.4, 2.0, 2.29]]
    assert long_gap_notes(times) == {"long_gaps": 3, "long_gaps_first": 1 / 3, "long_gap_ends": 2}
    assert long_gap_notes([[0.0, 0.2, 0.4], [0.5]]) == {}  # none that long
    assert long_gap_notes([[1.0, 1.0, 1.0], []]) == {}  # all tokens of one burst


def test_bad_workloads_are_named(tmp_path):
    with pytest.raises(ConfigError, match="named workloads"):
        select("decode-1,nope", None, 1, 8, 8)
    bad = tmp_path / "w.json"
    bad.write_text(json.dumps([{"name": "x", "num_requests": 1, "input_len": 8, "output_len": 2, "batch": 3}]))
    with pytest.raises(ConfigError, match=r"unknown fields \['batch'\]"):
        read_workload_file(bad)
    bad.write_text(json.dumps([{"name": "x", "input_len": 8}]))
    with pytest.raises(ConfigError, match=r"missing fields \['num_requests', 'output_len'\]"):
        read_workload_file(bad)
    with pytest.raises(ConfigError, match="shared_prefix_len"):
        Workload("x", 1, 8, 2, shared_prefix_len=8)
    assert NAMED_WORKLOADS["prefix-64"].shared_prefix_len == 1024


def write_dataset(path: Path, lengths: list[tuple[int, int]], vocab_size: int = 128) -> Path:
    """A trtllm-bench dataset of distinct random prompts of these (input, output) lengths, as prepare_dataset.py
    writes it: one JSON object a line."""
    import torch

    g = torch.Generator().manual_seed(7)
    path.write_text("".join(json.dumps({"task_id": n, "input_ids": torch.randint(0, vocab_size, (i,), generator=g)
                                        .tolist(), "output_tokens": o}) + "\n" for n, (i, o) in enumerate(lengths)))
    return path


# Lengths of a mixed dataset: the longest request (70 + 5) is not the longest prompt plus the longest output
# (70 + 6); 15 output tokens, not 4 x the mean 3.75 (rounded to 4) = 16; the 70- and 40-token prompts fill whole
# KV blocks (32 tokens), so a warm-up on them would feed the prefix cache.
MIXED = [(70, 5), (9, 3), (40, 6), (17, 1)]


def test_a_dataset_is_read_as_one_workload_of_each_requests_lengths(tmp_path):
    path = write_dataset(tmp_path / "mixed.jsonl", MIXED)
    path.write_text(path.read_text() + "\n")  # a blank line at the end is no request
    w = read_dataset(path)
    assert (w.name, w.num_requests, w.input_len, w.output_len) == ("dataset:mixed", 4, 34, 4)  # the means
    assert w.request_lengths() == MIXED and w.output_lens() == [5, 3, 6, 1]
    assert (w.max_input_len, w.max_seq_len) == (70, 75)
    lines = path.read_text().splitlines()
    assert w.prompts(vocab_size=128) == [json.loads(line)["input_ids"] for line in lines[:4]]
    assert w.length_notes() == {"lengths": "mean", "input_max": 70, "output_max": 6}
    assert select(None, None, 1, 8, 8, dataset=str(path)) == [w]  # alone: no default workloads beside it
    assert [x.name for x in select("decode-1", None, 1, 8, 8, dataset=str(path))] == ["decode-1", "dataset:mixed"]
    fixed = Workload("f", 3, 10, 5)  # a fixed workload answers the same questions
    assert fixed.request_lengths() == [(10, 5)] * 3 and (fixed.max_input_len, fixed.max_seq_len) == (10, 15)
    with pytest.raises(ConfigError, match=rf"{path} line 1: input_ids holds token id \d+, but the model's "
                                          r"vocabulary has 10 ids \(0 to 9\); tokenize"):
        w.prompts(vocab_size=10)


@pytest.mark.parametrize("line,message", [
    ('{"input_ids": [1, 2]', r"line 2: not JSON"),
    ('[1, 2]', r"line 2: a JSON list, not an object"),
    ('{"input_ids": [1, 2]}', r"line 2: missing fields \['output_tokens'\]"),
    ('{"output_tokens": 4}', r"line 2: missing fields \['input_ids'\]"),
    ('{"input_ids": [1], "output_tokens": 4, "max_tokens": 4}', r"line 2: unknown fields \['max_tokens'\]"),
    ('{"prompt": "Hello", "output_tokens": 4}', r'line 2: has a text "prompt", but this run has no tokenizer for it '
                                                r'.* into "input_ids" \(as TensorRT-LLM\'s prepare_dataset.py'),
    ('{"prompt": "Hi", "input_ids": [1], "output_tokens": 4}', r'line 2: has both "input_ids" and a text "prompt"; '
                                                               r'write one of them'),
    ('{"input_ids": [], "output_tokens": 4}', r"line 2: input_ids must be a non-empty list of token ids"),
    ('{"input_ids": [1, -2], "output_tokens": 4}', r"line 2: input_ids must be .* \(integers >= 0\)"),
    ('{"input_ids": [1, 2.0], "output_tokens": 4}', r"line 2: input_ids must be .* \(integers >= 0\)"),
    ('{"input_ids": "1 2", "output_tokens": 4}', r"line 2: input_ids must be a non-empty list"),
    ('{"input_ids": [1], "output_tokens": 0}', r"line 2: output_tokens must be an integer >= 1, got 0"),
    ('{"input_ids": [1], "output_tokens": "8"}', r"line 2: output_tokens must be an integer >= 1, got '8'"),
    ('{"input_ids": [1], "output_tokens": true}', r"line 2: output_tokens must be an integer >= 1, got True"),
])
def test_a_bad_dataset_line_is_named_with_its_field_and_the_fix(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input_ids": [1, 2, 3], "output_tokens": 2}\n' + line + "\n")
    with pytest.raises(ConfigError, match=rf"^{path} {message}") as error:
        read_dataset(path)
    assert "; write" in str(error.value) or "; tokenize" in str(error.value)  # and the fix


def test_text_prompts_are_tokenized_by_the_models_tokenizer(tmp_path):
    """With --model DIR holding tokenizer files, a "prompt" line becomes the ids LLM.generate would make of the
    text (a word-level tokenizer, saved as transformers saves one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["[UNK]", "the", "river", "runs", "cold", "and", "fast"])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]").save_pretrained(tmp_path / "model")
    path = tmp_path / "text.jsonl"
    path.write_text('{"task_id": 0, "prompt": "the river runs cold", "output_tokens": 3}\n'
                    '{"task_id": 1, "input_ids": [5, 6], "output_tokens": 2}\n'
                    '{"task_id": 2, "prompt": "and fast and cold", "output_tokens": 1}\n')
    w = read_dataset(path, tmp_path / "model")
    assert w.prompts(vocab_size=7) == [[1, 2, 3, 4], [5, 6], [5, 6, 5, 4]]
    assert w.request_lengths() == [(4, 3), (2, 2), (4, 1)]
    with pytest.raises(ConfigError, match=r'line 1: has a text "prompt", but this run has no tokenizer.*--tokenizer'):
        read_dataset(path, tmp_path / "no-such-model")
    # `kiln bench --serve URL --dataset F --tokenizer DIR`: the client tokenizes, and sends the ids
    from kiln.bench.serve_load import served_workloads, workload_requests
    from kiln.cli import make_parser

    args = make_parser().parse_args(["bench", "--serve", "http://127.0.0.1:1", "--dataset", str(path),
                                     "--tokenizer", str(tmp_path / "model")])
    (served,) = served_workloads(args)
    assert workload_requests(served) == [([1, 2, 3, 4], 3), ([5, 6], 2), ([5, 6, 5, 4], 1)]


def test_an_empty_or_missing_dataset_is_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match=rf"{empty}: the dataset holds no requests; write one JSON object a line"):
        read_dataset(empty)
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'nope.jsonl'}: cannot read the dataset"):
        read_dataset(tmp_path / "nope.jsonl")


def test_a_dataset_run_gives_each_request_its_own_output_length_and_warms_up_on_other_prompts(
        tiny_llama_session, kiln_cache, tmp_path):
    """The engine is built for the longest request; the timed run sends the file's prompts, each with its own
    max_tokens; the warm-up sends random prompts of the same lengths, so the prefix cache has none of the run's."""
    from kiln.bench.offline import bench_build_config, kiln_offline
    from kiln.llmapi.llm import LLM

    hf_dir, _ = tiny_llama_session
    path = write_dataset(tmp_path / "mixed.jsonl", MIXED)
    w = read_dataset(path)
    config = bench_build_config(make_parser().parse_args(["bench", "--model", str(hf_dir), "--dataset", str(path)]),
                                [w])
    assert (config.max_input_len, config.max_seq_len, config.max_batch_size) == (70, 75, 4)
    llm = LLM(hf_dir, dtype="float32", device="cpu", build_config=config)
    calls, generate = [], llm.generate  # each call kiln_offline makes, and the real engine's outputs

    def recording(prompts, params):
        calls.append((prompts, generate(prompts, params)))
        return calls[-1][1]

    llm.generate = recording
    try:
        r = kiln_offline(llm, w, "kiln")
    finally:
        llm.shutdown()
    *warm_up, (prompts, outputs) = calls
    assert prompts == w.prompts(vocab_size=128)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [5, 3, 6, 1]
    assert r.output_tokens_per_s * r.seconds == pytest.approx(15)
    warm_prompts = [p for part, _ in warm_up for p in part]
    assert [len(p) for p in warm_prompts] == [70, 9, 40, 17]
    assert not {tuple(p) for p in warm_prompts} & set(w.input_ids)
    assert "prefix_cache_hit_rate" not in r.extra  # noted when the run hits the cache: it found none of its prompts
    assert r.extra["lengths"] == "mean" and (r.extra["input_max"], r.extra["output_max"]) == (70, 6)


def test_bench_on_a_dataset_runs_kiln_alone_and_says_its_lengths_are_means(tiny_llama_session, kiln_cache, tmp_path,
                                                                           capsys):
    hf_dir, _ = tiny_llama_session
    path, report_path = write_dataset(tmp_path / "mixed.jsonl", MIXED), tmp_path / "r.json"
    assert main(["bench", "--model", str(hf_dir), "--dataset", str(path), "--dtype", "float32",
                 "--output-json", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "# no transformers baseline for dataset:mixed: transformers' generate gives every request" in out
    (row,) = json.loads(report_path.read_text())["results"]
    assert (row["system"], row["scenario"], row["requests"], row["input_len"], row["output_len"]) == (
        "kiln", "dataset:mixed", 4, 34, 4)
    assert row["extra"]["compute_floor_s"] > 0 and row["extra"]["kv_read_floor_s"] > 0  # outputs of 4 on average
    assert "| kiln | dataset:mixed | 4 | 34 | 4 |" in out and "lengths mean, input_max 70, output_max 6" in out


def test_the_floors_sum_over_each_requests_lengths(tmp_path):
    """A fixed workload's floors are one request's times the count, as before; a dataset's, each request's."""
    from kiln.bench.offline import decode_kv_bytes, floor_notes, prefill_floor_s
    from kiln.config import PretrainedConfig

    config = PretrainedConfig(architecture="LlamaForCausalLM", dtype="bfloat16", vocab_size=100, hidden_size=16,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_size=4,
                              intermediate_size=24)
    rates, bandwidth = {"bf16": 3.0}, 2.0
    assert floor_notes(config, Workload("f", 3, 10, 5), rates, bandwidth, 2) == {
        "compute_floor_s": prefill_floor_s(config, 10, rates) * 3,
        "kv_read_floor_s": decode_kv_bytes(config, 10, 5, 2) * 3 / bandwidth}
    dataset = read_dataset(write_dataset(tmp_path / "d.jsonl", [(10, 1), (4, 3)], vocab_size=100))
    assert floor_notes(config, dataset, rates, bandwidth, 2) == pytest.approx({
        "compute_floor_s": prefill_floor_s(config, 10, rates) + prefill_floor_s(config, 4, rates),
        "kv_read_floor_s": decode_kv_bytes(config, 4, 3, 2) / bandwidth})
    single = read_dataset(write_dataset(tmp_path / "s.jsonl", [(10, 1), (4, 1)], vocab_size=100))
    assert "kv_read_floor_s" not in floor_notes(config, single, rates, bandwidth, 2)  # no decode step reads


def test_decode_kv_bytes_count_each_decode_tokens_reads():
    """One request's decode steps read, per layer, keys and values of every cached token up to their own."""
    from types import SimpleNamespace

    from kiln.bench.offline import decode_kv_bytes
    from kiln.config import KVCacheLayout

    config = SimpleNamespace(num_hidden_layers=3, kv_cache_layout=lambda tp_size: KVCacheLayout(2, 8))
    per_token = 3 * 2 * 2 * 8 * 2  # layers, keys and values, heads, head size, bf16 bytes
    input_len, output_len = 11, 5
    read = sum(position + 1 for position in range(input_len, input_len + output_len - 1))  # outputs 2..5
    assert decode_kv_bytes(config, input_len, output_len, 2) == per_token * read
    assert decode_kv_bytes(config, input_len, 1, 2) == 0  # the only output comes from the prefill
    latent = SimpleNamespace(num_hidden_layers=3, kv_cache_layout=lambda tp_size: KVCacheLayout(1, 72, True))
    assert decode_kv_bytes(latent, input_len, output_len, 2) == 3 * 72 * 2 * read  # one row for keys and values


@pytest.mark.parametrize("algo,quantize_lm_head,linears_format", [
    (None, False, "bf16"), ("W4A16", False, "bf16"), ("W8A16", True, "bf16"), ("FP8", False, "fp8"),
    ("FP8", True, "fp8"), ("FP8_PER_CHANNEL_PER_TOKEN", False, "fp8"), ("W8A8_SQ_PER_CHANNEL", False, "int8")])
def test_the_prefill_floor_runs_the_linears_at_the_rate_of_the_engines_gemm_format(algo, quantize_lm_head,
                                                                                 linears_format):
    """An FP8 engine's floor is its linears at the e4m3 rate, lm_head (unless quantized) and attention at bf16's;
    an algorithm that dequantizes before its GEMM runs at bf16's throughout."""
    from kiln.bench.offline import prefill_floor_s
    from kiln.config import PretrainedConfig, QuantConfig, exclusions

    config = PretrainedConfig(architecture="LlamaForCausalLM", dtype="bfloat16", vocab_size=100, hidden_size=16,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_size=4,
                              intermediate_size=24,
                              quantization=QuantConfig(quant_algo=algo, exclude_modules=exclusions(quantize_lm_head)))
    tokens = 10
    linears = 2 * 2 * (16 * (16 + 2 * 8) + 16 * 16 + 16 * 3 * 24) * tokens  # layers, 2 a weight, qkv o fc_gate proj
    lm_head = 2 * 16 * 100 * tokens
    attention = 2 * 2 * 2 * 16 * tokens * tokens / 2  # layers, QK^T and PV, 2 a multiply-add, the causal half
    rates = {"bf16": 1.0, "fp8": 2.0, "int8": 4.0}
    head_rate = rates[linears_format] if quantize_lm_head else rates["bf16"]
    want = linears / rates[linears_format] + lm_head / head_rate + attention / rates["bf16"]
    assert prefill_floor_s(config, tokens, rates) == pytest.approx(want)


def test_the_prefill_floor_counts_a_mixture_of_experts_top_k_experts_and_latent_attention_absorbed():
    """A token's multiply-adds through a mixture: its top-k experts (three projections each), the shared expert and
    the router, not the dense MLP's width; a dense first layer as dense. Latent attention as it runs: q, kv_a, kv_b
    folded into the query and output, o; scores over the kv_lora + rope row, values over kv_lora."""
    from kiln.bench.offline import prefill_flops_by_part
    from kiln.config import PretrainedConfig

    moe = PretrainedConfig(architecture="Qwen3MoeForCausalLM", dtype="bfloat16", vocab_size=100, hidden_size=16,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_size=4,
                           intermediate_size=64, moe_num_experts=8, moe_top_k=2, moe_intermediate_size=12,
                           moe_shared_expert_intermediate_size=20, moe_dense_layers=(0,))
    attention = 16 * (16 + 2 * 8) + 16 * 16
    dense, routed = 16 * 64 * 3, 2 * 3 * 16 * 12 + 3 * 16 * 20 + 16 * 8
    assert prefill_flops_by_part(moe, 10)["linears"] == 2 * (2 * attention + dense + routed) * 10
    mla = PretrainedConfig(architecture="DeepseekV3ForCausalLM", dtype="bfloat16", vocab_size=100, hidden_size=16,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, head_size=12,
                           intermediate_size=24, mla_kv_lora_rank=8, mla_q_lora_rank=6, mla_rope_head_dim=4,
                           mla_v_head_dim=5)
    q, kv_a, absorbed, o = 16 * 6 + 6 * 4 * 12, 16 * (8 + 4), 4 * (8 + 5) * 8, 4 * 5 * 16
    parts = prefill_flops_by_part(mla, 10)
    assert parts["linears"] == 2 * (q + kv_a + absorbed + o + 16 * 24 * 3) * 10
    assert parts["attention"] == 2 * 4 * (8 + 4 + 8) * 10 * 10 / 2


def test_the_decode_roofline_counts_a_mixture_of_experts_top_k_share_of_its_experts(tmp_path):
    """Batch-1 decode reads every weight once a token, but of the stacked experts only the top-k a token picks."""
    import transformers as tf

    from kiln.bench.offline import decode_weight_bytes
    from kiln.models.llama.model import LLaMAForCausalLM
    from kiln.models.mixtral.model import MixtralForCausalLM

    hf = tf.MixtralForCausalLM(tf.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                num_local_experts=8, num_experts_per_tok=2))
    hf.save_pretrained(tmp_path / "hf")
    model = MixtralForCausalLM.from_hugging_face(tmp_path / "hf", dtype="float32").materialize()
    sizes = {name: p.numel() * 4 for name, p in model.named_parameters()}
    experts = sum(size for name, size in sizes.items() if ".mlp.experts." in name)
    assert experts == 2 * 3 * 8 * 32 * 64 * 4  # layers x projections x experts x hidden x inter x 4 bytes
    assert decode_weight_bytes(model, model.config) == sum(sizes.values()) - experts + experts * 2 // 8
    dense = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4))
    dense.save_pretrained(tmp_path / "dense")
    model = LLaMAForCausalLM.from_hugging_face(tmp_path / "dense", dtype="float32").materialize()
    assert decode_weight_bytes(model, model.config) == sum(p.numel() * 4 for p in model.parameters())


def test_gemm_formats_name_real_algorithms():
    from kiln.bench.offline import GEMM_FORMAT
    from kiln.config import QuantAlgo

    assert set(GEMM_FORMAT) <= {a.value for a in QuantAlgo}


def test_bench_reports_every_system_and_workload(tiny_llama, tmp_path, capsys, monkeypatch):
    hf_dir, _ = tiny_llama
    monkeypatch.setenv("KILN_DECODE_ATTENTION_STREAM", "off")  # a runtime switch: the report says it was set
    workloads = tmp_path / "workloads.json"
    workloads.write_text(json.dumps([
        {"name": "one", "num_requests": 1, "input_len": 8, "output_len": 6},
        {"name": "prefix", "num_requests": 4, "input_len": 40, "output_len": 3, "shared_prefix_len": 32},
    ]))
    report_path, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["bench", "--model", str(hf_dir), "--workload-file", str(workloads), "--dtype", "float32",
                 "--quant-algo", "W8A16", "--output-json", str(report_path), "--plot", str(png)]) == 0
    report = json.loads(report_path.read_text())
    assert report["settings"]["KILN_DECODE_ATTENTION_STREAM"] == "off"
    rows = {(r["system"], r["scenario"]): r for r in report["results"]}
    assert set(rows) == {(s, w) for s in ("transformers", "kiln", "kiln W8A16") for w in ("one", "prefix")}
    for system in ("kiln", "kiln W8A16"):
        info = report["systems"][system]
        assert info["load_to_first_token_s"] > 0 and info["first_load_to_first_token_s"] > 0
        assert info["kv_cache_tokens"] > 0
        assert info["kernel_choices_at_restart"] == {"timed": 0, "from_disk": 0}  # the CPU times no kernel
        assert info["kernel_choices_made"] == {}  # nor keeps a tile
        prefix = rows[(system, "prefix")]
        assert prefix["requests"] == 4 and prefix["extra"]["first_ttft_s"] > 0
        assert prefix["extra"]["follower_alone_ttft_s"] > 0 and "together_over_first" in prefix["extra"]
        # 3 followers find the 32-token prefix cached (one block of the default 32 tokens) of the 4 x 40 prompt
        # tokens looked up
        assert prefix["extra"]["prefix_cache_hit_rate"] == pytest.approx(3 * 32 / (4 * 40))
        assert "of_decode_roofline" in rows[(system, "one")]["extra"]
        assert rows[(system, "one")]["extra"]["kv_read_floor_s"] > 0  # beside its compute floor (6 outputs)
        assert rows[(system, "one")]["extra"]["matmul_after_tflops"] >= 0  # the rate again after the run
        assert rows[(system, "one")]["extra"]["bursts_run_ahead"] == 0  # decoded in bursts; no run-ahead on the CPU
        assert rows[(system, "one")]["extra"]["bursts"] > 0
        assert "preemptions" not in rows[(system, "one")]["extra"]  # noted only when the KV cache ran short
        one = rows[(system, "one")]  # 6 tokens: the first, then 5 steps in (seconds - TTFT)
        assert 0 < one["tpot_s"]["p50"] <= (one["seconds"] - one["ttft_s"]["p50"]) / 5 + 1e-6
    assert report["systems"]["kiln W8A16"]["weight_bytes"] < report["systems"]["kiln"]["weight_bytes"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "| kiln W8A16 | prefix | 4 |" in out
    # every kiln system over transformers, and the quantized engine over the unquantized one, on each workload
    ratios = {(r["system"], r["workload"], r["over"]): r["ratio"] for r in report["ratios"]}
    assert set(ratios) == {("kiln", w, "transformers") for w in ("one", "prefix")} | {
        ("kiln W8A16", w, over) for w in ("one", "prefix") for over in ("transformers", "kiln")}
    for (system, workload, over), ratio in ratios.items():
        speed = rows[(system, workload)]["output_tokens_per_s"] / rows[(over, workload)]["output_tokens_per_s"]
        assert ratio == pytest.approx(speed)
        assert f"| {system} | {workload} | {over} | {ratio:.2f}x |" in out


def test_bench_profile_runs_each_workload_again_under_the_profiler(tiny_llama, tmp_path, capsys):
    """--profile: after a workload's measured row, the same workload under torch.profiler, its operators by time
    (kernels by GPU time on a GPU); the measured row comes first and is not the profiled run."""
    hf_dir, _ = tiny_llama
    workloads = tmp_path / "workloads.json"
    workloads.write_text(json.dumps([{"name": "few", "num_requests": 2, "input_len": 24, "output_len": 3}]))
    assert main(["bench", "--model", str(hf_dir), "--workload-file", str(workloads), "--dtype", "float32",
                 "--baseline", "none", "--profile"]) == 0
    out = capsys.readouterr().out
    row, profile = out.index("| kiln | few | 2 |"), out.index("# profile of kiln few:")
    assert row < profile and "CPU operators" in out[profile:]
    table = out[profile:].splitlines()
    assert any("aten::" in line for line in table)  # the engine's operators, with their times


@pytest.mark.parametrize("argv,baseline", [([], "hf"), (["--baseline", "none"], "none"), (["--no-baseline"], "none"),
                                           (["--baseline", "hf"], "hf")])
def test_bench_baseline_flag(argv, baseline):
    assert make_parser().parse_args(["bench", "--synthetic", "llama-3-8b", *argv]).baseline == baseline


def test_one_system_per_weight_and_kv_cache_format():
    from kiln.bench.offline import quant_systems

    def systems(*argv):
        args = make_parser().parse_args(["bench", "--synthetic", "llama-3.2-1b", *argv])
        return [(label, qc and (qc.quant_algo and qc.quant_algo.value,
                                qc.kv_cache_quant_algo and qc.kv_cache_quant_algo.value))
                for label, qc in quant_systems(args)]

    assert systems("--quant-algo", "FP8", "--kv-cache-quant-algo", "none,fp8") == [
        ("kiln", None), ("kiln FP8", ("FP8", None)), ("kiln FP8 KV FP8", ("FP8", "FP8"))]
    assert systems("--kv-cache-quant-algo", "INT8", "--skip-unquantized") == [("kiln KV INT8", (None, "INT8"))]
    with pytest.raises(ConfigError, match="INT8, FP8 or NONE"):
        systems("--kv-cache-quant-algo", "INT4")


def test_the_notes_column_shows_seconds_as_ms_counts_as_counts_and_fractions_as_percentages():
    from kiln.bench.offline import format_extra

    notes = {"compute_floor_s": 40.0948, "bursts_run_ahead": 0.214, "steps_queued_ahead": 262, "lengths": "mean"}
    assert format_extra(notes) == ("compute_floor 40094.8 ms, bursts_run_ahead 21%, steps_queued_ahead 262, "
                                   "lengths mean")
    assert format_extra({}) == "—"


@pytest.fixture
def tiny_synthetic(tmp_path, monkeypatch):
    """A tiny shape registered as `--synthetic tiny-test` (the real shapes' code path, at 16 GB less a run), temp
    dirs made under one folder, and the engine cache in another; returns (the temp folder, the cache)."""
    import tempfile

    from kiln.bench.shapes import LLAMA_SHAPES

    monkeypatch.setitem(LLAMA_SHAPES, "tiny-test", dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=128))
    scratch, cache = tmp_path / "tmp", tmp_path / "cache"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("KILN_CACHE_DIR", str(cache))
    return scratch, cache


def kiln_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("kiln-"))  # (torch keeps caches there too)


def test_a_synthetic_run_leaves_no_checkpoint_or_engine_behind(tiny_synthetic, tmp_path):
    """--synthetic writes a checkpoint of random weights and builds an engine from it (16 GB each at Llama-3-8B's
    shapes): both are deleted when the run ends."""
    scratch, cache = tiny_synthetic
    workloads = tmp_path / "workloads.json"
    workloads.write_text(json.dumps([{"name": "one", "num_requests": 1, "input_len": 32, "output_len": 2}]))
    assert main(["bench", "--synthetic", "tiny-test", "--workload-file", str(workloads), "--dtype", "float32",
                 "--baseline", "none"]) == 0
    assert kiln_dirs(scratch) == []
    engines = cache / "engines"
    assert not engines.exists() or list(engines.iterdir()) == []


def test_a_system_that_fills_the_disk_is_named_and_the_others_reported(tiny_synthetic, tmp_path, capsys,
                                                                       monkeypatch):
    """A system whose checkpoint or engine fills the disk (DeepSeek-V2-Lite's 31 GB with a KV-cache-only
    quantization, on a 64 GB disk, thirty-ninth session: the run ended in a traceback and the bf16 results before it
    were never saved) is named as not run with the fix, its partial checkpoint deleted; the other systems run and
    the report is saved."""
    from kiln.quantization import workflow

    def disk_full(source, ckpt, *args, **kwargs):
        Path(ckpt).mkdir(parents=True)
        (Path(ckpt) / "rank0.safetensors").write_bytes(b"\0" * 64)  # what it wrote before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(workflow, "quantize_checkpoint", disk_full)
    scratch, _ = tiny_synthetic
    workloads, report_path = tmp_path / "workloads.json", tmp_path / "r.json"
    workloads.write_text(json.dumps([{"name": "one", "num_requests": 1, "input_len": 16, "output_len": 2}]))
    assert main(["bench", "--synthetic", "tiny-test", "--workload-file", str(workloads), "--baseline", "none",
                 "--device", "cpu", "--quant-algo", "W8A16", "--output-json", str(report_path)]) == 0
    assert "# kiln W8A16: not run, the disk filled" in capsys.readouterr().out
    assert {r["system"] for r in json.loads(report_path.read_text())["results"]} == {"kiln"}
    assert kiln_dirs(scratch) == []


def test_a_synthetic_run_takes_the_default_dtype(tiny_synthetic, tmp_path, caplog):
    """--dtype auto (the default) with --synthetic: random weights have no checkpoint dtype to follow, so the run
    takes the real checkpoints' bfloat16 on a GPU and float32 on the CPU (it once failed on torch.auto)."""
    workloads = tmp_path / "workloads.json"
    workloads.write_text(json.dumps([{"name": "one", "num_requests": 1, "input_len": 16, "output_len": 2}]))
    with caplog.at_level(logging.INFO, logger="kiln"):
        assert main(["bench", "--synthetic", "tiny-test", "--workload-file", str(workloads), "--baseline", "none",
                     "--device", "cpu"]) == 0
    assert "KV cache (float32)" in caplog.text


def test_calib_size_sets_the_quantized_systems_calibration(tiny_synthetic, tmp_path, caplog):
    """--calib-size reaches the calibration of a quantized system (AWQ's search on 8B shapes took minutes at 32)."""
    workloads = tmp_path / "workloads.json"
    workloads.write_text(json.dumps([{"name": "one", "num_requests": 1, "input_len": 16, "output_len": 2}]))
    with caplog.at_level(logging.INFO, logger="kiln"):
        assert main(["bench", "--synthetic", "tiny-test", "--workload-file", str(workloads), "--baseline", "none",
                     "--device", "cpu", "--skip-unquantized", "--quant-algo", "W4A16_AWQ", "--calib-size", "3"]) == 0
    assert "W4A16_AWQ: calibrating on 3 x " in caplog.text


def test_synthetic_layers_keep_a_shapes_first_layers(tiny_synthetic, tmp_path, capsys):
    """--synthetic-layers N: a shape too big for the GPU or its disk (Qwen3-30B-A3B's 61 GB) keeps its first N
    layers (and its per-layer lists' first N), the rest of the shape as it is; without --synthetic, or below 1, it is
    refused."""
    import torch

    from kiln.bench.offline import synthetic_hf_model

    model = synthetic_hf_model("qwen3-30b-a3b", torch.float32, torch.device("meta"), layers=2)
    assert model.config.num_hidden_layers == len(model.model.layers) == 2
    assert (model.config.num_experts, model.config.hidden_size) == (128, 2048)
    # a config with a list a layer keeps its first N too (gpt-oss's alternating windows): saved, it validates
    model = synthetic_hf_model("gpt-oss-20b", torch.float32, torch.device("meta"), layers=3)
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    model.config.save_pretrained(tmp_path / "gpt-oss")
    workloads = tmp_path / "workloads.json"
    workloads.write_text(json.dumps([{"name": "one", "num_requests": 1, "input_len": 16, "output_len": 2}]))
    assert main(["bench", "--synthetic", "tiny-test", "--synthetic-layers", "1", "--workload-file", str(workloads),
                 "--baseline", "none", "--device", "cpu", "--output-json", str(tmp_path / "r.json")]) == 0
    assert main(["bench", "--model", str(tmp_path), "--synthetic-layers", "1", "--device", "cpu"]) != 0
    assert "--synthetic-layers 1: keeps the first N >= 1 layers" in capsys.readouterr().err


def test_bad_system_flags_fail_before_any_run(tiny_synthetic, capsys):
    """A bad --quant-algo, KV cache format or build flag is refused before the ceilings, the weights and the
    baseline's run: nothing was measured, and no table was printed."""
    for flags in (["--quant-algo", "W5"], ["--kv-cache-quant-algo", "INT3"],
                  ["--capacity-scheduler-policy", "fast"]):
        assert main(["bench", "--synthetic", "tiny-test", "--workloads", "decode-1", "--device", "cpu", *flags]) != 0
        captured = capsys.readouterr()
        assert "| system |" not in captured.out and "measured copy bandwidth" not in captured.out
        assert flags[1] in captured.err


def test_the_prefix_profile_deletes_its_weights_and_engine_and_nothing_else(tiny_synthetic, monkeypatch, capsys):
    """kiln.bench.profile_prefix (on the CPU here) deletes the random checkpoint and the engine it built; an
    engine already in the cache stays. (profile_decode, which needs a GPU, cleans up the same way.)"""
    from kiln.bench import profile_prefix

    scratch, cache = tiny_synthetic
    users_engine = cache / "engines" / "someone-elses-engine"
    users_engine.mkdir(parents=True)
    monkeypatch.setattr("sys.argv", ["profile_prefix", "--synthetic", "tiny-test", "--prefix-len", "32",
                                     "--suffix-len", "8"])
    profile_prefix.main()
    assert "follower 1: cache hit 32 tokens" in capsys.readouterr().out  # it ran: the prefix was reused
    assert kiln_dirs(scratch) == []
    assert list((cache / "engines").iterdir()) == [users_engine]


def test_a_run_killed_by_sigterm_deletes_its_scratch_dirs(tmp_path):
    """`timeout` ends a run with SIGTERM: inside `scratch_dirs` that becomes SystemExit, so the dirs go anyway and
    the process exits with 128 + 15, as a killed process would. A real process and a real signal."""
    import signal
    import subprocess
    import sys

    scratch = tmp_path / "kiln-bench-scratch"
    code = ("import sys, time\n"
            "from pathlib import Path\n"
            "from kiln.bench.offline import scratch_dirs\n"
            "with scratch_dirs() as dirs:\n"
            f"    Path({str(scratch)!r}).mkdir(); (Path({str(scratch)!r}) / 'weights').write_bytes(b'x' * 1024)\n"
            f"    dirs.append({str(scratch)!r})\n"
            "    print('ready', flush=True)\n"
            "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert scratch.is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert not scratch.exists()


def test_a_source_transformers_cannot_run_says_why_there_is_no_baseline(tiny_llama, tmp_path, capsys):
    from kiln.checkpoint.convert import convert_checkpoint

    ckpt = convert_checkpoint(tiny_llama[0], tmp_path / "ckpt")
    report_path = tmp_path / "r.json"
    assert main(["bench", "--engine-dir", str(ckpt), "--num-requests", "2", "--input-len", "4", "--output-len", "2",
                 "--output-json", str(report_path)]) == 0
    assert f"# no transformers baseline: {ckpt} is not a Hugging Face dir" in capsys.readouterr().out
    assert {r["system"] for r in json.loads(report_path.read_text())["results"]} == {"kiln"}


def test_bench_notes_how_many_draft_tokens_speculative_decoding_took(tiny_llama, tmp_path):
    hf_dir, _ = tiny_llama
    report_path, workloads = tmp_path / "r.json", tmp_path / "workloads.json"
    workloads.write_text(json.dumps([{"name": "two", "num_requests": 2, "input_len": 8, "output_len": 48}]))
    assert main(["bench", "--model", str(hf_dir), "--workload-file", str(workloads), "--dtype", "float32",
                 "--baseline", "none", "--max-draft-len", "4", "--output-json", str(report_path)]) == 0
    (row,) = json.loads(report_path.read_text())["results"]
    assert row["extra"]["draft_tokens"] > 0 and 0 < row["extra"]["draft_acceptance"] <= 1
