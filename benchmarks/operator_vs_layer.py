"""Layer-level vs operator-level ShortV at equal prefill FLOPs on the embedded tiny LLaVA (issue #25).

Calibrates whole-layer and per-operator visual LC on the demo's calibration samples (the first ``--num-calib`` of
the calib split, seed 0, as `shortv demo`), then for each N of ``--ns``: the demo's LC-ranked N layers (layer-level),
and operators chosen by per-operator LC per FLOP saved up to the same FLOPs ratio (`shortv.selection.
select_operators`, priced at the test prompts' token counts as the demo prices its rows). Both are scored with the
demo's own scoring (greedy, 3 new tokens) on the same test questions. The layer-level rows repeat the demo's LC rows
(same layers, same FLOPs; accuracies equal up to float rounding of a different calibration batch order).

Usage::

    python benchmarks/operator_vs_layer.py --out benchmarks/results/operator_vs_layer.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from markdown_report import emit_report, machine_line
from shortv import ShortVConfig, apply_shortv, remove_shortv
from shortv.calibrate import calibrate
from shortv.data import read_jsonl, subsample
from shortv.demo import _accuracy, prompt_tokens  # the demo's own scoring, so the rows compare with its table
from shortv.flops import LayerDims, flops_ratio
from shortv.selection import select_operators
from shortv.tiny import embedded_split_path, load_embedded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-calib", type=int, default=32)
    parser.add_argument("--num-test", type=int, default=700)
    parser.add_argument("--ns", type=int, nargs="+", default=[3, 6, 9, 10, 11])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--plot", type=Path, default=None, help="accuracy vs FLOPs figure (png)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    start = time.perf_counter()
    model, processor = load_embedded()
    samples = subsample(read_jsonl(embedded_split_path("test"), require_answer=True), args.num_test, 0)
    visual, text = prompt_tokens(processor, samples, args.batch_size)
    dims = LayerDims.from_config(model.config)
    t = round(text)
    with tempfile.TemporaryDirectory() as folder:
        calibration = calibrate(model, processor=processor, data=embedded_split_path("calib"), out_dir=folder,
                                num_samples=args.num_calib, n=0, seed=0, progress=False, plot=False, operators=True)
    lc = calibration.lc
    unpatched, _ = _accuracy(model, processor, samples, args.batch_size)

    rows = []
    for n in args.ns:
        layers = lc.order[:n]
        target = flops_ratio(dims, t, visual, layers, formula="exact")
        operators = select_operators(lc, flops_ratio=target, dims=dims, text_tokens=t, visual_tokens=visual)
        scored = []
        for config in (ShortVConfig(layers), operators):
            apply_shortv(model, config)
            try:
                accuracy, _ = _accuracy(model, processor, samples, args.batch_size)
            finally:
                remove_shortv(model)
            scored.append(accuracy)
        rows.append((n, layers, target, operators, scored))

    lines = [
        "# Layer-level vs operator-level ShortV at equal FLOPs (embedded tiny LLaVA)",
        "",
        f"Command: `python benchmarks/operator_vs_layer.py --num-calib {args.num_calib} --num-test {args.num_test} "
        f"--ns {' '.join(map(str, args.ns))}`. {machine_line()}",
        "",
        f"{len(samples)} test questions, LC on {len(lc.sample_ids)} calib samples; FLOPs priced at {visual} visual + "
        f"{t} text tokens (exact count). Unpatched accuracy {100 * unpatched:.1f}%. Operator-level: attention (A) or "
        "MLP (M) updates of visual tokens skipped, chosen by per-operator LC per FLOP saved up to the layer-level "
        "FLOPs (never above them, less than one operator below).",
        "",
        "| N | layer-level layers | FLOPs | accuracy | operator-level: both / A only / M only | FLOPs | accuracy | "
        "winner |",
        "|---|---|---|---|---|---|---|---|",
    ]
    wins = {"layer": 0, "operator": 0, "tie": 0}
    for n, layers, target, operators, (layer_acc, operator_acc) in rows:
        winner = "tie" if layer_acc == operator_acc else ("layer" if layer_acc > operator_acc else "operator")
        wins[winner] += 1
        chosen = " / ".join(_listed(part) for part in (operators.layers, operators.attention_layers,
                                                         operators.mlp_layers))
        lines.append(f"| {n} | {_listed(layers)} | {100 * target:.1f}% | {100 * layer_acc:.1f}% | {chosen} | "
                     f"{100 * operators.provenance['flops_ratio']:.1f}% | {100 * operator_acc:.1f}% | {winner} |")
    lines += ["", f"Operator-level won {wins['operator']}, layer-level won {wins['layer']}, tied {wins['tie']} of "
              f"{len(rows)} budgets. Wall time {time.perf_counter() - start:.0f} s."]
    if args.plot is not None:
        _plot(rows, unpatched, args.plot)
        lines += ["", f"![accuracy vs FLOPs]({args.plot.name})"]
    emit_report(lines, args.out)


def _listed(layers: list[int]) -> str:
    return ",".join(map(str, layers)) or "-"


def _plot(rows, unpatched: float, path: Path) -> None:  # noqa: ANN001
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 3.8))
    axes.plot([100 * r[2] for r in rows], [100 * r[4][0] for r in rows], "o-", mfc="none", label="layer-level (ShortV)")
    axes.plot([100 * r[3].provenance["flops_ratio"] for r in rows], [100 * r[4][1] for r in rows], "s--", mfc="none",
              label="operator-level")
    axes.plot([100], [100 * unpatched], "k*", ms=12, label="unpatched")
    axes.set_xlabel("prefill FLOPs (% of unpatched)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_ylim(0, 100)
    axes.legend(fontsize=8)
    axes.set_title("embedded tiny LLaVA: layer- vs operator-level selection", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
