"""LLM on tiny random Llama and Mistral models (token-id prompts: they have no tokenizer).

Every expected token comes from transformers' greedy decoding of the same model.
"""

from __future__ import annotations

import json
import shutil

import pytest

from kiln.builder import build
from kiln.checkpoint.convert import convert_checkpoint
from kiln.config import BuildConfig
from kiln.errors import ConfigError, EngineVersionError
from kiln.llmapi.llm import LLM
from kiln.llmapi.sampling_params import SamplingParams
from kiln.models.llama.model import LLaMAForCausalLM
from kiln.version import FORMAT_VERSION

from conftest import TINY_SLIDING_WINDOW, hf_greedy, make_hf_model

pytestmark = pytest.mark.usefixtures("kiln_cache")

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
PROMPTS = [[5, 9, 17], list(range(20, 33)), [100, 3, 64, 12, 7, 7, 1], [42], [8, 1, 90, 60, 33, 2, 11, 4, 4, 70]]


@pytest.fixture(scope="module")
def llama_reference(tiny_llama_session):
    return [hf_greedy(tiny_llama_session[1], p, 32) for p in PROMPTS]


@pytest.fixture
def llama(tiny_llama_session):
    return LLM(tiny_llama_session[0], device="cpu")


def _assert_no_blocks_held(llm) -> None:
    """No sequence holds a KV-cache block: no tables, and every block is free or evictable cached prefix."""
    blocks = llm.generator.blocks
    assert blocks.tables == {}
    assert not any(blocks.refs) and blocks.num_available() == blocks.num_blocks


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_greedy_32_tokens_equal_transformers(arch, tiny_llama_session, tiny_mistral_session):
    hf_dir, hf = tiny_llama_session if arch == "llama" else tiny_mistral_session
    prompt = PROMPTS[1]
    assert len(prompt) + 32 > 2 * TINY_SLIDING_WINDOW  # the Mistral window cuts the context
    out = LLM(hf_dir, device="cpu").generate(prompt, GREEDY)
    assert len(out) == 1
    completion = out[0].outputs[0]
    assert completion.token_ids == hf_greedy(hf, prompt, 32)
    assert completion.finish_reason == "length"
    assert out[0].prompt_token_ids == prompt and out[0].finished


def test_greedy_equals_transformers_generate(tiny_llama_session, llama):
    import torch

    hf = tiny_llama_session[1]
    prompt = PROMPTS[4]
    expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32)
    assert llama.generate(prompt, GREEDY)[0].outputs[0].token_ids == expected[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_batch_of_different_lengths_equals_one_at_a_time(arch, tiny_llama_session, tiny_mistral_session):
    hf_dir, hf = tiny_llama_session if arch == "llama" else tiny_mistral_session
    llm = LLM(hf_dir, device="cpu")
    batched = _tokens(llm.generate(PROMPTS, GREEDY))
    one_by_one = [_tokens(llm.generate(p, GREEDY))[0] for p in PROMPTS]
    assert batched == one_by_one
    assert batched[0] == hf_greedy(hf, PROMPTS[0], 32) and batched[-1] == hf_greedy(hf, PROMPTS[-1], 32)


def test_queued_batch_with_small_limits_gives_the_same_tokens(tiny_llama_session, llama_reference):
    llm = LLM(tiny_llama_session[0], device="cpu", build_config=BuildConfig(max_batch_size=2, max_num_tokens=16))
    assert _tokens(llm.generate(PROMPTS, GREEDY)) == llama_reference


def test_length_at_the_engines_max_seq_len(tiny_llama_session, llama_reference):
    llm = LLM(tiny_llama_session[0], device="cpu", build_config=BuildConfig(max_seq_len=24))
    completion = llm.generate(PROMPTS[1], GREEDY)[0].outputs[0]  # 13 prompt tokens + 11 = 24
    assert completion.token_ids == llama_reference[1][:24 - len(PROMPTS[1])]
    assert completion.finish_reason == "length"


def test_length_at_max_tokens(llama, llama_reference):
    completion = llama.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0].outputs[0]
    assert completion.token_ids == llama_reference[0][:7]
    assert completion.finish_reason == "length"


