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


def test_demo_runs_end_to_end(tmp_path):
    folder = tmp_path / "model"
    torch.manual_seed(0)
    build.build_model(seed=0).save_pretrained(folder)
    build.build_processor().save_pretrained(folder)
    out = tmp_path / "demo"
    report = run_demo(out, num_calib=3, num_test=6, ns=(4, 8), batch_size=6, speed_repeats=2, progress=False,
                      model_path=folder)
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


def test_shipped_model_text_frozen_layers_lose_accuracy(tmp_path, shipped):
    """The direction of the paper's which-tokens ablation on the shipped model, on 60 count questions (where the
    demo's 300 questions give 89% with visual tokens frozen in the 9 LC-ranked layers, 52% with text tokens frozen;
    here 83% unpatched, 82% visual-frozen, 57% text-frozen when written): visual-frozen keeps the accuracy,
    text-frozen loses it. Fails if the layer selection or either freezing stops working. (LC-ranked against first-N
    is not tested: on this model they differ by at most 2 of 300 questions, see the README.)"""
    from shortv.calibrate import calibrate
    from shortv.data import read_jsonl
    from shortv.demo import _accuracy
    from shortv.tiny import embedded_split_path, load_embedded

    model, processor = load_embedded()
    lc = calibrate(model, processor=processor, data=embedded_split_path("calib"), out_dir=tmp_path / "cal",
                   num_samples=8, progress=False, plot=False).lc
    counts = [s for s in read_jsonl(embedded_split_path("test"), require_answer=True) if s.type == "count"][:60]
    unpatched, _ = _accuracy(model, processor, counts, batch_size=60)
    accuracy = {}
    for tokens in ("visual", "text"):
        layers = lc.order[:9]
        apply_shortv(model, ShortVConfig(layers, mode="reference", frozen_tokens="text") if tokens == "text"
                     else ShortVConfig(layers))
        try:
            accuracy[tokens], _ = _accuracy(model, processor, counts, batch_size=60)
        finally:
            remove_shortv(model)
    assert unpatched >= 0.8 and accuracy["visual"] >= unpatched - 0.05, (unpatched, accuracy)
    assert accuracy["text"] <= accuracy["visual"] - 0.15, (unpatched, accuracy)
