"""The fast list -> tensor path gives exactly what torch.tensor gives."""

import random

import pytest
import torch

from kiln.runtime import host_tensors
from kiln.runtime.host_tensors import (StagingRing, copy_list, list_tensor, padded_rows, padded_tables, readback_buffer,
                                       release_readback)


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


class RecordingFence:
    """What StagingRing needs of a CUDA event, on the CPU: it notes when the ring waited on it."""

    def __init__(self):
        self.waited = False

    def synchronize(self):
        self.waited = True


def test_staging_ring_copies_exactly_and_waits_only_for_regions_it_overwrites():
    rng = random.Random(0)
    fences = []

    def new_fence(device):
        assert device == torch.device("cpu")  # (the fence goes on the stream of the copy's device)
        fences.append(RecordingFence())
        return fences[-1]

    ring = StagingRing(1024, pin_memory=False, new_fence=new_fence)
    regions = []  # (physical start, end, fence) of each copy so far
    for _ in range(200):
        values = [rng.randint(-2**31, 2**31 - 1) for _ in range(rng.randint(1, 64))]
        dst = torch.empty(len(values), dtype=torch.int32)
        ring.copy(torch.tensor(values, dtype=torch.int32), dst)
        assert dst.tolist() == values
        lo = ring.pending[-1][0] % 1024
        hi = lo + 4 * len(values)
        assert hi <= 1024  # a region never wraps round the end
        for old_lo, old_hi, fence in regions:  # every earlier region these bytes overlap was waited for first
            if old_lo < hi and lo < old_hi:
                assert fence.waited
        regions.append((lo, hi, fence := fences[-1]))
        assert not fence.waited
        if ring.next <= 1024:  # the first lap overwrites nothing: no wait
            assert not any(f.waited for f in fences)
    for i, (lo, hi, fence) in enumerate(regions):  # and only those: each region waited for was overwritten later
        if fence.waited:
            assert any(later_lo < hi and lo < later_hi for later_lo, later_hi, _ in regions[i + 1:])
    assert 0 < sum(f.waited for f in fences) < len(fences)


def test_staging_ring_fits_only_a_quarter_of_itself():
    ring = StagingRing(1024, pin_memory=False, new_fence=lambda device: RecordingFence())
    assert ring.fits(256) and not ring.fits(257)


def test_a_ring_made_in_inference_mode_takes_copies_outside_it():
    """Steps run in and out of inference mode (a step queued ahead copies outside it), and an inference tensor may
    not be written outside: the ring's buffer is a normal tensor whichever mode made it."""
    with torch.inference_mode():
        ring = StagingRing(1024, pin_memory=False, new_fence=lambda device: RecordingFence())
    assert not ring.buffer.is_inference()
    dst = torch.empty(3, dtype=torch.long)
    ring.copy(torch.tensor([5, 6, 7]), dst)
    assert dst.tolist() == [5, 6, 7]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory)")
def test_a_readback_buffer_first_taken_in_inference_mode_is_written_outside_it(monkeypatch):
    monkeypatch.setattr(host_tensors, "_readbacks", [])  # (so the first one is made here, in inference mode)
    with torch.inference_mode():
        release_readback(readback_buffer(4, torch.long))
    buffer = readback_buffer(4, torch.long)
    buffer[:4].copy_(torch.arange(4, device="cuda"), non_blocking=True)
    torch.cuda.synchronize()
    assert buffer[:4].tolist() == [0, 1, 2, 3]
    release_readback(buffer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory and its allocator)")
def test_copies_to_the_gpu_allocate_no_pinned_memory_once_warm():
    device = torch.device("cuda")
    list_tensor([1, 2, 3], torch.long, device)  # the ring's one allocation
    before = torch.cuda.host_memory_stats().get("num_host_alloc", 0)
    rng = random.Random(1)
    for n in range(1, 3000, 7):
        values = [rng.randrange(1 << 40) for _ in range(n)]
        assert list_tensor(values, torch.long, device).tolist() == values
        tables = [[rng.randrange(1000) for _ in range(rng.randint(1, 9))] for _ in range(n % 50 + 1)]
        out = torch.full((len(tables), 12), -1, dtype=torch.int32, device=device)
        copy_list(out[:, :9], padded_rows(tables, 9, 0), torch.int32)
        assert out[:, :9].tolist() == [t + [0] * (9 - len(t)) for t in tables]
    assert torch.cuda.host_memory_stats().get("num_host_alloc", 0) == before
