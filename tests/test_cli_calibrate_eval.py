"""`shortv calibrate` and `shortv eval` end to end on a local (untrained) tiny LLaVA folder."""

import json

import pytest
import torch
from typer.testing import CliRunner

from shortv.cli import app
from shortv.tiny import build, synthetic

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llava")
    torch.manual_seed(0)
    build.build_model(seed=0).save_pretrained(folder)
    build.build_processor().save_pretrained(folder)
    return folder


def test_calibrate_then_eval(model_dir, tmp_path):
    calib = synthetic.write_split("calib", tmp_path / "calib", n=4)
    test = synthetic.write_split("test", tmp_path / "test", n=4)
    out = tmp_path / "cal"
    result = runner.invoke(app, ["calibrate", "--model", str(model_dir), "--data", str(calib), "--num-samples", "2",
                                 "--out", str(out), "--n", "6"])
    assert result.exit_code == 0, result.output
    assert "visual LC" in result.output and "ShortV layers (N=6)" in result.output
    lc = json.loads((out / "lc.json").read_text())
    assert json.loads((out / "shortv_config.json").read_text())["layers"] == lc["order"][:6]
    assert (out / "lc.png").is_file()

    evaluation = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--model", str(model_dir), "--data", str(test), "--lc", str(out / "lc.json"),
                                 "--n", "6", "--batch-size", "2", "--out", str(evaluation)])
    assert result.exit_code == 0, result.output
    summary = json.loads((evaluation / "summary.json").read_text())
    assert summary["num_samples"] == 4 and summary["layers"] == lc["order"][:6]
    assert len((evaluation / "predictions.jsonl").read_text().splitlines()) == 4


def flat(result):
    return " ".join(result.output.split())  # rich wraps long lines


def test_clear_errors(tmp_path, model_dir):
    result = runner.invoke(app, ["calibrate", "--model", str(tmp_path / "nowhere"), "--data", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 1 and "model not found" in flat(result)
    result = runner.invoke(app, ["eval", "--model", str(model_dir), "--n", "3"])
    assert result.exit_code == 1 and "give either --config FILE or --lc FILE with --n N" in flat(result)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"layers": [1]}))
    result = runner.invoke(app, ["eval", "--model", str(model_dir), "--data", str(empty), "--config", str(config)])
    assert result.exit_code == 1 and "no samples (empty file)" in flat(result)
