"""Shape-mode benchmark of ShortV at the scale of a paper model, recorded into ``benchmarks/results/``.

Default: the LLaVA-1.5-7B language model (random weights, real dims), N=19 ShortV layers as in the paper,
576 visual (LLaVA-NeXT shapes: 2880) + 64 text tokens, batch 1, bf16, CPU, 16 new tokens, 5 interleaved repetitions after 1 warm-up.

Usage::

    python benchmarks/bench_shapes.py                      # full 32-layer stack
    python benchmarks/bench_shapes.py --layers 17          # a prefix (see below)
    python benchmarks/bench_shapes.py --layers auto        # time a 4-layer run, pick the largest prefix in budget
    python benchmarks/bench_shapes.py --threads 1 --tag 1thread
    python benchmarks/bench_shapes.py --shape qwen3.6-27b --layers 4 --frozen 3   # exactly these layers frozen

Prefixes. A full 7B model in bf16 is 13.5 GB; on a small CPU machine one full repetition (baseline + ShortV, 16
tokens each) takes minutes, so a run may use only the first K layers. Every decoder layer has the same shape and
the weights are random, so a layer's cost does not depend on its index: what decides the prefill speedup is the
*share* of ShortV layers. The paper's published order cannot simply be cut at K (its layers sit mostly at the end:
only 0, 2, 3 and 12 of the 19 are below 16), so a prefix freezes ``round(K * 19 / 32)`` of its layers, and K is
chosen so that this share matches the full model's 19/32 = 59.4% closely (K = 5, 10, 17, 22, 27 or 32 are within
one percentage point). The results state which prefix and which layers were used. In a hybrid shape (layers of
different kinds, e.g. Qwen3.6's linear and full attention) the frozen layers of a prefix are shared out among the
kinds in proportion to their counts.

Memory. Timed runs use the default allocator, whose retained heap moves the RSS peak by a few percent from run to
run. On CPU a second process (``--memory-pass``, on by default) repeats the run with
``MALLOC_MMAP_THRESHOLD_=65536``, where freed tensors go back to the OS and the RSS peak follows live tensors; its
numbers are reported next to the timed runs' ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shortv.benchmark import MMAP_THRESHOLD_ENV, BenchResult, bench_shape, machine_info, paper_n, to_markdown
from shortv.config import ShortVConfig
from shortv.flops import get_shape

RESULTS = Path(__file__).resolve().parent / "results"


def _share_error(prefix: int, n: int, total: int) -> float:
    return abs(round(prefix * n / total) / prefix - n / total)


def proportional_prefixes(n: int, total: int, tolerance: float = 0.01) -> list[int]:
    """Prefix lengths whose rounded share of ShortV layers is within ``tolerance`` of the full model's."""
    return [k for k in range(1, total + 1) if round(k * n / total) > 0 and _share_error(k, n, total) <= tolerance]


def estimate_prefix(args: argparse.Namespace, total: int, n: int) -> tuple[int, dict]:
    """Time a 4-layer run (1 repetition, no warm-up) and pick the largest proportional prefix within the budget."""
    print(f"estimating: 4-layer {args.shape} run ...", flush=True)
    started = time.perf_counter()
    probe = bench_shape(
        args.shape, num_layers=4, n=n, proportional=True, visual_tokens=args.visual_tokens,
        text_tokens=args.text_tokens, batch_size=args.batch_size, new_tokens=args.new_tokens, repeats=1, warmup=0,
        dtype=args.dtype, device=args.device, threads=args.threads,
    )
    probe_wall = time.perf_counter() - started
    per_round = probe.baseline.e2e_s.median + probe.shortv.e2e_s.median  # one round = both variants
    per_layer_round = per_round / 4  # an overestimate: includes embeddings and the LM head
    rounds = args.repeats + args.warmup
    build_per_layer = max(probe_wall - per_round, 0.0) / 4
    projected = {k: k * (per_layer_round * rounds + build_per_layer) for k in range(1, total + 1)}
    candidates = [k for k in proportional_prefixes(n, total) if projected[k] <= args.budget_s]
    prefix = max(candidates) if candidates else min(proportional_prefixes(n, total))
    info = {
        "probe_layers": 4,
        "probe_round_s": per_round,
        "seconds_per_layer_per_round": per_layer_round,
        "projected_full_run_s": projected[total],
        "projected_chosen_run_s": projected[prefix],
        "budget_s": args.budget_s,
        "proportional_prefixes": proportional_prefixes(n, total),
    }
    print(
        f"  {per_round:.1f}s per round at 4 layers -> full {total}-layer run ~{projected[total] / 60:.1f} min; "
        f"chosen prefix {prefix} (~{projected[prefix] / 60:.1f} min, budget {args.budget_s / 60:.1f} min)",
        flush=True,
    )
    return prefix, info


