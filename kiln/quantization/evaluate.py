"""The quality cost of a quantization, measured at quantize time on held-out text.

For the float and the quantized model on the same token windows: perplexity of each, the mean per-token
KL divergence KL(p_float || p_quant) of the next-token distributions, and top-1 agreement (how often both
models rank the same next token first). Both are the reference forward of a TP=1 model; with a quantized KV
cache it quantize-dequantizes keys and values as the runtime's cache does (kiln.layers.attention.AttentionBatch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.layers.attention import AttentionBatch
from kiln.models.base import final_logits
from kiln.quantization import streaming

REPORT_FILE = "quant_report.json"


class _Totals:
    """The sums behind the metrics, over next-token predictions."""

    def __init__(self):
        self.nll_f = self.nll_q = self.kl = self.agree = 0.0
        self.count = 0
        self.windows: list[tuple[float, int]] = []  # each window's (sum of nll_q - nll_f, predictions)

    def add(self, logits_f: torch.Tensor, logits_q: torch.Tensor, ids: torch.Tensor) -> None:
        """One window: logits [t, vocab] of both models for token ids [t] (t - 1 predictions)."""
        lf, lq = logits_f[:-1].float().log_softmax(-1), logits_q[:-1].float().log_softmax(-1)
        target = ids[1:]
        nll_f, nll_q = (F.nll_loss(lp, target, reduction="sum").item() for lp in (lf, lq))
        self.nll_f, self.nll_q = self.nll_f + nll_f, self.nll_q + nll_q
        self.windows.append((nll_q - nll_f, target.numel()))
        self.kl += (lf.exp() * (lf - lq)).sum().item()
        self.agree += (lf.argmax(-1) == lq.argmax(-1)).sum().item()
        self.count += target.numel()

    def metrics(self) -> dict:
        ppl_f, ppl_q = math.exp(self.nll_f / self.count), math.exp(self.nll_q / self.count)
        return {"tokens": self.count, "perplexity_float": ppl_f, "perplexity_quantized": ppl_q,
                "perplexity_change_pct": 100.0 * (ppl_q / ppl_f - 1.0),
                "perplexity_change_se_pct": self.change_standard_error(ppl_q / ppl_f),
                "mean_kl_divergence": self.kl / self.count, "top1_agreement": self.agree / self.count}

    def change_standard_error(self, ratio: float) -> float | None:
        """The standard error of perplexity_change_pct, from how much the change varies between windows (each
        window's sum of log-likelihood differences against the mean's share of its tokens, a ratio estimate),
        through the delta method: 100 * ratio * SE(mean difference). It says how far a change on this text is
        from noise (windows of one text are not quite independent, so read it as a lower bound). None from a
        single window."""
        n = len(self.windows)
        if n < 2:
            return None
        mean = (self.nll_q - self.nll_f) / self.count
        spread = sum((d - mean * t) ** 2 for d, t in self.windows) * n / (n - 1)
        return 100.0 * ratio * math.sqrt(spread) / self.count


@torch.no_grad()
def compare(float_model, quant_model, windows, device="cpu") -> dict:
    """Metrics over every next-token prediction in each 1-D window of token ids (len - 1 predictions each), for
    two models in memory."""
    totals = _Totals()
    for row in windows:
        ids = row[None].to(device)
        totals.add(float_model(ids)[0], quant_model(ids)[0], ids[0])
    return totals.metrics()


@torch.no_grad()
def compare_streamed(source, quant_model, windows, device="cpu", max_windows: int = 64) -> dict:
    """compare's metrics for two lazy TP=1 models (the float source, the quantized one), streamed layer by layer
    as the calibrations are (kiln.quantization.streaming): memory holds one decoder layer of each (then both
    heads), the hidden states of up to max_windows windows of one length, and one window's logits; never a whole
    model. So a model larger than memory can be evaluated. Each pass over the layers takes max_windows windows."""
    totals = _Totals()
    by_length: dict[int, list[torch.Tensor]] = {}
    for row in windows:
        by_length.setdefault(len(row), []).append(row)
    for rows in by_length.values():
        for start in range(0, len(rows), max_windows):
            ids = torch.stack(rows[start:start + max_windows]).to(device)
            hidden_f, hidden_q = _final_hidden_states(source, quant_model, ids, device)
            head_f, head_q = _Head(source, device), _Head(quant_model, device)
            for w in range(ids.shape[0]):
                totals.add(head_f(hidden_f[w]), head_q(hidden_q[w]), ids[w])
            head_f.release()
            head_q.release()
    return totals.metrics()


def _final_hidden_states(source, quant_model, ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' last decoder layer outputs for windows ids [n, t], one layer of each in memory at a time (the
    quantized checkpoint keeps the source's embedding, so both start from it)."""
    n, t = ids.shape
    positions = torch.arange(t, device=device).repeat(n)
    batch = AttentionBatch.uncached(n, t)
    hidden_f = streaming.embed(source, ids, positions, device)
    hidden_q = hidden_f
    for i in range(source.config.num_hidden_layers):
        layer = streaming.load_layer(source, i, device)
        hidden_f = layer.full_output(hidden_f, positions, batch)
        del layer
        qlayer = streaming.load_module(quant_model.transformer.layers[str(i)], f"transformer.layers.{i}.",
                                       quant_model, device)
        hidden_q = qlayer.full_output(hidden_q, positions, batch)
        qlayer.to_empty(device="meta")  # back to shapes only
    return hidden_f.view(n, t, -1), hidden_q.view(n, t, -1)


class _Head:
    """A model's final norm and lm_head (quantized or not), loaded: hidden states [t, hidden] -> logits, as its
    forward applies them; release() drops the weights again."""

    def __init__(self, model, device):
        self.model = model
        self.norm = streaming.load_module(model.transformer.ln_f, "transformer.ln_f.", model, device)
        self.lm_head = streaming.load_module(model.lm_head, "lm_head.", model, device)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return final_logits(self.model.config, self.lm_head(self.norm(hidden)))

    def release(self) -> None:
        self.norm.to_empty(device="meta")
        self.lm_head.to_empty(device="meta")
        self.model.tie_weights()


def algo_label(quantization: dict) -> str:
    """"W4A16_AWQ", "INT8 KV cache", "W8A16 + FP8 KV cache", "FP8 (GPTQ-rounded)" from a QuantConfig.to_dict()."""
    kv, algo = quantization.get("kv_cache_quant_algo"), quantization["quant_algo"]
    if algo and quantization.get("weight_rounding", "nearest") != "nearest":
        algo = f"{algo} ({quantization['weight_rounding'].upper()}-rounded)"
    parts = [algo, kv and f"{kv} KV cache"]
    return " + ".join(p for p in parts if p)


def format_report(report: dict) -> str:
    m = report["metrics"]
    return (f"quality on {m['tokens']} held-out tokens: perplexity {m['perplexity_float']:.3f} (float) -> "
            f"{m['perplexity_quantized']:.3f} ({algo_label(report['quantization'])}, "
            f"{m['perplexity_change_pct']:+.2f}%{_plus_minus(m.get('perplexity_change_se_pct'))}), "
            f"mean KL {m['mean_kl_divergence']:.5f}, "
            f"top-1 agreement {100 * m['top1_agreement']:.1f}%")


def _plus_minus(se: float | None) -> str:
    """" +- 0.31 (1 SE)" after a perplexity change, where the text has windows enough to say."""
    return "" if se is None else f" +- {se:.2f} (1 SE)"
