"""The runtime on a CUDA GPU (Triton kernels in the model and in paged attention) against transformers on
the same GPU: float32 tiny models, so greedy tokens must be identical."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hf_model
from kiln.config import BuildConfig
from kiln.kernels import triton_available
from kiln.llmapi.llm import LLM
from kiln.llmapi.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs an NVIDIA GPU with Triton: the fast "
                                "path only exists there")

PROMPTS = [[1, 5, 9, 20, 3], [7, 8, 9], list(range(10, 80))]


def hf_greedy(hf, prompt, n, device):
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, hf(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


def one_then_two_greedy(engine_source) -> list:
    """24 greedy tokens of the first prompt alone, then of the other two together (decode at one and two rows), in
    bf16 on the GPU."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with LLM(engine_source, dtype="bfloat16", device="cuda") as llm:
        return [[o.outputs[0].token_ids for o in llm.generate(prompts, params)]
                for prompts in (PROMPTS[:1], PROMPTS[1:])]


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}


QWEN3_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, head_dim=32)


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("mistral", {"sliding_window": 16}),
                                        ("llama", {"rope_parameters": YARN}), ("qwen3", {"head_dim": 32}),
                                        ("qwen3_moe", QWEN3_MOE)])
def test_gpu_greedy_tokens_equal_transformers(tmp_path, monkeypatch, arch, extra):
    """Issue 3's check: 64 greedy tokens in float32 on the tiny models, transformers' on the same GPU. YaRN's
    attention factor goes into the softmax scale, so its rotation runs in the fused kernels too; Qwen3's q and k
    norms run in the rotary launch, and Qwen3-MoE's routing in its own kernel (kiln.kernels.moe.route)."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    hf = make_hf_model(tmp_path / "hf", arch=arch, **extra).to("cuda")
    greedy = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    with LLM(tmp_path / "hf", device="cuda") as llm:
        outputs = llm.generate(PROMPTS, greedy)
        again = llm.generate(PROMPTS, greedy)
        assert llm.generator.blocks.hit_rate() > 0  # the long prompt's full blocks were reused
        assert llm.runner.graphs is not None and llm.runner.graphs.replays > 0  # decode ran as CUDA graphs
    for prompt, out, out2 in zip(PROMPTS, outputs, again):
        expected = hf_greedy(hf, prompt, 64, "cuda")
        assert out.outputs[0].token_ids == expected
        assert out2.outputs[0].token_ids == expected


GLM4_MOE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.2,
                moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                first_k_dense_replace=1, attention_bias=True, use_qk_norm=True, n_group=4, topk_group=2,
                routed_scaling_factor=2.5)
GEMMA3 = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.2,
              sliding_window=5, query_pre_attn_scalar=24,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                               "full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}})


DEEPSEEK_V3 = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                   n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16,
                   v_head_dim=24, qk_nope_head_dim=32, first_k_dense_replace=1, max_position_embeddings=256,
                   initializer_range=0.2, n_group=4, topk_group=2, routed_scaling_factor=2.5)


GRANITE_MOE = dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, num_local_experts=8,
                   num_experts_per_tok=2, embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0,
                   attention_multiplier=1 / 32)
OLMO3 = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, sliding_window=8,
             layer_types=["sliding_attention"] * 3 + ["full_attention"])


GPT_OSS = dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.2,
               num_local_experts=8, num_experts_per_tok=4, sliding_window=8, pad_token_id=None)


SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.2, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)
FAMILIES = {  # (config class, model class, kwargs) by transformers' names
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", GLM4_MOE),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA3),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", DEEPSEEK_V3),
    "granite_moe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", GRANITE_MOE),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", OLMO3),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", GPT_OSS),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM",  # q/k norms over all heads, half the head rotates
                   dict(SMALL, num_local_experts=8, num_experts_per_tok=2, rotary_dim=16)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM",  # parallel blocks, windows, rotary-free global layers
                dict(SMALL, sliding_window=8, layer_types=["sliding_attention"] * 3 + ["full_attention"])),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(SMALL)),  # sandwich norms, partial interleaved rotary
}


def make_family_hf(out_dir, family: str):
    """A random tiny transformers model of one of FAMILIES, saved to out_dir (float32)."""
    import transformers as tf
    from conftest import make_tiny_hf

    config_cls, model_cls, config = FAMILIES[family]
    return make_tiny_hf(out_dir, getattr(tf, config_cls), getattr(tf, model_cls), **config)


def transformers_rotates_part_of_minimax_heads() -> bool:
    """Whether this transformers reads MiniMax-M2's `rotary_dim` (half the head rotates, as its checkpoints were
    trained): transformers 5.17 and earlier rotated the whole head (huggingface/transformers#48241, fixed by
    #48486); kiln rotates rotary_dim, as 5.25 does."""
    from transformers import MiniMaxM2Config

    return MiniMaxM2Config(rotary_dim=64, head_dim=128).rope_parameters.get("partial_rotary_factor") == 0.5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gpu_family_greedy_tokens_equal_transformers(tmp_path, monkeypatch, family):
    """On the GPU in float32, 64 greedy tokens as transformers' (see below): GLM-4.5 (its sigmoid routing in one
    kernel: 4 groups, 2 kept, a balance bias, weights scaled; a partial rotary; q/k norms), Gemma 3 (q/k norms
    scaling by 1 + w inside the rotary launch; sliding and global layers of their own rope), DeepSeek-V3 (latent
    attention: one 48-wide cached row a token, its key and its value), Granite MoE (its four multipliers), OLMo 3
    (norms after the sub-blocks, q/k norms over all heads, sliding layers) and gpt-oss (attention sinks in every
    paged kernel, experts with biases and the clamped GLU in both MoE kernels), MiniMax-M2, Command R7B and
    GLM-4. The tokens to match are transformers' on the CPU, kiln's reference. MiniMax-M2 needs a transformers that
    rotates only rotary_dim of each head: the device's 5.17 rotates all of it, on the CPU and the GPU alike (fortieth
    session; the thirty-ninth took its tokens for a CUDA-path difference)."""
    if family == "minimax_m2" and not transformers_rotates_part_of_minimax_heads():
        pytest.skip("this transformers rotates MiniMax-M2's whole head, ignoring rotary_dim (transformers#48241, "
                    "fixed in #48486): no oracle here; kiln's CPU parity test holds it to a transformers with the fix")
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    hf = make_family_hf(tmp_path / "hf", family)
    greedy = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    with LLM(tmp_path / "hf", device="cuda") as llm:
        outputs = llm.generate(PROMPTS, greedy)
    for prompt, out in zip(PROMPTS, outputs):  # transformers on the CPU: see the docstring
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 64, "cpu")


