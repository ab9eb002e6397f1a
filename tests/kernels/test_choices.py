"""Kernel choices kept on disk (kiln.kernels.choices): a restarted process reads what the last one timed, a
corrupt file is timed again, writes merge and land atomically, and KILN_AUTOTUNE=0 keeps the disk out of it."""

import json
import subprocess
import sys

import pytest
import torch

from kiln.kernels import choices


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KILN_AUTOTUNE", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    choices.forget_all()
    yield tmp_path
    choices.forget_all()


def test_a_restart_reads_the_choices_of_the_last_process(cache_dir):
    tiles = choices.KernelChoices("test_tile")
    tiles[(4096, 512, 128, False, 1, torch.bfloat16)] = (8, 512, 4)
    tiles[(6144, 512, 128, True, 1, torch.bfloat16)] = None
    faster = choices.KernelChoices("test_faster")
    faster[(4096, 4096, torch.bfloat16, 1, 0)] = True
    assert choices.choices_file().parent == cache_dir / "kernel-choices"

    assert choices.counts == {"timed": 3, "from_disk": 0}
    held = choices.held()  # what kiln bench records: every kind's choices, the keys as text
    assert held["test_tile|4096|512|128|False|1|torch.bfloat16"] == (8, 512, 4)
    assert held["test_faster|4096|4096|torch.bfloat16|1|0"] is True and len(held) == 3
    choices.forget_all()  # as a new process starts
    assert not tiles.items() and choices.counts == {"timed": 0, "from_disk": 0}
    assert tiles[(4096, 512, 128, False, 1, torch.bfloat16)] == (8, 512, 4)  # a tuple again, as the kernels take it
    assert (6144, 512, 128, True, 1, torch.bfloat16) in tiles and tiles.get((6144, 512, 128, True, 1, torch.bfloat16),
                                                                           "default") is None
    assert faster[(4096, 4096, torch.bfloat16, 1, 0)] is True
    assert (1, 2, 3) not in tiles and tiles.get((1, 2, 3), (1, 1, 1)) == (1, 1, 1)
    with pytest.raises(KeyError):
        tiles[(1, 2, 3)]
    assert choices.counts == {"timed": 0, "from_disk": 3}  # what kiln bench reports of its restart


def test_another_process_reads_them_from_the_file(cache_dir):
    choices.KernelChoices("test_tile")[("gemv", 300, 256, 128, True, 1)] = (16, 128, 4)
    code = ("from kiln.kernels.choices import KernelChoices; "
            "print(KernelChoices('test_tile').get(('gemv', 300, 256, 128, True, 1)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(16, 128, 4)"


def test_writes_merge_with_what_other_processes_wrote(cache_dir):
    tiles = choices.KernelChoices("test_tile")
    tiles[(1,)] = (1, 2, 3)
    path = choices.choices_file()
    entries = json.loads(path.read_text())
    other = next(iter(entries)).replace("|1", "|2")  # another process's choice, written after this one read
    path.write_text(json.dumps({**entries, other: [4, 5, 6]}))
    tiles[(3,)] = (7, 8, 9)
    assert set(json.loads(path.read_text())) == {*entries, other, other.replace("|2", "|3")}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "no temporary sibling is left"


def test_a_corrupt_file_counts_as_empty_and_is_rewritten(cache_dir):
    path = choices.choices_file()
    path.parent.mkdir(parents=True)
    path.write_text('{"half a file": [1, ')
    tiles = choices.KernelChoices("test_tile")
    assert (1,) not in tiles  # timed again, no crash at engine load
    tiles[(1,)] = (1, 2, 3)
    choices.forget_all()
    assert tiles[(1,)] == (1, 2, 3)


def test_tuning_off_neither_reads_nor_writes_the_file(cache_dir, monkeypatch):
    tiles = choices.KernelChoices("test_tile")
    tiles[(1,)] = (1, 2, 3)
    monkeypatch.setenv("KILN_AUTOTUNE", "0")
    choices.forget_all()
    assert (1,) not in tiles  # the tests' first-candidate runs are not steered by an earlier tuned run
    tiles[(2,)] = (4, 5, 6)
    assert tiles[(2,)] == (4, 5, 6)
    monkeypatch.setenv("KILN_AUTOTUNE", "1")
    choices.forget_all()
    assert tiles.get((2,)) is None and tiles[(1,)] == (1, 2, 3)


def test_a_cache_that_cannot_be_written_costs_only_the_next_start(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache dir would be")
    monkeypatch.setenv("KILN_CACHE_DIR", str(blocker))
    monkeypatch.setenv("KILN_AUTOTUNE", "1")
    choices.forget_all()
    tiles = choices.KernelChoices("test_tile")
    tiles[(1,)] = (1, 2, 3)  # no exception: the engine keeps loading
    tiles[(2,)] = (4, 5, 6)
    assert tiles[(1,)] == (1, 2, 3) and tiles[(2,)] == (4, 5, 6)
    warnings = [r.getMessage() for r in caplog.records if "not kept for the next start" in r.getMessage()]
    assert len(warnings) == 1 and "KILN_CACHE_DIR" in warnings[0] and str(blocker) in warnings[0]
    choices.forget_all()
