"""Quantizing lm_head (opt-in: exclude_modules without "lm_head"): quantize -> checkpoint -> from_checkpoint ->
build -> run against transformers whose lm_head (and linears) are replaced by the checkpoint's dequantization
(written out in reference.py / act_reference.py), tied embeddings, TP=2 shards of an odd vocab, the algorithms
that refuse it, the CLI flag, and (GPU only) a Llama-3-8B-shaped quantized lm_head through the CUDA kernels.

The tiny Llama here has a vocab of 127: odd, so TP=2 pads one row on the last rank."""

import json

import pytest
import torch
from act_reference import dequantized_weight, fake_quant_hf, is_searched_scale
from conftest import hf_greedy, leftovers, make_hf_model
from reference import QUANT_LLAMA, dequantized_hf, linear_tensors, rtn_int4, unpack
from safetensors.torch import load_file

import kiln
from kiln.builder import build_checkpoint
from kiln.cli import main
from kiln.config import QuantConfig
from kiln.errors import ConfigError
from kiln.mapping import Mapping
from kiln.models.base import PretrainedModel

VOCAB = 127
IDS = torch.tensor([[1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8]])
# name -> (config, the dtype of lm_head.weight in the checkpoint)
CONFIGS = {
    "W8A16": (QuantConfig(quant_algo="W8A16", exclude_modules=()), torch.int8),
    "W4A16_g32": (QuantConfig(quant_algo="W4A16", group_size=32, exclude_modules=()), torch.uint8),
    "W4A16_g32_zp": (QuantConfig(quant_algo="W4A16", group_size=32, has_zero_point=True, exclude_modules=()),
                     torch.uint8),
    "W4A16_AWQ_g64": (QuantConfig(quant_algo="W4A16_AWQ", group_size=64, exclude_modules=()), torch.uint8),
    "FP8": (QuantConfig(quant_algo="FP8", exclude_modules=()), torch.float8_e4m3fn),
}
WEIGHT_ONLY = ("W8A16", "W4A16_g32", "W4A16_g32_zp", "W4A16_AWQ_g64")


def _quantize(hf_dir, out, qc, mapping=None):
    # On the CPU also where there is a GPU: the expected codes below are computed on the CPU, and CUDA divides
    # by a scalar through its reciprocal, which can move a code that sits on a rounding boundary.
    return PretrainedModel.quantize(hf_dir, out, qc, mapping, calib_size=4, calib_max_seq_len=32, device="cpu")


@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("odd_llama") / "hf"
    return hf_dir, make_hf_model(hf_dir, vocab_size=VOCAB, **QUANT_LLAMA)