def test_warming_lm_head_at_load_runs_every_row_count_and_changes_no_token(tmp_path, monkeypatch):
    """KILN_WARM_LM_HEAD (on by default): the engine runs lm_head at 1..max_batch_size rows while it loads, so
    no step meets a new row count's first GEMM (which waits for the GPU's queue); the tokens are transformers'."""
    from kiln.runtime.model_runner import ModelRunner

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KILN_WARM_LM_HEAD", "1")
    hf = make_hf_model(tmp_path / "hf").to("cuda")
    rows_seen = []
    warm = ModelRunner._warm_lm_head

    def counted(self, max_rows):
        lm_head = self.model.lm_head.forward
        self.model.lm_head.forward = lambda x: rows_seen.append(x.shape[0]) or lm_head(x)
        try:
            warm(self, max_rows)
        finally:
            del self.model.lm_head.forward
    monkeypatch.setattr(ModelRunner, "_warm_lm_head", counted)
    with LLM(tmp_path / "hf", device="cuda", build_config=BuildConfig(max_batch_size=8)) as llm:
        out = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert rows_seen == list(range(1, 9))
    for prompt, o in zip(PROMPTS, out):
        assert o.outputs[0].token_ids == hf_greedy(hf, prompt, 16, "cuda")


def test_cuda_graphs_leave_room_for_one_max_seq_len_sequence(tmp_path, monkeypatch):
    # A cache of exactly one max_seq_len sequence: the graphs' scratch block must not come out of it, or a
    # sequence that grows to max_seq_len preempts itself and never fits again.
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    hf = make_hf_model(tmp_path / "hf").to("cuda")
    bc = BuildConfig(max_seq_len=64, max_input_len=16, tokens_per_block=16, kv_cache_max_tokens=64)
    with LLM(tmp_path / "hf", device="cuda", build_config=bc) as llm:
        assert llm.runner.graphs is not None and llm.generator.blocks.num_blocks == 4
        out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(hf, PROMPTS[0], 64 - len(PROMPTS[0]), "cuda")