def test_stop_token_ids(llama, llama_reference):
    expected = llama_reference[2]
    stop = expected[5]
    cut = expected.index(stop)
    completion = llama.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=32,
                                                           stop_token_ids=[stop]))[0].outputs[0]
    assert completion.token_ids == expected[:cut + 1]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)


def test_eos_from_the_model_config_stops_unless_ignore_eos(tmp_path, llama_reference):
    expected = llama_reference[4]
    eos = expected[6]
    hf_dir = tmp_path / "hf_eos"
    hf = make_hf_model(hf_dir, eos_token_id=eos)  # same seed, same weights; only the EOS id differs
    assert hf_greedy(hf, PROMPTS[4], 32) == expected
    llm = LLM(hf_dir, device="cpu")
    stopped = llm.generate(PROMPTS[4], SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    assert stopped.token_ids == expected[:expected.index(eos) + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", eos)
    ignored = llm.generate(PROMPTS[4], GREEDY)[0].outputs[0]
    assert ignored.token_ids == expected and ignored.finish_reason == "length"


def test_every_eos_of_the_generation_config_stops(tmp_path, llama_reference):
    expected = llama_reference[3]
    first, second = expected[9], expected[3]
    hf_dir = tmp_path / "hf_eos"
    make_hf_model(hf_dir, eos_token_id=first)
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [first, second]}))
    completion = LLM(hf_dir, device="cpu").generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=32))
    cut = min(expected.index(first), expected.index(second))
    assert completion[0].outputs[0].token_ids == expected[:cut + 1]


def test_prompt_longer_than_max_input_len_is_a_config_error(tiny_llama_session, llama_reference):
    llm = LLM(tiny_llama_session[0], device="cpu", build_config=BuildConfig(max_input_len=8, max_seq_len=64))
    with pytest.raises(ConfigError, match="max_input_len"):
        llm.generate(list(range(9)), GREEDY)
    assert not llm.generator.has_unfinished()
    assert _tokens(llm.generate(PROMPTS[0], GREEDY)) == [llama_reference[0]]  # the LLM still works


def test_a_bad_prompt_in_a_batch_leaves_no_request_behind(tiny_llama_session, llama_reference):
    llm = LLM(tiny_llama_session[0], device="cpu", build_config=BuildConfig(max_input_len=8, max_seq_len=64))
    with pytest.raises(ConfigError, match="max_input_len"):
        llm.generate([PROMPTS[0], list(range(9))], GREEDY)
    assert not llm.generator.has_unfinished()  # the good prompt's request was withdrawn too
    _assert_no_blocks_held(llm)


def test_n_with_seed_gives_n_reproducible_samples(llama):
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=1234, n=2, ignore_eos=True)
    first = llama.generate(PROMPTS[2], params)[0]
    again = llama.generate(PROMPTS[2], params)[0]
    assert [o.index for o in first.outputs] == [0, 1]
    a, b = (o.token_ids for o in first.outputs)
    assert len(a) == len(b) == 16
    assert a != b  # two samples, not one twice
    assert [o.token_ids for o in again.outputs] == [a, b]
    # The same seed beside other requests, and in a fresh LLM, draws the same tokens.
    beside = llama.generate([PROMPTS[0], PROMPTS[2]], [GREEDY, params])[1]
    assert [o.token_ids for o in beside.outputs] == [a, b]


