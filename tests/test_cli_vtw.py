"""`shortv calibrate --vtw-threshold`: VTW's own rule for K (issue #24) on the calibration samples, from the command
line; the chosen K and every mean KL equal a by-hand computation, and the config runs in `shortv eval`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from shortv.cli import app
from shortv.contribution import divergence_between
from shortv.data import read_jsonl
from shortv.evaluation import batch_inputs
from shortv.loading import inputs_for, load_model, resolve_model
from shortv.pruning import TokenPruningConfig, apply_vtw, remove_token_pruning
from shortv.tiny import synthetic

runner = CliRunner()


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return synthetic.write_split("calib", tmp_path_factory.mktemp("calib"), n=3)


@torch.no_grad()
def mean_kl_by_hand(folder, path, k: int) -> float:
    """Mean KL(withdrawn || original) of the last position's next token over the samples, one sample at a time."""
    model, processor, _ = load_model(resolve_model(str(folder)))
    values = []
    for sample in read_jsonl(path):
        inputs = inputs_for(model, batch_inputs(processor, [sample]))
        original = model(**inputs).logits[:, -1].float().log_softmax(-1)
        apply_vtw(model, k)
        withdrawn = model(**inputs).logits[:, -1].float().log_softmax(-1)
        remove_token_pruning(model)
        values.append(divergence_between(withdrawn, original, "kl"))
    return float(torch.cat(values).mean())


def test_calibrate_chooses_vtw_k_by_its_kl_rule(tiny_llava_dir, calib, tmp_path):
    means = [mean_kl_by_hand(tiny_llava_dir, calib, k) for k in (1, 2)]
    threshold = (means[0] + means[1]) / 2 if means[1] < means[0] else means[0] * 2  # K=2 if KL falls, else K=1
    expected = 2 if means[1] < means[0] else 1
    out = tmp_path / "cal"
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_llava_dir), "--data", str(calib), "--out", str(out),
                                 "--n", "2", "--vtw-threshold", str(threshold)])
    assert result.exit_code == 0, result.output
    assert f"VTW by its KL rule: K={expected}" in result.output
    config = TokenPruningConfig.load(out / "vtw_config.json")
    assert (config.method, config.k, config.ratio) == ("vtw", expected, 1.0)
    rule = config.provenance
    assert (rule["rule"], rule["threshold"], rule["samples"]) == ("vtw_kl", threshold, 3)
    assert rule["kl"] == pytest.approx(means[:expected], rel=1e-4, abs=1e-7)  # left-padded batches = one by one
    assert (out / "lc.json").is_file() and (out / "shortv_config.json").is_file()

    evaluation = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--model", str(tiny_llava_dir), "--data", str(calib), "--config",
                                 str(out / "vtw_config.json"), "--batch-size", "2", "--out", str(evaluation)])
    assert result.exit_code == 0, result.output
    summary = json.loads((evaluation / "summary.json").read_text())
    assert summary["methods"][0]["method"] == {"method": "vtw", "k": expected}


def test_vtw_threshold_errors_are_one_line(tiny_llava_dir, calib, tmp_path):
    bad = runner.invoke(app, ["calibrate", "--model", str(tiny_llava_dir), "--data", str(calib), "--out",
                              str(tmp_path / "a"), "--vtw-threshold", "0"])
    assert bad.exit_code == 1 and "VTW KL threshold must be a positive number" in bad.output
    assert not (tmp_path / "a" / "lc.json").exists()
    # no K under a tiny threshold: one line, after lc.json and the ShortV config are written (nothing computed lost)
    none = runner.invoke(app, ["calibrate", "--model", str(tiny_llava_dir), "--data", str(calib), "--out",
                               str(tmp_path / "b"), "--n", "2", "--vtw-threshold", "1e-30"])
    assert none.exit_code == 1 and "no K withdraws the visual tokens with a mean KL below 1e-30" in none.output
    assert (tmp_path / "b" / "lc.json").is_file() and not (tmp_path / "b" / "vtw_config.json").exists()