def test_decode_bursts_in_graphs_equal_single_steps(tmp_path, monkeypatch):
    """Greedy decode bursts (the graph feeds its argmax to the next step) give the tokens of one step at a
    time, for sequences that end mid-burst at different lengths, and leave no block behind; with the next burst
    queued before the last is read (run ahead) or not. One sequence crosses into a block reserved for a run-ahead
    burst: the graphs take its grown table."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    make_hf_model(tmp_path / "hf")
    prompts = PROMPTS + [[3] * 33, [4, 4]]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (5, 7, 13, 40, 22)]
    tokens = {}
    for steps, run_ahead in ((1, "0"), (4, "0"), (4, "1")):
        monkeypatch.setenv("KILN_DECODE_RUN_AHEAD", run_ahead)
        bc = BuildConfig(max_batch_size=8, max_seq_len=128, decode_steps_per_sync=steps)
        with LLM(tmp_path / "hf", device="cuda", build_config=bc) as llm:
            tokens[steps, run_ahead] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            assert llm.runner.graphs.replays > 0
            assert (llm.generator.executor.bursts_run_ahead > 0) == (run_ahead == "1")
            assert not llm.generator.blocks.tables and llm.generator.blocks.usage() == 0
    assert tokens[4, "0"] == tokens[1, "0"] and tokens[4, "1"] == tokens[1, "0"]
    assert [len(t) for t in tokens[4, "1"]] == [5, 7, 13, 40, 22]


def test_short_prompts_and_prefix_hits_run_their_prefill_as_cuda_graphs(tmp_path, monkeypatch):
    """A fresh prompt of up to 256 tokens, or one continuing a cached prefix by a few tokens, replays a prefill
    graph padded up to the next captured size: its greedy tokens equal transformers' for new-token counts inside
    and between the sizes, with a sliding window, and a continuation longer than the largest size runs
    eagerly."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    hf = make_hf_model(tmp_path / "hf", arch="mistral", sliding_window=48, max_position_embeddings=512).to("cuda")
    prefix = [(7 * i) % 128 for i in range(64)]  # two full 32-token blocks, cached by the first request
    bc = BuildConfig(max_batch_size=4, max_seq_len=512)
    with LLM(tmp_path / "hf", device="cuda", build_config=bc) as llm:
        graphs = llm.runner.prefill_graphs
        assert graphs is not None and graphs.sizes == [16, 32, 64, 128, 256]
        first = prefix + [1]  # 65 fresh tokens: padded to 128
        out = llm.generate([first], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
        assert graphs.replays == 1
        assert out.outputs[0].token_ids == hf_greedy(hf, first, 8, "cuda")
        for new, replayed in ((2, 1), (17, 1), (64, 1), (255, 1), (300, 0)):
            prompt = prefix + [(5 * i + new) % 128 for i in range(new)]
            before, hits = graphs.replays, llm.generator.blocks.prefix_hit_tokens
            out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
            assert llm.generator.blocks.prefix_hit_tokens - hits == 64, new
            assert graphs.replays - before == replayed, new
            assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 8, "cuda"), new


