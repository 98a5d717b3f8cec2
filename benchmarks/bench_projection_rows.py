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
from shortv.benchmark import paper_n
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
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shape = get_shape(args.shape)
    t = args.text_tokens
    v = shape.visual_tokens if args.visual_tokens is None else args.visual_tokens
    rows = sorted(set(args.rows) | {t, t + v})
    projections = layer_projections(shape.dims)
    seconds = {
        (name, n): value
        for name, (fan_in, fan_out) in projections.items()
        for n, value in time_projection(fan_in, fan_out, rows, args.repeats, DTYPES[args.dtype]).items()
    }

    def flops(name: str, n: int) -> float:
        fan_in, fan_out = projections[name]
        return 2.0 * n * fan_in * fan_out

    def measured(name: str, n: int) -> float:
        return seconds[name, n]

    def layer_total(cost, frozen: bool) -> float:  # noqa: ANN001
        """One layer's projections, each at the rows `shortv.flops` gives it: the same accounting as the FLOPs model."""
        return sum(cost(name, projection_rows(name, t, v, frozen)) for name in projections)

    dense_time, frozen_time = layer_total(measured, frozen=False), layer_total(measured, frozen=True)
    dense_flops, frozen_flops = layer_total(flops, frozen=False), layer_total(flops, frozen=True)

    layers, frozen_layers = shape.dims.num_layers, paper_n(args.shape)

    def whole(layer_speedup: float) -> float:
        return layers / ((layers - frozen_layers) + frozen_layers / layer_speedup)

    lines = [
        f"# Projection GEMMs by row count: {args.shape}, {args.dtype}, CPU",
        "",
        machine_line(),
        f"Command: `python benchmarks/bench_projection_rows.py --shape {args.shape} --threads {args.threads} "
        f"--dtype {args.dtype}`. "
        f"Weights cycled through a {POOL_BYTES >> 20} MiB pool per projection; median of {args.repeats} passes.",
        "",
        "Throughput of one decoder layer's projections (all seven together) by rows per GEMM:",
        "",
        "| rows | ms | TFLOP/s | weight GB/s |",
        "|---|---|---|---|",
    ]
    element_bytes = torch.finfo(DTYPES[args.dtype]).bits // 8
    weight_bytes = sum(fan_in * fan_out * element_bytes for fan_in, fan_out in projections.values())
    for n in rows:
        total = sum(seconds[name, n] for name in projections)
        marks = " (text tokens)" if n == t else " (all tokens)" if n == t + v else ""
        lines.append(
            f"| {n}{marks} | {total * 1e3:.2f} | {sum(flops(name, n) for name in projections) / total / 1e12:.2f} | "
            f"{weight_bytes / total / 1e9:.1f} |"
        )
    lines += [
        "",
        f"One layer's projections with {t} text + {v} visual tokens (a ShortV layer: q/o/MLP on the {t} text rows, "
        f"k/v on all {t + v}):",
        "",
        "| layer | projection ms | projection GFLOPs |",
        "|---|---|---|",
        f"| dense | {dense_time * 1e3:.1f} | {dense_flops / 1e9:.1f} |",
        f"| ShortV | {frozen_time * 1e3:.1f} | {frozen_flops / 1e9:.1f} |",
        "",
        f"Projection speedup of a ShortV layer: FLOPs-ideal {dense_flops / frozen_flops:.2f}x, time-ideal on this "
        f"machine {dense_time / frozen_time:.2f}x ({dense_time / frozen_time / (dense_flops / frozen_flops):.0%} of "
        f"the FLOPs-ideal), from the GEMMs alone: no attention, norms or ShortV bookkeeping.",
        "",
        f"Whole model, N={frozen_layers} of {layers} layers frozen, every layer costed by its projections alone: FLOPs-ideal "
        f"{whole(dense_flops / frozen_flops):.2f}x, time-ideal on this machine {whole(dense_time / frozen_time):.2f}x. "
        "A measured prefill speedup is best compared with the latter: it is what the FLOPs-ideal becomes once the "
        "text-only GEMMs run at the rate this machine reaches for that few rows.",
    ]
    emit_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
