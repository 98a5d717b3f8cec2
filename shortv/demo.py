"""`shortv demo`: the whole method and the paper's ablation on the embedded tiny LLaVA, offline, on a laptop CPU.

Calibrate LC on the calib split; then, on the test split, measure the accuracy of the unpatched model, of the
same questions on a blank image (blind control), and at several N of: ShortV with the LC-ranked layers, five
seeded random selections, the first N and the last N layers, and the LC-ranked layers with *text* tokens frozen
instead (the paper's "which tokens" ablation). Then the methods at matched FLOPs (`shortv.demo_methods`): ShortV,
operator-level ShortV, FastV, VTW and ShortV + FastV at 30%, 45% and 55% of the prefill FLOPs, and VTW at the K of
its own KL rule. Report FLOPs ratios and the measured prefill speedup; write report.md, results.json and plots.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from tqdm.auto import tqdm

from .benchmark import BenchInputs, benchmark
from .benchmark.report import SMALL_MODEL_CAVEAT
from .calibrate import calibrate, vtw_rule
from .config import ShortVConfig
from .contribution import LCResult
from .data import VQASample, read_jsonl, subsample
from .demo_methods import (FLOPS_TARGETS, VTW_THRESHOLD, ComparisonRow, Setting, applied, compare,
                           comparison_markdown, method_grid, verdicts, vtw_rule_setting)
from .evaluation import batch_inputs, generate_answers, is_correct, token_counts
from .files import output_folder, refuse_existing
from .flops import LayerDims, flops_ratio
from .loading import inputs_for
from .patch import apply_shortv, remove_shortv

#: Visual-token selections of the ablation, and the text-token one on the LC-ranked layers.
SELECTIONS = ("lc", "random", "first", "last", "lc_text")
LABELS = {
    "unpatched": "unpatched",
    "blind": "blank image (blind control)",
    "lc": "LC-ranked (ShortV)",
    "random": "random layers",
    "first": "first N layers",
    "last": "last N layers",
    "lc_text": "LC-ranked, text tokens frozen",
}
#: Printed under the speed table: at this size the measured speedup is not meaningful.
SPEED_CAVEAT = SMALL_MODEL_CAVEAT
#: The files a demo writes besides its calibration/ folder.
OUTPUTS = ("report.md", "results.json", "metrics.json", "accuracy_vs_flops.png", "methods_vs_flops.png")
#: The paper's operating point (LLaVA-1.5-7B, N=19 of 32): 55% of the prefill FLOPs.
OPERATING_FLOPS = 0.55


@dataclass
class DemoRow:
    selection: str
    n: int
    layers: list[int]
    #: Prefill FLOPs of ShortV with these layers over the unpatched model's; None for the text-token ablation.
    flops_ratio: float | None
    accuracy: float
    per_type: dict[str, float]
    draw: int | None = None  # which random draw


@dataclass
class SpeedRow:
    n: int
    layers: list[int]
    ideal: float
    median: float
    min: float
    max: float
    repeats: int


@dataclass
class DemoReport:
    model: str
    num_calib: int
    num_test: int
    num_layers: int
    visual_tokens: int
    text_tokens: float  # mean over the test questions
    lc_order: list[int]
    lc_visual: list[float]
    lc_text: list[float]
    operating_n: int
    majority: float
    rows: list[DemoRow] = field(default_factory=list)
    #: The methods at matched FLOPs (`shortv.demo_methods`), VTW's own rule last; the verdict lines; the rule's record.
    comparison: list[ComparisonRow] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    vtw_rule: dict[str, Any] = field(default_factory=dict)
    speed: list[SpeedRow] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)

    def row(self, selection: str, n: int = 0) -> DemoRow:
        return next(r for r in self.rows if r.selection == selection and r.n == n)

    def random_rows(self, n: int) -> list[DemoRow]:
        return [r for r in self.rows if r.selection == "random" and r.n == n]

    @property
    def ns(self) -> list[int]:
        return sorted({r.n for r in self.rows if r.n})

    def markdown(self) -> str:
        types = sorted(self.row("unpatched").per_type)
        lines = ["| selection | N | layers | FLOPs | accuracy | " + " | ".join(types) + " |",
                 "|" + "---|" * (5 + len(types))]

        def line(label: str, n: int, layers: str, flops: float | None, accuracy: str, per_type: dict) -> None:
            ratio = "-" if flops is None else f"{100 * flops:.0f}%"
            lines.append(f"| {label} | {n} | {layers} | {ratio} | {accuracy} | "
                         + " | ".join(f"{100 * per_type[kind]:.0f}" for kind in types) + " |")

        for key in ("unpatched", "blind"):
            r = self.row(key)
            line(LABELS[key], 0, "-", 1.0, f"{100 * r.accuracy:.1f}%", r.per_type)
        for n in self.ns:
            for key in SELECTIONS:
                if key == "random":
                    draws = self.random_rows(n)
                    accs = [100 * r.accuracy for r in draws]
                    per = {kind: mean(r.per_type[kind] for r in draws) for kind in types}
                    line(f"random layers, mean of {len(draws)}", n, f"{len(draws)} seeded draws", draws[0].flops_ratio,
                         f"{mean(accs):.1f}% ({min(accs):.1f}-{max(accs):.1f})", per)
                else:
                    r = self.row(key, n)
                    line(LABELS[key], n, ",".join(map(str, r.layers)), r.flops_ratio, f"{100 * r.accuracy:.1f}%",
                         r.per_type)
        return "\n".join(lines) + "\n"

    def comparison_markdown(self) -> str:
        return comparison_markdown(self.comparison, sorted(self.row("unpatched").per_type))

    def speed_markdown(self) -> str:
        lines = ["| N (LC-ranked) | FLOPs-ideal speedup | measured prefill speedup: median (min-max) |",
                 "|---|---|---|"]
        for s in self.speed:
            lines.append(f"| {s.n} | {s.ideal:.2f}x | {s.median:.2f}x ({s.min:.2f}-{s.max:.2f}), {s.repeats} runs |")
        return "\n".join(lines) + "\n"


def layer_selections(order: list[int], num_layers: int, n: int, seed: int,
                     draws: int = 5) -> dict[str, list[list[int]]]:
    """The paper's ablation at ``n``: the LC-ranked layers, ``draws`` seeded random selections, first and last N."""
    rng = random.Random(f"shortv-demo/{seed}/{n}")
    return {
        "lc": [list(order[:n])],
        "random": [sorted(rng.sample(range(num_layers), n)) for _ in range(draws)],
        "first": [list(range(n))],
        "last": [list(range(num_layers - n, num_layers))],
    }


