"""`shortv demo`: the whole method on the embedded tiny LLaVA, offline, in a few minutes on a laptop CPU.

Calibrate LC on the calib split; evaluate test accuracy of the unpatched model and of ShortV at several N with
three layer selections (LC-ranked, random, last N; the paper's ablation); report FLOPs ratio and measured prefill
speedup; write report.md, results.json and plots.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .benchmark import BenchInputs, benchmark
from .calibrate import calibrate
from .config import ShortVConfig
from .data import VQASample, read_jsonl, subsample
from .evaluation import batch_inputs, generate_answers, is_correct, token_counts
from .flops import LayerDims, flops_ratio
from .loading import inputs_for
from .patch import apply_shortv, remove_shortv

SELECTIONS = ("lc", "random", "last")


@dataclass
class DemoRow:
    selection: str
    n: int
    layers: list[int]
    flops_ratio: float
    accuracy: float
    per_type: dict[str, float]
    prefill_speedup: float | None = None


@dataclass
class DemoReport:
    model: str
    num_calib: int
    num_test: int
    visual_tokens: int
    text_tokens: int
    lc_order: list[int]
    baseline: DemoRow
    rows: list[DemoRow] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        types = sorted(self.baseline.per_type)
        header = "| selection | N | FLOPs | accuracy | " + " | ".join(types) + " | prefill speedup |"
        lines = [header, "|" + "---|" * (5 + len(types))]
        for row in [self.baseline, *self.rows]:
            speed = "" if row.prefill_speedup is None else f"{row.prefill_speedup:.2f}x"
            lines.append(
                f"| {row.selection} | {row.n} | {100 * row.flops_ratio:.0f}% | {100 * row.accuracy:.1f}% | "
                + " | ".join(f"{100 * row.per_type[kind]:.0f}" for kind in types)
                + f" | {speed} |"
            )
        return "\n".join(lines) + "\n"


def _accuracy(model: Any, processor: Any, samples: list[VQASample], batch_size: int) -> tuple[float, dict[str, float]]:
    by_type: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        answers, _ = generate_answers(model, processor, batch, max_new_tokens=3)
        for sample, answer in zip(batch, answers):
            by_type[sample.type or "all"].append(is_correct(answer, sample))
    flat = [value for values in by_type.values() for value in values]
    return sum(flat) / len(flat), {kind: sum(v) / len(v) for kind, v in sorted(by_type.items())}


def layer_selections(order: list[int], num_layers: int, n: int, seed: int) -> dict[str, list[int]]:
    """The paper's ablation: LC-ranked layers, random layers (seeded), the last N layers."""
    return {
        "lc": order[:n],
        "random": sorted(random.Random(seed * 1000 + n).sample(range(num_layers), n)),
        "last": list(range(num_layers - n, num_layers)),
    }


def _plot_accuracy(report: DemoReport, path: Path) -> None:
    from .plots import _pyplot

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 3.8))
    for selection, marker in zip(SELECTIONS, ("o", "s", "^")):
        rows = sorted((r for r in report.rows if r.selection == selection), key=lambda r: r.flops_ratio)
        axes.plot([100 * r.flops_ratio for r in rows], [100 * r.accuracy for r in rows], marker=marker,
                  label={"lc": "LC-ranked (ShortV)", "random": "random layers", "last": "last N layers"}[selection])
    axes.axhline(100 * report.baseline.accuracy, color="gray", ls="--", lw=1, label="unpatched")
    axes.set_xlabel("prefill FLOPs (% of unpatched)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(f"Accuracy vs FLOPs, {report.model} ({report.num_test} questions)", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_demo(
    out_dir: str | Path = "shortv_demo",
    num_calib: int = 32,
    num_test: int = 300,
    ns: tuple[int, ...] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    speed_repeats: int = 3,
    progress: bool = True,
    model_path: str | Path | None = None,
) -> DemoReport:
    """Run the demo into ``out_dir``; ``model_path`` swaps in another checkpoint of the embedded architecture."""
    from .benchmark import machine_info
    from .tiny import embedded_split_path, load_embedded

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = load_embedded(path=model_path)
    calibration_dir = out_dir / "calibration"
    calibration = calibrate(model, processor=processor, model_id="shortv-tiny-llava", data=embedded_split_path("calib"),
                            out_dir=calibration_dir, num_samples=num_calib, seed=seed, progress=progress,
                            resume=(calibration_dir / "lc_samples.jsonl").exists())
    order, num_layers = calibration.lc.order, calibration.lc.num_layers
    samples = subsample(read_jsonl(embedded_split_path("test"), require_answer=True), num_test, seed)
    ns = ns or tuple(sorted({round(num_layers * f) for f in (0.25, 0.5, 0.6, 0.75)}))

    counts = token_counts(processor, batch_inputs(processor, samples[:1]))[0]
    visual, text = counts["visual_tokens"], counts["text_tokens"]
    dims = LayerDims.from_config(model.config)

    plans = [(selection, n, layers) for n in ns for selection, layers in layer_selections(order, num_layers, n, seed).items()]
    bar = tqdm(total=len(plans) + 1, desc="demo: evaluating", unit="config", disable=not progress)
    accuracy, per_type = _accuracy(model, processor, samples, batch_size)
    bar.update(1)
    baseline = DemoRow("unpatched", 0, [], 1.0, accuracy, per_type, 1.0)
    report = DemoReport(model="shortv tiny LLaVA", num_calib=len(calibration.lc.sample_ids), num_test=len(samples),
                        visual_tokens=visual, text_tokens=text, lc_order=order, baseline=baseline,
                        machine=machine_info("cpu"))
    speed_batch = BenchInputs.from_model_inputs(model, inputs_for(model, batch_inputs(processor, samples[:8])))
    for selection, n, layers in plans:
        apply_shortv(model, ShortVConfig(layers))
        accuracy, per_type = _accuracy(model, processor, samples, batch_size)
        remove_shortv(model)
        speedup = None
        if selection == "lc" and speed_repeats > 0:
            speedup = benchmark(model, speed_batch, layers, new_tokens=1, repeats=speed_repeats, warmup=1).prefill_speedup
        report.rows.append(DemoRow(selection, n, layers, flops_ratio(dims, text, visual, layers, formula="exact"),
                                   accuracy, per_type, speedup))
        bar.update(1)
    bar.close()

    (out_dir / "results.json").write_text(json.dumps(asdict(report), indent=1) + "\n")
    _plot_accuracy(report, out_dir / "accuracy_vs_flops.png")
    (out_dir / "report.md").write_text(
        f"# ShortV demo: {report.model}\n\n"
        f"{report.num_test} test questions, LC calibrated on {report.num_calib} samples; "
        f"{visual} visual + {text} text tokens per prompt; {num_layers} decoder layers.\n"
        f"LC order (ascending visual LC): {order}\n\n{report.markdown()}\n"
        f"Prefill speedup: median over {speed_repeats} interleaved runs of a batch of 8 prompts, "
        f"{report.machine.get('cpu', 'cpu')}, torch {torch.__version__}.\n\n"
        "![LC](calibration/lc.png)\n\n![accuracy vs FLOPs](accuracy_vs_flops.png)\n"
    )
    return report
