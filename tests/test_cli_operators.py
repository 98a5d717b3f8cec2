"""`shortv calibrate --operators` and `shortv eval` of its operator-level config, end to end on a tiny LLaVA folder."""

import json

from cli_output import single_error_line
from transformers import AutoConfig
from typer.testing import CliRunner

from shortv import ShortVConfig
from shortv.cli import app
from shortv.contribution import LCResult
from shortv.flops import LayerDims, flops_ratio, model_flops, operator_saving
from shortv.tiny import synthetic

runner = CliRunner()


def test_calibrate_operators_then_eval(tiny_llava_dir, tmp_path):
    calib = synthetic.write_split("calib", tmp_path / "calib", n=3)
    test = synthetic.write_split("test", tmp_path / "test", n=2)
    out = tmp_path / "cal"
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_llava_dir), "--data", str(calib), "--num-samples",
                                 "2", "--out", str(out), "--n", "6", "--operators"])
    assert result.exit_code == 0, result.output
    assert "Per-operator visual LC" in result.output and "operator-level selection at" in result.output
    lc = LCResult.load(out / "lc.json")
    assert {"visual_attention", "visual_mlp"} <= set(lc.per_sample)
    assert (out / "lc_operators.png").is_file() and (out / "lc.png").is_file()
    layer_config = ShortVConfig.load(out / "shortv_config.json")
    config = ShortVConfig.load(out / "shortv_operators_config.json")
    assert config.mode == "fast" and config.provenance["selection"] == "operators"
    # at the FLOPs of the layer-level config (priced at the calibration inputs' mean token counts): not above it,
    # and less than the last chosen operator's saving below it
    dims = LayerDims.from_config(AutoConfig.from_pretrained(tiny_llava_dir))
    p = config.provenance
    t, v = p["text_tokens"], p["visual_tokens"]
    assert v > 0 and p["flops_ratio_target"] == flops_ratio(dims, t, v, layer_config.layers, "exact")
    assert p["flops_ratio"] == flops_ratio(dims, t, v, config.layers, "exact", attention_layers=config.attention_layers,
                                           mlp_layers=config.mlp_layers) <= p["flops_ratio_target"]
    last_layer, last_operator = p["operator_order"][p["n_operators"] - 1]
    last_saving = operator_saving(dims, t, v, last_layer, last_operator) / model_flops(dims, t, v, (), "exact")
    assert p["flops_ratio_target"] - p["flops_ratio"] < last_saving

    # Operator-level and layer-level selections side by side in one run (issue #25): one row each.
    evaluation = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--model", str(tiny_llava_dir), "--data", str(test), "--config",
                                 str(out / "shortv_operators_config.json"), "--config", str(out / "shortv_config.json"),
                                 "--batch-size", "2", "--out", str(evaluation)])
    assert result.exit_code == 0, result.output
    summary = json.loads((evaluation / "summary.json").read_text())
    assert summary["attention_layers"] == config.attention_layers and summary["mlp_layers"] == config.mlp_layers
    operators, layers = summary["methods"]
    assert (operators["key"], layers["key"]) == ("shortv-operators", "shortv")
    assert layers["method"]["layers"] == layer_config.layers and "attention_layers" not in layers["method"]
    records = [json.loads(line) for line in (evaluation / "predictions.jsonl").read_text().splitlines()]
    t, v = (round(sum(record[key] for record in records) / len(records)) for key in ("text_tokens", "visual_tokens"))
    assert operators["flops_ratio"] == flops_ratio(dims, t, v, config.layers, "exact",
                                                   attention_layers=config.attention_layers,
                                                   mlp_layers=config.mlp_layers) < 1.0
    assert layers["flops_ratio"] == flops_ratio(dims, t, v, layer_config.layers, "exact") < 1.0
    assert "| shortv-operators | " in result.output and "| shortv | " in result.output


def test_flops_needs_operators(tiny_llava_dir, tmp_path):
    calib = synthetic.write_split("calib", tmp_path / "calib", n=2)
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_llava_dir), "--data", str(calib), "--out",
                                 str(tmp_path / "cal"), "--flops", "0.5"])
    assert result.exit_code == 1
    assert "is for the operator-level selection: add --operators" in single_error_line(result)
