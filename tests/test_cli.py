"""The `kiln` command: help and version, convert -> build -> inspect on a tiny model, and user errors printed
as one line. Errors and the version run in a real subprocess, so stderr is exactly what a user sees."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import kiln
from kiln.builder import Engine
from kiln.cli import main

from conftest import TINY_LLAMA

SUBCOMMANDS = ["convert", "build", "run", "inspect"]


def kiln_cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kiln: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_version():
    result = kiln_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kiln {kiln.__version__}"


@pytest.mark.parametrize("argv", [["--help"]] + [[sub, "--help"] for sub in SUBCOMMANDS])
def test_help_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kiln")
    if argv == ["--help"]:
        assert all(sub in out for sub in SUBCOMMANDS)


def test_help_names_flags_after_config_fields(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    out = capsys.readouterr().out
    for flag in ("--max-batch-size", "--max-input-len", "--max-seq-len", "--max-num-tokens", "--tokens-per-block",
                 "--kv-cache-free-gpu-mem-fraction", "--kv-cache-max-tokens", "--capacity-scheduler-policy"):
        assert flag in out


def test_convert_build_inspect(tiny_llama_session, tmp_path, capsys):
    hf_dir, hf = tiny_llama_session
    ckpt, engine = tmp_path / "ckpt", tmp_path / "engine"
    assert main(["convert", "--model-dir", str(hf_dir), "--output-dir", str(ckpt)]) == 0
    assert (ckpt / "rank0.safetensors").is_file()
    assert main(["build", "--checkpoint-dir", str(ckpt), "--output-dir", str(engine), "--max-seq-len", "64",
                 "--max-batch-size", "3"]) == 0
    capsys.readouterr()

    loaded = Engine.from_dir(engine)
    assert (loaded.build_config.max_seq_len, loaded.build_config.max_batch_size) == (64, 3)  # flags -> config
    ids = torch.arange(10)[None] % TINY_LLAMA["vocab_size"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.runtime_model()(ids), hf(ids).logits, atol=1e-4, rtol=0)

    assert main(["inspect", str(engine), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"engine: {engine}")
    assert "LlamaForCausalLM" in out and "rank0.safetensors" in out
    assert "transformer.layers.0.mlp.fc_gate.weight [192, 64]" in out

    assert main(["inspect", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "checkpoint"
    with safe_open(ckpt / "rank0.safetensors", "pt") as f:
        assert set(info["ranks"]["rank0.safetensors"]["tensors"]) == set(f.keys())


def test_convert_with_tp_size_writes_every_rank(tiny_llama_session, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "--model-dir", str(tiny_llama_session[0]), "--output-dir", str(ckpt),
                 "--tp-size", "2"]) == 0
    assert sorted(p.name for p in ckpt.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]


def test_missing_model_dir_is_one_line(tmp_path):
    missing = tmp_path / "no_such_model"
    result = kiln_cli("convert", "--model-dir", missing, "--output-dir", tmp_path / "out")
    assert_one_line_error(result, str(missing))
    assert not (tmp_path / "out").exists()
    assert_one_line_error(kiln_cli("build", "--checkpoint-dir", missing, "--output-dir", tmp_path / "e"),
                          str(missing))


def test_a_source_model_dir_where_a_kiln_dir_is_read_is_one_line_naming_convert(tiny_llama_session, tmp_path):
    """kiln build and kiln inspect read kiln dirs; a Hugging Face dir there is told to go through kiln convert."""
    hf_dir, _ = tiny_llama_session
    result = kiln_cli("build", "--checkpoint-dir", hf_dir, "--output-dir", tmp_path / "engine")
    assert_one_line_error(result, "not a kiln checkpoint", f"kiln convert --model-dir {hf_dir}")
    assert not (tmp_path / "engine").exists()
    assert_one_line_error(kiln_cli("inspect", hf_dir), "not a kiln checkpoint", "kiln convert")
    gguf = tmp_path / "model.gguf"  # inspect reads a .gguf too: a broken one is named
    gguf.write_bytes(b"GGUF")
    assert_one_line_error(kiln_cli("inspect", gguf), str(gguf), "not a readable GGUF file")


def test_serve_on_a_taken_port_is_one_line_naming_the_flag(tiny_llama_session):
    """The server listens before it loads the model; a port another socket holds fails there, in one line."""
    import socket

    hf_dir, _ = tiny_llama_session
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = kiln_cli("serve", hf_dir, "--port", port, "--device", "cpu")
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}", "--port")


def test_bench_against_no_server_is_one_line_naming_the_url():
    """`kiln bench --serve URL` with nothing listening there: one line, the URL and how to start a server."""
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago, now closed again: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = kiln_cli("bench", "--serve", f"http://127.0.0.1:{port}", "--num-requests", 1, "--token-id-prompts")
    assert_one_line_error(result, f"cannot reach a server at http://127.0.0.1:{port}", "kiln serve")


def test_a_bench_dataset_of_text_prompts_is_one_line_naming_the_line_and_the_fix(tmp_path):
    """trtllm-bench also reads a text "prompt"; kiln bench reads token ids, and says so before any work."""
    dataset = tmp_path / "text.jsonl"
    dataset.write_text('{"task_id": 0, "input_ids": [1, 2], "output_tokens": 3}\n'
                       '{"task_id": 1, "prompt": "Hi", "output_tokens": 3}\n')
    result = kiln_cli("bench", "--synthetic", "llama-3.2-1b", "--dataset", dataset, "--device", "cpu")
    assert_one_line_error(result, f"{dataset} line 2", '"prompt"', '"input_ids"', "prepare_dataset.py")
    assert "| system |" not in result.stdout


def test_prompt_ids_that_are_not_integers_are_one_line(tiny_llama_session):
    hf_dir, _ = tiny_llama_session
    result = kiln_cli("run", "--model", hf_dir, "--prompt-ids", "1,x", "--device", "cpu")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "'1,x' is not a list of token ids" in result.stderr


def test_existing_output_dir_without_overwrite_is_one_line(tiny_llama_session, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    result = kiln_cli("convert", "--model-dir", tiny_llama_session[0], "--output-dir", out)
    assert_one_line_error(result, str(out), "--overwrite")
    assert (out / "keep").read_text() == "mine"
    result = kiln_cli("convert", "--model-dir", tiny_llama_session[0], "--output-dir", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (out / "rank0.safetensors").is_file() and not (out / "keep").exists()


def test_unsupported_architecture_is_one_line_naming_the_supported(tiny_llama_session, tmp_path):
    import shutil

    src = tmp_path / "foo"
    shutil.copytree(tiny_llama_session[0], src)
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["FooForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    result = kiln_cli("convert", "--model-dir", src, "--output-dir", tmp_path / "out")
    assert_one_line_error(result, "FooForCausalLM", "LlamaForCausalLM")
    assert not (tmp_path / "out").exists()  # nothing half-written is left at the target
    assert not list(tmp_path.glob(".out*"))


def test_build_limit_out_of_range_is_one_line(tiny_llama_session, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "--model-dir", str(tiny_llama_session[0]), "--output-dir", str(ckpt)]) == 0
    result = kiln_cli("build", "--checkpoint-dir", ckpt, "--output-dir", tmp_path / "engine", "--max-seq-len",
                      str(TINY_LLAMA["max_position_embeddings"] * 2))
    assert_one_line_error(result, "max_seq_len")


def test_run_with_token_ids_on_a_tiny_model(tiny_llama_session, tmp_path, monkeypatch, capsys):
    """Tiny models have no tokenizer, so this passes --prompt-ids (tests/test_smollm2.py runs text)."""
    from conftest import hf_greedy

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    hf_dir, hf = tiny_llama_session
    assert main(["run", "--engine-dir", str(hf_dir), "--prompt-ids", "5,9,17", "--max-tokens", "12",
                 "--ignore-eos", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.split()
    assert [int(t) for t in out] == hf_greedy(hf, [5, 9, 17], 12)


def test_runtime_flags_size_a_built_engines_kv_cache(tiny_llama_session, tmp_path, capsys, caplog):
    """--kv-cache-max-tokens (a BuildConfig runtime field) applies to an engine built without it, with no
    warning about the engine's own limits."""
    import logging

    from conftest import hf_greedy

    hf_dir, hf = tiny_llama_session
    engine = tmp_path / "engine"
    assert main(["convert", "--model-dir", str(hf_dir), "--output-dir", str(tmp_path / "ckpt")]) == 0
    assert main(["build", "--checkpoint-dir", str(tmp_path / "ckpt"), "--output-dir", str(engine), "--max-seq-len",
                 "64", "--max-batch-size", "3"]) == 0
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="kiln"):
        assert main(["run", "--engine-dir", str(engine), "--prompt-ids", "5,9,17", "--max-tokens", "6",
                     "--ignore-eos", "--device", "cpu", "--kv-cache-max-tokens", "64"]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == hf_greedy(hf, [5, 9, 17], 6)
    assert "= 64 tokens" in caplog.text and "from kv_cache_max_tokens" in caplog.text
    assert "fixed when it was built" not in caplog.text
