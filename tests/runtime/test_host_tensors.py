"""The fast list -> tensor path gives exactly what torch.tensor gives."""

import random

import pytest
import torch

from kiln.runtime.host_tensors import list_tensor, padded_tables


@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
@pytest.mark.parametrize("n", [0, 1, 517])
def test_int_list_tensor_equals_torch_tensor(dtype, n):
    hi = torch.iinfo(dtype).max
    values = [random.Random(n).randint(-hi - 1, hi) for _ in range(n)]
    out = list_tensor(values, dtype, "cpu")
    expected = torch.tensor(values, dtype=dtype)
    assert out.dtype == dtype and out.shape == expected.shape and torch.equal(out, expected)


def test_float_list_tensor_equals_torch_tensor():
    values = [random.Random(1).uniform(-3, 3) for _ in range(33)] + [0.8, 1.0, 1e-30]  # (sampling parameters)
    out = list_tensor(values, torch.float32, "cpu")
    assert out.dtype == torch.float32 and torch.equal(out, torch.tensor(values, dtype=torch.float32))


def test_padded_tables_pad_each_row_to_the_width():
    rng = random.Random(0)
    tables = [[rng.randrange(10_000) for _ in range(rng.randint(1, 9))] for _ in range(50)]
    width = max(map(len, tables)) + 2  # wider than the longest row, as the graph buffers are
    out = padded_tables(tables, width, -7, "cpu")
    assert out.dtype == torch.int32
    assert torch.equal(out, torch.tensor([t + [-7] * (width - len(t)) for t in tables], dtype=torch.int32))
