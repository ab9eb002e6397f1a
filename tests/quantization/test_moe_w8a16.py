"""W8A16 on a mixture of experts: the stacked expert weights quantized too (int8 codes, a scale per expert and
output row), through quantize -> checkpoint -> from_checkpoint -> build -> run, against transformers with every
weight replaced by its dequantization (reference.py), and sharded over tensor and expert parallelism."""

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import kiln
from kiln.config import QuantConfig
from kiln.errors import ConfigError
from kiln.kernels import triton_available
from kiln.mapping import Mapping
from kiln.models.base import PretrainedModel
from kiln.quantization.weight_only import quantize_int8_per_channel
from reference import dequantize_experts, dequantized_hf, linear_tensors
from conftest import hf_greedy, leftovers

TINY_MIXTRAL = dict(vocab_size=127, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_local_experts=4,
                    num_experts_per_tok=2, tie_word_embeddings=False)
IDS = torch.tensor([[1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8]])
EXPERTS = "transformer.layers.1.mlp.experts."


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(hf_dir, transformers model, W8A16 checkpoint dir) of a tiny Mixtral."""
    out = tmp_path_factory.mktemp("moe_w8a16")
    torch.manual_seed(0)
    hf = tf.MixtralForCausalLM(tf.MixtralConfig(**TINY_MIXTRAL)).eval()
    hf.save_pretrained(out / "hf")
    ckpt = PretrainedModel.quantize(out / "hf", out / "w8a16", QuantConfig(quant_algo="W8A16"))
    return out / "hf", hf, ckpt


def test_expert_codes_are_each_experts_rows_rounded_to_nearest(mixtral):
    _, hf, ckpt_dir = mixtral
    ckpt = load_file(ckpt_dir / "rank0.safetensors")
    t = linear_tensors(ckpt, EXPERTS + "proj")
    assert t["weight"].dtype == torch.int8 and t["weights_scaling_factor"].shape == (4, 64, 1)
    source = hf.model.layers[1].mlp.experts.down_proj.detach()  # [experts, hidden, inter]
    for e in range(4):
        q, s = quantize_int8_per_channel(source[e], torch.float32)
        assert torch.equal(t["weight"][e], q) and torch.equal(t["weights_scaling_factor"][e, :, 0], s)
    w = dequantize_experts(t)  # within half a step of each row's scale
    assert ((w - source).abs() <= t["weights_scaling_factor"] / 2 + 1e-7).all()


def test_logits_equal_transformers_with_dequantized_experts(mixtral):
    _, hf, ckpt_dir = mixtral
    model = PretrainedModel.from_checkpoint(ckpt_dir)
    ckpt = load_file(ckpt_dir / "rank0.safetensors")
    with torch.no_grad():
        ours, ref = model(IDS), dequantized_hf(hf, ckpt, model.config)(IDS).logits
        full = hf(IDS).logits
    assert (ours - ref).abs().max() <= 1e-4
    assert (ours - full).abs().max() > 1e-4  # the comparison would see a model that was not quantized


def test_qwen3_moe_logits_equal_transformers_with_dequantized_experts(tmp_path):
    """Another family: Qwen3-MoE (q/k norms, normalized top-2 of 4 experts of 32)."""
    torch.manual_seed(1)
    config = tf.Qwen3MoeConfig(vocab_size=127, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, num_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                               tie_word_embeddings=False)
    hf = tf.Qwen3MoeForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    ckpt_dir = PretrainedModel.quantize(tmp_path / "hf", tmp_path / "q", QuantConfig(quant_algo="W8A16"))
    ckpt = load_file(ckpt_dir / "rank0.safetensors")
    assert ckpt[EXPERTS + "gate.weight"].dtype == torch.int8
    model = PretrainedModel.from_checkpoint(ckpt_dir)
    with torch.no_grad():
        ours, ref = model(IDS), dequantized_hf(hf, ckpt, model.config)(IDS).logits
        full = hf(IDS).logits
    assert (ours - ref).abs().max() <= 1e-4
    assert (ours - full).abs().max() > 1e-4


def test_engine_fuses_the_codes_and_scales_and_greedy_equals_dequantized_transformers(mixtral, tmp_path):
    _, hf, ckpt_dir = mixtral
    model = PretrainedModel.from_checkpoint(ckpt_dir)
    engine = kiln.build(model, kiln.BuildConfig(max_batch_size=2, max_seq_len=64))
    fused = dict(engine.weights())
    assert fused["transformer.layers.0.mlp.experts.fc_gate.weight"].dtype == torch.int8
    assert fused["transformer.layers.0.mlp.experts.fc_gate.weights_scaling_factor"].shape == (4, 96, 1)
    engine.save(tmp_path / "engine")
    prompt = [1, 17, 5, 99, 42]
    ref = dequantized_hf(hf, load_file(ckpt_dir / "rank0.safetensors"), model.config)
    with kiln.LLM(tmp_path / "engine", device="cpu") as llm:
        out = llm.generate(prompt, kiln.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(ref, prompt, 8)


@pytest.mark.parametrize("tp, moe_tp, moe_ep", [(2, 2, 1), (2, 1, 2)])
def test_rank_files_hold_their_experts_and_slices(mixtral, tmp_path, tp, moe_tp, moe_ep):
    """Column experts (fc, gate) split their output rows and scales; the row expert (proj) splits its inputs and
    keeps every output's scale; expert parallelism splits the experts."""
    hf_dir, _, ckpt_dir = mixtral
    mapping = Mapping.of(tp_size=tp, moe_tp_size=moe_tp, moe_ep_size=moe_ep)
    out = PretrainedModel.quantize(hf_dir, tmp_path / "q", QuantConfig(quant_algo="W8A16"), mapping)
    full = load_file(ckpt_dir / "rank0.safetensors")
    ranks = [load_file(out / f"rank{r}.safetensors") for r in range(tp)]
    for name, tensor in full.items():
        if EXPERTS not in name:
            continue
        parts = [r[name] for r in ranks]
        if moe_ep > 1:
            joined = torch.cat(parts, dim=0)
        elif name.endswith(".proj.weight"):
            joined = torch.cat(parts, dim=2)
        elif ".proj." in name:  # every rank keeps every output's scale
            assert all(torch.equal(p, tensor) for p in parts), name
            continue
        else:
            joined = torch.cat(parts, dim=1)
        assert torch.equal(joined, tensor), name


