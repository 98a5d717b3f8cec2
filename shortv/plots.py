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


def plot_layer_contribution(lc: LCResult, path: str | Path, chosen: Sequence[int] = (), title: str | None = None) -> Path:
    """Visual and text LC per layer on a log scale, ShortV layers shaded."""
    plt = _pyplot()
    means = lc.mean
    layers = list(range(lc.num_layers))
    floor = 1e-12  # a log axis cannot show the exact zeros (e.g. the last layer's visual LC)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.35 * lc.num_layers + 2), 3.8))
    for layer in chosen:
        axes.axvspan(layer - 0.5, layer + 0.5, color="tab:green", alpha=0.15, lw=0)
    styles = {"visual": ("tab:blue", "o"), "text": ("tab:orange", "s")}
    for token_type in lc.token_types:
        color, marker = styles[token_type]
        values = [max(value, floor) for value in means[token_type]]
        axes.plot(layers, values, marker=marker, color=color, label=f"{token_type} tokens")
    axes.set_yscale("log")
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("layer contribution (KL)" if lc.metadata.get("divergence", "kl") == "kl" else "layer contribution")
    axes.set_xticks(layers)
    if chosen:
        axes.plot([], [], color="tab:green", alpha=0.3, lw=8, label=f"ShortV layers (N={len(chosen)})")
    axes.legend(loc="best", fontsize=8)
    axes.set_title(title or f"Layer contribution, {lc.model_id or 'model'} ({len(lc.sample_ids)} samples)", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
