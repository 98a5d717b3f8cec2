"""How fast this machine runs a decoder layer's projections as a function of the number of rows fed to them.

A ShortV layer sends only the text tokens (64 in the paper's setting) through ``q_proj``, ``o_proj`` and the MLP,
while a dense layer sends all tokens (640 with one LLaVA-1.5 image). The FLOPs-ideal speedup assumes both run at
the same FLOP rate. They do not when the weights must be streamed from memory for few rows: every projection reads
its whole weight matrix whatever the row count, so below some row count a GEMM is bound by weight bandwidth, not by
arithmetic. This script measures that curve for one paper shape and turns it into a *projection-time ideal*: the
dense/ShortV time ratio of a layer's projections alone, from timed GEMMs at the real row counts, beside their FLOPs
ratio. The gap between the two is what no ShortV implementation can recover on this machine at this batch size.

Each timing cycles through a pool of distinct weight matrices larger than the last-level cache, so every call
streams its weights from memory, as in a real forward pass.

Usage::

    python benchmarks/bench_projection_rows.py --shape qwen2-vl-7b --threads 2 \\
        --out benchmarks/results/projection_rows_qwen2-vl-7b_2threads.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from markdown_report import emit_report, machine_line
from shortv.benchmark import shape_shortv_config
from shortv.flops import get_shape, layer_projections, projection_rows
from shortv.loading import DTYPES

POOL_BYTES = 768 * 2**20  # beyond any last-level cache of the machines we run on


def time_projection(
    in_features: int, out_features: int, row_counts: list[int], repeats: int, dtype: torch.dtype
) -> dict[int, float]:
    """Median seconds of one ``F.linear`` per row count, weights streamed from memory."""
    weight_bytes = in_features * out_features * torch.finfo(dtype).bits // 8
    pool = [torch.randn(out_features, in_features).to(dtype) for _ in range(max(2, POOL_BYTES // weight_bytes))]
    seconds = {}
    with torch.inference_mode():
        for rows in row_counts:
            x = torch.randn(rows, in_features).to(dtype)
            for weight in pool:  # warm-up: one pass over the pool
                F.linear(x, weight)
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                for weight in pool:
                    F.linear(x, weight)
                samples.append((time.perf_counter() - start) / len(pool))
            seconds[rows] = statistics.median(samples)
    return seconds


def kind_report(dims, layer: int, t: int, v: int, rows: list[int], repeats: int, dtype: torch.dtype) -> dict:
    """One layer's projections (layer ``layer``, standing for every layer of its kind), timed at every row count."""
    projections = layer_projections(dims, layer)
    seconds = {
        (name, n): value
        for name, (fan_in, fan_out) in projections.items()
        for n, value in time_projection(fan_in, fan_out, rows, repeats, dtype).items()
    }

    def flops(name: str, n: int) -> float:
        fan_in, fan_out = projections[name]
        return 2.0 * n * fan_in * fan_out

    def layer_total(cost, frozen: bool) -> float:  # noqa: ANN001
        """The layer's projections, each at the rows `shortv.flops` gives it: the same accounting as the FLOPs model."""
        return sum(cost(name, projection_rows(name, t, v, frozen)) for name in projections)

    def measured(name: str, n: int) -> float:
        return seconds[name, n]

    return {
        "projections": projections, "seconds": seconds, "flops": flops,
        "time": {frozen: layer_total(measured, frozen) for frozen in (False, True)},
        "gflops": {frozen: layer_total(flops, frozen) / 1e9 for frozen in (False, True)},
    }