def operating_n(num_layers: int, ratio_of) -> int:
    """The N whose FLOPs ratio ``ratio_of(N)`` is closest to the paper's 55%."""
    return min(range(1, num_layers + 1), key=lambda n: abs(ratio_of(n) - OPERATING_FLOPS))


def default_ns(num_layers: int, ratio_of) -> tuple[int, ...]:
    """A quarter, half and three quarters of the layers, and the operating point (:func:`operating_n`)."""
    quarters = {round(num_layers * 0.25), round(num_layers * 0.5), round(num_layers * 0.75)}
    return tuple(sorted(quarters | {operating_n(num_layers, ratio_of)}))


def prompt_tokens(processor: Any, samples: list[VQASample], batch_size: int) -> tuple[int, float]:
    """Visual tokens per image and mean text tokens per prompt of ``samples``, as the model sees them."""
    counts = [c for start in range(0, len(samples), batch_size)
              for c in token_counts(processor, batch_inputs(processor, samples[start : start + batch_size]))]
    return counts[0]["visual_tokens"], mean(c["text_tokens"] for c in counts)


def _accuracy(model: Any, processor: Any, samples: list[VQASample], batch_size: int) -> tuple[float, dict[str, float]]:
    by_type: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        answers, _ = generate_answers(model, processor, batch, max_new_tokens=3)
        for sample, answer in zip(batch, answers):
            by_type[sample.type or "all"].append(is_correct(answer, sample))
    flat = [value for values in by_type.values() for value in values]
    return sum(flat) / len(flat), {kind: sum(v) / len(v) for kind, v in sorted(by_type.items())}


def _majority(samples: list[VQASample]) -> float:
    """Accuracy of always giving the most frequent answer of each question type."""
    by_type: dict[str, list[str]] = defaultdict(list)
    for sample in samples:
        by_type[sample.type or "all"].append(sample.answer or "")
    return sum(max(answers.count(a) for a in set(answers)) for answers in by_type.values()) / len(samples)