def test_speculative_decoding_on_the_gpu_gives_transformers_greedy_tokens(tmp_path, monkeypatch):
    """n-gram drafts checked on the GPU in float32, each draft token a decode row of its own: one sequence's steps
    replay the decode graphs (a batch-1 engine captures them up to 1 + max_draft_len rows), three sequences' run
    eagerly; the tokens are transformers' greedy ones either way, and sampled requests check drafts too."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    hf = make_hf_model(tmp_path / "hf").to("cuda")
    greedy = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    with LLM(tmp_path / "hf", device="cuda", build_config=BuildConfig(max_batch_size=1, max_draft_len=4)) as llm:
        executor, graphs = llm.generator.executor, llm.runner.graphs
        assert graphs.sizes == [1, 2, 4, 5]
        alone = llm.generate(PROMPTS[:1], greedy)
        assert executor.accepted_draft_tokens > 0 and graphs.replays >= executor.speculative_steps
    with LLM(tmp_path / "hf", device="cuda", build_config=BuildConfig(max_batch_size=4, max_draft_len=4)) as llm:
        executor = llm.generator.executor
        together = llm.generate(PROMPTS, greedy)
        steps = executor.speculative_steps
        sampled = llm.generate(PROMPTS, SamplingParams(max_tokens=64, temperature=0.8, seed=1, ignore_eos=True))
        assert executor.speculative_steps > steps and all(len(o.outputs[0].token_ids) == 64 for o in sampled)
        assert not llm.generator.blocks.tables
    assert alone[0].outputs[0].token_ids == hf_greedy(hf, PROMPTS[0], 64, "cuda")
    for prompt, out in zip(PROMPTS, together):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 64, "cuda")


def test_prompt_logprobs_on_the_gpu_equal_transformers(tmp_path, monkeypatch):
    """SamplingParams.prompt_logprobs in float32 on the GPU: each prompt token's logprob as transformers gives it
    (1e-3), through 16-token chunks beside other requests (a mixed step keeps every prompt row's logits), and a
    prompt alone, short enough for a prefill graph, runs eagerly instead (a graph keeps the last row only)."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    hf = make_hf_model(tmp_path / "hf").to("cuda")
    bc = BuildConfig(max_batch_size=4, max_seq_len=256, max_num_tokens=16)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=2)
    with LLM(tmp_path / "hf", device="cuda", build_config=bc) as llm:
        outs = llm.generate(PROMPTS, params)
        replays = llm.runner.prefill_graphs.replays
        outs += llm.generate(PROMPTS[:1], params)
        assert llm.runner.prefill_graphs.replays == replays
    for prompt, out in zip(PROMPTS + PROMPTS[:1], outs):
        with torch.no_grad():
            want = hf(torch.tensor([prompt], device="cuda")).logits[0, :-1].float().log_softmax(-1)
        want = want[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].tolist()
        assert out.prompt_logprobs[0] is None
        assert [e[0] for e in out.prompt_logprobs[1:]] == pytest.approx(want, abs=1e-3)
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 4, "cuda")


REAL_SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=256,
                  rope_theta=500000.0)  # Llama-3-8B layer shapes (two layers), Llama-2 vocab


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-3), ("bfloat16", 2e-2)])
def test_gpu_logits_of_a_real_shape_match_the_reference_path(tmp_path, monkeypatch, dtype, tolerance):
    """Paged Triton attention, fused kernels and decode CUDA graphs against the plain-PyTorch reference
    forward in float32, within `tolerance` of the largest reference logit (issue 3), or within 1.5x the error of
    the reference path itself in `dtype` where that is larger. The second bound is for bf16: on these shapes the
    reference path in bf16, which rounds as transformers does, is itself 1.5-1.9% off float32 (measured on the
    CPU), so 2% alone leaves the GPU's different summation orders no room (it measured 2.19% on one prompt)."""
    from dist_logits_main import PROMPTS as STEP_PROMPTS, steps

    from kiln.builder import Engine
    from kiln.config import BuildConfig
    from kiln.llmapi.llm import open_engine_dir
    from kiln.runtime.model_runner import ModelRunner

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    make_hf_model(tmp_path / "hf", **REAL_SHAPE)
    build_config = BuildConfig(max_batch_size=4, max_seq_len=256, kv_cache_max_tokens=2048)
    engine = Engine.from_dir(open_engine_dir(tmp_path / "hf", dtype, build_config))
    runner = ModelRunner(engine.runtime_model("cuda"), "cuda", engine.build_config)
    reference = Engine.from_dir(open_engine_dir(tmp_path / "hf", "float32", build_config)).runtime_model("cpu")
    reference_in_dtype = Engine.from_dir(open_engine_dir(tmp_path / "hf", dtype, build_config)).runtime_model("cpu")
    for step_index, step in enumerate(steps(build_config.tokens_per_block)):
        got = runner.execute(step).float().cpu()
        for i, prompt in enumerate(STEP_PROMPTS):
            ids = torch.tensor([prompt + ([11 + i] if step_index else [])])
            want = reference(ids)[0, -1]
            noise = (reference_in_dtype(ids)[0, -1].float() - want).abs().max()
            error = (got[i] - want).abs().max()
            assert error <= max(tolerance * want.abs().max(), 1.5 * noise), (dtype, step_index, i, error, noise)
    assert runner.graphs is not None and runner.graphs.replays == 1  # the decode step ran as a graph


