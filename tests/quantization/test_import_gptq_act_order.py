"""GPTQ act-order (`desc_act: true`) checkpoints import exactly: input channel c is in group g_idx[c], kiln sorts
the channels into runs of group_size and keeps the sort as `input_permutation` (W4A16_GPTQ). The tests write the
checkpoint themselves in GPTQ's published layout, with the act-order quantization written out here."""

import json

import pytest
import torch
from reference import QUANT_LLAMA
from safetensors.torch import save_file
from test_import_awq import GROUP, IDS, asymmetric_int4, pack_along_last

from kiln.builder import build
from kiln.checkpoint.convert import convert_checkpoint
from kiln.errors import CheckpointError, ConfigError
from kiln.models.base import PretrainedModel
from kiln.models.llama.model import LLaMAForCausalLM
from kiln.quantization.methods import quantized_linears

# HF projections fed the same input share their act-order (GPTQ sorts by the same input statistics).
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "mlp", "up_proj": "mlp"}


def act_order_int4(w_in_out: torch.Tensor, perm: torch.Tensor):
    """GPTQ act-order groups of w [in, out]: channels perm[0..g) form group 0, and so on. Returns the codes in
    the source's channel order, zeros and scales per group, and g_idx (g_idx[perm[i]] = i // group)."""
    q_sorted, z, s = asymmetric_int4(w_in_out[perm], GROUP)
    q = torch.empty_like(q_sorted)
    q[perm] = q_sorted
    g_idx = torch.empty(perm.numel(), dtype=torch.int32)
    g_idx[perm] = (torch.arange(perm.numel()) // GROUP).to(torch.int32)
    return q, z, s, g_idx


def write_act_order_gptq(hf_model, out_dir, tamper=None):
    """Save hf_model as a GPTQ desc_act checkpoint; return {hf linear name: (codes, zeros, scales, g_idx)}."""
    out_dir.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors, quantized, perms = {}, {}, {}
    for name, p in hf_model.state_dict().items():
        proj = name[: -len(".weight")]
        if not (proj.startswith("model.layers.") and proj.endswith("_proj") and name.endswith(".weight")):
            tensors[name] = p.contiguous()
            continue
        layer, kind = proj.rsplit(".", 2)[0], proj.rsplit(".", 1)[1]
        key = (layer, SHARED_INPUT.get(kind, kind))
        perm = perms.setdefault(key, torch.randperm(p.shape[1], generator=g))
        q, z, s, g_idx = act_order_int4(p.T, perm)
        if tamper:
            g_idx = tamper(proj, g_idx)
        quantized[proj] = (q, z, s, g_idx)
        tensors[proj + ".qweight"] = pack_along_last(q.T, list(range(8))).T.contiguous()
        tensors[proj + ".qzeros"] = pack_along_last((z - 1) & 0xF, list(range(8)))  # "gptq" stores zero - 1
        tensors[proj + ".scales"] = s
        tensors[proj + ".g_idx"] = g_idx
    save_file(tensors, str(out_dir / "model.safetensors"))
    config = hf_model.config.to_dict()
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": True,
                                     "sym": False, "checkpoint_format": "gptq"}
    (out_dir / "config.json").write_text(json.dumps(config))
    return quantized


def source_dequantized(q, z, s, g_idx) -> torch.Tensor:
    """GPTQ's own dequantization, written out: w[c] = (q[c] - z[g_idx[c]]) * s[g_idx[c]], as [out, in]."""
    gi = g_idx.long()
    return ((q.double() - z.double()[gi]) * s.double()[gi]).T


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    from conftest import make_hf_model

    return make_hf_model(tmp_path_factory.mktemp("float") / "hf", **QUANT_LLAMA)


@pytest.fixture(scope="module")
def imported(hf_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gptq_act_order")
    quantized = write_act_order_gptq(hf_llama, tmp / "src")
    return quantized, tmp / "src", convert_checkpoint(tmp / "src", tmp / "ckpt")


def test_config_is_w4a16_gptq_with_zero_point(imported):
    qc = LLaMAForCausalLM.from_hugging_face(imported[1]).config.quantization
    assert (qc.quant_algo.value, qc.group_size, qc.has_zero_point) == ("W4A16_GPTQ", GROUP, True)


def test_dequantized_weights_equal_the_sources_own_dequantization(imported):
    quantized, _, ckpt_dir = imported
    model = PretrainedModel.from_checkpoint(ckpt_dir).materialize()
    hf_of = {"attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "attention.dense": ("self_attn.o_proj",), "mlp.fc": ("mlp.gate_proj",), "mlp.gate": ("mlp.up_proj",),
             "mlp.proj": ("mlp.down_proj",)}
    for name, layer in quantized_linears(model).items():
        i, kiln_name = name.split(".")[2], name.split(".", 3)[3]
        expected = torch.cat([source_dequantized(*quantized[f"model.layers.{i}.{h}"]) for h in hf_of[kiln_name]])
        # float32 model: the codes, zeros and float16 scales are exact, so is each (q - z) * s
        assert torch.equal(layer.quant_method.dequantize(layer, torch.float32).double(), expected.float().double())
        assert not torch.equal(layer.input_permutation, torch.arange(layer.in_features, dtype=torch.int32))


def test_logits_of_checkpoint_and_engine_equal_transformers_with_the_dequantized_weights(hf_llama, imported):
    import copy

    quantized, src, ckpt_dir = imported
    ref = copy.deepcopy(hf_llama)
    with torch.no_grad():
        for proj, parts in quantized.items():
            ref.get_submodule(proj).weight.copy_(source_dequantized(*parts).float())
        expected = ref(IDS).logits
        model = PretrainedModel.from_checkpoint(ckpt_dir)
        for logits in (model(IDS), build(model).runtime_model()(IDS)):  # the engine fuses fc/gate
            assert (logits - expected).abs().max() <= 1e-4
        assert (expected - hf_llama(IDS).logits).abs().max() > 1e-3  # the reference really is quantized


def test_tp2_refuses_a_row_parallel_permutation_across_ranks(imported, tmp_path):
    with pytest.raises(ConfigError, match="tp_size 1"):
        convert_checkpoint(imported[1], tmp_path / "tp2", tp_size=2)
    assert not (tmp_path / "tp2").exists()


@pytest.mark.parametrize("tamper, match", [
    (lambda proj, g: torch.roll(g, 1) if proj.endswith("k_proj") else g, "different g_idx"),
    (lambda proj, g: torch.where(g == 0, torch.ones_like(g), g), "exactly group_size"),
])
def test_g_idx_that_kiln_cannot_represent_is_refused(hf_llama, tmp_path, tamper, match):
    write_act_order_gptq(hf_llama, tmp_path / "src", tamper)
    with pytest.raises(CheckpointError, match=match):
        convert_checkpoint(tmp_path / "src", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