def whole_model(kinds: list[str], frozen: set[int], reports: dict, key: str) -> float:
    """Dense over ShortV time (``key="time"``) or FLOPs (``"gflops"``) of layers of ``kinds``, by projections alone."""
    dense = sum(reports[kind][key][False] for kind in kinds)
    return dense / sum(reports[kind][key][index in frozen] for index, kind in enumerate(kinds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llava-1.5-7b")
    parser.add_argument("--visual-tokens", type=int, default=None, help="default: the shape's own count")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 16, 64, 128, 256, 640],
                        help="extra row counts for the curve (the text and all-token counts are always timed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                        help="bf16 where the CPU has native bf16 GEMMs (AMX); fp32 on CPUs that emulate bf16")
    parser.add_argument("--prefix", type=int, default=None, help="also cost this many first layers ...")
    parser.add_argument("--frozen", type=int, nargs="*", default=None, help="... with these layers frozen")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shape = get_shape(args.shape)
    dims = shape.dims
    t = args.text_tokens
    v = shape.visual_tokens if args.visual_tokens is None else args.visual_tokens
    rows = sorted(set(args.rows) | {t, t + v})
    kinds = list(dims.layer_kinds)
    dtype = DTYPES[args.dtype]
    reports = {kind: kind_report(dims, kinds.index(kind), t, v, rows, args.repeats, dtype)
               for kind in dict.fromkeys(kinds)}

    element_bytes = torch.finfo(dtype).bits // 8
    command = (f"`python benchmarks/bench_projection_rows.py --shape {args.shape} --threads {args.threads} "
               f"--dtype {args.dtype}" + (f" --rows {' '.join(map(str, args.rows))}" if args.rows else "")
               + (f" --prefix {args.prefix} --frozen {' '.join(map(str, args.frozen))}" if args.prefix else "") + "`")
    lines = [
        f"# Projection GEMMs by row count: {args.shape}, {args.dtype}, CPU",
        "",
        machine_line(),
        f"Command: {command}. Weights cycled through a {POOL_BYTES >> 20} MiB pool per projection; median of "
        f"{args.repeats} passes.",
    ]
    for kind, report in reports.items():
        projections, seconds, flops = report["projections"], report["seconds"], report["flops"]
        label = f" ({kind} layers)" if len(reports) > 1 else ""
        weight_bytes = sum(fan_in * fan_out * element_bytes for fan_in, fan_out in projections.values())
        lines += ["", f"Throughput of one decoder layer's projections{label} ({len(projections)} together: "
                  f"{', '.join(projections)}) by rows per GEMM:", "",
                  "| rows | ms | TFLOP/s | weight GB/s |", "|---|---|---|---|"]
        for n in rows:
            total = sum(seconds[name, n] for name in projections)
            marks = " (text tokens)" if n == t else " (all tokens)" if n == t + v else ""
            lines.append(f"| {n}{marks} | {total * 1e3:.2f} | "
                         f"{sum(flops(name, n) for name in projections) / total / 1e12:.2f} | "
                         f"{weight_bytes / total / 1e9:.1f} |")
        everyone = sorted(name for name in projections if projection_rows(name, t, v, True) == t + v)
        dense, frozen = report["time"][False], report["time"][True]
        ideal = report["gflops"][False] / report["gflops"][True]
        lines += ["", f"One layer's projections{label} with {t} text + {v} visual tokens (a ShortV layer: "
                  f"{', '.join(everyone)} on all {t + v} rows, the rest on the {t} text rows):", "",
                  "| layer | projection ms | projection GFLOPs |", "|---|---|---|",
                  f"| dense | {dense * 1e3:.1f} | {report['gflops'][False]:.1f} |",
                  f"| ShortV | {frozen * 1e3:.1f} | {report['gflops'][True]:.1f} |", "",
                  f"Projection speedup of a ShortV layer{label}: FLOPs-ideal {ideal:.2f}x, time-ideal on this machine "
                  f"{dense / frozen:.2f}x ({dense / frozen / ideal:.0%} of the FLOPs-ideal), from the GEMMs alone: no "
                  "attention, convolution, delta rule, norms or ShortV bookkeeping."]

    frozen_layers = set(shape_shortv_config(args.shape)[0].layers)
    cases = [(f"Whole model, N={len(frozen_layers)} of {len(kinds)} layers frozen (the paper's share, the layers the "
              "bench freezes without a calibrated config)", kinds, frozen_layers)]
    if args.prefix:
        cases.append((f"First {args.prefix} layers, layers {sorted(args.frozen)} frozen (the benchmarked prefix)",
                      kinds[: args.prefix], set(args.frozen)))
    for title, layer_kinds, frozen in cases:
        mix = ", ".join(f"{sum(layer_kinds[i] == kind for i in frozen)} of {layer_kinds.count(kind)} {kind}"
                        for kind in reports) if len(reports) > 1 else ""
        lines += ["", f"{title}{': ' + mix if mix else ''}; every layer costed by its projections alone: FLOPs-ideal "
                  f"{whole_model(layer_kinds, frozen, reports, 'gflops'):.2f}x, time-ideal on this machine "
                  f"{whole_model(layer_kinds, frozen, reports, 'time'):.2f}x."]
    lines += ["", "A measured prefill speedup is best compared with the time-ideal: it is what the FLOPs-ideal becomes "
              "once the text-only GEMMs run at the rate this machine reaches for that few rows."]
    emit_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
