"""QuantConfig.keep_sensitive_layers (`kiln quantize --keep-sensitive-layers N`): the streamed per-layer scores
equal the whole model's KL with one layer quantized on the calibration tokens, the held-out text plays no part,
the chosen layers are excluded in the written checkpoint (their tensors are the source's, the other layers'
unchanged), and bad values are clear errors."""

import json

import pytest
import torch
from reference import quant_llama  # noqa: F401 (fixture)
from safetensors.torch import load_file

from kiln.checkpoint.convert import load_source_model
from kiln.cli import main
from kiln.config import QuantConfig
from kiln.errors import ConfigError
from kiln.models.base import PretrainedModel
from kiln.quantization import calib_text, calibration, sensitivity

CALIB = {"calib_size": 4, "calib_max_seq_len": 32}


def quantize(hf_dir, out, algo="FP8", n=0, **kwargs):
    return PretrainedModel.quantize(hf_dir, out, QuantConfig(quant_algo=algo, keep_sensitive_layers=n),
                                    **{**CALIB, **kwargs})


def layer_tensors(ckpt: dict, index: int) -> dict:
    prefix = f"transformer.layers.{index}."
    return {k: v for k, v in ckpt.items() if k.startswith(prefix)}


def whole_model_scores(hf_dir, quantized_dir) -> dict[int, float]:
    """Reference: the float model with layer i swapped for the fully quantized checkpoint's layer i, run whole on the
    calibration tokens; mean KL(p_float || p_i) over every token."""
    source = load_source_model(hf_dir)
    tokens = calibration.token_batches(calibration.read_texts(None), None, source.config.vocab_size,
                                       CALIB["calib_size"], CALIB["calib_max_seq_len"])
    float_model, quant_model = source.materialize(), PretrainedModel.from_checkpoint(quantized_dir).materialize()
    layers = float_model.transformer.layers
    scores = {}
    with torch.no_grad():
        lf = float_model(tokens).float().log_softmax(-1)
        for i in range(float_model.config.num_hidden_layers):
            kept, layers[str(i)] = layers[str(i)], quant_model.transformer.layers[str(i)]
            lq = float_model(tokens).float().log_softmax(-1)
            layers[str(i)] = kept
            scores[i] = (lf.exp() * (lf - lq)).sum(-1).mean().item()
    return scores


def test_scores_are_the_whole_model_kl_with_one_layer_quantized_on_calibration_tokens(quant_llama, tmp_path, capsys):
    full = quantize(quant_llama[0], tmp_path / "all")
    out = quantize(quant_llama[0], tmp_path / "keep1", n=1, evaluate=True)
    report = json.loads((out / "quant_report.json").read_text())
    streamed = {int(i): kl for i, kl in report["layer_sensitivity_kl"].items()}
    reference = whole_model_scores(quant_llama[0], full)
    assert streamed.keys() == reference.keys() and min(reference.values()) > 0
    for i, kl in reference.items():  # float32 forwards in another batching: ~1e-6 relative on the logits
        assert abs(streamed[i] - kl) <= 1e-3 * kl
    assert reference[0] != reference[1]  # so the choice below is decided by the scores
    chosen = max(reference, key=reference.get)
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert config["exclude_modules"] == ["lm_head", f"transformer.layers.{chosen}.*"]
    assert config["keep_sensitive_layers"] == 1
    assert main(["inspect", str(out)]) == 0
    assert f"'transformer.layers.{chosen}.*'" in capsys.readouterr().out


def test_choice_does_not_read_the_heldout_text(quant_llama, tmp_path, monkeypatch):
    first = quantize(quant_llama[0], tmp_path / "a", n=1, evaluate=True)
    monkeypatch.setattr(calib_text, "HELDOUT", "other held-out words " * 40)
    second = quantize(quant_llama[0], tmp_path / "b", n=1, evaluate=True)
    scores = [json.loads((d / "quant_report.json").read_text())["layer_sensitivity_kl"] for d in (first, second)]
    metrics = [json.loads((d / "quant_report.json").read_text())["metrics"] for d in (first, second)]
    assert metrics[0] != metrics[1]  # the held-out text did change (the quality report reads it)
    assert scores[0] == scores[1]
    calib = tmp_path / "calib.txt"
    calib.write_text("a different calibration text, repeated. " * 40)
    third = quantize(quant_llama[0], tmp_path / "c", n=1, evaluate=True, calib_dataset=calib)
    assert json.loads((third / "quant_report.json").read_text())["layer_sensitivity_kl"] != scores[0]


@pytest.mark.parametrize("algo", ["FP8", "W8A8_SQ_PER_CHANNEL"])
def test_kept_layer_is_the_float_source_and_the_others_are_unchanged(quant_llama, tmp_path, algo):
    full = load_file(quantize(quant_llama[0], tmp_path / "all", algo) / "rank0.safetensors")
    out = quantize(quant_llama[0], tmp_path / "keep", algo, n=1)
    ckpt = load_file(out / "rank0.safetensors")
    (kept,) = [i for i in (0, 1) if f"transformer.layers.{i}.*" in
               PretrainedModel.from_checkpoint(out).config.quantization.exclude_modules]
    source = load_source_model(quant_llama[0])
    float_tensors = layer_tensors(ckpt, kept)
    assert float_tensors.keys() == {n for n in source.weight_specs() if n.startswith(f"transformer.layers.{kept}.")}
    for name, t in float_tensors.items():  # no scales, no smoothing folded into the norms
        assert torch.equal(t, source.read_weight(name)), name
    other = 1 - kept
    assert layer_tensors(ckpt, other).keys() == layer_tensors(full, other).keys()
    for name, t in layer_tensors(ckpt, other).items():
        assert torch.equal(t, full[name]), name


def test_bad_counts_are_clear_errors(quant_llama, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"keep_sensitive_layers must be an integer >= 0, got -1"):
        QuantConfig(quant_algo="FP8", keep_sensitive_layers=-1)
    with pytest.raises(ConfigError, match=r"keep_sensitive_layers must be at most the model's 2 decoder layers, got 3"):
        quantize(quant_llama[0], tmp_path / "q", n=3)
    with pytest.raises(ConfigError, match=r"keep_sensitive_layers needs a quant_algo"):
        PretrainedModel.quantize(quant_llama[0], tmp_path / "q", QuantConfig(kv_cache_quant_algo="INT8",
                                                                             keep_sensitive_layers=1))
    assert main(["quantize", "--model-dir", str(quant_llama[0]), "--output-dir", str(tmp_path / "q"),
                 "--quant-algo", "FP8", "--keep-sensitive-layers", "5"]) == 1
    assert "--keep-sensitive-layers" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_most_sensitive_takes_the_highest_scores_in_layer_order():
    scores = {0: 0.1, 1: 0.5, 2: 0.3, 3: 0.5}
    assert sensitivity.most_sensitive(scores, 0) == []
    assert sensitivity.most_sensitive(scores, 2) == [1, 3]
    assert sensitivity.most_sensitive(scores, 3) == [1, 2, 3]
