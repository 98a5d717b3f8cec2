"""A `BenchResult` as text: table rows for the terminal (`shortv bench`) and a self-contained markdown report."""

from __future__ import annotations

from collections.abc import Sequence

from .results import BenchResult, Stats, median_ratio


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
         f"speedup {result.prefill_speedup:.3f}x"),
        ("decode (tokens/s)", _fmt_stats(base.decode_tokens_per_s, digits=2),
         _fmt_stats(short.decode_tokens_per_s, digits=2), f"{_fmt_ratio(result.decode_ratio)} of baseline"),
        ("end-to-end (s)", _fmt_stats(base.e2e_s), _fmt_stats(short.e2e_s), f"speedup {result.e2e_speedup:.3f}x"),
        ("peak memory rise (MiB)", _fmt_stats(base.peak_memory_bytes, mib, 1),
         _fmt_stats(short.peak_memory_bytes, mib, 1), f"{_fmt_ratio(result.memory_ratio)} of baseline"),
        ("peak memory total (MiB)", _fmt_stats(base.peak_memory_total_bytes, mib, 1),
         _fmt_stats(short.peak_memory_total_bytes, mib, 1), _fmt_ratio(total_ratio, "x of baseline")),
    ]


def speedup_lines(result: BenchResult) -> list[str]:
    paired = result.prefill_speedup_paired
    saved = "n/a" if result.saved_time_realized is None else f"{result.saved_time_realized:.1%}"
    return [
        f"prefill speedup (measured, ratio of medians): {result.prefill_speedup:.3f}x "
        f"(per-repetition pairs: median {paired.median:.3f}x, {paired.min:.3f}-{paired.max:.3f})",
        f"FLOPs-ideal speedup (exact formula, model dims, t={fmt_counts(result.text_tokens)}, "
        f"v={fmt_counts(result.visual_tokens)}): {result.ideal_speedup:.3f}x "
        f"(paper formula: {result.ideal_speedup_paper:.3f}x)",
        f"realized: {result.realized:.1%} of the ideal speedup ({saved} of the ideally saved time)",
    ]


def layers_line(result: BenchResult) -> str:
    prefix = (
        f"first {result.num_layers} of {result.full_num_layers} layers"
        if result.full_num_layers and result.full_num_layers != result.num_layers
        else f"{result.num_layers} layers"
    )
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
        "| metric | baseline | ShortV | ShortV vs baseline |",
        "|---|---|---|---|",
    ]
    lines += [f"| {metric} | {base} | {short} | {ratio} |" for metric, base, short, ratio in summary_rows(result)]
    lines += [""] + [f"- {line}" for line in speedup_lines(result)]
    lines += [f"- note: {note}" for note in result.notes]
    return "\n".join(lines) + "\n"
