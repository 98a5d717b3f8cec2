"""`shortv demo` end to end on a reduced sample count (the embedded architecture; weights from a local folder)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from shortv import ShortVConfig, apply_shortv, remove_shortv
from shortv.demo import default_ns, layer_selections, run_demo
from shortv.tiny import build


def test_layer_selections_follow_the_paper_ablation():
    order = [11, 3, 7, 0, 5, 1, 2, 4, 6, 8, 9, 10]
    chosen = layer_selections(order, 12, 4, seed=0)
    assert chosen["lc"] == [[11, 3, 7, 0]]
    assert chosen["first"] == [[0, 1, 2, 3]] and chosen["last"] == [[8, 9, 10, 11]]
    draws = chosen["random"]
    assert len(draws) == 5 and all(len(set(d)) == 4 and set(d) <= set(range(12)) for d in draws)
    assert len({tuple(d) for d in draws}) > 1  # five draws, not one repeated
    assert draws == layer_selections(order, 12, 4, seed=0)["random"] != layer_selections(order, 12, 4, seed=1)["random"]


def test_default_ns_include_the_operating_point():
    # A toy FLOPs ratio, 1 - 0.075 N: 55% is closest at N = 6.
    assert default_ns(12, lambda n: 1 - 0.075 * n) == (3, 6, 9)


@pytest.fixture
def untrained(tmp_path):
    """A checkpoint of the embedded architecture with fresh (untrained) weights, in a local folder."""
    folder = tmp_path / "model"
    torch.manual_seed(0)
    build.build_model(seed=0).save_pretrained(folder)
    build.build_processor().save_pretrained(folder)
    return folder


def test_demo_runs_end_to_end(tmp_path, untrained):
    out = tmp_path / "demo"
    report = run_demo(out, num_calib=3, num_test=6, ns=(4, 8), batch_size=6, speed_repeats=2, progress=False,
                      model_path=untrained)
    keys = [(row.selection, row.n) for row in report.rows]
    assert keys[:2] == [("unpatched", 0), ("blind", 0)]
    for n in (4, 8):
        assert [k for k, m in keys if m == n] == ["lc", "random", "random", "random", "random", "random", "first",
                                                   "last", "lc_text"]
        assert report.row("lc_text", n).layers == report.row("lc", n).layers == report.lc_order[:n]
        assert report.row("lc_text", n).flops_ratio is None
    assert report.row("unpatched").flops_ratio == 1.0
    assert report.row("lc", 8).flops_ratio < report.row("lc", 4).flops_ratio < 1.0
    same_n = {r.flops_ratio for r in report.rows if r.n == 4 and r.selection != "lc_text"}
    assert same_n == {report.row("lc", 4).flops_ratio}
    assert [s.n for s in report.speed] == [4, 8] and all(s.min <= s.median <= s.max for s in report.speed)
    assert report.timing["wall_s"] > 0 and report.timing["cpu_s"] > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["lc_order"] == report.lc_order and saved["num_test"] == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_test"] == 6 and set(metrics["by_n"]) == {"4", "8"}
    assert metrics["by_n"]["4"]["random_draws"] == [r.accuracy for r in report.random_rows(4)]
    for name in ("report.md", "accuracy_vs_flops.png", "calibration/lc.png", "calibration/lc.json",
                 "calibration/shortv_config.json"):
        assert (out / name).is_file(), name
    text = (out / "report.md").read_text()
    assert "| LC-ranked (ShortV) | 4 |" in text and "random layers, mean of 5" in text
    assert f"LC order (ascending visual LC): {report.lc_order}" in text


def test_demo_refuses_a_used_output_folder_unless_overwrite(tmp_path, untrained):
    """An earlier demo's results are never replaced silently; with --overwrite its files go, nothing else does."""
    from shortv.cli import app

    out = tmp_path / "demo"
    (out / "calibration").mkdir(parents=True)
    (out / "results.json").write_text("a 16-minute result")
    (out / "calibration" / "lc_samples.jsonl").write_text("")
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--num-test", "3"])
    assert result.exit_code == 1 and "already holds calibration, notes.txt, results.json; pass --overwrite" in " ".join(
        result.output.split())
    assert (out / "results.json").read_text() == "a 16-minute result"
    report = run_demo(out, num_calib=2, num_test=3, ns=(4,), batch_size=3, speed_repeats=0, progress=False,
                      model_path=untrained, overwrite=True)
    assert json.loads((out / "results.json").read_text())["num_test"] == report.num_test == 3
    assert (out / "notes.txt").read_text() == "mine"
    assert len(report.lc_order) == 12 and (out / "calibration" / "lc.json").is_file()


