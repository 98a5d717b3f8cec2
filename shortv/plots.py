"""Figures (matplotlib, imported lazily so the core library does not need it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .contribution import LCResult


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'shortv[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _kind_marks(layer_types: Sequence[str]) -> tuple[list[str], str] | None:
    """Per-layer tick marks and a legend for models whose layers differ in kind (e.g. linear/full attention)."""
    kinds = sorted(set(layer_types))
    if len(kinds) < 2:
        return None
    letters = {kind: kind[0].upper() for kind in kinds}
    if len(set(letters.values())) < len(kinds):  # first letters collide: number the kinds instead
        letters = {kind: str(number) for number, kind in enumerate(kinds, start=1)}
    legend = ", ".join(f"{letter} = {kind}" for kind, letter in letters.items())
    return [letters[kind] for kind in layer_types], legend


def model_label(model_id: str | None) -> str:
    """A model's name for a title: a hub id as it is, a local folder by its name (never a long absolute path), the
    shipped checkpoint as the embedded tiny LLaVA."""
    if not model_id:
        return "model"
    from .tiny import embedded_model_path

    path = Path(model_id).expanduser()
    if path.is_absolute() or path.exists():
        path = path.resolve()
        if path.parts[-3:] == embedded_model_path().parts[-3:]:  # the shipped checkpoint, in any install
            return "embedded tiny LLaVA"
        return path.name or model_id
    return model_id


def layer_contribution_figure(
    lc: LCResult, chosen: Sequence[int] = (), title: str | None = None, layer_types: Sequence[str] | None = None,
):  # noqa: ANN201 - a matplotlib Figure, imported lazily
    """The figure of `plot_layer_contribution` (the caller closes it)."""
    plt = _pyplot()
    means = lc.mean
    layers = list(range(lc.num_layers))
    positive = [value for token_type in lc.token_types for value in means[token_type] if value > 0]
    # A log axis cannot show an LC of exactly 0 (e.g. a last layer's visual LC, which nothing downstream reads):
    # such layers are drawn on the axis floor, a decade under the smallest LC, with a marker of their own.
    floor = min(positive) / 10 if positive else 1e-12
    figure, axes = plt.subplots(figsize=(max(6.0, 0.35 * lc.num_layers + 2), 3.8))
    for layer in chosen:
        axes.axvspan(layer - 0.5, layer + 0.5, color="tab:green", alpha=0.15, lw=0)
    styles = {"visual": ("tab:blue", "o"), "text": ("tab:orange", "s")}
    zeros = []
    for token_type in (token_type for token_type in lc.token_types if token_type in styles):  # per-operator LC:
        color, marker = styles[token_type]  # `plot_operator_contribution`
        values = [max(value, floor) for value in means[token_type]]
        shown = [index for index, value in enumerate(means[token_type]) if value > 0]
        axes.plot(layers, values, color=color, marker=marker, markevery=shown, label=f"{token_type} tokens")
        zeros += [(index, color) for index, value in enumerate(means[token_type]) if value <= 0]
    if zeros:
        axes.scatter([index for index, _ in zeros], [floor] * len(zeros), marker="v", s=60, zorder=3,
                     facecolors="none", edgecolors=[color for _, color in zeros], linewidths=1.5,
                     label="LC exactly 0 (drawn at the axis floor)")
    axes.set_yscale("log")
    axes.set_ylim(bottom=floor / 2)
    marks = _kind_marks(layer_types) if layer_types is not None and len(layer_types) == lc.num_layers else None
    axes.set_xlabel("decoder layer" if marks is None else f"decoder layer and kind ({marks[1]})")
    axes.set_ylabel("layer contribution (KL)" if lc.metadata.get("divergence", "kl") == "kl" else "layer contribution")
    axes.set_xticks(layers)
    if marks is not None:
        axes.set_xticklabels([f"{layer}\n{mark}" for layer, mark in zip(layers, marks[0])], fontsize=7)
    if chosen:
        axes.plot([], [], color="tab:green", alpha=0.3, lw=8, label=f"ShortV layers (N={len(chosen)})")
    axes.legend(loc="best", fontsize=8)
    axes.set_title(title or f"Layer contribution, {model_label(lc.model_id)} ({len(lc.sample_ids)} samples)",
                   fontsize=9)
    figure.tight_layout()
    return figure


def _save(figure, path: str | Path) -> Path:  # noqa: ANN001 - a matplotlib Figure
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        figure.savefig(path, dpi=120)
    finally:
        _pyplot().close(figure)
    return path


def plot_layer_contribution(
    lc: LCResult, path: str | Path, chosen: Sequence[int] = (), title: str | None = None,
    layer_types: Sequence[str] | None = None,
) -> Path:
    """Visual and text LC per layer on a log scale, ShortV layers shaded, an LC of exactly 0 marked on the axis
    floor; with ``layer_types`` (the model's ``config.layer_types``) each layer's kind is marked under its index
    where the layers differ."""
    return _save(layer_contribution_figure(lc, chosen, title, layer_types), path)


def operator_contribution_figure(
    lc: LCResult, chosen: dict[int, frozenset[str]] | None = None, title: str | None = None,
):  # noqa: ANN201 - a matplotlib Figure, imported lazily
    """The figure of `plot_operator_contribution` (the caller closes it)."""
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    means = lc.mean
    rows = [("attention", "visual_attention"), ("MLP", "visual_mlp")] + ([("layer", "visual")] if "visual" in means
                                                                        else [])
    values = [means[key] for _, key in rows]
    positive = [value for row in values for value in row if value > 0]
    floor = min(positive) / 10 if positive else 1e-12
    figure, axes = plt.subplots(figsize=(max(6.0, 0.35 * lc.num_layers + 2.5), 1.2 + 0.55 * len(rows)))
    image = axes.imshow([[max(value, floor) for value in row] for row in values], aspect="auto", cmap="viridis",
                        norm=LogNorm(vmin=floor, vmax=max(positive) if positive else 1.0))
    for layer, operators in (chosen or {}).items():  # frozen operators framed
        for row, (label, _) in enumerate(rows[:2]):
            if ("attention" if label == "attention" else "mlp") in operators:
                axes.add_patch(Rectangle((layer - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.8))
    axes.set_yticks(range(len(rows)), [label for label, _ in rows])
    axes.set_xticks(range(lc.num_layers))
    axes.set_xlabel("decoder layer" + (" (red: frozen operators)" if chosen else ""))
    figure.colorbar(image, ax=axes, label="visual LC (KL)" if lc.metadata.get("divergence", "kl") == "kl" else "LC")
    axes.set_title(title or f"Per-operator visual LC, {model_label(lc.model_id)} ({len(lc.sample_ids)} samples); "
                   "0 drawn at the floor", fontsize=9)
    figure.tight_layout()
    return figure


def plot_operator_contribution(
    lc: LCResult, path: str | Path, chosen: dict[int, frozenset[str]] | None = None, title: str | None = None,
) -> Path:
    """Heatmap layer x operator of the visual LC of each layer's attention update, its MLP update and (when the
    result has it) the whole layer, on a log colour scale; ``chosen`` (layer -> operators, e.g.
    `ShortVConfig.frozen_operators`) frames the frozen operators."""
    return _save(operator_contribution_figure(lc, chosen, title), path)


def plot_accuracy_vs_flops(report, path: str | Path) -> Path:  # noqa: ANN001 - shortv.demo.DemoReport
    """The demo's ablation: accuracy against prefill FLOPs per layer selection, random draws as a min-max band.

    The y-axis spans 0-100% so that a one-question difference does not look like a cliff; markers are hollow and
    of different sizes so that coinciding points stay visible; the text-token ablation is drawn at the FLOPs of
    the same N of visual-token layers (it saves none itself). The legend sits under the axes, where it covers no
    curve (the text-frozen one falls to 0%).
    """
    return _save(accuracy_figure(report), path)


def accuracy_figure(report):  # noqa: ANN001, ANN201 - shortv.demo.DemoReport -> a matplotlib Figure
    """The figure of `plot_accuracy_vs_flops` (the caller closes it)."""
    from .demo import LABELS

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 6.0))
    ns = report.ns
    flops = {n: 100 * report.row("lc", n).flops_ratio for n in ns}
    xs = [flops[n] for n in ns]
    draws = [[100 * r.accuracy for r in report.random_rows(n)] for n in ns]
    axes.fill_between(xs, [min(d) for d in draws], [max(d) for d in draws], color="tab:gray", alpha=0.25, lw=0,
                      label=f"{LABELS['random']}, min-max of {len(draws[0])} draws")
    axes.plot(xs, [sum(d) / len(d) for d in draws], color="tab:gray", ls="-", marker="x", ms=6,
              label="random layers, mean")
    styles = {  # (color, marker, size): larger hollow markers behind smaller ones
        "last": ("tab:purple", "s", 11),
        "first": ("tab:red", "v", 9),
        "lc": ("tab:blue", "o", 7),
        "lc_text": ("tab:orange", "D", 6),
    }
    for key, (color, marker, size) in styles.items():
        axes.plot(xs, [100 * report.row(key, n).accuracy for n in ns], color=color, marker=marker, ms=size,
                  mfc="none", mew=1.6, lw=1.2,
                  label=LABELS[key] + ("\n(at its N; saves no FLOPs)" if key == "lc_text" else ""))
    base = report.row("unpatched")
    axes.plot([100], [100 * base.accuracy], marker="*", color="black", ms=13, ls="none", label=LABELS["unpatched"])
    blind = report.row("blind")
    axes.axhline(100 * blind.accuracy, color="black", ls=":", lw=1, label=LABELS["blind"])
    axes.set_xlim(min(xs) - 5, 103)
    axes.set_ylim(0, 100)
    axes.set_xlabel("prefill FLOPs (% of unpatched)")
    axes.set_ylabel("test accuracy (%)")
    top = axes.secondary_xaxis("top")
    top.set_xticks(xs, [str(n) for n in ns])
    top.set_xlabel("N (ShortV layers)", fontsize=8)
    axes.set_title(f"{report.model}: {report.num_test} test questions", fontsize=9)
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    figure.tight_layout()
    return figure


def plot_methods_vs_flops(report, path: str | Path) -> Path:  # noqa: ANN001 - shortv.demo.DemoReport
    """The demo's methods at matched FLOPs: accuracy against prefill FLOPs, one line per method through its settings
    at the targets (each at its exact FLOPs; a target out of a method's reach has no point), VTW at the K of its
    own KL rule as a lone marker, the targets as dotted verticals."""
    return _save(methods_figure(report), path)


def methods_figure(report):  # noqa: ANN001, ANN201 - shortv.demo.DemoReport -> a matplotlib Figure
    """The figure of `plot_methods_vs_flops` (the caller closes it)."""
    from .demo import LABELS
    from .demo_methods import METHOD_LABELS, METHODS

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 5.6))
    styles = {  # (color, marker, size, line style): larger hollow markers behind smaller ones
        "shortv": ("tab:blue", "o", 11, "-"),
        "operators": ("tab:cyan", "s", 9, "--"),
        "fastv": ("tab:red", "v", 9, "-"),
        "vtw": ("tab:purple", "D", 7, "-."),
        "shortv+fastv": ("tab:green", "^", 7, ":"),
    }
    shown = []
    for method in METHODS:
        color, marker, size, style = styles[method]
        points = sorted((100 * r.flops_ratio, 100 * r.accuracy) for r in report.comparison
                        if r.method == method and r.target is not None and r.reached)
        missed = [r for r in report.comparison if r.method == method and r.target is not None and not r.reached]
        label = METHOD_LABELS[method] + (f" ({len(missed)} target(s) out of reach)" if missed else "")
        axes.plot([x for x, _ in points], [y for _, y in points], color=color, marker=marker, ms=size, mfc="none",
                  mew=1.6, lw=1.2, ls=style, label=label)
        shown += [x for x, _ in points]
    for r in report.comparison:
        if r.method == "vtw_rule" and r.reached:
            axes.plot([100 * r.flops_ratio], [100 * r.accuracy], marker="P", color="tab:purple", ms=10, ls="none",
                      label=f"{METHOD_LABELS['vtw_rule']} (K={r.setting['k']})")
            shown.append(100 * r.flops_ratio)
    for target in sorted({r.target for r in report.comparison if r.target is not None}):
        axes.axvline(100 * target, color="gray", ls=":", lw=0.8)
    axes.plot([100], [100 * report.row("unpatched").accuracy], marker="*", color="black", ms=13, ls="none",
              label=LABELS["unpatched"])
    axes.axhline(100 * report.row("blind").accuracy, color="black", ls=":", lw=1, label=LABELS["blind"])
    targets = [100 * r.target for r in report.comparison if r.target is not None]
    axes.set_xlim(min(shown + targets, default=100) - 5, 103)
    axes.set_ylim(0, 100)
    axes.set_xlabel("prefill FLOPs (% of unpatched; dotted: the targets)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(f"{report.model}: methods at matched FLOPs, {report.num_test} test questions", fontsize=9)
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    figure.tight_layout()
    return figure
