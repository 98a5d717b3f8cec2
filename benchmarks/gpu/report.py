"""The GPU check's report: ``OUTDIR/cells.jsonl`` (``measure.py``) and ``OUTDIR/parity.txt`` (pytest) become
``OUTDIR/results.json`` (format ``shortv-gpu-check``, version 1: the setup, the device rates, the parity summary and
every cell as measured) and ``OUTDIR/report.md`` (tables, each number beside the target issue #23 sets for it,
met or not met). Runs also when the measurement was cut off."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

FORMAT = {"format": "shortv-gpu-check", "version": 1}


def load_cells(out: Path) -> list[dict[str, Any]]:
    path = out / "cells.jsonl"
    if not path.is_file():
        return []
    cells = []
    for line in path.read_text().splitlines():
        try:
            cells.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a run killed while writing it
            cells.append({"kind": "error", "cell": "?", "error": f"unreadable line in cells.jsonl: {line[:200]}"})
    return cells


def parity_summary(out: Path) -> str:
    """pytest's closing line (``N passed, M failed in S s``), or why there is none."""
    path = out / "parity.txt"
    if not path.is_file():
        return "not run"
    lines = [line.strip("= ") for line in path.read_text().splitlines() if line.strip()]
    closing = [line for line in lines if re.search(r"\b(passed|failed|error|errors|no tests ran)\b", line)]
    return closing[-1] if closing else "no pytest summary (cut off?); see parity.txt"


