"""What FP8's quality cost on the built-in model comes from: e4m3 weights and activations at several scale
granularities, each evaluated as `kiln quantize --eval` does (same held-out text, same metrics). On the CPU:

    python scripts/fp8_scale_granularity.py [WEIGHTS:ACTIVATIONS ...]

WEIGHTS is one of tensor, channel, block64, block32, group64 (an e4m3 scale per tensor, output row, 64 x 64 or 32 x
32 block, or 64 inputs of a row, max |w| at 448), group64-searched (FP8_BLOCK_SCALES' scales), channel-searched (one
searched scale a row) or float; ACTIVATIONS one of token, group64, group32 (a dynamic scale per token, or per 64 /
32 of its values), static (FP8's own: one scale per linear, max |x| over the calibration text / 448, as `kiln
quantize` calibrates it), mantissa3 (3 mantissa bits, as e4m3, with an unbounded exponent: no range limit at all)
or float.
Every linear that `kiln quantize --quant-algo FP8` quantizes (lm_head stays in full precision) runs quantize-
dequantized weights and activations in float32, from the float model's weights; no checkpoint is written. The
defaults run the rows of docs/quantization.md.
"""

from __future__ import annotations

import sys

import torch

from kiln.checkpoint.convert import load_source_model
from kiln.config import QuantConfig
from kiln.default_model import default_model_path
from kiln.layers.linear import Linear
from kiln.quantization import act_stats, calibration, evaluate, fp8
from kiln.quantization.fp8_block import dequantize_fp8_groups, quantize_fp8_groups_weight
from kiln.quantization.methods import is_excluded

DEFAULT_RUNS = ("tensor:float", "channel:float", "group64:float", "group64-searched:float", "float:mantissa3",
                "float:token", "float:group64", "tensor:token", "channel:token", "channel:group64", "block64:group64",
                "group64:group64", "group64-searched:group64", "block32:group32")


def e4m3_blocks(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """x [R, C] quantize-dequantized to e4m3 with one scale per rows x cols block (its max |x| at 448)."""
    r, c = x.shape
    rows, cols = min(rows, r), min(cols, c)
    blocks = x.float().reshape(r // rows, rows, c // cols, cols)
    scale = (blocks.abs().amax(dim=(1, 3), keepdim=True) / fp8.FP8_MAX).clamp(min=1e-12)
    return (fp8.to_fp8(blocks / scale).float() * scale).reshape(r, c)


def searched_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """FP8_BLOCK_SCALES' weights: a scale per row and group, searched for the least squared error."""
    q, scale = quantize_fp8_groups_weight(w, group, torch.float32)
    return dequantize_fp8_groups(q, scale, group, torch.float32)


def mantissa3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to 3 mantissa bits (nearest, ties to even), any exponent."""
    m, e = torch.frexp(x.float())  # x = m 2^e, 0.5 <= |m| < 1: 4 significant bits are m to 2^-4
    return torch.ldexp(torch.round(m * 16) / 16, e)


WEIGHTS = {"tensor": lambda w: e4m3_blocks(w, *w.shape), "channel": lambda w: e4m3_blocks(w, 1, w.shape[1]),
           "block64": lambda w: e4m3_blocks(w, 64, 64), "block32": lambda w: e4m3_blocks(w, 32, 32),
           "group64": lambda w: e4m3_blocks(w, 1, 64), "group64-searched": lambda w: searched_groups(w, 64),
           "channel-searched": lambda w: searched_groups(w, w.shape[1]),
           "tensor-searched": lambda w: searched_groups(w.reshape(1, -1), w.numel()).reshape(w.shape),
           "float": lambda w: w.float()}
ACTIVATIONS = {"token": lambda x: e4m3_blocks(x, 1, x.shape[1]), "group64": lambda x: e4m3_blocks(x, 1, 64),
               "group32": lambda x: e4m3_blocks(x, 1, 32), "mantissa3": mantissa3, "float": lambda x: x.float()}


class FakeQuantMatmul:
    """A linear's matmul on e4m3-rounded weights and activations, in float32 (Linear.forward adds the bias).
    A plain object, not a module: set on a Linear, it shadows the class's matmul."""

    def __init__(self, weight: torch.Tensor, activations):
        self.weight, self.activations = weight, activations

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activations(x.reshape(-1, x.shape[-1])) @ self.weight.T
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def static_activations(scale: torch.Tensor):
    """e4m3 codes of x over FP8's static per-tensor scale, dequantized (values past the calibrated range clip)."""
    return lambda x: fp8.to_fp8((x.float() / scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX)).float() * scale


def calibrated_absmax(source) -> dict[str, torch.Tensor]:
    """{linear: max |x| per input channel} on the shipped calibration text, as `kiln quantize --quant-algo FP8`
    calibrates (its default 32 windows of 256 tokens)."""
    tokens = calibration.token_batches(calibration.read_texts(None), calibration.source_tokenizer(source),
                                       source.config.vocab_size, 32, 256)
    return act_stats.calibrate_absmax(source, tokens, QuantConfig(quant_algo="FP8"))


def fake_quantized(model, weights: str, activations: str, absmax: dict) -> dict:
    """{name: original linear} after the linears FP8 quantizes run e4m3 fakes (restore with the result)."""
    excluded = QuantConfig(quant_algo="FP8").exclude_modules
    swapped = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear) and not is_excluded(name, excluded):
            act = static_activations(fp8.static_activation_scale(absmax[name], torch.float32)) \
                if activations == "static" else ACTIVATIONS[activations]
            module.matmul = FakeQuantMatmul(WEIGHTS[weights](module.weight.detach()), act)
            swapped[name] = module
    return swapped


def main(runs: list[str]) -> None:
    source = load_source_model(default_model_path(), "float32", None)
    # (calibration streams the source's layers and leaves them unloaded: it runs on a source of its own)
    static = any(run.endswith(":static") for run in runs)
    absmax = calibrated_absmax(load_source_model(default_model_path(), "float32", None)) if static else {}
    windows = calibration.heldout_windows(calibration.source_tokenizer(source), source.config.vocab_size, 256)
    float_model = source.materialize("cpu")
    quant_model = load_source_model(default_model_path(), "float32", None).materialize("cpu")  # (not the same one)
    print("| weights | activations | perplexity change | mean KL / token | top-1 agreement |")
    print("| --- | --- | --- | --- | --- |")
    for run in runs:
        weights, activations = run.split(":")
        swapped = fake_quantized(quant_model, weights, activations, absmax)
        m = evaluate.compare(float_model, quant_model, windows)
        for module in swapped.values():
            del module.matmul  # back to the class's own matmul
        change = f"{m['perplexity_change_pct']:+.2f}% +- {m['perplexity_change_se_pct']:.2f}"
        print(f"| {weights} | {activations} | {change} | {m['mean_kl_divergence']:.4f} | {m['top1_agreement']:.1%} |",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(DEFAULT_RUNS))
