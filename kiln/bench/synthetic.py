"""Write a Hugging Face Llama checkpoint of a real shape with random weights, tensor by tensor.

Used to measure conversion memory and (on GPUs) speed at real sizes without downloading weights.
    python -m kiln.bench.synthetic tinyllama-1.1b OUT_DIR [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kiln.bench.shapes import LLAMA_SHAPES
from kiln.checkpoint.atomic import atomic_dir
from kiln.checkpoint.safetensors_io import SafetensorsWriter
from kiln.config import torch_dtype


def hf_tensor_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    h, d = s["hidden_size"], s["hidden_size"] // s["num_attention_heads"]
    kv, ffn = s["num_key_value_heads"] * d, s["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (s["vocab_size"], h), "model.norm.weight": (h,)}
    if not s["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (s["vocab_size"], h)
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
            p + "mlp.down_proj.weight": (h, ffn),
        })
    return shapes


def write_synthetic_hf(out_dir: str | Path, shape: str, dtype: str = "float32", seed: int = 0) -> Path:
    s = LLAMA_SHAPES[shape]
    dt = torch_dtype(dtype)
    shapes = hf_tensor_shapes(s)
    generator = torch.Generator().manual_seed(seed)
    with atomic_dir(out_dir) as tmp:
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": dtype,
                  "rms_norm_eps": 1e-5, "hidden_act": "silu", **s}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        with SafetensorsWriter(tmp / "model.safetensors", {n: (dt, sh) for n, sh in shapes.items()},
                               {"format": "pt"}) as writer:
            for name, sh in shapes.items():
                scale = 1.0 if name.endswith("norm.weight") else sh[-1] ** -0.5
                writer.write(name, (torch.randn(sh, generator=generator) * scale).to(dt))
    return Path(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(LLAMA_SHAPES))
    parser.add_argument("output_dir")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    print(write_synthetic_hf(args.output_dir, args.shape, args.dtype))


if __name__ == "__main__":
    main()
