"""KV-cache quantization (INT8, FP8): the formats against float math written out, calibration against the
absmax of transformers' keys and values, quantize -> build -> run through LLM against the reference forward
(which emulates the quantized cache), the doubled capacity, and the refusals."""

import json
import logging
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import kiln
import kiln.cli
from kiln.config import BuildConfig, KVCacheLayout, QuantConfig
from kiln.errors import CheckpointError, ConfigError
from kiln.kernels import triton_available
from kiln.kernels.paged_attention import paged_decode_attention_ref
from kiln.models.base import PretrainedModel
from kiln.quantization import calib_text, calibration
from kiln.quantization.kv_cache import dequantize, quantize, scale_from_amax
from kiln.runtime.kv_cache import bytes_per_block, plan_num_blocks
from conftest import make_hf_model

QMAX = {"INT8": 127.0, "FP8": 448.0}
DTYPE = {"INT8": torch.int8, "FP8": torch.float8_e4m3fn}
SCALE = "kv_cache_scaling_factor"


def roundtrip_bound(x: torch.Tensor, s: float, algo: str) -> torch.Tensor:
    """Largest |dequantize(quantize(x)) - x| the format allows, per element. int8: half a step, s / 2.
    e4m3 (3 mantissa bits): half a step of x's binade, at most 2^-4 |x|, for normal codes (|x / s| >= 2^-6);
    below, subnormal steps of 2^-9, so half of that times s."""
    if algo == "INT8":
        return torch.full_like(x, s / 2)
    return torch.maximum(x.abs() * 2.0**-4, torch.full_like(x, s * 2.0**-10))


def random_values(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, generator=g) * 2
    x[:4] = torch.tensor([9.0, -7.5, 1e-4, -3e-6])  # outliers that set the scale, and values far below a step
    return x


@pytest.mark.parametrize("algo", ["INT8", "FP8"])
def test_roundtrip_error_is_within_the_format_step(algo):
    x = random_values()
    s = x.abs().max().item() / QMAX[algo]
    codes = quantize(x, torch.tensor(s), DTYPE[algo])
    assert codes.dtype == DTYPE[algo]
    err = (dequantize(codes, torch.tensor(s), torch.float32) - x).abs()
    assert (err <= roundtrip_bound(x, s, algo) * (1 + 1e-6)).all()
    if algo == "INT8":  # round to nearest, written out
        assert torch.equal(codes.float(), torch.round(x / s).clamp(-127, 127))
    assert err.max() > 0  # (a test that could not see a lossless path)


@pytest.mark.parametrize("algo", ["INT8", "FP8"])
def test_out_of_range_values_clamp_to_the_largest_code(algo):
    codes = quantize(torch.tensor([1e6, -1e6]), torch.tensor(1.0), DTYPE[algo])
    assert codes.float().tolist() == [QMAX[algo], -QMAX[algo]]