@pytest.fixture(scope="module")
def quantized(odd_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_head")
    return {name: _quantize(odd_llama[0], out / name, qc) for name, (qc, _) in CONFIGS.items()}


def _reference(hf, ckpt, config):
    """transformers with the checkpoint's dequantized weights and the format's activation quantization."""
    return (dequantized_hf if config.quantization.quant_algo.value in ("W8A16", "W4A16", "W4A16_AWQ")
            else fake_quant_hf)(hf, ckpt, config)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers_with_a_dequantized_lm_head(odd_llama, quantized, name):
    hf = odd_llama[1]
    ckpt = load_file(quantized[name] / "rank0.safetensors")
    head = linear_tensors(ckpt, "lm_head")
    assert head["weight"].dtype == CONFIGS[name][1] and head["weights_scaling_factor"].shape[0] == VOCAB
    model = PretrainedModel.from_checkpoint(quantized[name])
    without_head = {k: v for k, v in ckpt.items() if not k.startswith("lm_head.")}
    with torch.no_grad():
        ours = model(IDS)
        ref = _reference(hf, ckpt, model.config)(IDS).logits
        float_head = _reference(hf, without_head, model.config)(IDS).logits  # the same model, lm_head in float
    # float32 summation (the reference sums the same products in another order; FP8's in float64)
    bound = 1e-4 * max(1.0, ref.abs().max().item())
    assert (ours - ref).abs().max() <= bound
    assert (ours - float_head).abs().max() > 10 * bound  # an lm_head left in full precision would fail here


@pytest.mark.parametrize("name", ["W4A16_g32_zp", "W4A16_AWQ_g64"])
def test_lm_head_codes_are_round_to_nearest_of_the_source_with_no_awq_scales(odd_llama, quantized, name):
    qc = CONFIGS[name][0]
    head = linear_tensors(load_file(quantized[name] / "rank0.safetensors"), "lm_head")
    codes, s, z = rtn_int4(odd_llama[1].lm_head.weight.detach(), qc.group_size, qc.has_zero_point)
    assert torch.equal(unpack(head["weight"]), codes) and torch.equal(head["weights_scaling_factor"], s)
    assert "prequant_scaling_factor" not in head and ("zero_point" in head) == qc.has_zero_point
    assert not qc.has_zero_point or torch.equal(head["zero_point"], z)


def test_fp8_lm_head_has_per_channel_weights_and_dynamic_activations(odd_llama, quantized):
    head = linear_tensors(load_file(quantized["FP8"] / "rank0.safetensors"), "lm_head")
    assert set(head) == {"weight", "weights_scaling_factor"}  # no static activation scale to calibrate
    w = odd_llama[1].lm_head.weight.detach()
    assert is_searched_scale(head["weights_scaling_factor"], w.abs().amax(1))  # per channel, searched


def _assert_llm_greedy_equals_reference(hf, ckpt_dir, engine_dir, tokens=8):
    """An engine built from the checkpoint generates, greedily through `LLM` on the CPU, the reference's tokens."""
    model = PretrainedModel.from_checkpoint(ckpt_dir)
    kiln.build(model, kiln.BuildConfig(max_batch_size=2, max_seq_len=64)).save(engine_dir)
    ref = _reference(hf, load_file(ckpt_dir / "rank0.safetensors"), model.config)
    prompt = [1, 17, 5, 99, 42]
    with kiln.LLM(engine_dir, device="cpu") as llm:
        got = llm.generate(prompt, kiln.SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    assert got[0].outputs[0].token_ids == hf_greedy(ref, prompt, tokens)


@pytest.mark.parametrize("name", ["W4A16_g32", "FP8"])
def test_build_and_llm_greedy_equal_the_reference(odd_llama, quantized, name, tmp_path):
    _assert_llm_greedy_equals_reference(odd_llama[1], quantized[name], tmp_path / "engine")


def test_tied_embeddings_stay_full_precision_and_lm_head_is_quantized_from_them(tmp_path):
    hf = make_hf_model(tmp_path / "hf", vocab_size=VOCAB, tie_word_embeddings=True, **QUANT_LLAMA)
    qc = QuantConfig(quant_algo="W4A16", group_size=32, has_zero_point=True, exclude_modules=())
    out = _quantize(tmp_path / "hf", tmp_path / "q", qc)
    ckpt = load_file(out / "rank0.safetensors")
    embedding = hf.model.embed_tokens.weight.detach()
    assert torch.equal(ckpt["transformer.vocab_embedding.weight"], embedding)
    codes, s, z = rtn_int4(embedding, 32, True)
    head = linear_tensors(ckpt, "lm_head")
    assert torch.equal(unpack(head["weight"]), codes) and torch.equal(head["zero_point"], z)
    assert torch.equal(head["weights_scaling_factor"], s)
    model = PretrainedModel.from_checkpoint(out).materialize()
    assert model.lm_head.weight is not model.transformer.vocab_embedding.weight  # not tied back
    ref = dequantized_hf(hf, ckpt, model.config)
    assert torch.equal(ref.model.embed_tokens.weight, embedding)  # the reference's embedding stays float too
    with torch.no_grad():
        want = ref(IDS).logits
        assert (model(IDS) - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
    _assert_llm_greedy_equals_reference(hf, out, tmp_path / "engine")


@pytest.mark.parametrize("name", ["W8A16", "W4A16_g32_zp", "FP8"])
def test_tp2_shards_of_an_odd_vocab_give_the_tp1_logits(odd_llama, quantized, name, tmp_path):
    """Rank r holds rows [64 r, 64 r + 64) of every lm_head leaf; the vocab's padding row (zeros, scale 0)
    gives a logit of exactly 0 (no NaN), and the ranks' logits side by side are the TP=1 logits."""
    out = _quantize(odd_llama[0], tmp_path / "tp2", CONFIGS[name][0], Mapping.of(2))
    full = linear_tensors(load_file(quantized[name] / "rank0.safetensors"), "lm_head")
    ranks = [linear_tensors(load_file(out / f"rank{r}.safetensors"), "lm_head") for r in range(2)]
    for leaf, tensor in full.items():
        assert [r[leaf].shape[0] for r in ranks] == [64, 64]
        assert torch.equal(torch.cat([r[leaf] for r in ranks]).float()[:VOCAB], tensor.float()), leaf
        assert not ranks[1][leaf][-1].float().any(), leaf  # the padding row
    torch.manual_seed(0)
    h = torch.randn(5, QUANT_LLAMA["hidden_size"])
    tp1 = PretrainedModel.from_checkpoint(quantized[name]).materialize().lm_head
    heads = [PretrainedModel.from_checkpoint(out, rank=r).materialize().lm_head for r in range(2)]
    with torch.no_grad():
        want = tp1(h).double()
        parts = [head.matmul(h) for head in heads]  # what each rank all-gathers
        terms = h.double().abs() @ dequantized_weight(full, CONFIGS[name][0].group_size).abs().T
    assert torch.equal(parts[1][:, -1], torch.zeros(5))  # the padding logit, sliced away after the gather
    got = torch.cat(parts, dim=-1)[:, :VOCAB].double()
    # the same products per row; only float32 summation order (and FP8's per-token scale) may differ
    assert ((got - want).abs() <= QUANT_LLAMA["hidden_size"] * 2.0 ** -24 * terms * 2).all()


def test_llm_tp2_greedy_tokens_equal_tp1(odd_llama, tmp_path):
    """The gather over two worker processes (gloo) of a quantized, padded lm_head."""
    qc = CONFIGS["W4A16_g32_zp"][0]
    tokens = []
    for tp in (1, 2):
        out = _quantize(odd_llama[0], tmp_path / f"tp{tp}", qc, Mapping.of(tp))
        engine = build_checkpoint(out, tmp_path / f"engine{tp}")
        with kiln.LLM(engine, tensor_parallel_size=tp, device="cpu") as llm:
            got = llm.generate([1, 17, 5, 99, 42], kiln.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        tokens.append(got[0].outputs[0].token_ids)
    assert tokens[0] == tokens[1]


@pytest.mark.parametrize("algo", ["W8A8_SQ_PER_CHANNEL", "W4A8_AWQ"])
def test_algorithms_without_an_lm_head_method_refuse_it_and_write_nothing(odd_llama, tmp_path, algo):
    qc = QuantConfig(quant_algo=algo, exclude_modules=())
    with pytest.raises(ConfigError, match=rf"exclude_modules must include 'lm_head' for {algo}.*'W8A16', "
                                          r"'W4A16', 'W4A16_AWQ', 'W4A16_GPTQ', 'FP8'.*Keep 'lm_head'"):
        PretrainedModel.quantize(odd_llama[0], tmp_path / "q", qc)
    assert leftovers(tmp_path / "q") == []


def test_cli_quantize_lm_head_flag_and_inspect(odd_llama, tmp_path, capsys):
    base = ["quantize", "--model-dir", str(odd_llama[0]), "--quant-algo", "W8A16"]
    assert main(base + ["--output-dir", str(tmp_path / "q"), "--quantize-lm-head", "--exclude-modules",
                        "mlp.proj", "--eval", "--calib-max-seq-len", "32"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["exclude_modules"] == ["mlp.proj"]
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())  # the quality report runs it too
    assert report["quantization"]["exclude_modules"] == ["mlp.proj"] and report["metrics"]["mean_kl_divergence"] > 0
    assert main(base + ["--output-dir", str(tmp_path / "d"), "--exclude-modules", "mlp.proj"]) == 0
    assert json.loads((tmp_path / "d" / "config.json").read_text())["quantization"]["exclude_modules"] == \
        ["lm_head", "mlp.proj"]  # the default keeps lm_head in full precision
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "q")]) == 0 and "lm_head       quantized (W8A16)" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "d")]) == 0 and "lm_head       full precision" in capsys.readouterr().out
    assert main(base + ["--output-dir", str(tmp_path / "x"), "--quantize-lm-head", "--exclude-modules", "lm_head"]) == 1
    assert "--quantize-lm-head and --exclude-modules contradict" in capsys.readouterr().err
    assert leftovers(tmp_path / "x") == []


