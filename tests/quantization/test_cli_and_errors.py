"""`kiln quantize` end to end (with --eval), and bad input: each mistake is a clear error that writes nothing."""

import json

import pytest
import torch

from kiln.cli import main
from kiln.config import QuantConfig
from kiln.errors import CheckpointError, ConfigError
from kiln.models.base import PretrainedModel
from reference import quant_llama  # noqa: F401
from conftest import leftovers

REPORT_METRICS = {"tokens", "perplexity_float", "perplexity_quantized", "perplexity_change_pct",
                  "perplexity_change_se_pct", "mean_kl_divergence", "top1_agreement"}


def test_cli_quantize_with_eval_writes_a_checkpoint_and_a_report(quant_llama, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["quantize", "--model-dir", str(quant_llama[0]), "--output-dir", str(out), "--quant-algo", "w4a16",
                 "--group-size", "32", "--has-zero-point", "--tp-size", "2", "--eval",
                 "--calib-max-seq-len", "64"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "top-1 agreement" in printed
    report = json.loads((out / "quant_report.json").read_text())
    assert set(report["metrics"]) == REPORT_METRICS
    m = report["metrics"]
    assert m["tokens"] > 0 and 0.0 <= m["top1_agreement"] <= 1.0 and m["mean_kl_divergence"] >= 0.0
    assert report["quantization"]["group_size"] == 32 and report["quantization"]["has_zero_point"]
    config = json.loads((out / "config.json").read_text())
    assert config["mapping"]["tp_size"] == 2 and config["quantization"]["quant_algo"] == "W4A16"
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]
    # an existing dir is refused without --overwrite
    assert main(["quantize", "--model-dir", str(quant_llama[0]), "--output-dir", str(out),
                 "--quant-algo", "W8A16"]) == 1
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("algo, kv", [("W8A16", None), ("W4A16", None), ("W4A16_AWQ", None), ("W4A8_AWQ", None),
                                      ("W8A8_SQ_PER_CHANNEL", None), ("FP8", None), ("FP8_PER_CHANNEL_PER_TOKEN", None),
                                      (None, "INT8"), (None, "FP8")])
def test_eval_reports_every_mode_on_a_users_held_out_text(quant_llama, tmp_path, algo, kv):
    """--eval for each weight algorithm and KV cache format, on --eval-dataset's text (a JSONL file here): the
    quantized model differs from the float one (KL > 0), and the report names the text."""
    from kiln.quantization.calibration import heldout_windows, read_texts

    text = tmp_path / "heldout.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"held out line {i}, " * 6}) for i in range(3)) + "\n")
    qc = QuantConfig(quant_algo=algo, kv_cache_quant_algo=kv, group_size=64)
    out = PretrainedModel.quantize(quant_llama[0], tmp_path / "q", qc, calib_size=4, calib_max_seq_len=32,
                                   evaluate=True, eval_dataset=text)
    report = json.loads((out / "quant_report.json").read_text())
    m = report["metrics"]
    assert report["eval_text"] == str(text) and report["quantization"]["quant_algo"] == algo
    assert report["quantization"]["kv_cache_quant_algo"] == kv
    windows = heldout_windows(None, quant_llama[1].config.vocab_size, 32, read_texts(text))  # (no tokenizer)
    assert m["tokens"] == sum(len(w) - 1 for w in windows) > 0
    assert m["mean_kl_divergence"] > 0 and 0.0 <= m["top1_agreement"] <= 1.0


def test_a_bad_eval_dataset_fails_before_anything_is_written(quant_llama, tmp_path, capsys):
    bad = tmp_path / "heldout.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    out = tmp_path / "q"
    assert main(["quantize", "--model-dir", str(quant_llama[0]), "--output-dir", str(out), "--quant-algo", "W8A16",
                 "--eval-dataset", str(bad)]) == 1
    assert f"{bad}:1: each JSONL line needs a string 'text' field" in capsys.readouterr().err
    assert leftovers(out) == []


def test_a_failed_evaluation_keeps_the_checkpoint(quant_llama, tmp_path, monkeypatch):
    """The report is written after the checkpoint is in place, so an evaluation that fails (out of memory, say)
    does not throw the quantization away."""
    from kiln.quantization import evaluate
    from kiln.models.base import CONFIG_FILE

    def out_of_memory(*args, **kwargs):
        raise MemoryError("the evaluation ran out of memory")

    monkeypatch.setattr(evaluate, "compare_streamed", out_of_memory)
    out = tmp_path / "q"
    with pytest.raises(MemoryError):
        PretrainedModel.quantize(quant_llama[0], out, QuantConfig(quant_algo="W8A16"), evaluate=True)
    assert (out / CONFIG_FILE).is_file() and (out / "rank0.safetensors").is_file()
    assert not (out / "quant_report.json").exists()
    assert leftovers(out) == [out.name] and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_cli_awq_with_a_user_jsonl_calibration_file(quant_llama, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"sample {i} " * 40}) for i in range(4)) + "\n")
    out = tmp_path / "awq"
    assert main(["quantize", "--model-dir", str(quant_llama[0]), "--output-dir", str(out), "--quant-algo",
                 "W4A16_AWQ", "--group-size", "64", "--calib-dataset", str(calib), "--calib-size", "4",
                 "--calib-max-seq-len", "32"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization"]["quant_algo"] == "W4A16_AWQ"


def test_cli_unknown_algo_lists_the_valid_ones(quant_llama, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model-dir", str(quant_llama[0]), "--output-dir", str(out),
                 "--quant-algo", "W3A16"]) == 1
    err = capsys.readouterr().err
    assert "quant_algo" in err and "W4A16_AWQ" in err and "W8A16" in err
    assert leftovers(out) == []


@pytest.mark.parametrize("kwargs,field", [
    (dict(quant_algo="W3A16"), "quant_algo"),
    (dict(quant_algo="W4A16", group_size=96), "group_size"),
])
def test_bad_quant_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("qc,field", [
    (QuantConfig(), "quant_algo"),  # nothing to quantize
    (QuantConfig(quant_algo="W8A16", exclude_modules=("lm_head", "layers.0.mlp.fc")), "exclude_modules"),
])
def test_unsupported_configs_fail_before_writing(quant_llama, tmp_path, qc, field):
    with pytest.raises(ConfigError, match=field):
        PretrainedModel.quantize(quant_llama[0], tmp_path / "q", qc)
    assert leftovers(tmp_path / "q") == []


def test_a_short_last_group_quantizes_at_tp1(tmp_path):
    """ffn 96 is 1.5 groups of 64: the last group of mlp.proj's rows is short (SmolLM2's 576 / 128 too)."""
    from conftest import make_hf_model
    from safetensors.torch import load_file

    import torch
    from reference import dequantized_hf

    hf = make_hf_model(tmp_path / "hf")
    out = PretrainedModel.quantize(tmp_path / "hf", tmp_path / "q", QuantConfig(quant_algo="W4A16", group_size=64))
    ckpt = load_file(out / "rank0.safetensors")
    assert ckpt["transformer.layers.0.mlp.proj.weights_scaling_factor"].shape == (64, 2)
    model = PretrainedModel.from_checkpoint(out)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert (model(ids) - dequantized_hf(hf, ckpt, model.config)(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("name,content,match", [
    ("bad.jsonl", '{"text": "fine"}\nnot json\n', r"bad.jsonl:2"),
    ("nofield.jsonl", '{"body": "x"}\n', "text"),
    ("empty.txt", "   \n", "no text"),
])
def test_corrupt_calibration_file_is_named_and_writes_nothing(quant_llama, tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(CheckpointError, match=match):
        PretrainedModel.quantize(quant_llama[0], tmp_path / "q", QuantConfig(quant_algo="W4A16_AWQ", group_size=64),
                                 calib_dataset=tmp_path / name)
    assert leftovers(tmp_path / "q") == []


def test_cli_quantize_runs_the_architectures_own_quantize(quant_llama, tmp_path, monkeypatch):
    """`Model.quantize` is a classmethod an architecture may override: `kiln quantize` calls the source's class."""
    from kiln.models.llama.model import LLaMAForCausalLM

    calls = []
    original = LLaMAForCausalLM.quantize.__func__

    def recorded(cls, *args, **kwargs):
        calls.append(cls)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(LLaMAForCausalLM, "quantize", classmethod(recorded))
    assert main(["quantize", "--model-dir", str(quant_llama[0]), "--output-dir", str(tmp_path / "q"),
                 "--quant-algo", "W8A16", "--device", "cpu"]) == 0
    assert calls == [LLaMAForCausalLM]


def test_cli_quantize_names_a_device_it_cannot_use(quant_llama, tmp_path, capsys):
    assert main(["quantize", "--model-dir", str(quant_llama[0]), "--output-dir", str(tmp_path / "q"),
                 "--quant-algo", "W8A16", "--device", "tpu"]) == 1
    assert "tpu" in capsys.readouterr().err and leftovers(tmp_path / "q") == []


@pytest.mark.parametrize("algo, kv, lm_head", [("W4A16_AWQ", None, False), ("FP8", None, True),
                                               ("W8A8_SQ_PER_CHANNEL", None, False), (None, "INT8", False)])
def test_streamed_evaluation_equals_the_two_models_in_memory(quant_llama, tmp_path, algo, kv, lm_head):
    """--eval streams both models layer by layer (evaluate.compare_streamed), as calibration does: its metrics
    equal those of the two models materialized whole (evaluate.compare), up to float32 summation order. Windows
    of two lengths (a short last one) and, with lm_head quantized, the quantized head."""
    from kiln.checkpoint.convert import load_source_model
    from kiln.quantization import calibration, evaluate

    excluded = () if lm_head else ("lm_head",)
    qc = QuantConfig(quant_algo=algo, kv_cache_quant_algo=kv, group_size=64, exclude_modules=excluded)
    ckpt = PretrainedModel.quantize(quant_llama[0], tmp_path / "q", qc, calib_size=4, calib_max_seq_len=32)
    windows = calibration.heldout_windows(None, quant_llama[1].config.vocab_size, 48)
    assert len({len(w) for w in windows}) == 2
    source = load_source_model(quant_llama[0], "auto")
    quantized = PretrainedModel.from_checkpoint(ckpt)
    streamed = evaluate.compare_streamed(source, quantized, windows, max_windows=3)
    whole = evaluate.compare(load_source_model(quant_llama[0], "auto").materialize(),
                             PretrainedModel.from_checkpoint(ckpt).materialize(), windows)
    assert streamed["tokens"] == whole["tokens"] and streamed["mean_kl_divergence"] > 0
    for key in ("perplexity_float", "perplexity_quantized", "perplexity_change_se_pct", "mean_kl_divergence",
                "top1_agreement"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key


def test_perplexity_change_standard_error_is_the_spread_of_the_windows_changes():
    """Each window's log-likelihood difference d_w over its t_w predictions, by cross-entropy in float64: the
    standard error of the mean difference D = sum d / sum t is sqrt(n / (n - 1) sum (d_w - D t_w)^2) / sum t, and
    the change's is 100 exp(D) times it. Identical models give 0; a single window, None."""
    import math

    import torch.nn.functional as F

    from kiln.quantization import evaluate

    g = torch.Generator().manual_seed(0)
    totals, same, by_hand = evaluate._Totals(), evaluate._Totals(), []
    for t in (9, 17, 33):
        ids = torch.randint(0, 50, (t,), generator=g)
        logits_f, logits_q = torch.randn(t, 50, generator=g) * 3, torch.randn(t, 50, generator=g) * 3
        totals.add(logits_f, logits_q, ids)
        same.add(logits_f, logits_f, ids)
        nll = [F.cross_entropy(x[:-1].double(), ids[1:], reduction="sum").item() for x in (logits_f, logits_q)]
        by_hand.append((nll[1] - nll[0], t - 1))
    tokens = sum(t for _, t in by_hand)
    mean = sum(d for d, _ in by_hand) / tokens
    se = math.sqrt(3 / 2 * sum((d - mean * t) ** 2 for d, t in by_hand)) / tokens
    assert totals.metrics()["perplexity_change_se_pct"] == pytest.approx(100 * math.exp(mean) * se, rel=1e-5)
    assert same.metrics()["perplexity_change_se_pct"] == 0
    one = evaluate._Totals()
    one.add(logits_f, logits_q, ids)
    assert one.metrics()["perplexity_change_se_pct"] is None
