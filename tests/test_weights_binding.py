"""Runs, LC files and configs are bound to the weights that made them (issue #22): a resumed run refuses other weights,
an LC file or config from another model is refused (or, with --allow-other-model, taken with a warning naming both),
and files of older versions (no fingerprint) still work, with one warning line."""

import json
import shutil

import pytest
from cli_output import single_error_line, warning_lines
from typer.testing import CliRunner

from shortv.cli import app
from shortv.tiny import embedded_model_path, synthetic

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.fixture
def data(tmp_path):
    return synthetic.write_split("test", tmp_path / "test", n=8)


@pytest.fixture
def m1(tmp_path):
    return shutil.copytree(embedded_model_path(), tmp_path / "m1")


def test_resumed_eval_refuses_swapped_weights(m1, data, tiny_llava_dir, tmp_path):
    """The issue's reproduction: eval, cut the predictions to their first half, copy other weights over
    model.safetensors, resume."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"layers": [9, 10, 11]}))
    out = tmp_path / "evW"
    common = ["eval", "--model", m1, "--data", data, "--config", config, "--batch-size", "4", "--out", out]
    assert run(*common).exit_code == 0
    predictions = out / "predictions.jsonl"
    predictions.write_text("".join(predictions.read_text().splitlines(keepends=True)[:4]))
    for name in ("summary.json", "summary.md"):
        (out / name).unlink()
    original = (m1 / "model.safetensors").read_bytes()
    shutil.copy(tiny_llava_dir / "model.safetensors", m1 / "model.safetensors")
    before = snapshot(out)

    line = single_error_line(run(*common, "--resume"))
    assert f"cannot resume {out}: the weights differ from the interrupted run's (model.safetensors: " in line
    assert "sampled bytes of tensors" in line and "resume with the weights it used (files " in line
    assert snapshot(out) == before  # nothing lost, nothing written

    (m1 / "model.safetensors").write_bytes(original)  # the weights it used: the run resumes and completes
    result = run(*common, "--resume")
    assert result.exit_code == 0 and not warning_lines(result)
    assert len(predictions.read_text().splitlines()) == 8


def test_resumed_calibration_refuses_other_weights(m1, tiny_llava_dir, tmp_path):
    calib = synthetic.write_split("calib", tmp_path / "calib", n=4)
    out = tmp_path / "cal"
    common = ["calibrate", "--model", m1, "--data", calib, "--out", out, "--n", "4"]
    assert run(*common).exit_code == 0
    samples = out / "lc_samples.jsonl"
    samples.write_text(samples.read_text().splitlines(keepends=True)[0])
    for name in ("lc.json", "shortv_config.json", "lc.png"):
        (out / name).unlink()
    shutil.copy(tiny_llava_dir / "model.safetensors", m1 / "model.safetensors")
    before = snapshot(out)
    line = single_error_line(run(*common, "--resume"))
    assert f"cannot resume {out}: the weights differ from the interrupted run's (model.safetensors: " in line
    assert snapshot(out) == before


def test_lc_and_config_from_another_checkpoint_folder_are_refused(m1, data, tiny_llava_dir, tmp_path):
    """Both folders are called `checkpoint`: the old rule (the folder's last name) took one for the other."""
    a = shutil.copytree(m1, tmp_path / "a" / "checkpoint")
    b = shutil.copytree(m1, tmp_path / "b" / "checkpoint")
    shutil.copy(tiny_llava_dir / "model.safetensors", b / "model.safetensors")
    same = shutil.copytree(m1, tmp_path / "c" / "moved")  # the same weights under another name
    calib = synthetic.write_split("calib", tmp_path / "calib", n=2)
    cal = tmp_path / "cal"
    assert run("calibrate", "--model", a, "--data", calib, "--out", cal, "--n", "3").exit_code == 0
    lc, config = cal / "lc.json", cal / "shortv_config.json"
    recorded = json.loads(lc.read_text())["weights"]
    assert recorded["kind"] == "files" and json.loads(config.read_text())["provenance"]["weights"] == recorded
    assert set(recorded["files"]["model.safetensors"]) == {"size", "digest"}  # compact: the run file has the tensors
    assert "tensors" in json.loads((cal / "lc_run.json").read_text())["weights"]["files"]["model.safetensors"]

    for given in (["--lc", lc, "--n", "3"], ["--config", config]):
        args = ["eval", "--model", b, "--data", data, "--num-samples", "2", *given]
        line = single_error_line(run(*args, "--out", tmp_path / "refused"))
        assert f"was made for other weights: made for {a} (files " in line and f"used with {b} (files " in line
        assert "(model.safetensors: header or sampled bytes differ)" in line and "--allow-other-model" in line
        assert not (tmp_path / "refused").exists()
        out = tmp_path / f"allowed{len(given)}"
        warnings = warning_lines(run(*args, "--out", out, "--allow-other-model"))
        assert len(warnings) == 1 and f"made for {a} (files" in warnings[0] and f"used with {b} (files" in warnings[0]
        assert "accepted by --allow-other-model" in warnings[0]
        moved = run("eval", "--model", same, "--data", data, "--num-samples", "2", *given, "--out", out / "same")
        assert not warning_lines(moved)  # same weights, other folder: no question asked


def test_files_of_older_versions_load_with_one_warning(m1, data, tmp_path):
    calib = synthetic.write_split("calib", tmp_path / "calib", n=2)
    cal = tmp_path / "cal"
    assert run("calibrate", "--model", m1, "--data", calib, "--out", cal, "--n", "3").exit_code == 0
    for name, key in (("lc.json", None), ("shortv_config.json", "provenance")):
        content = json.loads((cal / name).read_text())
        (content[key] if key else content).pop("weights")
        (cal / name).write_text(json.dumps(content))
    for given in (["--lc", cal / "lc.json", "--n", "3"], ["--config", cal / "shortv_config.json"]):
        out = tmp_path / f"old{len(given)}"
        warnings = warning_lines(run("eval", "--model", m1, "--data", data, "--num-samples", "2", *given, "--out", out))
        assert len(warnings) == 1 and "records no weights fingerprint (written by an older shortv)" in warnings[0]

    # An interrupted run of an older version: its run file has no fingerprint; it resumes, with one warning.
    out = tmp_path / "old2"
    run_file = out / "eval_run.json"
    settings = json.loads(run_file.read_text())
    settings.pop("weights")
    run_file.write_text(json.dumps(settings))
    (out / "predictions.jsonl").write_text((out / "predictions.jsonl").read_text().splitlines(keepends=True)[0])
    for name in ("summary.json", "summary.md"):
        (out / name).unlink()
    result = run("eval", "--model", m1, "--data", data, "--num-samples", "2", "--config", cal / "shortv_config.json",
                 "--out", out, "--resume")
    warnings = warning_lines(result)
    assert [line for line in warnings if "eval_run.json records no weights fingerprint" in line] == warnings[-1:]
    assert "weights" in json.loads(run_file.read_text())  # the resumed run records them from now on