def memory_pass(args: argparse.Namespace, prefix: int, n: int) -> BenchResult:
    """The same benchmark in a child process whose allocator returns freed blocks (2 repetitions, 1 warm-up)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "memory.json"
        command = [
            sys.executable, str(Path(__file__).resolve()), "--shape", args.shape, "--layers", str(prefix), "--n", str(n),
            *(["--visual-tokens", str(args.visual_tokens)] if args.visual_tokens is not None else []),
            "--text-tokens", str(args.text_tokens),
            "--batch-size", str(args.batch_size), "--new-tokens", str(args.new_tokens), "--repeats", "2",
            "--warmup", "1", "--dtype", args.dtype, "--device", args.device, "--memory-only", str(out),
            *(["--frozen", *map(str, args.frozen)] if args.frozen else []),
        ]
        if args.threads is not None:
            command += ["--threads", str(args.threads)]
        print(f"memory pass: {MMAP_THRESHOLD_ENV}=65536, 2 repetitions ...", flush=True)
        subprocess.run(command, check=True, env={**os.environ, MMAP_THRESHOLD_ENV: "65536"}, stdout=subprocess.DEVNULL)
        data = json.loads(out.read_text())
    return BenchResult.from_dict(data)


def memory_markdown(memory: BenchResult) -> str:
    mib = 2**20

    def cell(stats) -> str:  # noqa: ANN001
        return "n/a" if stats is None else f"{stats.median / mib:.1f} [{stats.min / mib:.1f}-{stats.max / mib:.1f}]"

    rows = [
        ("peak memory rise (MiB)", memory.baseline.peak_memory_bytes, memory.shortv.peak_memory_bytes),
        ("peak memory total (MiB)", memory.baseline.peak_memory_total_bytes, memory.shortv.peak_memory_total_bytes),
    ]
    lines = [
        "### Peak memory, allocator-exact pass",
        "",
        f"A second process with `{MMAP_THRESHOLD_ENV}=65536` ({memory.repeats} repetitions after {memory.warmup} "
        "warm-up, same model, inputs and layers): freed blocks go back to the OS, so the RSS peak follows live "
        f"tensors. Method: {memory.memory_method}.",
        "",
        "| metric | baseline | ShortV | ShortV - baseline |",
        "|---|---|---|---|",
    ]
    for name, base, short in rows:
        diff = "n/a" if base is None or short is None else f"{(short.median - base.median) / mib:+.1f} MiB"
        lines.append(f"| {name} | {cell(base)} | {cell(short)} | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llava-1.5-7b")
    parser.add_argument("--n", type=int, default=None, help="ShortV layers in the full model (default: paper N)")
    parser.add_argument("--layers", default=None, help="prefix length K, 'auto', or omit for the full stack")
    parser.add_argument("--budget-s", type=float, default=600.0, help="time budget for --layers auto")
    parser.add_argument("--visual-tokens", type=int, default=None,
                        help="visual tokens per sample (default: the shape's own, 576 or 2880 for LLaVA-NeXT)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--frozen", type=int, nargs="+", default=None,
                        help="freeze exactly these layers (of the prefix) instead of the proportional/paper choice")
    parser.add_argument("--tag", default="", help="suffix for the result file names")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--memory-pass", action=argparse.BooleanOptionalAction, default=True,
        help=f"CPU: measure peak memory again in a child process with {MMAP_THRESHOLD_ENV}=65536",
    )
    parser.add_argument("--memory-only", type=Path, default=None, help=argparse.SUPPRESS)  # child: result JSON path
    args = parser.parse_args(argv)

    shape = get_shape(args.shape)
    total = shape.dims.num_layers
    n = args.n if args.n is not None else paper_n(args.shape)
    estimate = None
    if args.layers == "auto":
        prefix, estimate = estimate_prefix(args, total, n)
    else:
        prefix = total if args.layers is None else int(args.layers)
    proportional = prefix < total
    if proportional and _share_error(prefix, n, total) > 0.01:
        print(
            f"warning: a {prefix}-layer prefix freezes {round(prefix * n / total)} layers "
            f"({round(prefix * n / total) / prefix:.1%}), not the full model's {n / total:.1%}; "
            f"proportional prefixes: {proportional_prefixes(n, total)}",
            file=sys.stderr,
        )

    print(f"benchmarking {args.shape}: {prefix} of {total} layers, N={n} ({'proportional' if proportional else 'paper order'})")
    started = time.perf_counter()
    config = None if args.frozen is None else ShortVConfig(layers=args.frozen, provenance={"policy": "--frozen"})
    result = bench_shape(
        args.shape, num_layers=prefix, n=n, config=config, proportional=proportional, visual_tokens=args.visual_tokens,
        text_tokens=args.text_tokens, batch_size=args.batch_size, new_tokens=args.new_tokens, repeats=args.repeats,
        warmup=args.warmup, dtype=args.dtype, device=args.device, threads=args.threads,
        progress=lambda message: print(f"  {message}", flush=True),
    )
    wall = time.perf_counter() - started
    if args.memory_only is not None:
        result.save(args.memory_only)
        return 0
    memory = memory_pass(args, prefix, n) if args.memory_pass and args.device == "cpu" else None

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{args.shape}_{args.device}_{result.dtype}_{prefix}of{total}layers" + (f"_{args.tag}" if args.tag else "")
    record = {
        "benchmark": "benchmarks/bench_shapes.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "wall_s": wall,
        "prefix_estimate": estimate,
        "result": result.to_dict(),
        "memory_pass": memory.to_dict() if memory else None,
    }
    json_path = args.out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(record, indent=2) + "\n")

    prefix_text = (
        f"the full {total}-layer stack"
        if prefix == total
        else f"the first {prefix} of {total} layers, {len(result.shortv_layers)} of them ShortV layers "
        f"({len(result.shortv_layers) / prefix:.1%}, vs {n}/{total} = {n / total:.1%} in the full model); "
        + ("layer cost does not depend on its index in shape mode, so the share is what sets the speedup"
           if len(set(shape.dims.layer_kinds)) == 1 else
           "layers of one kind cost the same whatever their index in shape mode, so the share of each kind frozen "
           f"is what sets the speedup (kinds of the prefix: {', '.join(shape.dims.layer_kinds[:prefix])})")
    )
    header = [
        f"# ShortV shape benchmark: {args.shape}",
        "",
        f"Command: `python benchmarks/bench_shapes.py {' '.join(record['argv'])}` ({wall / 60:.1f} min).",
        f"Prefix: {prefix_text}.",
    ]
    if estimate:
        header.append(
            f"Prefix chosen from a 4-layer probe: {estimate['probe_round_s']:.1f} s per round, projected "
            f"{estimate['projected_full_run_s'] / 60:.1f} min for the full stack (budget {args.budget_s / 60:.0f} min)."
        )
    machine = machine_info(args.device)
    header.append(f"Load average after the run: {machine.get('load_average')} (before: "
                  f"{result.machine.get('load_average_before')}); the machine may be shared.")
    markdown = "\n".join(header) + "\n\n" + to_markdown(result, title="Results")
    if memory is not None:
        markdown += "\n" + memory_markdown(memory)
    md_path = args.out_dir / f"{stem}.md"
    md_path.write_text(markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