def test_fp8_word_gemv_epilogue_gives_the_tokens_of_the_separate_kernels(tmp_path, monkeypatch):
    """An FP8 engine whose GEMVs run on the word kernel (forced: the tests do not time kernels) takes its fc_gate
    GEMV, SiLU-and-mul and the down projection's quantization in one launch, and its QKV GEMV, rotary and the cache
    write in another, at one and two rows: the greedy tokens of the same engine with KILN_GEMV_EPILOGUES=0 (the
    GEMVs, then the SiLU-and-mul and rotary kernels)."""
    from kiln.config import QuantConfig
    from kiln.kernels import gemv, quant_gemm
    from kiln.quantization.workflow import quantize_checkpoint

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs an FP8 GPU (compute capability 8.9+)")
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(gemv, "_fp8_kernel_choice", lambda args: gemv.FP8_WORD_TILES[0])
    make_hf_model(tmp_path / "hf")
    ckpt = quantize_checkpoint(tmp_path / "hf", tmp_path / "fp8", QuantConfig(quant_algo="FP8"), dtype="bfloat16",
                               calib_size=4, calib_max_seq_len=64, device="cuda")
    fused_calls = []
    for module, name in ((gemv, "run_fp8_silu_and_mul"), (quant_gemm, "run_fp8_qkv_rotary")):
        def counted(*args, real=getattr(module, name), name=name):
            fused_calls.append(name)
            return real(*args)
        monkeypatch.setattr(module, name, counted)

    fused = one_then_two_greedy(ckpt)
    assert set(fused_calls) == {"run_fp8_silu_and_mul", "run_fp8_qkv_rotary"}
    fused_calls.clear()
    monkeypatch.setenv("KILN_GEMV_EPILOGUES", "0")
    assert one_then_two_greedy(ckpt) == fused
    assert not fused_calls


def weight_only_tiny_checkpoint(tmp_path, monkeypatch, algo: str):
    """The tiny model quantized to `algo` (W4A16 at group 32, or W8A16) on the GPU, its kernels untuned (one tile
    for every call, so fused and separate kernels sum alike) and their choices cached under tmp_path."""
    from kiln.config import QuantConfig
    from kiln.kernels import quant_gemm
    from kiln.quantization.workflow import quantize_checkpoint

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(quant_gemm, "AUTOTUNE", False)
    make_hf_model(tmp_path / "hf")
    return quantize_checkpoint(tmp_path / "hf", tmp_path / "ckpt", QuantConfig(quant_algo=algo, group_size=32),
                               dtype="bfloat16", device="cuda")


