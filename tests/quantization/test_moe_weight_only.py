"""Weight-only quantization of a mixture of experts: W8A16 and W4A16 quantize the stacked expert weights too
(each expert as a dense layer of the format), through quantize -> checkpoint -> from_checkpoint -> build -> run,
against transformers with every weight replaced by its dequantization (reference.py), and sharded over tensor and
expert parallelism."""

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import kiln
from kiln.config import QuantConfig
from kiln.errors import ConfigError
from kiln.kernels import triton_available
from kiln.mapping import Mapping
from kiln.models.base import PretrainedModel
from kiln.models.mixtral.model import MixtralForCausalLM
from kiln.quantization.fp8 import search_scales
from kiln.quantization.fp8_block import quantize_fp8_groups_weight
from kiln.quantization.weight_only import quantize_int4_groups, quantize_int8_per_channel
from reference import dequantize_experts, dequantized_hf, is_decoder_linear, linear_tensors
from conftest import hf_greedy, leftovers

# intermediate 64: whole groups of 32 for proj's inputs, on one rank and on two
TINY_MIXTRAL = dict(vocab_size=127, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_local_experts=4,
                    num_experts_per_tok=2, tie_word_embeddings=False)
CONFIGS = {
    "W8A16": QuantConfig(quant_algo="W8A16"),
    "W4A16_g32": QuantConfig(quant_algo="W4A16", group_size=32),
    "W4A16_g32_zp": QuantConfig(quant_algo="W4A16", group_size=32, has_zero_point=True),
    # e4m3 experts with 16-bit inputs; attention kept float so the reference needs no activation quantization
    "FP8_experts": QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN", exclude_modules=("lm_head", "attention.*")),
    # e4m3 experts with a scale per row and group of 32 inputs
    "FP8_block_experts": QuantConfig(quant_algo="FP8_BLOCK_SCALES", group_size=32,
                                     exclude_modules=("lm_head", "attention.*")),
}
ROW_SCALED = ("W8A16", "FP8_experts")  # a scale an output row, [experts, out, 1]
FP8_EXPERTS = ("FP8_experts", "FP8_block_experts")  # e4m3 codes, attention kept float
IDS = torch.tensor([[1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8]])
EXPERTS = "transformer.layers.1.mlp.experts."