def run_demo(
    out_dir: str | Path = "shortv_demo",
    num_calib: int = 32,
    num_test: int = 700,
    ns: tuple[int, ...] | None = None,
    batch_size: int = 50,
    seed: int = 0,
    speed_repeats: int = 5,
    random_draws: int = 5,
    progress: bool = True,
    model_path: str | Path | None = None,
    overwrite: bool = False,
    flops_targets: tuple[float, ...] = FLOPS_TARGETS,
) -> DemoReport:
    """Run the demo into ``out_dir``; ``model_path`` swaps in another checkpoint of the embedded architecture.

    An ``out_dir`` that holds anything is refused unless ``overwrite``; then the files of an earlier demo there
    (:data:`OUTPUTS` and ``calibration/``) are removed first, and nothing else.

    ``ns`` defaults to :func:`default_ns`. Writes results.json (every row), metrics.json (:func:`ablation_metrics`),
    report.md, accuracy_vs_flops.png, methods_vs_flops.png (the methods at ``flops_targets``) and calibration/
    (lc.json with per-operator LC, shortv_config.json for the operating N, lc.png, the operator-level files).
    """
    from .benchmark import machine_info
    from .plots import plot_accuracy_vs_flops, plot_methods_vs_flops
    from .tiny import embedded_split_path, load_embedded

    wall0, cpu0, load0 = time.perf_counter(), time.process_time(), _load()
    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite)
    output_folder(out_dir)
    for name in OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)
    if (out_dir / "calibration").is_dir():
        shutil.rmtree(out_dir / "calibration")
    model, processor = load_embedded(path=model_path)
    samples = subsample(read_jsonl(embedded_split_path("test"), require_answer=True), num_test, seed)
    blank = subsample(read_jsonl(embedded_split_path("test", blank=True), require_answer=True), num_test, seed)
    if [(s.id, s.prompt, s.answer) for s in blank] != [(s.id, s.prompt, s.answer) for s in samples]:  # pragma: no cover
        raise ValueError("the blank-image split does not hold the test split's questions")

    visual, text = prompt_tokens(processor, samples, batch_size)
    dims = LayerDims.from_config(model.config)
    num_layers = dims.num_layers

    def ratio(layers: list[int]) -> float:
        return flops_ratio(dims, round(text), visual, layers, formula="exact")

    operating = operating_n(num_layers, lambda n: ratio(list(range(n))))
    # The model id is the checkpoint folder (as `shortv eval` names it), and the config holds the operating N, so
    # that `shortv eval --lc OUT/calibration/lc.json` and `--config OUT/calibration/shortv_config.json` accept them.
    calibration_dir = out_dir / "calibration"
    calibration = calibrate(model, processor=processor, data=embedded_split_path("calib"), out_dir=calibration_dir,
                            num_samples=num_calib, n=operating, seed=seed, progress=progress, operators=True)
    lc = calibration.lc
    order = lc.order
    ns = ns or default_ns(num_layers, lambda n: ratio(list(range(n))))
    plans: list[tuple[str, int, list[int], int | None]] = []
    for n in ns:
        for key, selections in layer_selections(order, num_layers, n, seed, random_draws).items():
            plans += [(key, n, layers, draw if key == "random" else None) for draw, layers in enumerate(selections)]
        plans.append(("lc_text", n, list(order[:n]), None))

    report = DemoReport(model="shortv tiny LLaVA", num_calib=len(lc.sample_ids), num_test=len(samples),
                        num_layers=num_layers, visual_tokens=visual, text_tokens=round(text, 1), lc_order=order,
                        lc_visual=lc.mean["visual"], lc_text=lc.mean.get("text", []), operating_n=operating,
                        majority=_majority(samples), machine=machine_info("cpu"))
    bar = tqdm(total=len(plans) + 2, desc="demo: evaluating", unit="config", disable=not progress)
    for key, data in (("unpatched", samples), ("blind", blank)):
        accuracy, per_type = _accuracy(model, processor, data, batch_size)
        report.rows.append(DemoRow(key, 0, [], 1.0, accuracy, per_type))
        bar.update(1)
    for key, n, layers, draw in plans:
        # The text-token ablation is a reference-mode option of the config (the fast layer freezes visual tokens).
        config = (ShortVConfig(layers, mode="reference", frozen_tokens="text") if key == "lc_text"
                  else ShortVConfig(layers))
        apply_shortv(model, config)
        try:
            accuracy, per_type = _accuracy(model, processor, samples, batch_size)
        finally:
            remove_shortv(model)
        report.rows.append(DemoRow(key, n, layers, None if key == "lc_text" else ratio(layers), accuracy, per_type,
                                   draw))
        bar.update(1)
    bar.close()
    _compare_methods(report, model, processor, samples, batch_size, lc, dims, (round(text), visual), flops_targets,
                     calibration_samples=subsample(read_jsonl(embedded_split_path("calib")), num_calib, seed),
                     progress=progress)

    if speed_repeats > 0:
        speed_batch = BenchInputs.from_model_inputs(model, inputs_for(model, batch_inputs(processor, samples[:8])))
        for n in ns:
            result = benchmark(model, speed_batch, order[:n], new_tokens=1, repeats=speed_repeats, warmup=2)
            paired = result.prefill_speedup_paired
            report.speed.append(SpeedRow(n, order[:n], result.ideal_speedup, paired.median, paired.min, paired.max,
                                         speed_repeats))

    report.timing = {"wall_s": round(time.perf_counter() - wall0, 1), "cpu_s": round(time.process_time() - cpu0, 1),
                     "load_average_start": load0, "load_average_end": _load(), "torch_threads": torch.get_num_threads()}
    (out_dir / "results.json").write_text(json.dumps(asdict(report), indent=1) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(ablation_metrics(report), indent=1) + "\n")
    plot_accuracy_vs_flops(report, out_dir / "accuracy_vs_flops.png")
    plot_methods_vs_flops(report, out_dir / "methods_vs_flops.png")
    (out_dir / "report.md").write_text(report_text(report))
    return report


