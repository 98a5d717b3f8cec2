"""`shortv demo` end to end on a reduced sample count (the embedded architecture; weights from a local folder)."""

import json

import torch
from typer.testing import CliRunner

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
    assert default_ns(12, lambda n: 1 - 0.075 * n) == (3, 5, 6, 9)


def test_demo_runs_end_to_end(tmp_path):
    folder = tmp_path / "model"
    torch.manual_seed(0)
    build.build_model(seed=0).save_pretrained(folder)
    build.build_processor().save_pretrained(folder)
    out = tmp_path / "demo"
    report = run_demo(out, num_calib=3, num_test=12, ns=(4, 8), batch_size=6, speed_repeats=2, progress=False,
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
    assert {r.flops_ratio for r in report.rows if r.n == 4 and r.selection != "lc_text"} == {report.row("lc", 4).flops_ratio}
    assert [s.n for s in report.speed] == [4, 8] and all(s.min <= s.median <= s.max for s in report.speed)
    assert report.timing["wall_s"] > 0 and report.timing["cpu_s"] > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["lc_order"] == report.lc_order and saved["num_test"] == 12
    for name in ("report.md", "accuracy_vs_flops.png", "calibration/lc.png", "calibration/lc.json"):
        assert (out / name).is_file(), name
    text = (out / "report.md").read_text()
    assert "| LC-ranked (ShortV) | 4 |" in text and "random layers, mean of 5" in text
    assert f"LC order (ascending visual LC): {report.lc_order}" in text


def test_demo_command_reports_missing_checkpoint(tmp_path, monkeypatch):
    from shortv.cli import app

    monkeypatch.setattr("shortv.tiny.embedded_model_path", lambda: tmp_path / "no-checkpoint")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "no checkpoint at" in " ".join(result.output.split())


def test_demo_command_on_the_shipped_checkpoint(tmp_path, monkeypatch):
    """`shortv demo` as the README runs it, on the embedded checkpoint, with few samples."""
    import pytest

    from shortv.cli import app
    from shortv.tiny import embedded_model_path

    if not (embedded_model_path() / "config.json").is_file():
        pytest.skip("embedded checkpoint not shipped")
    monkeypatch.setenv("SHORTV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--num-calib", "4", "--num-test", "20", "--n", "6",
                                      "--speed-repeats", "1"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert sorted(saved["lc_order"]) == list(range(12))
    assert saved["baseline"]["accuracy"] >= 0.6  # a trained model, not a random one
    assert {row["selection"] for row in saved["rows"]} == {"lc", "random", "last"}
    assert (out / "report.md").is_file() and (out / "accuracy_vs_flops.png").is_file()