@pytest.fixture(scope="module")
def hf_mixtral(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "hf"
    torch.manual_seed(0)
    hf = tf.MixtralForCausalLM(tf.MixtralConfig(**TINY_MIXTRAL)).eval()
    hf.save_pretrained(out)
    return out, hf


@pytest.fixture(scope="module", params=list(CONFIGS))
def quantized(request, hf_mixtral, tmp_path_factory):
    """(config name, checkpoint dir) of the tiny Mixtral under each config."""
    out = tmp_path_factory.mktemp("moe_" + request.param)
    return request.param, PretrainedModel.quantize(hf_mixtral[0], out / "q", CONFIGS[request.param])


def test_expert_codes_are_each_experts_rows_rounded_to_nearest(hf_mixtral, quantized):
    name, ckpt_dir = quantized
    qc = CONFIGS[name]
    t = linear_tensors(load_file(ckpt_dir / "rank0.safetensors"), EXPERTS + "proj")
    source = hf_mixtral[1].model.layers[1].mlp.experts.down_proj.detach()  # [experts, hidden, inter]
    for e in range(4):
        if name == "W8A16":
            q, s = quantize_int8_per_channel(source[e], torch.float32)
            assert torch.equal(t["weight"][e], q) and torch.equal(t["weights_scaling_factor"][e, :, 0], s)
        elif name == "FP8_experts":
            q, s = search_scales(source[e].float(), torch.float32)
            assert torch.equal(t["weight"][e].view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(t["weights_scaling_factor"][e, :, 0], s)
        elif name == "FP8_block_experts":
            q, s = quantize_fp8_groups_weight(source[e], qc.group_size, torch.float32)
            assert torch.equal(t["weight"][e].view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(t["weights_scaling_factor"][e], s)
        else:
            packed, s, z = quantize_int4_groups(source[e], qc.group_size, qc.has_zero_point, torch.float32)
            assert torch.equal(t["weight"][e], packed) and torch.equal(t["weights_scaling_factor"][e], s)
            assert (z is None) == ("zero_point" not in t) and (z is None or torch.equal(t["zero_point"][e], z))
    w = dequantize_experts(t, qc.group_size)  # int: within half a step of its group's scale (a clamped zero: a step)
    if name in FP8_EXPERTS:  # e4m3: within half its 3-bit mantissa's step, or of its smallest subnormal
        scale = t["weights_scaling_factor"].repeat_interleave(qc.group_size if name == "FP8_block_experts" else 64, -1)
        assert ((w - source).abs() <= source.abs() * 2 ** -4 + scale * 2 ** -10).all()
        return
    step = t["weights_scaling_factor"].repeat_interleave(qc.group_size if name != "W8A16" else 64, dim=-1)
    assert ((w - source).abs() <= step * (1 if qc.has_zero_point else 0.5) + 1e-6).all()


def assert_logits_equal_dequantized_transformers(hf, ckpt_dir) -> None:
    """The checkpoint's logits within 1e-4 of transformers' on its dequantized weights (and its norms and router),
    and not within it of the float model's: the comparison would see a model that was not quantized."""
    ckpt = load_file(ckpt_dir / "rank0.safetensors")
    model = PretrainedModel.from_checkpoint(ckpt_dir)
    with torch.no_grad():
        ours, ref, full = model(IDS), dequantized_hf(hf, ckpt, model.config)(IDS).logits, hf(IDS).logits
    assert (ours - ref).abs().max() <= 1e-4
    assert (ours - full).abs().max() > 1e-4


def test_logits_equal_transformers_with_dequantized_experts(hf_mixtral, quantized):
    ckpt_dir = quantized[1]
    assert load_file(ckpt_dir / "rank0.safetensors")[EXPERTS + "fc.weight"].dtype in (torch.int8, torch.uint8,
                                                                                      torch.float8_e4m3fn)
    assert_logits_equal_dequantized_transformers(hf_mixtral[1], ckpt_dir)


def test_qwen3_moe_logits_equal_transformers_with_dequantized_experts(tmp_path):
    """Another family: Qwen3-MoE (q/k norms, normalized top-2 of 4 experts of 32), int4 with zero points."""
    torch.manual_seed(1)
    config = tf.Qwen3MoeConfig(vocab_size=127, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, num_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                               tie_word_embeddings=False)
    hf = tf.Qwen3MoeForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    qc = QuantConfig(quant_algo="W4A16", group_size=32, has_zero_point=True)
    ckpt_dir = PretrainedModel.quantize(tmp_path / "hf", tmp_path / "q", qc)
    ckpt = load_file(ckpt_dir / "rank0.safetensors")
    assert ckpt[EXPERTS + "gate.weight"].dtype == torch.uint8
    assert_logits_equal_dequantized_transformers(hf, ckpt_dir)


@pytest.mark.parametrize("algo", ["W8A16", "W4A16", "W4A16_AWQ"])
def test_qwen2_moe_with_a_shared_expert_logits_equal_transformers_with_dequantized_weights(tmp_path, algo):
    """Qwen2-MoE: a sigmoid-gated shared expert (a dense gated MLP, quantized as any) beside the routed experts;
    under AWQ it shares the experts' scale, which its fc and gate take as their input scale and its sigmoid gate
    in its float weight, as the router does."""
    torch.manual_seed(2)
    config = tf.Qwen2MoeConfig(vocab_size=127, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=32, shared_expert_intermediate_size=64,
                               tie_word_embeddings=False)
    hf = tf.Qwen2MoeForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    ckpt_dir = PretrainedModel.quantize(tmp_path / "hf", tmp_path / "q", QuantConfig(quant_algo=algo, group_size=32))
    ckpt = load_file(ckpt_dir / "rank0.safetensors")
    assert ckpt["transformer.layers.1.mlp.shared_expert.proj.weight"].dtype in (torch.int8, torch.uint8)
    assert ckpt[EXPERTS + "proj.weight"].dtype in (torch.int8, torch.uint8)
    if algo == "W4A16_AWQ":
        layer = hf.model.layers[1]
        s = layer.post_attention_layernorm.weight.detach() / ckpt["transformer.layers.1.post_layernorm.weight"]
        torch.testing.assert_close(ckpt["transformer.layers.1.mlp.shared_expert_gate.weight"],
                                   layer.mlp.shared_expert_gate.weight.detach() * s, rtol=1e-5, atol=1e-6)
    assert_logits_equal_dequantized_transformers(hf, ckpt_dir)


@pytest.mark.parametrize("algo", ["W4A16", "W4A16_AWQ"])
def test_glm4_moe_logits_equal_transformers_with_dequantized_weights(tmp_path, algo):
    """GLM-4.5: a sigmoid router that chooses by a balance bias within groups, an ungated shared expert, a dense
    first layer; under AWQ the router's float weight takes the norm's scale (its float32 logits unchanged)."""
    torch.manual_seed(3)
    config = tf.Glm4MoeConfig(vocab_size=127, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=4,
                              num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, n_group=2,
                              topk_group=1, routed_scaling_factor=1.5, first_k_dense_replace=1, use_qk_norm=True,
                              attention_bias=True, tie_word_embeddings=False)
    hf = tf.Glm4MoeForCausalLM(config).eval()
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.weight.normal_(0, 0.3)  # (transformers starts routers and their bias at zero)
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    ckpt_dir = PretrainedModel.quantize(tmp_path / "hf", tmp_path / "q", QuantConfig(quant_algo=algo, group_size=32))
    ckpt = load_file(ckpt_dir / "rank0.safetensors")
    assert ckpt["transformer.layers.1.mlp.shared_expert.proj.weight"].dtype == torch.uint8
    assert ckpt[EXPERTS + "proj.weight"].dtype == torch.uint8
    bias = hf.model.layers[1].mlp.gate.e_score_correction_bias
    assert torch.equal(ckpt["transformer.layers.1.mlp.choice_bias"], bias)  # (float: it only chooses)
    assert_logits_equal_dequantized_transformers(hf, ckpt_dir)


@pytest.mark.parametrize("algo", ["W8A16", "W4A16", "W4A16_AWQ"])
def test_gpt_oss_logits_equal_transformers_with_dequantized_weights(tmp_path, algo):
    """gpt-oss: its experts' codes beside their float biases (the router's and attention's too, and the sinks),
    the clamped GLU read from the dequantized weights; AWQ's expert scale folds into post_layernorm and the router
    as for any mixture."""
    from conftest import make_tiny_hf

    hf = make_tiny_hf(tmp_path / "hf", tf.GptOssConfig, tf.GptOssForCausalLM, vocab_size=127, hidden_size=64,
                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                      initializer_range=0.2, pad_token_id=None, tie_word_embeddings=False)
    ckpt_dir = PretrainedModel.quantize(tmp_path / "hf", tmp_path / "q", QuantConfig(quant_algo=algo, group_size=32))
    ckpt = load_file(ckpt_dir / "rank0.safetensors")
    assert ckpt[EXPERTS + "fc.weight"].dtype in (torch.int8, torch.uint8)
    assert ckpt[EXPERTS + "fc.bias"].dtype == torch.float32  # (biases stay in the model dtype)
    assert_logits_equal_dequantized_transformers(hf, ckpt_dir)


@pytest.mark.parametrize("algo", ["W8A16", "W4A16", "W4A16_AWQ"])
def test_deepseek_v3_logits_equal_transformers_with_dequantized_weights(tmp_path, algo):
    """DeepSeek-V3: multi-head latent attention's q_b and o_proj quantized like any column- and row-parallel linear,
    its replicated down projections (q_a, kv_a) kept like routers and kv_b (folded into attention) kept too; the
    experts and the shared expert as GLM-4.5's. Under AWQ q_b's scale folds into q_a_norm."""
    torch.manual_seed(4)
    config = tf.DeepseekV3Config(vocab_size=127, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                 n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=32,
                                 q_lora_rank=32, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32,
                                 n_group=2, topk_group=1, first_k_dense_replace=1, tie_word_embeddings=False)
    hf = tf.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        hf.model.layers[1].mlp.gate.weight.normal_(0, 0.3)  # (transformers starts routers and their bias at zero)
        hf.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    ckpt_dir = PretrainedModel.quantize(tmp_path / "hf", tmp_path / "q", QuantConfig(quant_algo=algo, group_size=32))
    ckpt = load_file(ckpt_dir / "rank0.safetensors")
    for name in ("attention.q_b", "attention.dense"):
        assert ckpt[f"transformer.layers.0.{name}.weight"].dtype in (torch.int8, torch.uint8)
    for name in ("attention.kv_a", "attention.kv_b"):
        assert ckpt[f"transformer.layers.0.{name}.weight"].dtype == torch.float32
    if algo == "W4A16_AWQ":  # the norm took the scale
        norm = hf.model.layers[0].self_attn.q_a_layernorm.weight.detach()
        assert not torch.equal(ckpt["transformer.layers.0.attention.q_a_norm.weight"], norm)
    assert_logits_equal_dequantized_transformers(hf, ckpt_dir)


def test_the_engine_holds_exactly_the_formats_size(quantized, tmp_path):
    """Issue 4's memory line on a mixture of experts: every decoder linear (attention's, and each expert's fc,
    gate and proj) as the format defines it, 1 byte a weight and one scale an output (W8A16) or half a byte and
    a scale (and zero) per group of inputs (W4A16); routers, norms, embedding and lm_head in the model dtype."""
    name, ckpt_dir = quantized
    qc = CONFIGS[name]
    c = PretrainedModel.from_checkpoint(ckpt_dir).config
    h, inter, experts, layers = c.hidden_size, c.moe_intermediate_size, c.moe_num_experts, c.num_hidden_layers
    q, kv = c.num_attention_heads * c.head_size, c.num_key_value_heads * c.head_size
    attention, moe = [(q + 2 * kv, h), (h, q)], [(2 * inter, h), (h, inter)] * experts  # (out, in)
    linears = moe if name in FP8_EXPERTS else attention + moe  # (the FP8 experts' configs keep attention float)
    if name in ROW_SCALED:
        per_layer = sum(o * i + o * 4 for o, i in linears)
    elif name == "FP8_block_experts":
        per_layer = sum(o * i + o * (i // qc.group_size) * 4 for o, i in linears)
    else:
        per_layer = sum(o * i // 2 + o * (i // qc.group_size) * 4 * (1 + qc.has_zero_point) for o, i in linears)
    if name in FP8_EXPERTS:
        per_layer += sum(o * i * 4 for o, i in attention)
    per_layer += (experts * h + 2 * h) * 4  # the router, two norms (float32)
    expected = layers * per_layer + (2 * c.vocab_size * h + h) * 4  # embedding, lm_head, final norm
    model = PretrainedModel.from_checkpoint(ckpt_dir)
    kiln.build(model, kiln.BuildConfig(max_batch_size=1, max_seq_len=32)).save(tmp_path / "engine")
    held = sum(t.numel() * t.element_size() for f in (tmp_path / "engine").glob("*.safetensors")
               for t in load_file(f).values())
    assert held == expected


def test_engine_fuses_the_codes_and_scales_and_greedy_equals_dequantized_transformers(hf_mixtral, quantized,
                                                                                      tmp_path):
    hf = hf_mixtral[1]
    name, ckpt_dir = quantized
    model = PretrainedModel.from_checkpoint(ckpt_dir)
    engine = kiln.build(model, kiln.BuildConfig(max_batch_size=2, max_seq_len=64))
    fused = dict(engine.weights())
    codes = fused["transformer.layers.0.mlp.experts.fc_gate.weight"]
    assert codes.shape == ((4, 128, 64) if name in ROW_SCALED + FP8_EXPERTS else (4, 128, 32))
    assert fused["transformer.layers.0.mlp.experts.fc_gate.weights_scaling_factor"].shape[:2] == (4, 128)
    engine.save(tmp_path / "engine")
    prompt = [1, 17, 5, 99, 42]
    ref = dequantized_hf(hf, load_file(ckpt_dir / "rank0.safetensors"), model.config)
    with kiln.LLM(tmp_path / "engine", device="cpu") as llm:
        out = llm.generate(prompt, kiln.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(ref, prompt, 8)


@pytest.mark.parametrize("moe_tp, moe_ep", [(2, 1), (1, 2)])
def test_rank_files_hold_their_experts_and_slices(hf_mixtral, quantized, tmp_path, moe_tp, moe_ep):
    """Column experts (fc, gate) split their output rows, scales and zeros; the row expert (proj) splits its inputs
    (int4: whole groups) and W8A16 keeps every output's scale on each rank; expert parallelism splits the experts."""
    name, ckpt_dir = quantized
    mapping = Mapping.of(tp_size=2, moe_tp_size=moe_tp, moe_ep_size=moe_ep)
    out = PretrainedModel.quantize(hf_mixtral[0], tmp_path / "q", CONFIGS[name], mapping)
    full = load_file(ckpt_dir / "rank0.safetensors")
    ranks = [load_file(out / f"rank{r}.safetensors") for r in range(2)]
    for tensor_name, tensor in full.items():
        if EXPERTS not in tensor_name:
            continue
        parts = [r[tensor_name] for r in ranks]
        if moe_ep > 1:
            joined = torch.cat(parts, dim=0)
        elif ".proj." in tensor_name and name in ROW_SCALED and tensor_name.endswith("scaling_factor"):
            assert all(torch.equal(p, tensor) for p in parts), tensor_name  # every output's scale on each rank
            continue
        else:
            joined = torch.cat(parts, dim=2 if ".proj." in tensor_name else 1)
        assert torch.equal(joined, tensor), tensor_name


def test_ranks_partial_expert_outputs_sum_to_the_single_rank(hf_mixtral, quantized, tmp_path):
    """Each rank's local experts give a partial sum; added up (the all-reduce, done here in one process) they are
    the single rank's experts' output, for moe_tp = 2 and for moe_ep = 2."""
    name, ckpt_dir = quantized
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(1))
    moe = PretrainedModel.from_checkpoint(ckpt_dir).materialize().transformer.layers["0"].mlp
    with torch.no_grad():
        weights, experts = torch.softmax(moe.router(x), -1).topk(2, dim=-1)
        want = moe.experts(x, experts, weights)
        for moe_tp, moe_ep in ((2, 1), (1, 2)):
            out = PretrainedModel.quantize(hf_mixtral[0], tmp_path / str(moe_ep), CONFIGS[name],
                                           Mapping.of(tp_size=2, moe_tp_size=moe_tp, moe_ep_size=moe_ep))
            ranks = [PretrainedModel.from_checkpoint(out, rank=r).materialize() for r in range(2)]
            got = sum(r.transformer.layers["0"].mlp.experts(x, experts, weights) for r in ranks)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("moe_tp, moe_ep", [(2, 1), (1, 2)])
def test_two_worker_engine_greedy_equals_dequantized_transformers(hf_mixtral, tmp_path, kiln_cache, moe_tp, moe_ep):
    """W4A16 experts split over two worker processes (torch.distributed on gloo): by their inputs' groups
    (moe_tp 2) or by expert (moe_ep 2); the all-reduced partial sums give transformers' tokens on the dequantized
    weights."""
    from kiln.builder import build_checkpoint

    qc = CONFIGS["W4A16_g32_zp"]
    one = PretrainedModel.quantize(hf_mixtral[0], tmp_path / "tp1", qc)
    ckpt = PretrainedModel.quantize(hf_mixtral[0], tmp_path / "tp2", qc,
                                    Mapping.of(tp_size=2, moe_tp_size=moe_tp, moe_ep_size=moe_ep))
    engine = build_checkpoint(ckpt, tmp_path / "engine")
    prompt = [1, 17, 5, 99, 42]
    config = PretrainedModel.from_checkpoint(one).config
    ref = dequantized_hf(hf_mixtral[1], load_file(one / "rank0.safetensors"), config)
    with kiln.LLM(engine, tensor_parallel_size=2, device="cpu") as llm:
        out = llm.generate(prompt, kiln.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(ref, prompt, 8)


def test_excluding_the_experts_keeps_them_float_and_half_of_a_pair_is_refused(hf_mixtral, tmp_path):
    hf_dir = hf_mixtral[0]
    out = PretrainedModel.quantize(hf_dir, tmp_path / "q", QuantConfig(quant_algo="W8A16",
                                                                       exclude_modules=("lm_head", "experts.*")))
    ckpt = load_file(out / "rank0.safetensors")
    assert ckpt[EXPERTS + "fc.weight"].dtype == torch.float32 and EXPERTS + "fc.weights_scaling_factor" not in ckpt
    assert ckpt["transformer.layers.1.attention.qkv.weight"].dtype == torch.int8
    with pytest.raises(ConfigError, match="both or neither.*experts.fc.*experts.gate"):
        PretrainedModel.quantize(hf_dir, tmp_path / "half", QuantConfig(quant_algo="W8A16",
                                                                        exclude_modules=("lm_head", "experts.fc")))
    assert leftovers(tmp_path / "half") == []


def test_int4_group_that_does_not_divide_an_experts_inputs_is_refused(hf_mixtral, tmp_path):
    qc = QuantConfig(quant_algo="W4A16", group_size=128)  # dense layers take a short last group, experts do not
    with pytest.raises(ConfigError, match="group_size.*experts' input features on a rank.*exclude_modules"):
        PretrainedModel.quantize(hf_mixtral[0], tmp_path / "q", qc)
    assert leftovers(tmp_path / "q") == []


@pytest.mark.skipif(not triton_available(), reason="the grouped GEMM on int8 and int4 codes runs on an NVIDIA GPU")
def test_gpu_engine_greedy_equals_dequantized_transformers(hf_mixtral, quantized, tmp_path, monkeypatch):
    """The quantized experts through kiln.kernels.moe on the GPU (float32, so tokens must be identical)."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    hf = hf_mixtral[1]
    ckpt_dir = quantized[1]
    model = PretrainedModel.from_checkpoint(ckpt_dir)
    kiln.build(model, kiln.BuildConfig(max_batch_size=4, max_seq_len=128)).save(tmp_path / "engine")
    ref = dequantized_hf(hf, load_file(ckpt_dir / "rank0.safetensors"), model.config).to("cuda")
    prompts = [[1, 17, 5, 99, 42], list(range(10, 60))]
    greedy = kiln.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with kiln.LLM(tmp_path / "engine", device="cuda") as llm:
        outputs = llm.generate(prompts, greedy)
    for prompt, out in zip(prompts, outputs):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            for _ in range(32):
                ids = torch.cat([ids, ref(ids).logits[:, -1:].argmax(-1)], dim=1)
        assert out.outputs[0].token_ids == ids[0, len(prompt):].tolist()


# ---- pre-quantized MoE checkpoints: AutoAWQ (GEMM) and GPTQ, one tensor set per expert as the hub has them ----

def write_prequantized_moe(hf_dir, out_dir, method: str, group: int = 32):
    """The saved checkpoint in hf_dir with every decoder linear, each expert's too (routers stay float), as an
    AutoAWQ-GEMM or GPTQ checkpoint in out_dir / "q" (packing as tests/quantization/test_import_awq.py writes
    it), and a float checkpoint of the dequantized weights in out_dir / "dequantized"."""
    from test_import_awq import packed_int4

    config = json.loads((hf_dir / "config.json").read_text())
    tensors, dequantized = {}, {}
    for name, p in load_file(hf_dir / "model.safetensors").items():
        if not is_decoder_linear(name):
            tensors[name] = dequantized[name] = p
            continue
        packed, (q, z, s) = packed_int4(p, method, "gptq", group)  # codes [in, out], zeros, scales [groups, out]
        tensors.update({f"{name[: -len('.weight')]}.{leaf}": t for leaf, t in packed.items()})
        dequantized[name] = ((q - z.repeat_interleave(group, 0)) * s.float().repeat_interleave(group, 0)).T
    for sub, state, qc in (("q", tensors, {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group,
                                            "zero_point": True} if method == "awq" else
                            {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": False}),
                           ("dequantized", dequantized, None)):
        (out_dir / sub).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / sub / "model.safetensors"))
        extra = {"quantization_config": qc} if qc else {}
        (out_dir / sub / "config.json").write_text(json.dumps({**config, **extra}))
    return out_dir / "q", out_dir / "dequantized"


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_awq_and_gptq_moe_checkpoints_import_their_experts_as_int4(hf_mixtral, method, tmp_path):
    """Hub AWQ/GPTQ MoE releases (Mixtral-AWQ, Qwen3-MoE-GPTQ) pack each expert's linears like any other: they
    import as W4A16 experts with their own codes, and compute what transformers computes on the dequantized
    weights."""
    quantized, dequantized = write_prequantized_moe(hf_mixtral[0], tmp_path, method)
    model = MixtralForCausalLM.from_hugging_face(quantized, dtype="float32")
    assert model.weight_specs()[EXPERTS + "fc.weight"] == (torch.uint8, (4, 64, 32))
    ref = tf.AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (model(IDS) - ref(IDS).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("quantization_config, algo", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True}, "W4A16_GPTQ"),
])
def test_an_moe_checkpoint_kiln_does_not_import_is_refused_by_name(hf_mixtral, tmp_path, quantization_config, algo):
    """Act-order GPTQ MoE checkpoints (the grouped GEMM reads no permutation): refused from their config, naming
    the formats that do import."""
    quantized, _ = write_prequantized_moe(hf_mixtral[0], tmp_path, "gptq")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"mixture of experts quantized as {algo}.*AWQ, GPTQ without desc_act"):
        MixtralForCausalLM.from_hugging_face(quantized, dtype="float32")


def _output_error(w: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """tr(D H D^T), D the weight's change: the summed squared output error over the inputs H came from."""
    d = (dequantized - w).double()
    return torch.einsum("oi,ij,oj->", d, hessian.double(), d)


def test_gptq_experts_beat_rounding_to_nearest_on_their_own_inputs():
    """gptq_experts_int4 on four experts at once: round to nearest's scales, a smaller output error than its codes
    on each expert's inputs; an expert no token reached is rounded to nearest, and an input none fired keeps its
    weight (rounded to nearest, where a dense layer's GPTQ zeroes it)."""
    from kiln.quantization.gptq import gptq_experts_int4

    g = torch.Generator().manual_seed(3)
    experts, out, inp, group = 4, 48, 96, 32
    w = torch.randn(experts, out, inp, generator=g)
    hessians = torch.zeros(experts, inp, inp)
    for e in (0, 1, 3):  # correlated inputs, as a model's are; expert 2 is never routed to
        x = torch.randn(200, 16, generator=g) @ torch.randn(16, inp, generator=g) + 0.1 * torch.randn(200, inp,
                                                                                                         generator=g)
        x[:, 5] = 0 if e == 3 else x[:, 5]  # an input that never fires for expert 3
        hessians[e] = x.T @ x
    for zero_point in (False, True):
        got = gptq_experts_int4(w, hessians, group, zero_point, torch.float32)
        w_got = dequantize_experts(got, group)
        for e in range(experts):
            packed, s, z = quantize_int4_groups(w[e], group, zero_point, torch.float32)
            nearest = {"weight": packed, "weights_scaling_factor": s, **({"zero_point": z} if zero_point else {})}
            assert torch.equal(got["weights_scaling_factor"][e], s)
            assert not zero_point or torch.equal(got["zero_point"][e], z)
            w_rtn = dequantize_experts({leaf: t[None] for leaf, t in nearest.items()}, group)[0]
            if e == 2:
                assert torch.equal(got["weight"][e], packed)
                continue
            gptq_err, rtn_err = (_output_error(w[e], v, hessians[e]) for v in (w_got[e], w_rtn))
            print(f"expert {e} zero_point={zero_point}: output error GPTQ {gptq_err:.4g}, nearest {rtn_err:.4g}")
            assert gptq_err < 0.8 * rtn_err
        # the dead input: never zeroed, within a step of its weight
        assert ((w_got[3, :, 5] - w[3, :, 5]).abs() <= got["weights_scaling_factor"][3, :, 0] * 1.001).all()
        assert (w_got[3, :, 5] != 0).any()


@pytest.mark.parametrize("algo", ["FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES"])
def test_gptq_rounded_fp8_experts_keep_their_scales_and_logits_equal_dequantized_transformers(hf_mixtral, tmp_path,
                                                                                            algo):
    """--weight-rounding gptq on e4m3 experts: round to nearest's scales (a row's, or a row's group's), GPTQ's codes
    (some off round to nearest's), and the model computes transformers' on its dequantized experts."""
    from kiln.quantization.methods import EXPERT_METHODS

    qc = QuantConfig(quant_algo=algo, group_size=32, weight_rounding="gptq", exclude_modules=("lm_head", "attention.*"))
    ckpt_dir = PretrainedModel.quantize(hf_mixtral[0], tmp_path / "q", qc)
    t = linear_tensors(load_file(ckpt_dir / "rank0.safetensors"), EXPERTS + "proj")
    nearest = EXPERT_METHODS[qc.quant_algo](qc).quantize(hf_mixtral[1].model.layers[1].mlp.experts.down_proj.detach(),
                                                         torch.float32)
    assert t["weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(t["weights_scaling_factor"], nearest["weights_scaling_factor"])
    assert not torch.equal(t["weight"].view(torch.uint8), nearest["weight"].view(torch.uint8))
    assert_logits_equal_dequantized_transformers(hf_mixtral[1], ckpt_dir)
    if algo == "FP8":  # with attention in FP8 too: its static activation scales, none for the weight-only experts
        qc = QuantConfig(quant_algo=algo, weight_rounding="gptq")
        ckpt = load_file(PretrainedModel.quantize(hf_mixtral[0], tmp_path / "all", qc) / "rank0.safetensors")
        assert "transformer.layers.1.attention.qkv.activation_scaling_factor" in ckpt
        assert not any(n.startswith(EXPERTS) and n.endswith("activation_scaling_factor") for n in ckpt)


def test_w4a16_gptq_quantizes_the_experts_by_gptq_and_logits_equal_dequantized_transformers(hf_mixtral, tmp_path):
    """W4A16_GPTQ on a mixture of experts: every expert's Hessians come from the calibration tokens routed to it
    (proj's from act(fc x) * gate x), and its codes from GPTQ in W4A16's expert format (round to nearest's scales):
    the model's logits equal transformers' on the dequantized experts."""
    hf = hf_mixtral[1]
    qc = QuantConfig(quant_algo="W4A16_GPTQ", group_size=32, exclude_modules=("lm_head", "attention.*"))
    ckpt_dir = PretrainedModel.quantize(hf_mixtral[0], tmp_path / "q", qc)
    ckpt = load_file(ckpt_dir / "rank0.safetensors")
    t = linear_tensors(ckpt, EXPERTS + "proj")
    assert t["weight"].dtype == torch.uint8 and "input_permutation" not in t
    source = hf.model.layers[1].mlp.experts.down_proj.detach()
    changed = 0
    for e in range(4):
        packed, s, _ = quantize_int4_groups(source[e], 32, False, torch.float32)
        assert torch.equal(t["weights_scaling_factor"][e], s)
        changed += (t["weight"][e] != packed).sum().item()
    assert changed > 0  # GPTQ moved codes off round to nearest
    assert_logits_equal_dequantized_transformers(hf, ckpt_dir)


def test_w4a16_awq_folds_its_scales_and_logits_equal_dequantized_transformers(hf_mixtral, tmp_path):
    """W4A16_AWQ on a mixture of experts (AutoAWQ's recipe): one scale for every expert's fc and gate folds into
    post_layernorm and multiplies the router's weight (the router's logits stay exact), each expert's proj scale
    folds into its gate rows; the experts are W4A16 codes, and the model's logits equal transformers' on the
    checkpoint's norms, router and dequantized weights."""
    hf = hf_mixtral[1]
    qc = QuantConfig(quant_algo="W4A16_AWQ", group_size=32)
    ckpt_dir = PretrainedModel.quantize(hf_mixtral[0], tmp_path / "q", qc)
    ckpt = load_file(ckpt_dir / "rank0.safetensors")
    t = linear_tensors(ckpt, EXPERTS + "gate")
    assert t["weight"].dtype == torch.uint8 and t["weights_scaling_factor"].shape == (4, 64, 2)
    layer = hf.model.layers[1]
    norm, router = ckpt["transformer.layers.1.post_layernorm.weight"], ckpt["transformer.layers.1.mlp.router.weight"]
    s = layer.post_attention_layernorm.weight.detach() / norm  # the folded scale, one per input channel
    assert not torch.allclose(s, torch.ones_like(s))  # AWQ moved the scale
    torch.testing.assert_close(router, layer.mlp.gate.weight.detach() * s, rtol=1e-5, atol=1e-6)
    # fc: each expert's W s clipped before rounding (search_clip): no group's scale above round to nearest's of
    # W s, and some below it
    fc = linear_tensors(ckpt, EXPERTS + "fc")["weights_scaling_factor"]
    nearest = torch.stack([quantize_int4_groups(w * s, 32, False, torch.float32)[1]
                           for w in layer.mlp.experts.gate_up_proj.detach()[:, :64]])
    assert (fc <= nearest * (1 + 1e-5)).all() and (fc < 0.99 * nearest).any()
    assert_logits_equal_dequantized_transformers(hf, ckpt_dir)


def test_w4a8_awq_on_experts_is_refused_by_name():
    """W4A8 has no expert kernel: refused before any work."""
    from kiln.config import PretrainedConfig
    from kiln.quantization.workflow import check_quant_config

    config = PretrainedConfig(architecture="MixtralForCausalLM", dtype="float32", vocab_size=127, hidden_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_size=16,
                              intermediate_size=64, moe_num_experts=4, moe_top_k=2, moe_intermediate_size=32)
    with pytest.raises(ConfigError, match="W4A8_AWQ does not support mixture-of-experts"):
        check_quant_config(QuantConfig(quant_algo="W4A8_AWQ"), config)