def _compare_methods(report: DemoReport, model: Any, processor: Any, samples: list[VQASample], batch_size: int,
                     lc: LCResult, dims: LayerDims, shape: tuple[int, int], targets: tuple[float, ...],
                     calibration_samples: list[VQASample], progress: bool) -> None:
    """The methods at matched FLOPs into ``report``: every setting scored once (the ablation's LC-ranked rows are
    reused), then VTW at the K of its own KL rule on the calibration samples (the ones LC was calibrated on)."""
    t, v = shape
    if [s.id for s in calibration_samples] != lc.sample_ids:  # pragma: no cover - calibrate subsamples the same way
        raise ValueError("the VTW rule's calibration samples are not the ones LC was calibrated on")
    known = {Setting("shortv", r.flops_ratio, tuple(r.layers)): (r.accuracy, r.per_type)
             for r in report.rows if r.selection == "lc"}
    bar = tqdm(desc="demo: methods at matched FLOPs", unit="config", disable=not progress)

    def score(setting: Setting) -> tuple[float, dict[str, float]]:
        if setting not in known:
            with applied(model, setting):
                known[setting] = _accuracy(model, processor, samples, batch_size)
            bar.update(1)
        return known[setting]

    report.comparison = compare(score, targets, lc, dims, t, v)
    grid = method_grid("vtw", dims, t, v, lc.order)
    span = (grid[0].flops_ratio, grid[-1].flops_ratio)
    try:
        rule = vtw_rule(model, processor, calibration_samples, VTW_THRESHOLD, batch_size)
        setting, report.vtw_rule = vtw_rule_setting(rule, dims, t, v)
    except ValueError as error:  # no K meets the threshold: said in the row
        report.vtw_rule = {"rule": "vtw_kl", "threshold": VTW_THRESHOLD, "error": str(error)}
        report.comparison.append(ComparisonRow(None, "vtw_rule", None, f"no K with mean KL < {VTW_THRESHOLD}", None,
                                               *span, 0.0))
    else:
        report.vtw_rule["calibration_samples"] = len(calibration_samples)
        kl = report.vtw_rule["kl"][setting.k - report.vtw_rule["first_k"]]
        report.comparison.append(ComparisonRow(None, "vtw_rule", asdict(setting),
                                               f"{setting.describe()} (mean KL {kl:.3g} < {VTW_THRESHOLD})",
                                               setting.flops_ratio, *span, 0.0, *score(setting)))
    bar.close()
    report.verdicts = verdicts(report.comparison)


#: Issue #15's targets for the embedded model at the operating N, as (name, description); see :func:`ablation_metrics`.
TARGETS = (
    ("unpatched", "unpatched accuracy >= 85%"),
    ("blind", "blind control within 15 points of majority-class guessing"),
    ("lc_kept", "LC-ranked ShortV keeps >= 97% of the unpatched accuracy"),
    ("random_gap", "mean of the random selections >= 5 points below LC-ranked"),
    ("first_gap", "first-N >= 15 points below LC-ranked"),
    ("text_frozen", "LC-ranked layers with text tokens frozen <= 10 points above the blind control"),
)


