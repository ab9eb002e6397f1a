"""The layer-by-layer walk every calibration shares (kiln.quantization.streaming.walk_layers)."""

from __future__ import annotations

import pytest
import torch

from kiln.checkpoint.convert import load_source_model
from kiln.config import QuantAlgo, QuantConfig
from kiln.mapping import Mapping
from kiln.quantization import streaming
from reference import quant_llama  # noqa: F401


def _source_and_tokens(quant_llama):
    hf_dir, hf = quant_llama
    tokens = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    return load_source_model(hf_dir, "float32", Mapping()), hf, tokens


def test_each_layer_reads_the_float_layers_output_as_transformers_computes_it(quant_llama):
    source, hf, tokens = _source_and_tokens(quant_llama)
    with torch.no_grad():
        expected = hf(tokens, output_hidden_states=True).hidden_states  # [embedding, layer 0, ...] (last: normed)
    qc = QuantConfig(quant_algo=QuantAlgo.W8A16)
    got, want = {}, {}
    for i, (prefix, layer, run) in enumerate(streaming.walk_layers(source, tokens, "cpu")):
        qkv = streaming.quantized_linears(layer, prefix, qc)["attention.qkv"]  # qkv reads the norm of the input
        run({qkv: lambda module, args, prefix=prefix: got.setdefault(prefix, args[0].clone())})
        with torch.no_grad():
            want[prefix] = layer.input_layernorm(expected[i].reshape(-1, hf.config.hidden_size))
    assert list(got) == [f"transformer.layers.{i}." for i in range(hf.config.num_hidden_layers)]
    for prefix in got:
        torch.testing.assert_close(got[prefix], want[prefix], atol=1e-5, rtol=1e-5, msg=prefix)


def test_a_layer_left_unrun_stops_the_walk(quant_llama):
    source, _, tokens = _source_and_tokens(quant_llama)
    walk = streaming.walk_layers(source, tokens, "cpu")
    next(walk)
    with pytest.raises(RuntimeError, match="layer 0 was not run"):
        next(walk)
