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
    assert [(r.target, r.method) for r in report.comparison][::5] == [(0.3, "shortv"), (0.45, "shortv"),
                                                                       (0.55, "shortv"), (None, "vtw_rule")]
    assert len(report.verdicts) == 4 and len(saved["comparison"]) == 16 and saved["verdicts"] == report.verdicts
    for name in ("report.md", "accuracy_vs_flops.png", "methods_vs_flops.png", "calibration/lc.png",
                 "calibration/lc.json", "calibration/shortv_config.json", "calibration/lc_operators.png"):
        assert (out / name).is_file(), name
    text = (out / "report.md").read_text()
    assert "| LC-ranked (ShortV) | 4 |" in text and "random layers, mean of 5" in text
    assert f"LC order (ascending visual LC): {report.lc_order}" in text
    assert report.comparison_markdown() in text and all(f"- {line}" in text for line in report.verdicts)


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
                      model_path=untrained, overwrite=True, flops_targets=())
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
    # header, unpatched, blind, 5 selections at N = 6; header, 5 methods at 3 FLOPs targets, VTW's rule; speed
    assert len(table) == 2 + 2 + 5 + 2 + 15 + 1 + 2 + 1
    assert all(line.endswith("|") for line in table)
    assert len({line.count("|") for line in table[:9 + 18]}) == 1
    assert not any(char in result.output for char in "┃━│─╇"), "rich box characters break in a pipe"
    saved = json.loads((out / "results.json").read_text())
    assert sorted(saved["lc_order"]) == list(range(12))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["unpatched"] >= 0.6 and metrics["by_n"]["6"]["lc_layers"] == saved["lc_order"][:6]
    _check_methods_at_matched_flops(saved, result.output)
    for follow_up in (["--lc", str(out / "calibration" / "lc.json"), "--n", "6"],
                      ["--config", str(out / "calibration" / "shortv_config.json")]):
        result = CliRunner().invoke(app, ["eval", *follow_up, "--num-samples", "4",
                                          "--out", str(tmp_path / ("eval" + follow_up[0]))])
        assert result.exit_code == 0, result.output


def _check_methods_at_matched_flops(saved: dict, output: str) -> None:
    """The demo's comparison rows, redone by hand: each reached row's FLOPs from the library's FLOPs models, and its
    accuracy from its config applied to the same 20 test questions; the verdict lines name the best accuracy."""
    from shortv.data import read_jsonl, subsample
    from shortv.demo_methods import METHOD_LABELS
    from shortv.evaluation import generate_answers, is_correct
    from shortv.flops import LayerDims, flops_ratio
    from shortv.flops_pruning import fastv_ratio, vtw_ratio
    from shortv.pruning import TokenPruningConfig, apply_token_pruning, remove_token_pruning
    from shortv.tiny import embedded_split_path, load_embedded

    rows = saved["comparison"]
    assert [(r["target"], r["method"]) for r in rows] == [
        (target, method) for target in (0.3, 0.45, 0.55)
        for method in ("shortv", "operators", "fastv", "vtw", "shortv+fastv")] + [(None, "vtw_rule")]
    model, processor = load_embedded()
    dims, t, v = LayerDims.from_config(model.config), round(saved["text_tokens"]), saved["visual_tokens"]
    samples = subsample(read_jsonl(embedded_split_path("test"), require_answer=True), 20, 0)
    accuracies = {}
    for r in rows:
        s = r["setting"]
        if s is None:  # out of reach: no accuracy, the method's FLOPs span instead
            assert r["accuracy"] is None and r["flops_ratio"] is None and "out of reach" in r["description"]
            assert r["target"] < r["lowest"] or r["target"] > r["highest"]
            continue
        if s["method"] in ("shortv", "operators"):
            config = ShortVConfig(s["layers"], attention_layers=s["attention_layers"], mlp_layers=s["mlp_layers"])
            flops = flops_ratio(dims, t, v, s["layers"], "exact", attention_layers=s["attention_layers"],
                                mlp_layers=s["mlp_layers"])
            apply, remove = apply_shortv, remove_shortv
        else:
            pruned = s["method"] != "vtw" and s["method"] != "vtw_rule"
            config = TokenPruningConfig("fastv" if pruned else "vtw", s["k"], s["ratio"] if pruned else None,
                                        shortv_layers=s["layers"])
            flops = (fastv_ratio(dims, t, v, s["k"], s["ratio"], s["layers"]) if pruned
                     else vtw_ratio(dims, t, v, s["k"]))
            apply, remove = apply_token_pruning, remove_token_pruning
        assert r["flops_ratio"] == pytest.approx(flops, abs=1e-12)
        if r["target"] is not None:
            assert abs(flops - r["target"]) <= r["tolerance"] + 1e-12 if s["method"] != "operators" else (
                0 <= r["target"] - flops <= r["tolerance"])
        key = str(config.to_dict())
        if key not in accuracies:
            apply(model, config)
            try:
                answers, _ = generate_answers(model, processor, samples, max_new_tokens=3)
            finally:
                remove(model)
            accuracies[key] = sum(is_correct(a, sample) for a, sample in zip(answers, samples)) / len(samples)
        assert r["accuracy"] == accuracies[key], (r, accuracies[key])
    assert len(set(accuracies.values())) > 1  # the methods differ: not one number for all
    for target in (30, 45, 55):
        [line] = [line for line in output.splitlines() if line.startswith(f"{target}% of the FLOPs: ")]
        reached = [r for r in rows if r["target"] == target / 100 and r["accuracy"] is not None]
        best = max(reached, key=lambda r: r["accuracy"])
        assert METHOD_LABELS[best["method"]] in line and f"at {100 * best['accuracy']:.1f}%" in line
    assert any(line.startswith("Operator-level ") for line in output.splitlines())


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


