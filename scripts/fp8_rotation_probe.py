"""Does rotating the model first (QuaRot / SpinQuant's offline rotations) help static FP8 on the built-in model?
On the CPU (about 5 minutes):

    python scripts/fp8_rotation_probe.py

The float model is rotated into an equal one, weights only: each norm's weight folded into the linears after it
(the model's RMSNorms are then rotation-invariant), the residual stream turned by a random orthogonal Q1 (the
embedding and lm_head, now untied, times Q1; every linear reading the stream times Q1 on its input side, every
linear writing it times Q1^T on its output side), and each value head by a random orthogonal Q2 (the v rows of qkv
and the matching columns of the attention output). The rotated model's logits equal the float model's up to
float32 rounding (the first row checks it). Then each model runs as scripts/fp8_scale_granularity.py does:
e4m3 weights (or float) and static e4m3 activations, the per-linear scales calibrated on the shipped text.
No checkpoint is written; kiln ships no rotation.
"""

from __future__ import annotations

import torch
from fp8_scale_granularity import WEIGHTS, FakeQuantMatmul, static_activations

from kiln.checkpoint.convert import load_source_model
from kiln.default_model import default_model_path
from kiln.layers.linear import Linear
from kiln.quantization import calibration, evaluate, fp8

RUNS = ((False, "float", "static"), (True, "float", "float"), (True, "float", "static"), (True, "tensor", "static"))


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@torch.no_grad()
def rotate(model, config, gen: torch.Generator) -> None:
    """model (float32, materialized) -> the same function with its residual stream and value heads rotated."""
    t, d = model.transformer, config.head_size
    q1, q2 = random_orthogonal(config.hidden_size, gen), random_orthogonal(d, gen)
    emb = t.vocab_embedding.weight.double()
    model.lm_head.weight = torch.nn.Parameter(((emb * t.ln_f.weight.double()) @ q1).float(), requires_grad=False)
    t.vocab_embedding.weight = torch.nn.Parameter((emb @ q1).float(), requires_grad=False)
    t.ln_f.weight.fill_(1.0)
    v_rows = (config.num_attention_heads + config.num_key_value_heads) * d  # qkv's first v row
    for layer in t.layers.values():
        attn, mlp = layer.attention, layer.mlp
        for norm, readers in ((layer.input_layernorm, [attn.qkv]), (layer.post_layernorm, [mlp.fc, mlp.gate])):
            for linear in readers:
                linear.weight.copy_((linear.weight.double() * norm.weight.double()) @ q1)
            norm.weight.fill_(1.0)
        qkv, dense = attn.qkv.weight.double(), attn.dense.weight.double()
        for h in range(config.num_key_value_heads):
            rows = slice(v_rows + h * d, v_rows + (h + 1) * d)
            qkv[rows] = q2.T @ qkv[rows]
        for h in range(config.num_attention_heads):
            dense[:, h * d:(h + 1) * d] = dense[:, h * d:(h + 1) * d] @ q2
        attn.qkv.weight.copy_(qkv)
        attn.dense.weight.copy_(q1.T @ dense)
        mlp.proj.weight.copy_(q1.T @ mlp.proj.weight.double())


@torch.no_grad()
def input_absmax(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """{linear: max |x| of its input} over the calibration windows, for every decoder linear."""
    absmax: dict[str, torch.Tensor] = {}

    def observer(name):
        def observe(module, args):
            a = args[0].detach().abs().amax().float()
            absmax[name] = torch.maximum(absmax.get(name, a), a)
        return observe

    hooks = [m.register_forward_pre_hook(observer(n)) for n, m in decoder_linears(model).items()]
    for batch in tokens.split(8):
        model(batch)
    for hook in hooks:
        hook.remove()
    return absmax


def decoder_linears(model) -> dict[str, Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear) and n != "lm_head"}


def main() -> None:
    source = load_source_model(default_model_path(), "float32", None)
    tokenizer = calibration.source_tokenizer(source)
    windows = calibration.heldout_windows(tokenizer, source.config.vocab_size, 256)
    tokens = calibration.token_batches(calibration.read_texts(None), tokenizer, source.config.vocab_size, 32, 256)
    float_model = source.materialize("cpu")
    print("| rotated | weights | activations | perplexity change | mean KL / token | top-1 agreement |")
    print("| --- | --- | --- | --- | --- | --- |")
    for rotated, weights, activations in RUNS:
        model = load_source_model(default_model_path(), "float32", None).materialize("cpu")
        if rotated:
            rotate(model, source.config, torch.Generator().manual_seed(0))
        absmax = input_absmax(model, tokens) if activations == "static" else {}
        for name, linear in decoder_linears(model).items():
            act = static_activations(fp8.static_activation_scale(absmax[name], torch.float32)) \
                if activations == "static" else (lambda x: x.float())
            linear.matmul = FakeQuantMatmul(WEIGHTS[weights](linear.weight.detach()), act)
        m = evaluate.compare(float_model, model, windows)
        change = f"{m['perplexity_change_pct']:+.2f}% +- {m['perplexity_change_se_pct']:.2f}"
        print(f"| {'yes' if rotated else 'no'} | {weights} | {activations} | {change} | "
              f"{m['mean_kl_divergence']:.4f} | {m['top1_agreement']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
