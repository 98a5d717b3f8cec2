"""`shortv demo` end to end on a reduced sample count (the embedded architecture; weights from a local folder)."""

import json

import torch
from typer.testing import CliRunner

from shortv.demo import layer_selections, run_demo
from shortv.tiny import build


def test_layer_selections_follow_the_paper_ablation():
    order = [11, 3, 7, 0, 5, 1, 2, 4, 6, 8, 9, 10]
    chosen = layer_selections(order, 12, 4, seed=0)
    assert chosen["lc"] == [11, 3, 7, 0]
    assert chosen["last"] == [8, 9, 10, 11]
    assert len(set(chosen["random"])) == 4 and chosen["random"] == layer_selections(order, 12, 4, seed=0)["random"]


def test_demo_runs_end_to_end(tmp_path):
    folder = tmp_path / "model"
    torch.manual_seed(0)
    build.build_model(seed=0).save_pretrained(folder)
    build.build_processor().save_pretrained(folder)
    out = tmp_path / "demo"
    report = run_demo(out, num_calib=3, num_test=12, ns=(4, 8), batch_size=6, speed_repeats=1, progress=False,
                      model_path=folder)
    assert [(row.selection, row.n) for row in report.rows] == [
        ("lc", 4), ("random", 4), ("last", 4), ("lc", 8), ("random", 8), ("last", 8)
    ]
    assert report.baseline.flops_ratio == 1.0
    assert all(row.flops_ratio < 1.0 for row in report.rows)
    assert [row.flops_ratio for row in report.rows if row.selection == "lc"] == sorted(
        (row.flops_ratio for row in report.rows if row.selection == "lc"), reverse=True
    )
    assert all((row.prefill_speedup is not None) == (row.selection == "lc") for row in report.rows)
    saved = json.loads((out / "results.json").read_text())
    assert saved["lc_order"] == report.lc_order and saved["num_test"] == 12
    for name in ("report.md", "accuracy_vs_flops.png", "calibration/lc.png", "calibration/lc.json"):
        assert (out / name).is_file(), name
    assert "| lc | 4 |" in (out / "report.md").read_text()


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