@pytest.mark.parametrize("algo", ["W4A16", "W8A16"])
def test_weight_only_gemv_epilogues_give_the_tokens_of_the_separate_kernels(tmp_path, monkeypatch, algo):
    """At one or two rows a W4A16 or W8A16 engine's fused QKV GEMV also rotates q and k and writes the cache, and
    its fc_gate GEMV applies SiLU-and-mul: greedy tokens, one sequence and two together, equal those of the same
    engine running the GEMV, then the rotary and activation kernels (one tile for all, so the sums agree)."""
    from kiln.kernels import quant_gemm

    ckpt = weight_only_tiny_checkpoint(tmp_path, monkeypatch, algo)
    fused_calls = []
    names = [f"{algo.lower()}_qkv_rotary_matmul", f"{algo.lower()}_silu_and_mul_matmul"]
    for name in names:  # count the calls that fused
        real = getattr(quant_gemm, name)

        def counted(*args, real=real, name=name, **kwargs):
            y = real(*args, **kwargs)
            fused_calls.extend([name] if y is not None else [])
            return y
        monkeypatch.setattr(quant_gemm, name, counted)

    fused = one_then_two_greedy(ckpt)
    assert set(names) <= set(fused_calls)
    fused_calls.clear()
    monkeypatch.setenv("KILN_GEMV_EPILOGUES", "0")
    assert one_then_two_greedy(ckpt) == fused
    assert not fused_calls