@pytest.mark.parametrize("algo", ["INT8", "FP8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stored_scale_keeps_the_calibration_maximum_in_range(algo, dtype):
    amax = torch.tensor([3.3, 0.0123])
    s = scale_from_amax(amax, kiln.QuantAlgo(algo), dtype)
    assert s.dtype == dtype
    exact = amax / QMAX[algo]
    assert (s.float() >= exact).all() and (s.float() <= exact * (1 + 2 * torch.finfo(dtype).eps)).all()


def test_int8_scale_is_the_clip_ratio_of_least_error_and_e4m3_keeps_the_maximum():
    """int8: of the candidate scales r amax / 127, the one whose codes read back closest to the values (squared
    error, written out here in float64); with one outlier among many small values it clips (r < 1), and reads
    back better than the maximum's scale. e4m3 keeps amax / 448."""
    from kiln.quantization.kv_cache import INT8_CLIP_RATIOS, calibrated_scale

    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 2, 16, generator=g)
    x[0, 0, 0] = 40.0  # an outlier, as an attention sink's key has
    s = calibrated_scale(x, kiln.QuantAlgo.INT8, torch.float32)
    amax = x.abs().max()

    def error(scale):
        codes = torch.round(x.double() / scale).clamp(-127, 127)
        return (codes * scale - x.double()).square().sum().item()
    errors = {float(r): error(scale_from_amax(amax * r, kiln.QuantAlgo.INT8, torch.float32).double())
              for r in INT8_CLIP_RATIOS}
    assert error(s.double()) == pytest.approx(min(errors.values()), rel=1e-9)
    assert s < amax / 127 and error(s.double()) < errors[1.0]
    assert torch.equal(calibrated_scale(x, kiln.QuantAlgo.FP8, torch.float32),
                       scale_from_amax(amax, kiln.QuantAlgo.FP8, torch.float32))


def float_decode(q, k, v, scale):
    """One query per sequence over dense k/v [n, kv_heads, d], float64 softmax attention written out."""
    groups = q.shape[0] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    p = torch.einsum("hd,nhd->hn", q.double(), k).mul(scale).softmax(-1)
    return torch.einsum("hn,nhd->hd", p, v)


@pytest.mark.parametrize("algo", ["INT8", "FP8"])
def test_attention_over_a_quantized_cache_is_within_the_bound_of_its_step(algo):
    """Keys off by e_k move each score by at most delta = scale * sum_d |q_d| e_k[d], so each softmax weight
    by a factor in [exp(-2 delta), exp(2 delta)] and the weights by sum |p' - p| <= exp(2 delta) - 1 in all;
    values off by e_v: |out' - out| <= max e_v + (exp(2 delta) - 1) max |v|."""
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, d, n, block = 4, 2, 16, 40, 8
    q = torch.randn(1, heads, d, generator=g)
    k, v = torch.randn(n, kv_heads, d, generator=g) * 3, torch.randn(n, kv_heads, d, generator=g)
    s = torch.tensor([k.abs().max() / QMAX[algo], v.abs().max() / QMAX[algo]])
    pages = n // block
    k_cache = quantize(k, s[0], DTYPE[algo]).view(pages, block, kv_heads, d)
    v_cache = quantize(v, s[1], DTYPE[algo]).view(pages, block, kv_heads, d)
    tables, lens, scale = torch.arange(pages, dtype=torch.int32)[None], torch.tensor([n], dtype=torch.int32), d**-0.5
    got = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale, kv_scale=s)[0].double()
    want = float_decode(q[0], k, v, scale)
    e_k, e_v = roundtrip_bound(k, s[0].item(), algo), roundtrip_bound(v, s[1].item(), algo)
    q_kv = q[0].abs().view(kv_heads, heads // kv_heads, d)
    delta = scale * torch.einsum("kgd,nkd->kgn", q_kv, e_k).amax(-1).flatten()  # per query head
    bound = e_v.max() + (torch.exp(2 * delta) - 1)[:, None] * v.abs().max()
    err = (got - want).abs()
    assert (err <= bound.double() + 1e-6).all()
    assert err.max() > 1e-7


# ---- quantize -> checkpoint -> build -> run ---------------------------------------------------------------

@pytest.fixture(scope="module")
def kv_llama(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("kv_llama") / "hf"
    return hf_dir, make_hf_model(hf_dir)


CONFIGS = {"INT8": QuantConfig(kv_cache_quant_algo="INT8"), "FP8": QuantConfig(kv_cache_quant_algo="FP8"),
           "W8A16+INT8": QuantConfig(quant_algo="W8A16", kv_cache_quant_algo="INT8")}
CALIB = dict(calib_size=3, calib_max_seq_len=48)


@pytest.fixture(scope="module")
def kv_quantized(kv_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("kv_quantized")
    return {name: PretrainedModel.quantize(kv_llama[0], out / name, qc, **CALIB) for name, qc in CONFIGS.items()}


def hf_keys_and_values(hf, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys after rotary, values) of transformers' forward over `tokens` [n, seq]."""
    import transformers.models.llama.modeling_llama as llama

    keys, values, rope = [], [], llama.apply_rotary_pos_emb

    def recording_rope(q, k, *args, **kwargs):
        q, k = rope(q, k, *args, **kwargs)
        keys.append(k.detach().clone())
        return q, k
    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda m, i, o: values.append(o.detach().clone()))
             for layer in hf.model.layers]
    try:
        llama.apply_rotary_pos_emb = recording_rope
        with torch.no_grad():
            hf(tokens)
    finally:
        llama.apply_rotary_pos_emb = rope
        for h in hooks:
            h.remove()
    return list(zip(keys, values))


@pytest.mark.parametrize("name", ["INT8", "FP8"])
def test_scales_come_from_each_layers_keys_and_values(kv_llama, kv_quantized, name):
    """e4m3: each layer's max |k| and max |v| / 448, of transformers' keys and values over the calibration windows;
    int8: the least-error clip ratio of those (calibrated_scale, checked against its definition above)."""
    from kiln.quantization.kv_cache import calibrated_scale

    hf = kv_llama[1]
    ckpt = load_file(kv_quantized[name] / "rank0.safetensors")
    # The calibration windows quantize() used: the shipped text, as bytes (the tiny model has no tokenizer).
    tokens = calibration.token_batches([calib_text.CALIBRATION], None, hf.config.vocab_size, CALIB["calib_size"],
                                       CALIB["calib_max_seq_len"])
    for i, (k, v) in enumerate(hf_keys_and_values(hf, tokens)):
        got = ckpt[f"transformer.layers.{i}.attention.{SCALE}"]
        assert got.shape == (2,)
        if name == "FP8":
            want = torch.stack([k.abs().max(), v.abs().max()]) / QMAX[name]
        else:
            want = torch.stack([calibrated_scale(t, kiln.QuantAlgo.INT8, torch.float32) for t in (k, v)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert json.loads((kv_quantized[name] / "config.json").read_text())["quantization"]["kv_cache_quant_algo"] == name


def reference_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs from kiln's reference forward (whole sequence, emulated cache)."""
    ids, logprobs = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(steps):
            lp = model(ids)[0, -1].log_softmax(-1)
            ids = torch.cat([ids, lp.argmax().view(1, 1)], dim=1)
            logprobs.append(lp.max().item())
    return ids[0, len(prompt):].tolist(), logprobs


# On the GPU the Triton kernels (and a decode CUDA graph) read the cache; float32 sums in another order can
# round a key that sits on a code boundary to the neighbouring code, so a looser logprob tolerance there.
DEVICES = [pytest.param("cpu", 1e-4, id="cpu"),
           pytest.param("cuda", 2e-3, id="cuda", marks=pytest.mark.skipif(
               not triton_available(), reason="needs an NVIDIA GPU with Triton: the kernel path only exists there"))]


@pytest.mark.parametrize("device,atol", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_llm_over_the_quantized_cache_equals_the_emulating_reference(kv_llama, kv_quantized, name, device, atol,
                                                                     tmp_path):
    """The runtime quantizes keys and values into int8/e4m3 pages and reads them back (fresh prefill, decode,
    and a prompt continuing a cached prefix); the reference forward quantize-dequantizes the same k/v."""
    model = PretrainedModel.from_checkpoint(kv_quantized[name])
    kiln.build(model, BuildConfig(max_batch_size=2, max_seq_len=64, tokens_per_block=8)).save(tmp_path / "e")
    prefix = [1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8, 33, 2, 90, 61]  # two whole blocks, reused below
    prompts = [prefix + [4, 9], prefix + [77, 23, 5]]
    params = kiln.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    with kiln.LLM(tmp_path / "e", device=device) as llm:
        assert llm.runner.kv.k[0].dtype == DTYPE[name.split("+")[-1]]
        outs = [llm.generate(p, params)[0].outputs[0] for p in prompts]  # one after the other: prefix reuse
    reference = model.materialize()
    for prompt, out in zip(prompts, outs):
        tokens, logprobs = reference_greedy(reference, prompt, 10)
        assert out.token_ids == tokens
        torch.testing.assert_close(torch.tensor([lp for lp, _ in out.logprobs]), torch.tensor(logprobs),
                                   rtol=0, atol=atol)


def test_reference_forward_emulates_the_cache(kv_llama, kv_quantized):
    """The quantized checkpoint's reference forward is transformers' with every key (after rotary) and value
    quantize-dequantized with its layer's scales, written out here."""
    import transformers.models.llama.modeling_llama as llama

    hf = kv_llama[1]
    ckpt = load_file(kv_quantized["INT8"] / "rank0.safetensors")
    scales = [ckpt[f"transformer.layers.{i}.attention.{SCALE}"] for i in range(len(hf.model.layers))]
    fake = lambda x, s: (torch.round(x / s).clamp(-127, 127) * s)  # noqa: E731
    rope, layer = llama.apply_rotary_pos_emb, iter(range(len(scales)))

    def rope_then_quantize(q, k, *args, **kwargs):
        q, k = rope(q, k, *args, **kwargs)
        return q, fake(k, scales[next(layer)][0])
    hooks = [m.self_attn.v_proj.register_forward_hook(lambda mod, i, o, s=s: fake(o, s[1]))
             for m, s in zip(hf.model.layers, scales)]
    ids = torch.tensor([[1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8]])
    try:
        llama.apply_rotary_pos_emb = rope_then_quantize
        with torch.no_grad():
            want = hf(ids).logits
    finally:
        llama.apply_rotary_pos_emb = rope
        for h in hooks:
            h.remove()
    with torch.no_grad():
        got = PretrainedModel.from_checkpoint(kv_quantized["INT8"])(ids)
        full = hf(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (got - full).abs().max() > 1e-4  # the comparison would see a cache that was not quantized


def test_kv_only_quantization_keeps_the_weights_and_adds_the_scales(kv_llama, kv_quantized, tmp_path):
    ckpt = load_file(kv_quantized["INT8"] / "rank0.safetensors")
    hf = kv_llama[1]
    assert torch.equal(ckpt["transformer.layers.1.mlp.proj.weight"], hf.model.layers[1].mlp.down_proj.weight)
    assert {n for n in ckpt if n.endswith(SCALE)} == {f"transformer.layers.{i}.attention.{SCALE}" for i in (0, 1)}
    both = load_file(kv_quantized["W8A16+INT8"] / "rank0.safetensors")
    assert both["transformer.layers.1.mlp.proj.weight"].dtype == torch.int8
    assert torch.equal(both[f"transformer.layers.0.attention.{SCALE}"], ckpt[f"transformer.layers.0.attention.{SCALE}"])


def test_checkpoint_without_kv_scales_is_refused(kv_quantized, tmp_path):
    from kiln.checkpoint.safetensors_io import save_tensors

    bad = tmp_path / "bad"
    shutil.copytree(kv_quantized["INT8"], bad)
    tensors = load_file(bad / "rank0.safetensors")
    del tensors[f"transformer.layers.1.attention.{SCALE}"]
    save_tensors(bad / "rank0.safetensors", tensors)
    with pytest.raises(CheckpointError, match="kv_cache_scaling_factor.*--kv-cache-quant-algo INT8"):
        PretrainedModel.from_checkpoint(bad)


def test_one_byte_cache_holds_twice_the_tokens_and_the_log_names_its_dtype(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 80 * 2**30))
    bc = BuildConfig(max_seq_len=2048, tokens_per_block=32)
    blocks = {}
    with caplog.at_level(logging.INFO, logger="kiln.runtime.kv_cache"):
        for dtype in (torch.bfloat16, torch.int8, torch.float8_e4m3fn):
            block_bytes = bytes_per_block(32, 32, KVCacheLayout(8, 128), dtype)
            blocks[dtype] = plan_num_blocks(bc, block_bytes, torch.device("cuda"), 0, dtype)
    assert blocks[torch.int8] == blocks[torch.float8_e4m3fn] == 2 * blocks[torch.bfloat16]
    assert "KV cache (int8)" in caplog.text and "KV cache (float8_e4m3fn)" in caplog.text


def test_cli_quantizes_the_kv_cache_alone_or_with_weights(kv_llama, tmp_path, capsys):
    hf_dir = kv_llama[0]
    calib = ["--calib-size", "2", "--calib-max-seq-len", "32"]
    assert kiln.cli.main(["quantize", "--model-dir", str(hf_dir), "--output-dir", str(tmp_path / "a"),
                          "--kv-cache-quant-algo", "fp8", *calib]) == 0
    assert "FP8 KV cache" in capsys.readouterr().out
    assert kiln.cli.main(["quantize", "--model-dir", str(hf_dir), "--output-dir", str(tmp_path / "b"),
                          "--quant-algo", "W8A16", "--kv-cache-quant-algo", "INT8", *calib]) == 0
    q = json.loads((tmp_path / "b" / "config.json").read_text())["quantization"]
    assert (q["quant_algo"], q["kv_cache_quant_algo"]) == ("W8A16", "INT8")


def test_nothing_to_quantize_and_bad_kv_algo_are_refused(kv_llama, tmp_path):
    with pytest.raises(ConfigError, match="kv_cache_quant_algo"):
        PretrainedModel.quantize(kv_llama[0], tmp_path / "q", QuantConfig())
    with pytest.raises(ConfigError, match=r"kv_cache_quant_algo must be one of \['INT8', 'FP8'\]"):
        QuantConfig(kv_cache_quant_algo="INT4")


def test_eval_reports_the_quantized_cache(kv_llama, tmp_path):
    out = PretrainedModel.quantize(kv_llama[0], tmp_path / "q", QuantConfig(kv_cache_quant_algo="INT8"),
                                   evaluate=True, **CALIB)
    report = json.loads((out / "quant_report.json").read_text())
    m = report["metrics"]
    assert report["quantization"]["kv_cache_quant_algo"] == "INT8"
    assert m["mean_kl_divergence"] > 0 and math.isfinite(m["perplexity_quantized"])  # the eval saw the cache


def test_fp8_cache_on_a_gpu_before_ada_names_the_capability(monkeypatch):
    from kiln.runtime.kv_cache import check_cache_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigError, match=r"compute capability 8.9 .* A100 is 8.0.*--kv-cache-quant-algo INT8"):
        check_cache_dtype(torch.float8_e4m3fn, torch.device("cuda"))
    check_cache_dtype(torch.int8, torch.device("cuda"))  # int8 codes run anywhere


def test_every_tensor_parallel_rank_holds_the_same_scales(kv_llama, kv_quantized, tmp_path):
    from kiln.mapping import Mapping

    out = PretrainedModel.quantize(kv_llama[0], tmp_path / "tp2", CONFIGS["INT8"], Mapping.of(2), **CALIB)
    one = load_file(kv_quantized["INT8"] / "rank0.safetensors")
    for rank in (0, 1):
        shard = load_file(out / f"rank{rank}.safetensors")
        for i in (0, 1):
            name = f"transformer.layers.{i}.attention.{SCALE}"
            assert torch.equal(shard[name], one[name])
        PretrainedModel.from_checkpoint(out, rank).materialize()


def deepseek_v3(hf_dir, seed: int = 5):
    """A tiny DeepSeek-V3 (latent attention: 32-wide latent, 16 rope dims; one dense and one MoE layer), saved."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.DeepseekV3Config(vocab_size=127, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                 n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=None,
                                 qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32, n_group=1, topk_group=1,
                                 first_k_dense_replace=1, tie_word_embeddings=False)
    hf = tf.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        hf.model.layers[1].mlp.gate.weight.normal_(0, 0.3)  # (transformers starts routers at zero)
    hf.save_pretrained(hf_dir)
    return hf


def latent_rows_of(hf, ids: torch.Tensor, scales=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """transformers' logits over ids and each layer's cached latent rows [normed latent | rotated rope key], with
    the rows fake-quantized to int8 by `scales` (one per layer) before attention when given."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds

    rows, expand = [], ds.DeepseekV3Attention.expand_kv

    def recording_expand(self, kv_nope, k_rot):
        rows.append(torch.cat([kv_nope, k_rot], dim=-1).detach().clone())
        if scales is not None:
            s = scales[self.layer_idx]
            kv_nope, k_rot = ((x / s).round().clamp(-127, 127) * s for x in (kv_nope, k_rot))
        return expand(self, kv_nope, k_rot)
    ds.DeepseekV3Attention.expand_kv = recording_expand
    try:
        with torch.no_grad():
            logits = hf(ids).logits
    finally:
        ds.DeepseekV3Attention.expand_kv = expand
    return logits, rows


@pytest.mark.parametrize("algo", ["INT8", "FP8"])
def test_latent_attention_caches_its_rows_in_codes_of_one_scale(algo, tmp_path):
    """Latent attention (DeepSeek) caches one row a token, its key and its value both: one scale for the two,
    calibrated on transformers' latent rows; the reference forward is transformers' with the rows quantized (int8,
    written out); LLM over the paged codes (prefill, decode, a reused prefix) gives the reference's greedy tokens
    and logprobs; the cache is one tensor of 1-byte codes, half the bytes of the bf16 one."""
    from kiln.quantization.kv_cache import calibrated_scale

    hf = deepseek_v3(tmp_path / "hf")
    ckpt_dir = PretrainedModel.quantize(tmp_path / "hf", tmp_path / "q", QuantConfig(kv_cache_quant_algo=algo),
                                        **CALIB)
    ckpt = load_file(ckpt_dir / "rank0.safetensors")
    tokens = calibration.token_batches([calib_text.CALIBRATION], None, hf.config.vocab_size, CALIB["calib_size"],
                                       CALIB["calib_max_seq_len"])
    _, rows = latent_rows_of(hf, tokens)
    scales = [ckpt[f"transformer.layers.{i}.attention.{SCALE}"] for i in range(2)]
    for s, row in zip(scales, rows):
        want = calibrated_scale(row, kiln.QuantAlgo(algo), torch.float32)
        torch.testing.assert_close(s, torch.stack([want, want]), rtol=1e-5, atol=0)

    ids = torch.tensor([[1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8]])
    model = PretrainedModel.from_checkpoint(ckpt_dir)
    if algo == "INT8":
        want, _ = latent_rows_of(hf, ids, [s[0] for s in scales])
        with torch.no_grad():
            got = model(ids)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert (got - latent_rows_of(hf, ids)[0]).abs().max() > 1e-4  # (it would see an unquantized cache)

    kiln.build(model, BuildConfig(max_batch_size=2, max_seq_len=64, tokens_per_block=8)).save(tmp_path / "e")
    prefix = [1, 17, 5, 99, 42, 7, 3, 64, 120, 11, 0, 8, 33, 2, 90, 61]
    params = kiln.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    with kiln.LLM(tmp_path / "e") as llm:
        kv = llm.runner.kv
        assert kv.v[0] is kv.k[0] and kv.k[0].dtype == DTYPE[algo] and kv.k[0].shape[2:] == (1, 48)
        outs = [llm.generate(p, params)[0].outputs[0] for p in (prefix + [4, 9], prefix + [77, 23, 5])]
    reference = model.materialize()
    for prompt, out in zip((prefix + [4, 9], prefix + [77, 23, 5]), outs):
        tokens, logprobs = reference_greedy(reference, prompt, 10)
        assert out.token_ids == tokens
        torch.testing.assert_close(torch.tensor([lp for lp, _ in out.logprobs]), torch.tensor(logprobs),
                                   rtol=0, atol=1e-4)
