"""kiln's safetensors reader and streaming writer: round trips, and interchange with the official library."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.checkpoint.safetensors_io import SafetensorsFile, SafetensorsWriter, save_tensors
from kiln.errors import CheckpointError


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "i64": torch.randint(-(2 ** 40), 2 ** 40, (5,), generator=g),
        "i32": torch.randint(-1000, 1000, (2, 3), generator=g, dtype=torch.int32),
        "i8": torch.randint(-128, 128, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 256, (3, 3), generator=g, dtype=torch.uint8),
        "bool": torch.rand(6, generator=g) > 0.5,
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.5),
        "odd_size": torch.randn(3, generator=g).half(),  # 6 bytes: the next tensor starts unaligned
        "after_odd": torch.randn(2, 3, generator=g),
    }


def assert_same(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype, name
        assert tuple(got[name].shape) == tuple(t.shape), name
        assert torch.equal(got[name], t), name


def test_round_trip_every_dtype(tmp_path):
    tensors = sample_tensors()
    save_tensors(tmp_path / "a.safetensors", tensors, {"format": "pt", "note": "hi"})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    assert f.metadata == {"format": "pt", "note": "hi"}
    assert f.shape("bf16") == (4, 6) and f.shape("empty") == (0, 4) and f.shape("scalar") == ()
    assert_same({n: f.get(n) for n in f.keys()}, tensors)


def test_load_all_equals_reading_each_tensor(tmp_path):
    """The parallel, mapped loader an engine uses on a GPU (run here onto the CPU: same code path)."""
    tensors = sample_tensors()
    path = tmp_path / "all.safetensors"
    save_tensors(path, tensors)
    file = SafetensorsFile(path)
    loaded = file.load_all(torch.device("cpu"), threads=3)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    loaded[next(iter(loaded))].zero_()  # its own memory: the file is untouched
    assert torch.equal(file.get(next(iter(tensors))), tensors[next(iter(tensors))])


def test_streaming_writer_takes_tensors_in_any_order(tmp_path):
    tensors = sample_tensors()
    specs = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    with SafetensorsWriter(tmp_path / "a.safetensors", specs) as w:
        for name in reversed(list(tensors)):
            w.write(name, tensors[name])
    f = SafetensorsFile(tmp_path / "a.safetensors")
    assert_same({n: f.get(n) for n in f.keys()}, tensors)


def test_writer_refuses_a_tensor_unlike_its_spec(tmp_path):
    with SafetensorsWriter(tmp_path / "a.safetensors", {"w": (torch.float32, (2, 2))}) as w:
        with pytest.raises(CheckpointError, match="'w'"):
            w.write("w", torch.zeros(2, 3))
        with pytest.raises(CheckpointError, match="'w'"):
            w.write("w", torch.zeros(2, 2, dtype=torch.float16))
        w.write("w", torch.zeros(2, 2))


def test_writer_refuses_to_close_with_tensors_unwritten(tmp_path):
    specs = {"a": (torch.float32, (2,)), "b": (torch.float32, (3,))}
    with pytest.raises(CheckpointError, match="'b'"):
        with SafetensorsWriter(tmp_path / "a.safetensors", specs) as w:
            w.write("a", torch.ones(2))


def test_written_files_load_with_the_official_library(tmp_path):
    tensors = sample_tensors()
    save_tensors(tmp_path / "a.safetensors", tensors, {"format": "pt"})
    assert_same(load_file(tmp_path / "a.safetensors"), tensors)


def test_data_section_is_8_byte_aligned(tmp_path):
    save_tensors(tmp_path / "a.safetensors", {"x": torch.ones(3)})
    raw = (tmp_path / "a.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    assert (8 + size) % 8 == 0
    json.loads(raw[8:8 + size])


def test_official_files_load_with_kiln(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    assert f.metadata == {"format": "pt"}
    assert_same({n: f.get(n) for n in f.keys()}, tensors)


def test_read_tensors_are_independent_and_writable(tmp_path):
    save_tensors(tmp_path / "a.safetensors", {"x": torch.arange(4.0)})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    a = f.get("x")
    a += 1
    assert torch.equal(f.get("x"), torch.arange(4.0))


@pytest.mark.parametrize("cut", [4, 20, -1])
def test_truncated_files_are_named(tmp_path, cut):
    path = tmp_path / "a.safetensors"
    save_tensors(path, {"x": torch.ones(16), "y": torch.ones(16)})
    raw = path.read_bytes()
    path.write_bytes(raw[:cut])
    with pytest.raises(CheckpointError) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)


def test_entry_whose_size_does_not_match_its_shape_is_named(tmp_path):
    path = tmp_path / "a.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="'x'"):
        SafetensorsFile(path)


def test_unknown_dtype_is_named(tmp_path):
    path = tmp_path / "a.safetensors"
    header = json.dumps({"x": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match="'x'"):
        SafetensorsFile(path)


def test_missing_file_and_missing_tensor_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        SafetensorsFile(tmp_path / "nope.safetensors")
    save_tensors(tmp_path / "a.safetensors", {"x": torch.ones(1)})
    with pytest.raises(CheckpointError, match="'y'"):
        SafetensorsFile(tmp_path / "a.safetensors").get("y")
