"""`shortv calibrate` and `shortv eval` end to end on a local (untrained) tiny LLaVA folder."""

import json
import re
import shutil

import pytest
from broken_models import corrupt_safetensors, unpicklable_bin
from cli_output import single_error_line
from typer.testing import CliRunner

from shortv.cli import app
from shortv.tiny import synthetic

runner = CliRunner()


@pytest.fixture
def model_dir(tiny_llava_dir):
    return tiny_llava_dir


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
    calib = synthetic.write_split("calib", tmp_path / "calib", n=2)
    result = runner.invoke(app, ["calibrate", "--model", str(tmp_path / "nowhere"), "--data", str(calib)])
    assert result.exit_code == 1 and "model not found" in flat(result)
    result = runner.invoke(app, ["eval", "--model", str(model_dir), "--n", "3"])
    assert result.exit_code == 1 and "give either --config FILE or --lc FILE with --n N" in flat(result)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"layers": [1]}))
    result = runner.invoke(app, ["eval", "--model", str(model_dir), "--data", str(empty), "--config", str(config)])
    assert result.exit_code == 1 and "no samples (empty file)" in flat(result)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"layers": "1,2"}', r"c.json: not a ShortV config: ShortVConfig.layers must be a list of layer indices"),
        ('{"layers": [1], "provenance": []}', r"c.json: not a ShortV config: ShortVConfig.provenance must be a dict"),
        ("{}", r"c.json: not a ShortV config: a ShortV config needs \"layers\""),
        ("[1, 2]", r"c.json: not a ShortV config: a ShortV config must be a JSON object"),
        ('{"layers": \n[1,', r"c.json:2: not valid JSON"),
        (b'{"layers": [1], "provenance": {"note": "caf\xe9"}}', r"c.json: not UTF-8 text"),
    ],
)
def test_bad_config_file_is_one_error_line(tmp_path, model_dir, content, message):
    config = tmp_path / "c.json"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = runner.invoke(app, ["eval", "--model", str(model_dir), "--config", str(config), "--out", str(tmp_path / "o")])
    assert re.search(message, single_error_line(result))


def test_user_mistakes_are_one_error_line_naming_the_file(tmp_path, model_dir, monkeypatch):
    from PIL import Image

    test = synthetic.write_split("test", tmp_path / "test", n=2)
    config = tmp_path / "config.json"
    config.write_bytes(b"\xef\xbb\xbf" + json.dumps({"layers": [1, 2]}).encode())  # a BOM is fine
    model = ["--model", str(model_dir)]
    eval_args = ["eval", *model, "--data", str(test), "--config", str(config)]

    lc = tmp_path / "lc.json"
    lc.write_text(json.dumps({"version": 1, "num_layers": 12}))
    assert re.search(r"lc.json: not an LC file from shortv calibrate \(missing token_types, sample_ids, per_sample\)",
                     single_error_line(runner.invoke(app, ["eval", *model, "--lc", str(lc), "--n", "3"])))
    assert "--n goes with --lc" in single_error_line(runner.invoke(app, [*eval_args, "--n", "3"]))

    for name, corrupt, expected in [("st", corrupt_safetensors, r"st/model.safetensors: not a valid safetensors file"),
                                    ("bin", unpicklable_bin, r"bin/pytorch_model.bin: not a loadable PyTorch")]:
        broken = shutil.copytree(model_dir, tmp_path / name)
        corrupt(broken)
        result = runner.invoke(app, ["eval", "--model", str(broken), "--data", str(test), "--config", str(config),
                                     "--out", str(tmp_path / f"out-{name}")])
        assert re.search(expected, single_error_line(result))

    latin = tmp_path / "test" / "latin.jsonl"
    latin.write_bytes(test.read_bytes() + '{"image": "x.png", "prompt": "caf\u00e9"}\n'.encode("latin-1"))
    result = runner.invoke(app, ["eval", *model, "--data", str(latin), "--config", str(config)])
    assert re.search(r"latin.jsonl:3: not UTF-8 text", single_error_line(result))

    (tmp_path / "a_file").write_text("")
    for command in (["calibrate", *model, "--data", str(test)], eval_args):
        result = runner.invoke(app, [*command, "--out", str(tmp_path / "a_file")])
        assert re.search(r"a_file is a file, not a folder", single_error_line(result))

    result = runner.invoke(app, ["bench", "--model", str(tmp_path / "missing")])
    assert re.search(r"model not found: .*missing is not a local checkpoint folder", single_error_line(result))
    result = runner.invoke(app, ["demo", "--n", "3", "--n", "13", "--out", str(tmp_path / "demo")])
    assert "--n 13: the embedded model has 12 decoder layers; give N in 1..12" in single_error_line(result)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # so that a 96x96 test image counts as a decompression bomb
    result = runner.invoke(app, eval_args)
    assert re.search(r"test.jsonl:1: image .*\.png is too large to open safely", single_error_line(result))
