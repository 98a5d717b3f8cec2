"""A `BenchResult` as text: table rows for the terminal (`shortv bench`) and a self-contained markdown report.

The headline speedup is the median of the per-repetition pairs (baseline run ``i`` over ShortV run ``i``, taken
back to back), with their spread. A run whose pairs spread wider than `NOISY_SPREAD` is flagged as too noisy to
read, and then no "% of the ideal" above 100% is printed: a noisy machine, not ShortV, put it there.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from .results import BenchResult, Stats, median_ratio

#: Spread of the per-pair speedups, (max - min) / median, above which a run is too noisy to read.
NOISY_SPREAD = 0.25
#: Said with every speed measured on the embedded tiny model (``shortv bench`` without --model/--shape, the demo).
SMALL_MODEL_CAVEAT = ("Not meaningful at this size: a layer of the tiny model (hidden size 128, ~50 tokens) takes "
                      "well under a millisecond, so fixed per-layer costs and the machine's noise dominate (see the "
                      "min-max spread); `shortv bench --shape` measures ShortV's speed at the paper's model shapes.")


def _fmt_stats(stats: Stats | None, scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
    if stats is None:
        return "n/a"
    return (
        f"{stats.median * scale:.{digits}f}{unit} "
        f"[{stats.min * scale:.{digits}f}-{stats.max * scale:.{digits}f}]"
    )


def _fmt_ratio(value: float | None, suffix: str = "x") -> str:
    return "n/a" if value is None else f"{value:.3f}{suffix}"


def fmt_counts(counts: Sequence[int]) -> str:
    """One number when every sample has the same count, else all of them: ``576`` or ``576/580``."""
    unique = sorted(set(counts))
    return str(unique[0]) if len(unique) == 1 else "/".join(map(str, counts))


def summary_rows(result: BenchResult) -> list[tuple[str, str, str, str]]:
    """(metric, baseline, ShortV, ShortV vs baseline) rows, values as ``median [min-max]``."""
    mib = 1 / 2**20
    base, short = result.baseline, result.shortv
    total_ratio = median_ratio(short.peak_memory_total_bytes, base.peak_memory_total_bytes)
    return [
        ("TTFT / prefill (s)", _fmt_stats(base.ttft_s), _fmt_stats(short.ttft_s),
         f"speedup {result.prefill_speedup_paired.median:.3f}x (pairs)"),
        ("decode (tokens/s)", _fmt_stats(base.decode_tokens_per_s, digits=2),
         _fmt_stats(short.decode_tokens_per_s, digits=2), f"{_fmt_ratio(result.decode_ratio)} of baseline"),
        ("end-to-end (s)", _fmt_stats(base.e2e_s), _fmt_stats(short.e2e_s), f"speedup {result.e2e_speedup:.3f}x"),
        ("peak memory rise (MiB)", _fmt_stats(base.peak_memory_bytes, mib, 1),
         _fmt_stats(short.peak_memory_bytes, mib, 1), f"{_fmt_ratio(result.memory_ratio)} of baseline"),
        ("peak memory total (MiB)", _fmt_stats(base.peak_memory_total_bytes, mib, 1),
         _fmt_stats(short.peak_memory_total_bytes, mib, 1), _fmt_ratio(total_ratio, "x of baseline")),
    ]


def pair_spread(result: BenchResult) -> float:
    """(max - min) / median of the per-repetition prefill speedups."""
    paired = result.prefill_speedup_paired
    return (paired.max - paired.min) / paired.median


def is_noisy(result: BenchResult) -> bool:
    """Whether the per-pair speedups spread too widely (`NOISY_SPREAD`) for the headline to be read."""
    return pair_spread(result) > NOISY_SPREAD


def _spread_text(paired: Stats) -> str:
    text = f"range {paired.min:.3f}-{paired.max:.3f}"
    if len(paired.values) >= 4:
        q1, _, q3 = statistics.quantiles(paired.values, n=4, method="inclusive")
        text = f"IQR {q1:.3f}-{q3:.3f}, {text}"
    return text


def speedup_lines(result: BenchResult) -> list[str]:
    """The headline (per-pair median speedup and its spread), the FLOPs-ideal, and how much of it was realized."""
    paired = result.prefill_speedup_paired
    realized = paired.median / result.ideal_speedup
    lines = [
        f"prefill speedup: {paired.median:.3f}x, median of {len(paired.values)} back-to-back baseline/"
        f"{'ShortV' if result.method_name == 'shortv' else result.method_name} pairs "
        f"({_spread_text(paired)}; ratio of the medians {result.prefill_speedup:.3f}x)",
        f"FLOPs-ideal speedup (exact formula, model dims, t={fmt_counts(result.text_tokens)}, "
        f"v={fmt_counts(result.visual_tokens)}): {result.ideal_speedup:.3f}x "
        f"(paper formula: {result.ideal_speedup_paper:.3f}x)",
    ]
    noisy = is_noisy(result)
    if noisy:
        base = result.baseline.ttft_s
        lines.append(
            f"too noisy to read: the pairs spread over {pair_spread(result):.0%} of their median (baseline TTFT "
            f"{base.min:.3f}-{base.max:.3f} s); rerun on a quieter machine (--threads with the free cores, more "
            "--repeats)")
    if noisy and realized > 1:
        lines.append("realized: not given (the median pair is above the FLOPs-ideal, which only noise can do here)")
    else:
        ideal = result.ideal_speedup
        saved = "n/a" if ideal <= 1.0 else f"{(1 - 1 / paired.median) / (1 - 1 / ideal):.1%}"
        lines.append(f"realized: {realized:.1%} of the ideal speedup ({saved} of the ideally saved time)"
                     + (", from a noisy run" if noisy else ""))
    return lines


def layers_line(result: BenchResult) -> str:
    prefix = (
        f"first {result.num_layers} of {result.full_num_layers} layers"
        if result.full_num_layers and result.full_num_layers != result.num_layers
        else f"{result.num_layers} layers"
    )
    if result.method_name != "shortv":
        return f"{prefix}; {result.layer_selection}"
    return (
        f"{prefix}; ShortV layers ({len(result.shortv_layers)}, mode {result.shortv_mode}): "
        f"{sorted(result.shortv_layers)} - {result.layer_selection}"
    )


def to_markdown(result: BenchResult, title: str | None = None) -> str:
    """A self-contained markdown report: setup, machine, results table, speedup vs FLOPs-ideal."""
    machine = result.machine
    memory = machine.get("memory_total_bytes")
    lines = [f"## {title or result.model}", ""]
    lines += [
        f"- model: {result.model} ({result.source}), {result.dtype}, device {result.device}",
        f"- layers: {layers_line(result)}",
        f"- tokens per sample: {fmt_counts(result.visual_tokens)} visual + {fmt_counts(result.text_tokens)} text, "
        f"batch {result.batch_size}, {result.new_tokens} new tokens (greedy, KV cache)",
        f"- repetitions: {result.repeats} (after {result.warmup} warm-up), baseline/ShortV interleaved, "
        "order alternating; values are median [min-max]",
        f"- machine: {machine.get('cpu', '?')}, {machine.get('cpu_usable', '?')} usable cores "
        f"({machine.get('torch_threads', '?')} torch threads)"
        + (f", {memory / 2**30:.1f} GiB RAM" if memory else "")
        + (f", GPU {machine['gpu']}" if "gpu" in machine else "")
        + f"; torch {machine.get('torch', '?')}, transformers {machine.get('transformers', '?')}; "
        f"{machine.get('date', '?')}",
        f"- peak memory: {result.memory_method}",
        "",
        "| metric | baseline | {0} | {0} vs baseline |".format(
            "ShortV" if result.method_name == "shortv" else result.method_name),
        "|---|---|---|---|",
    ]
    lines += [f"| {metric} | {base} | {short} | {ratio} |" for metric, base, short, ratio in summary_rows(result)]
    lines += [""] + [f"- {line}" for line in speedup_lines(result)]
    lines += [f"- note: {note}" for note in result.notes]
    return "\n".join(lines) + "\n"
