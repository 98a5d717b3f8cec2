"""The figures as objects (legend placement, markers, titles), not pixels."""

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from shortv import LCResult  # noqa: E402
from shortv.plots import accuracy_figure, layer_contribution_figure, methods_figure, model_label  # noqa: E402
from shortv.tiny import embedded_model_path  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "demo"


def recorded_demo():
    from shortv.demo import DemoReport, DemoRow, SpeedRow
    from shortv.demo_methods import ComparisonRow

    data = json.loads((DEMO / "results.json").read_text())
    return DemoReport(**{**data, "rows": [DemoRow(**row) for row in data["rows"]],
                         "speed": [SpeedRow(**row) for row in data["speed"]],
                         "comparison": [ComparisonRow(**row) for row in data["comparison"]]})


def test_accuracy_legend_covers_no_curve():
    """The recorded demo, whose text-frozen curve falls to 0% at N = 9: the legend lies wholly outside the axes."""
    import matplotlib.pyplot as plt

    report = recorded_demo()
    assert report.row("lc_text", 9).accuracy == 0.0
    figure = accuracy_figure(report)
    try:
        figure.canvas.draw()
        [axes] = [axes for axes in figure.axes if axes.get_legend() is not None]
        legend, frame = axes.get_legend().get_window_extent(), axes.get_window_extent()
        assert legend.y1 < frame.y0 or legend.x0 > frame.x1  # under or beside the plotting area
        labels = [text.get_text() for text in axes.get_legend().get_texts()]
        assert any(label.startswith("LC-ranked, text tokens frozen") for label in labels)
    finally:
        plt.close(figure)


def test_methods_figure_draws_one_line_per_method_through_its_rows():
    """The recorded demo's comparison: one line per method through the FLOPs and accuracy of its reached rows (a
    target out of its reach has no point and is counted in its label), VTW's own rule as a lone marker."""
    import matplotlib.pyplot as plt

    from shortv.demo_methods import METHOD_LABELS, METHODS

    report = recorded_demo()
    figure = methods_figure(report)
    try:
        figure.canvas.draw()
        [axes] = figure.axes
        lines = {line.get_label(): line for line in axes.get_lines()}
        for method in METHODS:
            rows = [r for r in report.comparison if r.method == method and r.target is not None]
            missed = len([r for r in rows if not r.reached])
            label = METHOD_LABELS[method] + (f" ({missed} target(s) out of reach)" if missed else "")
            points = sorted((100 * r.flops_ratio, 100 * r.accuracy) for r in rows if r.reached)
            assert list(zip(lines[label].get_xdata(), lines[label].get_ydata())) == points, method
        [rule] = [r for r in report.comparison if r.method == "vtw_rule"]
        assert list(lines[f"{METHOD_LABELS['vtw_rule']} (K={rule.setting['k']})"].get_xdata()) == [
            100 * rule.flops_ratio]
        legend, frame = axes.get_legend().get_window_extent(), axes.get_window_extent()
        assert legend.y1 < frame.y0
    finally:
        plt.close(figure)


def lc_with_a_zero():
    return LCResult(num_layers=4, token_types=("visual", "text"), sample_ids=["a", "b"],
                    per_sample={"visual": [[3e-3, 2e-5, 1e-2, 0.0], [1e-3, 4e-5, 3e-2, 0.0]],
                                "text": [[1.0, 0.1, 0.5, 2e-4], [2.0, 0.3, 0.7, 4e-4]]},
                    model_id=str(embedded_model_path()))


def test_an_lc_of_exactly_zero_is_marked_on_the_axis_floor():
    import matplotlib.pyplot as plt

    figure = layer_contribution_figure(lc_with_a_zero(), chosen=[1, 3])
    try:
        [axes] = figure.axes
        [zeros] = axes.collections[-1:]
        assert zeros.get_label() == "LC exactly 0 (drawn at the axis floor)"
        [[x, y]] = zeros.get_offsets().tolist()
        bottom, _ = axes.get_ylim()
        assert x == 3 and bottom < y < 3e-5  # on the floor, a decade under the smallest LC, inside the axes
        visual = next(line for line in axes.get_lines() if line.get_label() == "visual tokens")
        assert list(visual.get_markevery()) == [0, 1, 2]  # the round marker is for measured values only
        labels = [text.get_text() for text in axes.get_legend().get_texts()]
        assert "LC exactly 0 (drawn at the axis floor)" in labels
        assert axes.get_title() == "Layer contribution, embedded tiny LLaVA (2 samples)"
    finally:
        plt.close(figure)
    no_zero = LCResult(num_layers=2, token_types=("visual",), sample_ids=["a"], per_sample={"visual": [[0.1, 0.2]]})
    figure = layer_contribution_figure(no_zero)
    try:
        assert not figure.axes[0].collections  # no zero, no extra marker
    finally:
        plt.close(figure)


def test_titles_name_a_model_without_its_absolute_path(tmp_path):
    folder = tmp_path / "runs" / "my-llava"
    folder.mkdir(parents=True)
    assert model_label(str(folder)) == "my-llava"
    assert model_label("/somewhere/else/shortv/tiny/checkpoint") == "embedded tiny LLaVA"
    assert model_label("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"  # a hub id stays whole
    assert model_label(None) == "model"