def ablation_metrics(report: DemoReport) -> dict[str, Any]:
    """metrics.json: the ablation's accuracies at every N, and :data:`TARGETS` checked at the operating N."""
    unpatched, blind = report.row("unpatched").accuracy, report.row("blind").accuracy
    by_n = {}
    for n in report.ns:
        randoms = [r.accuracy for r in report.random_rows(n)]
        by_n[str(n)] = {"flops_ratio": report.row("lc", n).flops_ratio, "lc_layers": report.row("lc", n).layers,
                        "lc": report.row("lc", n).accuracy, "random_mean": mean(randoms),
                        "random_min": min(randoms), "random_max": max(randoms), "random_draws": randoms,
                        "first": report.row("first", n).accuracy, "last": report.row("last", n).accuracy,
                        "lc_text": report.row("lc_text", n).accuracy}
    targets = {}
    if str(report.operating_n) in by_n:
        at = by_n[str(report.operating_n)]
        values = {
            "unpatched": (unpatched, unpatched >= 0.85),
            "blind": (blind - report.majority, abs(blind - report.majority) <= 0.15),
            "lc_kept": (at["lc"] / unpatched, at["lc"] >= 0.97 * unpatched),
            "random_gap": (at["lc"] - at["random_mean"], at["lc"] - at["random_mean"] >= 0.05),
            "first_gap": (at["lc"] - at["first"], at["lc"] - at["first"] >= 0.15),
            "text_frozen": (at["lc_text"] - blind, at["lc_text"] - blind <= 0.10),
        }
        targets = {key: {"target": description, "value": round(values[key][0], 4), "met": values[key][1]}
                   for key, description in TARGETS}
    return {"num_test": report.num_test, "num_calib": report.num_calib, "majority": report.majority,
            "unpatched": unpatched, "blind": blind, "operating_n": report.operating_n, "by_n": by_n,
            "targets_at_operating_n": targets, "wall_s": report.timing.get("wall_s")}


def _load() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover - not on Linux/macOS
        return None


def report_text(report: DemoReport) -> str:
    """report.md: setup, LC profile, the ablation table, the speed table with its caveat, timing, figures."""
    lc_line = ", ".join(f"{layer}: {report.lc_visual[layer]:.1e}" for layer in report.lc_order)
    timing = report.timing
    return (
        f"# ShortV demo: {report.model}\n\n"
        f"{report.num_test} test questions (greedy decoding), LC calibrated on {report.num_calib} calib samples; "
        f"{report.visual_tokens} visual + {report.text_tokens} text tokens per prompt (mean); "
        f"{report.num_layers} decoder layers. Majority-class guessing scores {100 * report.majority:.1f}%.\n\n"
        f"LC order (ascending visual LC): {report.lc_order}\n\nVisual LC per layer, in that order: {lc_line}\n\n"
        f"The paper's operating point (55% of the prefill FLOPs) is N = {report.operating_n}.\n\n"
        f"{report.markdown()}\n"
        "Methods at matched prefill FLOPs (same model, test questions and calibration samples; the rules that set "
        "each method's parameters for a target are in docs/demo.md):\n\n"
        f"{report.comparison_markdown()}\n" + "".join(f"- {line}\n" for line in report.verdicts) + "\n"
        f"Random layers: {sum(1 for r in report.rows if r.selection == 'random' and r.n == report.operating_n)} "
        "seeded draws per N, mean (min-max). The text-token ablation saves no FLOPs (it runs in reference mode).\n\n"
        + (f"Prefill speedup of the LC-ranked layers (batch of 8 prompts, paired interleaved runs after warm-up):\n\n"
           f"{report.speed_markdown()}\n"
           f"{SPEED_CAVEAT}\n\n" if report.speed else "")
        + f"Demo wall time {timing.get('wall_s')} s, CPU time {timing.get('cpu_s')} s, {timing.get('torch_threads')} "
        f"torch threads, load average {timing.get('load_average_start')} at the start; "
        f"{report.machine.get('cpu', 'cpu')}, torch {torch.__version__}.\n\n"
        "![LC](calibration/lc.png)\n\n![accuracy vs FLOPs](accuracy_vs_flops.png)\n\n"
        "![methods vs FLOPs](methods_vs_flops.png)\n"
    )