def test_seeded_sampling_repeats_in_a_new_llm(tiny_llama_session):
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=16, seed=7, ignore_eos=True)
    runs = [LLM(tiny_llama_session[0], device="cpu").generate(PROMPTS[1], params)[0].outputs[0].token_ids
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_generate_stream_grows_to_the_generate_result(llama, llama_reference):
    outputs = list(llama.generate_stream(PROMPTS[1], GREEDY))
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    # one token from the prefill, then greedy decode bursts of decode_steps_per_sync (4) tokens
    assert lengths == [1] + list(range(5, 33, 4)) + [32]
    for o in outputs:
        assert o.outputs[0].token_ids == llama_reference[1][:len(o.outputs[0].token_ids)]
    assert not any(o.finished for o in outputs[:-1])
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"
    assert outputs[-1].outputs[0].token_ids == llama.generate(PROMPTS[1], GREEDY)[0].outputs[0].token_ids


def test_abandoned_stream_frees_its_request(llama):
    stream = llama.generate_stream(PROMPTS[1], GREEDY)
    for _ in range(3):
        next(stream)
    blocks = llama.generator.blocks
    assert len(blocks.tables) == 1 and blocks.num_available() < blocks.num_blocks
    stream.close()
    assert not llama.generator.has_unfinished()
    _assert_no_blocks_held(llama)


def test_llm_accepts_engine_checkpoint_and_hf_dirs(tiny_llama_session, tmp_path, llama_reference):
    hf_dir, _ = tiny_llama_session
    ckpt = convert_checkpoint(hf_dir, tmp_path / "ckpt")
    engine_dir = build(LLaMAForCausalLM.from_hugging_face(hf_dir)).save(tmp_path / "engine")
    for source in (engine_dir, ckpt, hf_dir):
        assert _tokens(LLM(source, device="cpu").generate(PROMPTS[0], GREEDY)) == [llama_reference[0]], source


def _snapshot(cache_dir):
    return {p.relative_to(cache_dir): p.stat().st_mtime_ns for p in cache_dir.rglob("*")}


def test_hf_dir_engine_is_cached_and_reused(tiny_llama_session, kiln_cache, llama_reference):
    hf_dir, _ = tiny_llama_session
    assert not kiln_cache.exists()
    LLM(hf_dir, device="cpu")
    engines = list((kiln_cache / "engines").iterdir())
    assert len(engines) == 1 and (engines[0] / "config.json").is_file()
    assert (engines[0] / "rank0.safetensors").is_file()
    before = _snapshot(kiln_cache)
    llm = LLM(hf_dir, device="cpu")
    assert _snapshot(kiln_cache) == before  # loaded, not rebuilt
    assert _tokens(llm.generate(PROMPTS[0], GREEDY)) == [llama_reference[0]]
    # Another build config is another engine.
    LLM(hf_dir, device="cpu", build_config=BuildConfig(max_seq_len=64))
    assert len(list((kiln_cache / "engines").iterdir())) == 2


def test_cached_engine_of_another_format_is_rebuilt(tiny_llama_session, kiln_cache, llama_reference):
    hf_dir, _ = tiny_llama_session
    LLM(hf_dir, device="cpu")
    (engine_dir,) = (kiln_cache / "engines").iterdir()
    config = json.loads((engine_dir / "config.json").read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (engine_dir / "config.json").write_text(json.dumps(config))
    llm = LLM(hf_dir, device="cpu")
    assert json.loads((engine_dir / "config.json").read_text())["format_version"] == FORMAT_VERSION
    assert _tokens(llm.generate(PROMPTS[0], GREEDY)) == [llama_reference[0]]


def test_engine_dir_of_another_format_is_refused(tiny_llama_session, tmp_path):
    engine_dir = build(LLaMAForCausalLM.from_hugging_face(tiny_llama_session[0])).save(tmp_path / "engine")
    config = json.loads((engine_dir / "config.json").read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (engine_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineVersionError, match="kiln build"):
        LLM(engine_dir, device="cpu")


def test_text_prompt_without_tokenizer_says_to_pass_ids(llama):
    """The message names the files looked for and each way to pass ids; a chat names the template's places."""
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match="token ids") as text:
        llama.generate("hello", GREEDY)
    assert all(part in str(text.value) for part in ("tokenizer.json", "tokenizer.model", "--prompt-ids"))
    with pytest.raises(KilnError, match="no chat template") as chat:
        llama.chat([{"role": "user", "content": "hello"}], GREEDY)
    assert "tokenizer_config.json" in str(chat.value) and "--prompt" in str(chat.value)


def test_sampling_params_are_validated():
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                dict(n=0), dict(repetition_penalty=0)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_a_dtype_for_a_kiln_checkpoint_is_named_as_not_applying(tiny_llama_session, tmp_path, caplog):
    """A kiln checkpoint's dtype was fixed when it was converted: asking for another one says so (it used to be
    ignored in silence), and the run goes on in the checkpoint's own."""
    import logging

    ckpt = convert_checkpoint(tiny_llama_session[0], tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING, logger="kiln"):
        llm = LLM(ckpt, dtype="float16", device="cpu")
    assert "kiln checkpoint of float32: dtype float16 applies only when a source model is converted" in caplog.text
    assert llm.engine.config.dtype == "float32"


def test_a_built_engine_takes_the_runtime_options_asked_for(tiny_llama_session, tmp_path, caplog,
                                                           llama_reference):
    """The KV cache's size, the decode bursts and the admission policy are read at load (BuildConfig's
    RUNTIME_FIELDS): a built engine takes them from the build_config given, and only a limit fixed at build time
    that differs is named as not applying."""
    import logging

    engine_dir = build(LLaMAForCausalLM.from_hugging_face(tiny_llama_session[0]),
                       BuildConfig(max_batch_size=4, max_seq_len=64, tokens_per_block=16)).save(tmp_path / "engine")
    asked = BuildConfig(max_batch_size=4, kv_cache_max_tokens=100, decode_steps_per_sync=1,
                        capacity_scheduler_policy="guaranteed_no_evict")
    with caplog.at_level(logging.WARNING, logger="kiln"):
        llm = LLM(engine_dir, device="cpu", build_config=asked)
    assert "fixed when it was built" not in caplog.text
    assert llm.runner.num_blocks == 7  # 100 tokens in whole blocks of 16
    assert (llm.build_config.decode_steps_per_sync, llm.build_config.capacity_scheduler_policy) == \
        (1, "guaranteed_no_evict")
    assert (llm.build_config.max_batch_size, llm.build_config.max_seq_len) == (4, 64)  # the engine's own
    assert _tokens(llm.generate(PROMPTS[0], GREEDY)) == [llama_reference[0]]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kiln"):
        llm = LLM(engine_dir, device="cpu", build_config=BuildConfig(max_batch_size=6, kv_cache_max_tokens=64))
    assert "max_batch_size 4 (asked: 6) fixed when it was built" in caplog.text
    assert "max_num_tokens" not in caplog.text and "kv_cache" not in caplog.text
    assert (llm.runner.num_blocks, llm.build_config.max_batch_size) == (4, 4)


def test_runtime_options_left_at_their_defaults_keep_the_engines(tiny_llama_session, tmp_path):
    """`kiln run ENGINE --kv-cache-max-tokens N` passes the other flags' defaults: an engine built with one decode
    step per sync keeps it."""
    engine_dir = build(LLaMAForCausalLM.from_hugging_face(tiny_llama_session[0]),
                       BuildConfig(max_seq_len=64, decode_steps_per_sync=1, kv_cache_max_tokens=128)).save(
                           tmp_path / "engine")
    llm = LLM(engine_dir, device="cpu", build_config=BuildConfig(capacity_scheduler_policy="guaranteed_no_evict"))
    bc = llm.build_config
    assert (bc.decode_steps_per_sync, bc.kv_cache_max_tokens, bc.capacity_scheduler_policy) == \
        (1, 128, "guaranteed_no_evict")
    # A memory fraction asked for replaces the engine's token count: the two are alternatives.
    bc = BuildConfig(max_seq_len=64, kv_cache_max_tokens=128).with_runtime_options(
        BuildConfig(kv_cache_free_gpu_mem_fraction=0.5))
    assert (bc.kv_cache_free_gpu_mem_fraction, bc.kv_cache_max_tokens) == (0.5, None)


def test_runtime_options_rebuild_no_cached_engine(tiny_llama_session, kiln_cache):
    """Nor does passing the default config (as `kiln run` and `kiln serve` do) where LLM(path) passed none."""
    hf_dir, _ = tiny_llama_session
    LLM(hf_dir, device="cpu")
    before = _snapshot(kiln_cache)
    llm = LLM(hf_dir, device="cpu", build_config=BuildConfig(kv_cache_max_tokens=512))
    LLM(hf_dir, device="cpu", build_config=BuildConfig())
    assert _snapshot(kiln_cache) == before
    assert llm.runner.num_blocks * llm.build_config.tokens_per_block == 512


def test_a_cached_engine_takes_this_calls_runtime_options_not_its_builders(tiny_llama_session, kiln_cache):
    """The engine cache's key leaves the runtime options out, so an engine built by an earlier call with one
    decode step per sync serves a later call that asks for the default (or nothing) with the default's bursts."""
    hf_dir, _ = tiny_llama_session
    first = LLM(hf_dir, device="cpu", build_config=BuildConfig(decode_steps_per_sync=1, kv_cache_max_tokens=256))
    before = _snapshot(kiln_cache)
    default = BuildConfig().decode_steps_per_sync
    assert default != 1 and first.build_config.decode_steps_per_sync == 1
    for asked in (BuildConfig(decode_steps_per_sync=default), None):
        llm = LLM(hf_dir, device="cpu", build_config=asked)
        assert (llm.build_config.decode_steps_per_sync, llm.build_config.kv_cache_max_tokens) == \
            (default, BuildConfig().kv_cache_max_tokens)
    assert _snapshot(kiln_cache) == before  # (the same engine, not rebuilt)


def test_copy_of_an_hf_dir_gets_its_own_cache_entry(tiny_llama_session, tmp_path, kiln_cache):
    # The cache key is the source's path and files: a copy elsewhere builds its own engine.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_session[0], copy)
    LLM(tiny_llama_session[0], device="cpu")
    LLM(copy, device="cpu")
    assert len(list((kiln_cache / "engines").iterdir())) == 2


def test_outputs_carry_token_times_for_latency_metrics(tiny_llama_session, kiln_cache):
    hf_dir, _ = tiny_llama_session
    llm = LLM(hf_dir)
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    times = out.outputs[0].token_times
    assert len(times) == 5 and times == sorted(times)
    assert out.ttft() is not None and out.ttft() >= 0
    arrivals = sorted(set(times))  # a burst of decode steps read at once arrives at one time
    assert out.inter_token_latencies() == [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert all(x > 0 for x in out.inter_token_latencies())


def test_inter_token_latencies_are_the_gaps_between_arrivals():
    """Tokens that arrive together (a decode burst) make one gap, not zeros: p50 ITL was 0.0 ms offline."""
    from kiln.llmapi.sampling_params import CompletionOutput, RequestOutput

    times = [1.0, 1.5, 1.5, 1.5, 1.5, 2.5, 2.5]
    out = RequestOutput(0, None, [1], [CompletionOutput(0, "", list(range(7)), None, None, None, times)], True, 0.5)
    assert out.inter_token_latencies() == [0.5, 1.0]
    assert out.time_per_output_token() == 1.5 / 6 and out.ttft() == 0.5


def test_the_runtime_takes_its_cuda_graph_sizes_from_the_engine_plan(tiny_llama_session, tmp_path):
    """The batch sizes and prefill token counts of the CUDA graphs are chosen at build time and recorded in the
    engine's plan; the runtime captures what the plan says (graphs run on a GPU only; the choice is made anywhere)."""
    engine_dir = build(LLaMAForCausalLM.from_hugging_face(tiny_llama_session[0]),
                       BuildConfig(max_batch_size=8, max_seq_len=64)).save(tmp_path / "engine")
    config = json.loads((engine_dir / "config.json").read_text())
    assert LLM(engine_dir, device="cpu").runner.graph_batch_sizes == config["plan"]["cuda_graph_batch_sizes"]
    config["plan"].update(cuda_graph_batch_sizes=[1, 3, 8], cuda_graph_prefill_tokens=[16])
    (engine_dir / "config.json").write_text(json.dumps(config))
    runner = LLM(engine_dir, device="cpu").runner
    assert (runner.graph_batch_sizes, runner.graph_prefill_tokens) == ([1, 3, 8], [16])


def test_a_dropped_llm_frees_its_model_and_kv_cache(tiny_llama_session):
    """LLM freezes the objects alive when it opens (gc.freeze): a cycle through the LLM itself would then never be
    collected, and a closed engine's GPU memory would stay taken until the process ends (kiln bench opens one
    engine after another in one process: the next found 10 GiB of an H100 free)."""
    import gc
    import weakref

    hf_dir, _ = tiny_llama_session
    llm = LLM(hf_dir, build_config=BuildConfig(max_draft_len=2))
    llm.generate([[5, 9, 17]], SamplingParams(max_tokens=8, temperature=0.7, seed=1))
    dropped = weakref.ref(llm), weakref.ref(next(iter(llm.runner.kv.k.values())))
    llm.shutdown()
    del llm
    gc.collect()
    assert [ref() for ref in dropped] == [None, None]
