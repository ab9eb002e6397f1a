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

REPORT_FILE = "quant_report.json"


@torch.no_grad()
def compare(float_model, quant_model, windows, device="cpu") -> dict:
    """Metrics over every next-token prediction in each 1-D window of token ids (len - 1 predictions each)."""
    nll_f = nll_q = kl = agree = 0.0
    count = 0
    for row in windows:
        ids = row[None].to(device)
        lf = float_model(ids)[0, :-1].float().log_softmax(-1)
        lq = quant_model(ids)[0, :-1].float().log_softmax(-1)
        target = ids[0, 1:]
        nll_f += F.nll_loss(lf, target, reduction="sum").item()
        nll_q += F.nll_loss(lq, target, reduction="sum").item()
        kl += (lf.exp() * (lf - lq)).sum().item()
        agree += (lf.argmax(-1) == lq.argmax(-1)).sum().item()
        count += target.numel()
    ppl_f, ppl_q = math.exp(nll_f / count), math.exp(nll_q / count)
    return {"tokens": count, "perplexity_float": ppl_f, "perplexity_quantized": ppl_q,
            "perplexity_change_pct": 100.0 * (ppl_q / ppl_f - 1.0), "mean_kl_divergence": kl / count,
            "top1_agreement": agree / count}


def algo_label(quantization: dict) -> str:
    """"W4A16_AWQ", "INT8 KV cache", "W8A16 + FP8 KV cache" from a QuantConfig.to_dict()."""
    kv = quantization.get("kv_cache_quant_algo")
    parts = [quantization["quant_algo"], kv and f"{kv} KV cache"]
    return " + ".join(p for p in parts if p)


def format_report(report: dict) -> str:
    m = report["metrics"]
    return (f"quality on {m['tokens']} held-out tokens: perplexity {m['perplexity_float']:.3f} (float) -> "
            f"{m['perplexity_quantized']:.3f} ({algo_label(report['quantization'])}, "
            f"{m['perplexity_change_pct']:+.2f}%), mean KL {m['mean_kl_divergence']:.5f}, "
            f"top-1 agreement {100 * m['top1_agreement']:.1f}%")