# ---- GPU: a quantized lm_head of Llama-3-8B's shape through the CUDA kernels -------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                               reason="needs a CUDA GPU of compute capability >= 8.9: the kernel paths exist there")
LLAMA3_VOCAB, LLAMA3_HIDDEN = 128256, 4096


def _cuda_lm_head(method, weight: torch.Tensor):
    from kiln.layers.embedding import LMHead

    head = LMHead(weight.shape[0], weight.shape[1], Mapping())
    head.set_quant_method(method)
    for leaf, t in method.quantize(weight, torch.bfloat16).items():
        getattr(head, leaf).data = t
    return head.cuda()


@needs_gpu
@pytest.mark.parametrize("algo", ["W8A16", "W4A16_g128", "W4A16_g128_zp", "FP8"])
@pytest.mark.parametrize("rows", [1, 37])
def test_gpu_quantized_lm_head_of_llama3_shape_matches_its_reference(algo, rows):
    from kiln.quantization import fp8
    from kiln.quantization.weight_only import Int4GroupMethod, Int8WeightOnlyMethod

    method = {"W8A16": Int8WeightOnlyMethod(), "W4A16_g128": Int4GroupMethod(128, False),
              "W4A16_g128_zp": Int4GroupMethod(128, True), "FP8": fp8.Fp8Method(static=False)}[algo]
    torch.manual_seed(rows)
    head = _cuda_lm_head(method, torch.randn(LLAMA3_VOCAB, LLAMA3_HIDDEN, device="cuda") * 0.02)
    x = torch.randn(rows, LLAMA3_HIDDEN, device="cuda", dtype=torch.bfloat16)
    w = method.dequantize(head, torch.bfloat16).double()
    with torch.no_grad():
        y = head(x).double()
        if algo == "FP8":  # the same per-token codes, multiplied in float64
            xq, xs = fp8.quantize_fp8_per_token(x)
            ref = (xq.double() @ head.weight.double().T) * xs.double() * head.weights_scaling_factor.double()
            terms = (xq.double().abs() @ head.weight.double().abs().T) * xs.double() * \
                head.weights_scaling_factor.double().abs()
            # float32 (or Hopper's ~14-bit FP8 accumulator) summation, then the bf16 output (test_gpu_quant2.py)
            bound = max(LLAMA3_HIDDEN * 2.0 ** -24, 2.0 ** -13) * terms + 2.0 ** -8 * ref.abs()
        else:  # the dequantized bf16 weight, multiplied in float64
            ref = x.double() @ w.T
            # 3 bf16 ulps of sum |x||w| (tests/kernels/test_quant_gemm_kernel.py): w and y rounded, sum order
            bound = 3 * 2.0 ** -8 * (x.double().abs() @ w.abs().T)
    assert y.shape == (rows, LLAMA3_VOCAB) and torch.isfinite(y).all()
    assert ((y - ref).abs() <= bound + 1e-30).all(), f"{algo} rows {rows}: max error {(y - ref).abs().max().item()}"