def _ms(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "n/a"
    return f"{stats['median'] * 1e3:.2f} [{stats['min'] * 1e3:.2f}-{stats['max'] * 1e3:.2f}]"


def _gib(stats: dict[str, Any] | None) -> str:
    return "n/a" if not stats else f"{stats['median'] / 2**30:.2f}"


def _tokens(cell: dict[str, Any]) -> str:
    return f"{cell['batch']} x ({cell['visual_tokens'][0]} + {cell['text_tokens'][0]})"


#: Issue #23's targets. Prefill at batch 1: eager ShortV never slower; LLaVA-1.5-7B compiled and with CUDA graphs
#: at least these speedups. Batched prefill (batch 8 on the GPU; the --smoke batch 2 checks the code) at least this
#: fraction of the roofline speedup, in every mode. Decode tokens/s at least this fraction of the baseline's.
EAGER_B1_SPEEDUP = 1.0
LLAVA_B1_SPEEDUP = {"compile": 1.45, "CUDA graphs": 1.55}
TARGET_SHAPE = "llava-1.5-7b"
BATCHED_OF_ROOFLINE = 0.90
DECODE_RATIO = 0.97


PREFILL_HEADING = "## Prefill (the prompt forward alone, CUDA events; ms, median [min-max] after warm-up)"


def _verdict(label: str, met: bool) -> str:
    return f"{label}: {'met' if met else '**not met**'}"


def _skipped(cell: dict[str, Any]) -> str:
    """A CUDA-graph cell whose graphs inductor compiled without CUDA graphs says so (log.txt says why)."""
    skips = cell.get("cudagraph_skips") or 0
    return f" ({skips} graphs without CUDA graph)" if skips else ""


def prefill_mode(cell: dict[str, Any]) -> str:
    timing = cell["timing"]
    return "CUDA graphs" if timing.get("cuda_graphs") else "compile" if timing["compiled"] else "eager"


def prefill_target(cell: dict[str, Any]) -> str:
    """The issue's target for this prefill cell, and whether it is met ("" where the issue sets none)."""
    mode, speedup = prefill_mode(cell), cell["timing"]["speedup"]
    if cell["batch"] > 1:
        return _verdict(f">= {BATCHED_OF_ROOFLINE:.0%} of roofline", cell["realized_of_roofline"] >= BATCHED_OF_ROOFLINE)
    if mode == "eager":
        return _verdict(f">= {EAGER_B1_SPEEDUP:.2f}x", speedup >= EAGER_B1_SPEEDUP)
    if cell["shape"] == TARGET_SHAPE:
        return _verdict(f">= {LLAVA_B1_SPEEDUP[mode]:.2f}x", speedup >= LLAVA_B1_SPEEDUP[mode])
    return ""


def decode_target(cell: dict[str, Any]) -> str:
    ratio = cell["result"]["decode_ratio"]
    return "" if ratio is None else _verdict(f">= {DECODE_RATIO:.2f}x", ratio >= DECODE_RATIO)


def prefill_rows(cells: list[dict[str, Any]]) -> list[str]:
    rows = []
    for cell in cells:
        if cell["kind"] not in ("prefill", "prefill_compiled", "prefill_cuda_graphs"):
            continue
        timing = cell["timing"]
        mode = prefill_mode(cell) + _skipped(cell)
        compile_s = "" if not timing.get("compile_s") else " / ".join(f"{s:.0f}" for s in timing["compile_s"].values())
        rows.append(
            f"| {cell['shape']} | {_tokens(cell)} | {mode} | {_ms(timing['baseline_s'])} | {_ms(timing['shortv_s'])} "
            f"| **{timing['speedup']:.2f}x** | {cell['flops_ideal']:.2f}x | {cell['roofline_ideal']:.2f}x "
            f"| {cell['realized_of_flops_ideal']:.0%} | {cell['realized_of_roofline']:.0%} "
            f"| {cell['roofline_seconds']['baseline'] * 1e3:.2f} | {compile_s} | {prefill_target(cell)} |"
        )
    return rows


def method_rows(cells: list[dict[str, Any]]) -> list[str]:
    rows = []
    for cell in cells:
        if cell["kind"] != "prefill_method":
            continue
        timing, method = cell["timing"], cell["method"]
        setting = " ".join(f"{key}={value}" for key, value in method.items() if key != "method")
        rows.append(
            f"| {cell['shape']} | {_tokens(cell)} | {method['method']} | {setting} | {_ms(timing['baseline_s'])} "
            f"| {_ms(timing['shortv_s'])} | **{timing['speedup']:.2f}x** | {cell['flops_ideal']:.2f}x "
            f"| {cell['realized_of_flops_ideal']:.0%} |"
        )
    return rows


def generate_rows(cells: list[dict[str, Any]]) -> list[str]:
    rows = []
    for cell in cells:
        if cell["kind"] not in ("generate", "generate_cuda_graphs"):
            continue
        result = cell["result"]
        base, short = result["baseline"], result["shortv"]
        decode = result["decode_ratio"]
        mode = ("CUDA graphs" if cell["kind"] == "generate_cuda_graphs" else "eager") + _skipped(cell)
        rows.append(
            f"| {cell['shape']} | {cell['batch']} | {mode} | {_ms(base['ttft_s'])} | {_ms(short['ttft_s'])} "
            f"| {result['prefill_speedup']:.2f}x "
            f"| {(base['decode_tokens_per_s'] or {}).get('median', float('nan')):.1f} / "
            f"{(short['decode_tokens_per_s'] or {}).get('median', float('nan')):.1f} "
            f"| {'n/a' if decode is None else f'{decode:.3f}x'} "
            f"| {_gib(base['peak_memory_total_bytes'])} / {_gib(short['peak_memory_total_bytes'])} "
            f"| {decode_target(cell)} |"
        )
    return rows


def markdown(cells: list[dict[str, Any]], parity: str) -> str:
    setup = next((cell for cell in cells if cell["kind"] == "setup"), {})
    rates = next((cell for cell in cells if cell["kind"] == "rates"), None)
    machine = setup.get("machine", {})
    done = next((cell for cell in cells if cell["kind"] == "done"), None)
    lines = [
        "# ShortV GPU check" + (" (--smoke, CPU: checks the script, not the numbers)" if setup.get("smoke") else ""),
        "",
        f"- device: {machine.get('gpu', machine.get('cpu', '?'))}; torch {machine.get('torch', '?')}, "
        f"transformers {machine.get('transformers', '?')}, CUDA {machine.get('cuda', '-')}; {machine.get('date', '?')}",
        "- measured rates: " + (f"{rates['flops_per_s'] / 1e12:.3g} TFLOP/s bf16 GEMM ({rates['gemm_size']}^3), "
                                f"{rates['bytes_per_s'] / 1e12:.3g} TB/s copy (read + write)" if rates else "n/a"),
        f"- parity tests on {setup.get('device', '?')}: {parity}",
        f"- shapes: {', '.join(setup.get('shapes', [])) or 'none'}; not registered yet: "
        f"{', '.join(setup.get('missing_shapes', [])) or 'none'}; bf16, sdpa, random weights with the real dims, "
        "the paper's N ShortV layers (published order, else the last N)",
        f"- measurement: {'finished' if done else 'cut off by the time limit (cells below are what finished)'}"
        + (f" in {done['wall_s']:.0f} s" if done else ""),
        "",
        PREFILL_HEADING,
        "",
        "*Roofline*: each projection costs max(FLOPs / measured GEMM rate, weight bytes / measured bandwidth), "
        "attention its FLOPs; *base roofline ms* is the dense prefill on that roofline. *compile s*: first call of "
        "baseline / ShortV. *compile*: `torch.compile(model, dynamic=False)`; *CUDA graphs*: the decoder stack "
        "compiled by `shortv.cuda_graphs.compile_decoder` (mode reduce-overhead) into a static cache. *target*: "
        "issue #23's.",
        "",
        "| shape | tokens | mode | baseline ms | ShortV ms | speedup | FLOPs-ideal | roofline | of FLOPs-ideal "
        "| of roofline | base roofline ms | compile s | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *prefill_rows(cells),
        "",
        "## Prefill of the paper's other methods (eager; issue #24)",
        "",
        "FastV (K = 2, R = 50% at full depth), VTW (the K nearest ShortV's FLOPs) and ShortV + FastV (the ShortV layers "
        "above with FastV's K and R) against the unpatched model on the same shape model.",
        "",
        "| shape | tokens | method | setting | baseline ms | method ms | speedup | FLOPs-ideal | of FLOPs-ideal |",
        "|---|---|---|---|---|---|---|---|---|",
        *method_rows(cells),
        "",
        "## Generate (greedy, KV cache: TTFT in ms, decode tokens/s, peak torch.cuda.max_memory_allocated in GiB)",
        "",
        "| shape | batch | mode | TTFT baseline | TTFT ShortV | TTFT speedup | decode tok/s baseline / ShortV "
        "| decode ratio | peak GiB baseline / ShortV | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *generate_rows(cells),
    ]
    prefills = ("prefill", "prefill_compiled", "prefill_cuda_graphs")
    verdicts = [target for target in [prefill_target(cell) for cell in cells if cell["kind"] in prefills]
                + [decode_target(cell) for cell in cells if cell["kind"].startswith("generate")] if target]
    met = sum(verdict.endswith(": met") for verdict in verdicts)
    lines.insert(lines.index(PREFILL_HEADING) - 1,
                 f"- issue #23's targets: {met} of {len(verdicts)} measured cells meet theirs (column *target*)")
    problems = [cell for cell in cells if cell["kind"] in ("error", "skipped")]
    if problems:
        lines += ["", "## Skipped and failed cells", ""]
        for cell in problems:
            where = f"{cell.get('cell')} {cell.get('shape', '')} batch {cell.get('batch', '-')}"
            lines.append(f"- {cell['kind']}: {where}: {cell.get('error') or cell.get('reason')}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    cells, parity = load_cells(out), parity_summary(out)
    results = {**FORMAT, "parity": parity, "cells": cells}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report = markdown(cells, parity)
    (out / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