# ---------------------------------------------------------------------------------------------------------------
# The methods at matched FLOPs (shortv.demo_methods)
# ---------------------------------------------------------------------------------------------------------------
def _embedded_dims():
    from shortv.flops import LayerDims

    return LayerDims.from_config(build.build_config())


def _lc_with_operators(num_layers=12, seed=0):
    import random

    from shortv.contribution import LCResult

    rng = random.Random(seed)
    rows = {kind: [[rng.uniform(1e-4, 1.0) for _ in range(num_layers)]] for kind in
            ("visual", "text", "visual_attention", "visual_mlp")}
    return LCResult(num_layers, tuple(rows), ["s0"], rows)


def test_nearest_setting_rule_and_unreachable_targets():
    """The nearest setting (ties: the cheaper one), within half its local step; beyond half a step past the grid's
    lowest setting the target is out of reach, with that lowest ratio, never moved."""
    from shortv.demo_methods import Setting, nearest

    grid = [Setting("vtw", ratio, k=k) for k, ratio in ((3, 0.3), (2, 0.4), (1, 0.6))]
    assert nearest(0.5, "vtw", grid).setting.k == 2  # equally near 0.4 and 0.6: the cheaper
    match = nearest(0.58, "vtw", grid)
    assert match.setting.k == 1 and match.tolerance == pytest.approx(0.1) and match.lowest == 0.3
    assert nearest(0.25, "vtw", grid).setting.k == 3  # half a step (0.05) below the lowest: still its setting
    out = nearest(0.24, "vtw", grid)
    assert out.setting is None and (out.lowest, out.highest, out.target) == (0.3, 0.6, 0.24)
    assert nearest(0.7, "vtw", grid).setting.k == 1 and nearest(0.71, "vtw", grid).setting is None  # and above


def test_every_method_lands_within_its_step_of_the_target():
    """On the embedded model's shape: every method's grid priced by the library's FLOPs models, and at each target
    from 20% to 100% the chosen setting is within the method's step of it (operator-level: at or under it, by less
    than one operator's saving), or the target is below the method's reach."""
    from shortv.demo_methods import METHODS, matches, method_grid
    from shortv.flops import flops_ratio
    from shortv.flops_pruning import fastv_ratio, vtw_ratio
    from shortv.pruning import TokenPruningConfig

    dims, lc, t, v = _embedded_dims(), _lc_with_operators(), 13, 36
    order = lc.order
    fastv = method_grid("fastv", dims, t, v, order)
    assert [s.kept for s in fastv] == list(range(1, v)) and all(
        TokenPruningConfig("fastv", 2, s.ratio).kept(v) == s.kept for s in fastv)
    assert fastv[-1].flops_ratio == pytest.approx(fastv_ratio(dims, t, v, 2, 1 / v))
    assert [s.k for s in method_grid("vtw", dims, t, v, order)] == list(range(1, 12))  # K=1: cheapest
    assert method_grid("vtw", dims, t, v, order)[0].flops_ratio == vtw_ratio(dims, t, v, 1)
    shortv = method_grid("shortv", dims, t, v, order)
    assert shortv[0].layers == tuple(order) and shortv[0].flops_ratio == flops_ratio(dims, t, v, order, "exact")
    composed = method_grid("shortv+fastv", dims, t, v, order)
    assert {s.kept for s in composed} == {18} and composed[-1].layers == ()
    targets = tuple(round(0.2 + 0.01 * i, 2) for i in range(81))
    found = matches(targets, lc, dims, t, v)
    assert [(m.target, m.method) for m in found] == [(x, method) for x in targets for method in METHODS]
    for m in found:
        if m.setting is None:
            assert m.target < m.lowest or m.target > m.highest, m
        elif m.method == "operators":
            assert 0 <= m.target - m.setting.flops_ratio < m.tolerance or m.setting.flops_ratio == m.target, m
        else:
            assert abs(m.setting.flops_ratio - m.target) <= m.tolerance + 1e-12, m
    at_30 = {m.method: m for m in found if m.target == 0.3}
    assert at_30["shortv"].setting is None and at_30["shortv"].lowest == shortv[0].flops_ratio  # 37%: out of reach
    assert at_30["vtw"].setting.k == 1  # VTW K=1 (32%) is the nearest of its settings
    reached = {m.method for m in found if m.target == 0.55 and m.setting is not None}
    assert reached == set(METHODS)


def test_verdicts_name_the_winner_ties_and_operator_vs_layer():
    from shortv.demo_methods import ComparisonRow, verdicts

    def row(target, method, accuracy, flops=0.5):
        setting = None if accuracy is None else {"k": 1}
        return ComparisonRow(target, method, setting, "x" if setting else "unreachable", flops if setting else None,
                             0.4, 0.9, 0.01, accuracy)

    rows = [row(0.5, "shortv", 0.8), row(0.5, "operators", 0.9), row(0.5, "fastv", 0.7), row(0.5, "vtw", None),
            row(0.6, "shortv", 0.8), row(0.6, "operators", 0.8), row(0.6, "fastv", 0.2), row(None, "vtw_rule", 0.1)]
    lines = verdicts(rows)
    assert len(lines) == 3
    assert lines[0] == "50% of the FLOPs: operator-level ShortV (x, 50.0% FLOPs) wins at 90.0%; out of reach: VTW."
    assert "tie at 80.0%" in lines[1] and lines[1].count("ShortV") == 2
    assert lines[2].startswith("Operator-level beat layer-level ShortV at equal FLOPs: better at 1, worse at 0, tied "
                               "at 1 of the 2 targets")
