"""The quantized formats: packing, and each quantizer against the float math written out in reference.py."""

import pytest
import torch

from kiln.errors import ConfigError
from kiln.quantization.weight_only import (dequantize_int4, dequantize_int8, pack_int4, quantize_int4_groups,
                                           quantize_int8_per_channel, unpack_int4)
from reference import dequantize, rtn_int4, unpack


def test_int4_pack_unpack_round_trip_and_documented_layout():
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_int4(codes)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(unpack(packed), codes.long())  # low nibble = even column, high nibble = odd column
    assert packed[0, 0] == codes[0, 0] + 16 * codes[0, 1]


def test_int8_per_channel_matches_written_out_math():
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(1))
    q, s = quantize_int8_per_channel(w, torch.float32)
    scale = w.abs().amax(1) / 127
    assert torch.allclose(s, scale)
    assert torch.equal(q.long(), torch.round(w / s[:, None]).long())
    deq = dequantize_int8(q, s, torch.float32)
    assert torch.equal(deq, dequantize({"weight": q, "weights_scaling_factor": s}))
    assert ((deq - w).abs() <= s[:, None] / 2 + 1e-7).all()  # round to nearest: at most half a step


@pytest.mark.parametrize("group,zero_point,inputs", [(32, False, 256), (64, False, 256), (128, False, 256),
                                                     (32, True, 256), (128, True, 256),
                                                     (128, False, 576), (64, True, 96)])  # short last group
def test_int4_groups_match_written_out_math(group, zero_point, inputs):
    w = torch.randn(24, inputs, generator=torch.Generator().manual_seed(group))
    packed, s, z = quantize_int4_groups(w, group, zero_point, torch.float32)
    codes, s_ref, z_ref = rtn_int4(w, group, zero_point)
    assert torch.equal(s, s_ref) and torch.equal(unpack(packed), codes)
    assert (z is None) == (not zero_point) and (z is None or torch.equal(z, z_ref))
    deq = dequantize_int4(packed, s, z, group, torch.float32)
    tensors = {"weight": packed, "weights_scaling_factor": s, **({"zero_point": z} if zero_point else {})}
    assert torch.allclose(deq, dequantize(tensors, group), atol=1e-6)
    step = s.repeat_interleave(group, dim=1)[:, :inputs]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()


def test_bf16_scales_are_rounded_before_the_codes():
    """The dequantized weight equals the quantizer's reconstruction exactly in the model dtype."""
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(3))
    packed, s, z = quantize_int4_groups(w, 64, True, torch.bfloat16)
    assert s.dtype == torch.bfloat16 and z.dtype == torch.bfloat16
    codes, s_ref, z_ref = rtn_int4(w, 64, True, torch.bfloat16)
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref) and torch.equal(unpack(packed), codes)
    ref = ((codes.double().reshape(16, 2, 64) - z.double()[..., None]) * s.double()[..., None]).reshape(16, 128)
    assert torch.equal(dequantize_int4(packed, s, z, 64, torch.float32), ref.float())


def test_int4_needs_an_even_number_of_inputs():
    with pytest.raises(ConfigError, match="even"):
        quantize_int4_groups(torch.randn(4, 97), 32, False, torch.float32)
