"""Prefill speed of an operator-level ShortV selection at ~50% of the FLOPs, beside its FLOPs-ideal (issue #25).

At a paper shape's real dims (random weights, `shortv.benchmark.bench_shape`), on the first ``--layers`` decoder
layers: ``W`` layers frozen whole (ShortV), ``M`` whose visual tokens skip only the MLP and ``A`` only the attention,
the counts picked so that the prefix's prefill FLOPs come closest to ``--target`` with at least one layer of each kind
(the selection a real model would get from `select_operators`; which layers does not matter at equal dims). Beside
it, for comparison, the whole-layer ShortV selection nearest to the same FLOPs. Fast mode, interleaved runs.

Usage::

    python benchmarks/bench_operator_speed.py --shapes llava-1.5-7b qwen2-vl-7b --layers 8 --threads 2 \\
        --out benchmarks/results/operators/speed_cpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
from itertools import product
from pathlib import Path

from markdown_report import emit_report, machine_line
from shortv import ShortVConfig
from shortv.benchmark import bench_shape, ideal_prefill_speedup
from shortv.flops import LayerDims, flops_ratio, get_shape


def prefix_dims(shape: str, layers: int) -> LayerDims:
    """The shape's dims for its first ``layers`` layers (the FLOPs of the prefix that runs, not of the whole model)."""
    return dataclasses.replace(get_shape(shape).dims, num_layers=layers)


def split(whole: int, mlp: int, attention: int) -> ShortVConfig:
    order = list(range(whole + mlp + attention))
    return ShortVConfig(order[:whole], mlp_layers=order[whole : whole + mlp], attention_layers=order[whole + mlp :],
                        provenance={"benchmark": "operator-level, FLOPs nearest the target"})


def operator_config(shape: str, layers: int, target: float, t: int, v: int) -> ShortVConfig:
    """W whole, M MLP-only, A attention-only layers of the prefix (M, A >= 1), FLOPs ratio closest to ``target``."""
    dims = prefix_dims(shape, layers)

    def ratio(config: ShortVConfig) -> float:
        return flops_ratio(dims, t, v, config.layers, "exact", mlp_layers=config.mlp_layers,
                           attention_layers=config.attention_layers)

    configs = [split(*c) for c in product(range(layers + 1), repeat=3) if sum(c) <= layers and c[1] and c[2]]
    return min(configs, key=lambda config: abs(ratio(config) - target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["llava-1.5-7b", "qwen2-vl-7b"])
    parser.add_argument("--layers", type=int, default=8, help="decoder-layer prefix of each shape")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    lines = [
        "# Operator-level ShortV: prefill speed at ~50% FLOPs, beside its FLOPs-ideal",
        "",
        f"Command: `python benchmarks/bench_operator_speed.py --shapes {' '.join(args.shapes)} --layers {args.layers} "
        f"--threads {args.threads} --dtype {args.dtype} --device {args.device}`. {machine_line()}",
        "",
        f"First {args.layers} decoder layers of each shape, {args.text_tokens} text + the shape's visual tokens, "
        f"batch 1, {args.dtype}, {args.repeats} interleaved repeats; prefill speedup = per-pair median (min-max); "
        "FLOPs-ideal with the exact count (decoder prefix + LM head for one position).",
        "",
        "| shape | selection | FLOPs | prefill speedup | FLOPs-ideal | realized |",
        "|---|---|---|---|---|---|",
    ]
    loads = []
    for shape in args.shapes:
        v = get_shape(shape).visual_tokens
        operators = operator_config(shape, args.layers, args.target, args.text_tokens, v)
        results = {}
        for label, config in (("operator-level", operators), ("layer-level", None)):
            if config is None:  # whole layers at the operator-level selection's FLOPs (nearest count)
                ideal = results["operator-level"].ideal_speedup
                config = min((ShortVConfig(list(range(n))) for n in range(args.layers + 1)),
                             key=lambda c: abs(_ideal(shape, args, c, v) - ideal))
            result = bench_shape(shape, num_layers=args.layers, config=config, text_tokens=args.text_tokens,
                                 new_tokens=1, repeats=args.repeats, warmup=1, dtype=args.dtype, device=args.device,
                                 threads=args.threads)
            results[label] = result
            loads.append(f"{shape} {label}: {result.machine.get('load_average_before')} -> "
                         f"{result.machine.get('load_average')}")
            paired = result.prefill_speedup_paired
            kinds = (f"whole {config.layers}, MLP-only {config.mlp_layers}, attention-only {config.attention_layers}"
                     if config.operator_level else f"whole {config.layers}")
            lines.append(f"| {shape} | {label}: {kinds} | {100 / result.ideal_speedup:.1f}% | {paired.median:.2f}x "
                         f"({paired.min:.2f}-{paired.max:.2f}) | {result.ideal_speedup:.2f}x | "
                         f"{100 * paired.median / result.ideal_speedup:.0f}% |")
    lines += ["", "Load average (1, 5, 15 min) before -> after each timed run, this benchmark's own threads included: "
              + "; ".join(loads) + "."]
    emit_report(lines, args.out)


def _ideal(shape: str, args: argparse.Namespace, config: ShortVConfig, v: int) -> float:
    return ideal_prefill_speedup(prefix_dims(shape, args.layers), [(args.text_tokens, v)], config.layers, "exact")


if __name__ == "__main__":
    main()