def test_demo_command_reports_missing_checkpoint(tmp_path, monkeypatch):
    from shortv.cli import app

    monkeypatch.setattr("shortv.tiny.embedded_model_path", lambda: tmp_path / "no-checkpoint")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "no checkpoint at" in " ".join(result.output.split())


@pytest.fixture
def shipped(monkeypatch):
    """The shipped checkpoint, offline."""
    from shortv.tiny import embedded_model_path

    if not (embedded_model_path() / "config.json").is_file():
        pytest.skip("embedded checkpoint not shipped")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_demo_command_on_the_shipped_checkpoint(tmp_path, shipped, monkeypatch):
    """`shortv demo` as the README runs it, with few samples: plain tables (as when piped), and output files that
    the README's follow-up commands (`shortv eval --lc ...`, `--config ...`) accept on the embedded model."""
    from shortv.cli import app

    monkeypatch.setenv("SHORTV_CACHE", str(tmp_path / "cache"))  # the splits regenerate offline
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--num-calib", "4", "--num-test", "20", "--n", "6",
                                      "--speed-repeats", "1", "--threads", str(torch.get_num_threads())])
    assert result.exit_code == 0, result.output
    table = [line for line in result.output.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2 + 5 + 2 + 1  # header, unpatched, blind, 5 selections at N = 6; speed header + 1 row
    assert all(line.endswith("|") for line in table)
    assert len({line.count("|") for line in table[:9]}) == 1
    assert not any(char in result.output for char in "┃━│─╇"), "rich box characters break in a pipe"
    saved = json.loads((out / "results.json").read_text())
    assert sorted(saved["lc_order"]) == list(range(12))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["unpatched"] >= 0.6 and metrics["by_n"]["6"]["lc_layers"] == saved["lc_order"][:6]
    for follow_up in (["--lc", str(out / "calibration" / "lc.json"), "--n", "6"],
                      ["--config", str(out / "calibration" / "shortv_config.json")]):
        result = CliRunner().invoke(app, ["eval", *follow_up, "--num-samples", "4",
                                          "--out", str(tmp_path / ("eval" + follow_up[0]))])
        assert result.exit_code == 0, result.output


#: Limits of the shipped-model ablation test below. Measured on its 70 questions when written (N = 9): unpatched
#: 84.3%, LC-ranked 84.3%, first-N 57.1%, LC-ranked with text frozen 0.0%. Issue #15's 85% is the demo's target on
#: 700 questions (87.1%); on these 70, one type of which the model answers at chance, the floor only catches a
#: broken checkpoint.
LIMITS = {"unpatched": 0.8, "first_gap": 0.15, "text_gap": 0.15}


def test_shipped_model_shows_the_paper_ablation(tmp_path, shipped):
    """The direction of the paper's ablation on the shipped model, at the operating N, on 10 test questions of each
    type (the demo's full run is in docs/demo.md): LC-ranked layers keep the accuracy, the first N layers lose it, and
    text tokens frozen in the LC-ranked layers lose more. Fails if the LC ranking, the layer selection or either
    freezing stops working."""
    from shortv.calibrate import calibrate
    from shortv.data import read_jsonl
    from shortv.demo import _accuracy, operating_n, prompt_tokens
    from shortv.flops import LayerDims, flops_ratio
    from shortv.tiny import embedded_split_path, load_embedded, synthetic

    model, processor = load_embedded()
    lc = calibrate(model, processor=processor, data=embedded_split_path("calib"), out_dir=tmp_path / "cal",
                   num_samples=8, progress=False, plot=False).lc
    test = read_jsonl(embedded_split_path("test"), require_answer=True)
    samples = [s for kind in synthetic.QUESTION_TYPES for s in [s for s in test if s.type == kind][:10]]
    dims = LayerDims.from_config(model.config)
    visual, text = prompt_tokens(processor, samples, batch_size=len(samples))
    n = operating_n(dims.num_layers,
                    lambda k: flops_ratio(dims, round(text), visual, list(range(k)), formula="exact"))
    unpatched, _ = _accuracy(model, processor, samples, batch_size=len(samples))
    accuracy = {}
    for name, config in (("lc", ShortVConfig(lc.order[:n])), ("first", ShortVConfig(list(range(n)))),
                         ("text", ShortVConfig(lc.order[:n], mode="reference", frozen_tokens="text"))):
        apply_shortv(model, config)
        try:
            accuracy[name], _ = _accuracy(model, processor, samples, batch_size=len(samples))
        finally:
            remove_shortv(model)
    assert unpatched >= LIMITS["unpatched"] and accuracy["lc"] >= unpatched - 0.05, (n, unpatched, accuracy)
    assert accuracy["first"] <= accuracy["lc"] - LIMITS["first_gap"], (n, unpatched, accuracy)
    assert accuracy["text"] <= accuracy["lc"] - LIMITS["text_gap"], (n, unpatched, accuracy)
