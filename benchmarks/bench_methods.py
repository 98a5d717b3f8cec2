"""Prefill and TTFT of every method (`shortv.methods`) at a paper shape, each beside its FLOPs-ideal, recorded into
``benchmarks/results/`` (``methods_<shape>_...json`` and ``.md``).

One random-weight shape model (`shortv.benchmark.shapes`, a prefix of ``--layers`` decoder layers) is built once;
each method is measured against the baseline on it with `shortv.benchmark.benchmark` (interleaved repetitions, the
explicit visual mask of shape mode), as ``shortv bench --shape S --method M`` does. The methods, with their
parameters scaled to the prefix (a prefix keeps the cost per layer, so what matters is the share of layers each
method touches):

* ShortV: ``round(P * N / L)`` layers of the ``P``-layer prefix (the shape's `shape_shortv_config`, proportional);
  N = 19 of 32 (LLaVA-1.5-7B) or 16 of 28 (Qwen2-VL-7B) unless ``--n``;
* FastV: K = ``max(1, round(P * 2 / L))``, R = 0.5 (the paper's K = 2 of 32 layers);
* VTW: the K whose prefill FLOPs are nearest ShortV's (`shortv.flops_pruning.vtw_ratio`);
* ShortV + FastV: ShortV's layers and FastV's K, R.

Usage::

    python benchmarks/bench_methods.py --shape llava-1.5-7b --layers 5 --threads 1 --dtype fp32 --tag 1thread
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from shortv.benchmark import benchmark, causal_lm_inputs, machine_info, pruning_beside, shape_shortv_config
from shortv.benchmark import shapes
from shortv.benchmark.devices import resolve_dtype
from shortv.benchmark.report import fmt_counts
from shortv.flops import LayerDims, get_shape
from shortv.methods import get_method

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_N = {"llava-1.5-7b": 19, "qwen2-vl-7b": 16}


def method_configs(shape: str, prefix: int, n: int, dims: LayerDims, t: int, v: int) -> dict[str, object]:
    """Each method's config for a ``prefix``-layer run of ``shape`` (see the module docstring)."""
    total = get_shape(shape).dims.num_layers
    shortv, _ = shape_shortv_config(shape, prefix, n, proportional=prefix < total)
    return {"shortv": shortv, **pruning_beside(shortv, prefix, total, dims, t, v)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llava-1.5-7b")
    parser.add_argument("--layers", type=int, required=True, help="prefix length P")
    parser.add_argument("--n", type=int, default=None, help="ShortV layers of the full model")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of shortv fastv vtw shortv+fastv")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    spec = get_shape(args.shape)
    n = args.n if args.n is not None else PAPER_N.get(args.shape, round(19 / 32 * spec.dims.num_layers))
    print(f"building {args.shape}: {args.layers} of {spec.dims.num_layers} layers, {args.dtype}", flush=True)
    model = shapes.build_shape_model(args.shape, num_layers=args.layers, dtype=resolve_dtype(args.dtype), seed=0)
    inputs = causal_lm_inputs(1, args.text_tokens, spec.visual_tokens, model.config.vocab_size, 0)
    dims = LayerDims.from_config(model.config)
    [(t, v)] = inputs.token_counts()
    configs = method_configs(args.shape, args.layers, n, dims, t, v)
    results = {}
    for name, config in configs.items():
        if args.methods and name not in args.methods:
            continue
        print(f"{name}: {get_method(name).describe(config)}", flush=True)
        started = time.perf_counter()
        result = benchmark(
            model, inputs, config, new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup,
            name=f"{args.shape} (shape, first {args.layers} layers)", source="shape",
            full_num_layers=spec.dims.num_layers, layer_selection=get_method(name).describe(config),
            threads=args.threads, progress=lambda message: print(f"  {message}", flush=True),
        )
        results[name] = {"flops_ratio": get_method(name).flops_ratio(dims, t, v, config),
                         "wall_s": round(time.perf_counter() - started, 1), "result": result.to_dict()}

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = (f"methods_{args.shape}_cpu_{args.dtype}_{args.layers}of{spec.dims.num_layers}layers"
            + (f"_{args.tag}" if args.tag else ""))
    record = {"benchmark": "benchmarks/bench_methods.py", "argv": sys.argv[1:] if argv is None else argv,
              "machine": machine_info(), "methods": results}
    (args.out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        f"## {args.shape}: first {args.layers} of {spec.dims.num_layers} layers, {args.dtype}, "
        f"{args.threads} thread(s), t={fmt_counts([t])} v={fmt_counts([v])}, batch 1",
        "",
        f"`python benchmarks/bench_methods.py {' '.join(record['argv'])}`; {args.repeats} repetitions after "
        f"{args.warmup} warm-up, baseline and method interleaved; median [min-max]; load average before each: "
        + ", ".join(f"{name} {entry['result']['machine'].get('load_average_before')}" for name, entry in results.items()),
        "",
        "| method | parameters (prefix) | prefill FLOPs | TTFT baseline (s) | TTFT method (s) | prefill speedup "
        "(pairs) | FLOPs-ideal | realized |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        r = entry["result"]
        base, short = r["baseline"]["ttft_s"], r["shortv"]["ttft_s"]
        paired = r["prefill_speedup_paired"]
        lines.append(
            f"| {name} | {r['layer_selection']} | {100 * entry['flops_ratio']:.1f}% | "
            f"{base['median']:.2f} [{base['min']:.2f}-{base['max']:.2f}] | "
            f"{short['median']:.2f} [{short['min']:.2f}-{short['max']:.2f}] | "
            f"{paired['median']:.2f}x [{paired['min']:.2f}-{paired['max']:.2f}] | {r['ideal_speedup']:.2f}x | "
            f"{paired['median'] / r['ideal_speedup']:.0%} |")
    machine = record["machine"]
    lines += ["", f"Machine: {machine.get('cpu')}, {machine.get('cpu_usable')} usable cores, torch "
                  f"{machine.get('torch')}, transformers {machine.get('transformers')}; {machine.get('date')}.", ""]
    (args.out_dir / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out_dir / stem}.json, .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