def test_ranks_partial_expert_outputs_sum_to_the_single_rank(mixtral, tmp_path):
    """Each rank's local experts give a partial sum; added up (the all-reduce, done here in one process) they are
    the single rank's experts' output, for moe_tp = 2 (the row expert's whole scales) and for moe_ep = 2."""
    hf_dir, _, ckpt_dir = mixtral
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(1))
    moe = PretrainedModel.from_checkpoint(ckpt_dir).materialize().transformer.layers["0"].mlp
    with torch.no_grad():
        weights, experts = torch.softmax(moe.router(x), -1).topk(2, dim=-1)
        want = moe.experts(x, experts, weights)
        for kwargs in (dict(moe_tp_size=2, moe_ep_size=1), dict(moe_tp_size=1, moe_ep_size=2)):
            out = PretrainedModel.quantize(hf_dir, tmp_path / str(kwargs["moe_ep_size"]),
                                           QuantConfig(quant_algo="W8A16"), Mapping.of(tp_size=2, **kwargs))
            ranks = [PretrainedModel.from_checkpoint(out, rank=r).materialize() for r in range(2)]
            got = sum(r.transformer.layers["0"].mlp.experts(x, experts, weights) for r in ranks)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_excluding_the_experts_keeps_them_float_and_half_of_a_pair_is_refused(mixtral, tmp_path):
    hf_dir = mixtral[0]
    out = PretrainedModel.quantize(hf_dir, tmp_path / "q", QuantConfig(quant_algo="W8A16",
                                                                       exclude_modules=("lm_head", "experts.*")))
    ckpt = load_file(out / "rank0.safetensors")
    assert ckpt[EXPERTS + "fc.weight"].dtype == torch.float32 and EXPERTS + "fc.weights_scaling_factor" not in ckpt
    assert ckpt["transformer.layers.1.attention.qkv.weight"].dtype == torch.int8
    with pytest.raises(ConfigError, match="both or neither.*experts.fc.*experts.gate"):
        PretrainedModel.quantize(hf_dir, tmp_path / "half", QuantConfig(quant_algo="W8A16",
                                                                        exclude_modules=("lm_head", "experts.fc")))
    assert leftovers(tmp_path / "half") == []


@pytest.mark.skipif(not triton_available(), reason="the grouped GEMM on int8 codes runs on an NVIDIA GPU")
def test_gpu_engine_greedy_equals_dequantized_transformers(mixtral, tmp_path, monkeypatch):
    """The W8A16 experts through kiln.kernels.moe on the GPU (float32, so tokens must be identical)."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    _, hf, ckpt_dir = mixtral
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
