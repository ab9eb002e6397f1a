"""Where a family's GPU engine first departs from kiln's CPU reference: one prefill step of a tiny random model
(tests/runtime/test_gpu_runtime.py's FAMILIES) in float32 through the GPU runner and through the reference, every
module's output compared (max abs difference, and the output's scale), in the order the modules ran.

    PYTHONPATH=. python scripts/gpu_module_diff.py minimax_m2

Thirty-ninth session: MiniMax-M2's GPU greedy tokens differed from transformers' on the GPU; this found kiln's GPU
engine within 3e-6 of its reference at every module, which pointed at transformers' CUDA path."""

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path[:0] = ["tests", "tests/runtime"]
from dist_logits_main import PROMPTS, steps  # noqa: E402
from test_gpu_runtime import make_family_hf  # noqa: E402

from kiln.builder import Engine  # noqa: E402
from kiln.config import BuildConfig  # noqa: E402
from kiln.llmapi.llm import open_engine_dir  # noqa: E402
from kiln.runtime.model_runner import ModelRunner  # noqa: E402


def record_outputs(model, store: dict) -> None:
    """store[module name] = its first output, float32 on the CPU, one row a token."""
    for name, module in model.named_modules():
        def hook(module, args, out, name=name):
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(out, torch.Tensor) and name not in store:
                store[name] = out.detach().float().cpu().reshape(-1, out.shape[-1])
        module.register_forward_hook(hook)


def main(family: str) -> None:
    tmp = Path(tempfile.mkdtemp())
    os.environ["KILN_CACHE_DIR"] = str(tmp / "cache")
    make_family_hf(tmp / "hf", family)
    build_config = BuildConfig(max_batch_size=4, max_seq_len=256, kv_cache_max_tokens=2048)
    engine_dir = open_engine_dir(tmp / "hf", "float32", build_config)
    gpu = Engine.from_dir(engine_dir).runtime_model("cuda")
    reference = Engine.from_dir(engine_dir).runtime_model("cpu")
    got, want = {}, {}
    record_outputs(gpu, got)
    record_outputs(reference, want)
    logits = ModelRunner(gpu, "cuda", build_config).execute(next(steps(build_config.tokens_per_block)))
    tokens = len(PROMPTS[0])  # the GPU step packs the prompts: the first one's rows come first
    want_logits = reference(torch.tensor([PROMPTS[0]]))[0, -1]
    print(f"logits, first prompt: {(logits[0].float().cpu() - want_logits).abs().max():.3g}")
    for name, w in want.items():
        g = got.get(name)
        if g is None or g.shape[-1] != w.shape[-1]:
            continue
        print(f"{name or '(model)'}: {(g[:tokens] - w[:tokens]).abs().max():.3g} (scale {w.abs().max():.3g})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "minimax_m2")