def test_w4a16_decode_with_norms_in_the_gemvs_gives_the_logits_of_the_norm_kernels(tmp_path, monkeypatch):
    """A W4A16 engine's decode steps at one and two rows carry the RMSNorms between layers in the int4 GEMVs
    (DecoderLayer.defer_norms: the output projections add the residual and sum its squares, the next GEMV applies
    the 1/rms; only the first layer's input norm and the final norm run as kernels). Its decode logits equal those
    of the same engine with KILN_DEFER_NORMS=0 (the norm kernels) within bf16's rounding (one rounding of each norm
    moves), through prefill and two decode steps."""
    from kiln.builder import Engine
    from kiln.kernels import quant_gemm
    from kiln.llmapi.llm import open_engine_dir
    from kiln.runtime.block_manager import BlockManager
    from kiln.runtime.model_runner import ModelRunner, StepInputs

    build_config = BuildConfig(max_batch_size=2, max_seq_len=128, kv_cache_max_tokens=512)
    engine_dir = open_engine_dir(weight_only_tiny_checkpoint(tmp_path, monkeypatch, "W4A16"), "bfloat16",
                                 build_config)
    pending = []
    real = quant_gemm.w4a16_add_norm_matmul
    monkeypatch.setattr(quant_gemm, "w4a16_add_norm_matmul", lambda *a: pending.append(1) or real(*a))

    def decode_logits(prompts) -> list:
        runner = ModelRunner(Engine.from_dir(engine_dir).runtime_model("cuda"), "cuda", build_config)
        blocks = BlockManager(num_blocks=8, block_size=build_config.tokens_per_block)
        for i, p in enumerate(prompts):
            blocks.allocate(i, p + [0, 0])  # room for two decode tokens
        tables, lens = [blocks.tables[i] for i in range(len(prompts))], [len(p) for p in prompts]
        runner.execute(StepInputs([t for p in prompts for t in p], [i for p in prompts for i in range(len(p))], lens,
                                  [0] * len(prompts), [blocks.slot(i, t) for i, p in enumerate(prompts)
                                                       for t in range(len(p))], tables))
        logits = []
        for step in range(2):
            at = [n + step for n in lens]
            logits.append(runner.execute(StepInputs([11 + step] * len(prompts), at, [1] * len(prompts), at,
                                                    [blocks.slot(i, n) for i, n in enumerate(at)],
                                                    tables)).float().cpu())
        return logits

    for prompts in (PROMPTS[:1], PROMPTS[1:]):
        pending.clear()
        monkeypatch.setenv("KILN_DEFER_NORMS", "1")
        carried = decode_logits(prompts)
        assert pending, "no GEMV began a norm"
        monkeypatch.setenv("KILN_DEFER_NORMS", "0")
        pending.clear()
        kernels = decode_logits(prompts)
        assert not pending
        for got, want in zip(carried, kernels):
            assert (got - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 GEMMs need an Ada or Hopper GPU")
def test_fp8_decode_attention_writing_the_projections_input_gives_the_same_tokens(tmp_path, monkeypatch):
    """KILN_FP8_ATTENTION_CODES (on unless 0): an FP8 engine's decode attention writes its output projection's e4m3
    input (Fp8Rows) where it merges split keys; greedy tokens, one sequence and two together, equal those of the engine
    whose projection quantizes its input itself (one GEMV tile for both, so the sums agree)."""
    from kiln.config import QuantConfig
    from kiln.kernels import gemv, paged_attention
    from kiln.kernels.fp8_quant import Fp8Rows
    from kiln.quantization.workflow import quantize_checkpoint
    from kiln.runtime import paged_batch

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(gemv, "AUTOTUNE", False)
    make_hf_model(tmp_path / "hf")
    ckpt = quantize_checkpoint(tmp_path / "hf", tmp_path / "fp8", QuantConfig(quant_algo="FP8"), dtype="bfloat16",
                               calib_size=4, calib_max_seq_len=64, device="cuda")
    codes_returned = []
    real = paged_attention.paged_decode_attention

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        codes_returned.append(isinstance(out, Fp8Rows))
        return out
    monkeypatch.setattr(paged_batch, "paged_decode_attention", counted)

    monkeypatch.setenv("KILN_FP8_ATTENTION_CODES", "1")
    fused = one_then_two_greedy(ckpt)
    assert any(codes_returned)
    codes_returned.clear()
    monkeypatch.setenv("KILN_FP8_ATTENTION_CODES", "0")
    assert one_then_two_greedy(ckpt) == fused
    assert not any(codes_returned)


def test_steps_queued_ahead_equal_transformers_and_queue_without_a_host_sync(tmp_path, monkeypatch):
    """KILN_STEP_RUN_AHEAD=1 on the GPU: requests joining running ones give transformers' greedy tokens, steps
    were queued ahead, and queuing a mixed step (its inputs to the GPU, the forward, the sampled tokens, a row's
    input filled from the step before) never waits for the GPU: that is what lets the host work while the step
    before runs. Seeded sampled requests draw the same tokens queued ahead as read in turn, decode steps in CUDA
    graphs included."""
    from kiln.runtime.executor import step_inputs

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KILN_STEP_RUN_AHEAD", "1")
    hf = make_hf_model(tmp_path / "hf").to("cuda")
    bc = BuildConfig(max_batch_size=8, max_seq_len=128, max_num_tokens=32)  # long prompts join in chunks
    prompts = PROMPTS + [list(range(5, 65)), [9] * 40]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with LLM(tmp_path / "hf", device="cuda", build_config=bc) as llm:
        outputs = llm.generate(prompts, params)
        assert llm.generator.executor.steps_queued_ahead > 0
        engine, runner = llm.generator, llm.runner
        first = engine.add_request(PROMPTS[0], params)  # its prompt, then (below) its next step beside a new prompt
        step = engine.scheduler.schedule()
        assert [n for _, n in step] == [len(PROMPTS[0])]
        earlier = runner.execute_ahead(step_inputs(step, engine.blocks), [0], [first])  # its token, on the GPU
        first.num_cached, first.num_in_flight = len(PROMPTS[0]), 1  # (as the executor leaves it)
        engine.add_request(list(range(90, 120)), params)  # (a prompt not seen before: no prefix hit)
        step = engine.scheduler.schedule()
        assert [n for _, n in step] == [1, 30]
        inp = step_inputs(step, engine.blocks)
        assert inp.token_ids[0] == -1  # filled on the GPU from `earlier`
        runner.execute_ahead(inp, [0], [first], ([0], [0], earlier))  # (compiles what this step's shapes need)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            tokens = runner.execute_ahead(inp, [0], [first], ([0], [0], earlier))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        expected = hf_greedy(hf, PROMPTS[0], 2, "cuda")
        assert earlier.tolist() == expected[:1] and tokens.tolist() == expected[1:]
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 24, "cuda")
    sampled = [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_tokens=16, seed=i, ignore_eos=True)
               for i in range(len(prompts))]
    tokens = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("KILN_STEP_RUN_AHEAD", setting)
        with LLM(tmp_path / "hf", device="cuda", build_config=bc) as llm:
            tokens[setting] = [o.outputs[0].token_ids for o in llm.generate(prompts, sampled)]
            assert llm.runner.graphs.replays > 0
            assert (llm.generator.executor.steps_queued_ahead > 0) == (setting == "1")
    assert tokens["1"] == tokens["0"]
