"""One loading path and clear errors for every command (issue #22 items 4-6): ``--device-map cuda`` on a CPU-only
torch, ``bench --model`` through the checks of `shortv.loading.load_model` (corrupt safetensors, pickled .bin,
a folder's own code), and where ``bench --out`` writes (a folder, a missing folder, a read-only one)."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from broken_models import corrupt_safetensors, remote_code_folder, unpicklable_bin
from cli_output import single_error_line
from typer.testing import CliRunner

from shortv.cli import app
from shortv.tiny import synthetic

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
QUICK = ["--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--dtype", "fp32", "--quiet"]


def run(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def flat(text):
    """Console output without the line breaks rich puts anywhere, even inside a path."""
    return "".join(text.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
@pytest.mark.parametrize("command", ["calibrate", "eval"])
def test_device_map_cuda_without_cuda_is_one_single_error_line(command, tiny_llava_dir, tmp_path):
    data = synthetic.write_split("calib", tmp_path / "data", n=2)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"layers": [1]}))
    extra = ["--config", config] if command == "eval" else []
    line = single_error_line(run(command, "--model", tiny_llava_dir, "--data", data, *extra, "--device-map", "cuda",
                          "--out", tmp_path / "out"))
    assert line == "error: device 'cuda' requested but CUDA is not available in this torch build/machine"
    bench = single_error_line(run("bench", "--device", "cuda"))
    assert bench == line  # the same check, in one place
    assert "unknown device 'gpu'" in single_error_line(run(command, "--model", tiny_llava_dir, "--data", data, *extra,
                                                    "--device-map", "gpu", "--out", tmp_path / "out2"))


@pytest.mark.parametrize(("corrupt", "expected"), [
    (corrupt_safetensors, r"model/model.safetensors: not a valid safetensors file \(.*\); re-download or re-save"),
    (unpicklable_bin, r"model/pytorch_model.bin: not a loadable PyTorch checkpoint"),
])
def test_bench_model_is_loaded_with_the_checks_of_every_command(corrupt, expected, tiny_llava_dir, tmp_path):
    import re

    folder = shutil.copytree(tiny_llava_dir, tmp_path / "model")
    corrupt(folder)
    assert re.search(expected, single_error_line(run("bench", "--model", folder, *QUICK)))


def test_bench_runs_a_folders_own_code_only_when_trusted(tmp_path):
    folder, marker = remote_code_folder(tmp_path)
    line = single_error_line(run("bench", "--model", folder, *QUICK))
    assert "custom contains custom code" in line and "unless you pass --trust-remote-code" in line
    assert not marker.exists()
    trusted = run("bench", "--model", folder, *QUICK, "--trust-remote-code")
    assert marker.exists() and "--trust-remote-code" not in trusted.stderr  # the option exists and lets it run


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    return path


def bench_lm(saved_lm, out):
    return run("bench", "--model", saved_lm, "--visual-tokens", "6", "--text-tokens", "3", *QUICK, "--out", out)


def test_bench_out_folder_gets_the_default_name(saved_lm, tmp_path):
    existing = tmp_path / "results"
    existing.mkdir()
    # An existing folder, or a path ending with a separator (a folder to create, and said so).
    for out, created in ((existing, False), (f"{tmp_path / 'new'}/", True)):
        result = bench_lm(saved_lm, out)
        assert result.exit_code == 0, result.output
        written = tmp_path / str(out).rstrip("/").split("/")[-1] / "shortv_bench.json"
        assert json.loads(written.read_text())["source"] == "pretrained"
        assert flat(f"wrote {written}") in flat(result.stdout)
        assert (flat(f"created folder {written.parent} for --out") in flat(result.stdout)) == created


def test_bench_out_missing_folder_is_created_and_said(saved_lm, tmp_path):
    out = tmp_path / "missing" / "deeper" / "r.json"
    result = bench_lm(saved_lm, out)
    assert result.exit_code == 0, result.output
    assert flat(f"created folder {tmp_path / 'missing'} for --out") in flat(result.stdout)
    assert out.is_file()


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot write to, also as root (the immutable attribute), or skip."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
            pytest.skip("cannot make a read-only folder here")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_bench_read_only_out_is_refused_before_the_run(saved_lm, read_only_folder):
    result = bench_lm(saved_lm, read_only_folder / "r.json")
    line = single_error_line(result)
    assert line.startswith(f"error: --out: cannot write {read_only_folder / 'r.json'}: {read_only_folder} is not "
                           "writable (")
    assert "choose a location you can write to" in line
    assert "prefill" not in result.stdout  # refused before benchmarking, not after
    file_as_folder = read_only_folder.parent / "file"
    file_as_folder.write_text("")
    assert "is a file, not a folder" in single_error_line(bench_lm(saved_lm, file_as_folder / "r.json"))
