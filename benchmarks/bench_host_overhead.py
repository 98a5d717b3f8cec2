"""Host-side cost of a ShortV layer: operators dispatched and host time per dense and per frozen layer.

On a GPU a small prefill can be bound by the host launching kernels rather than by the GPU (the H200 run in
`benchmarks/results/gpu/`: an eager LLaVA-1.5-7B prefill of 640 tokens took 20-38 ms for ~13 ms of GPU work, and
eager ShortV was slower there at batch 1). This script measures what decides that case without a GPU: a miniature
of a paper shape (its family and attention layout, full depth, hidden size 64, few tokens), whose arithmetic costs
next to nothing, so its forward time is host time. It reports

* aten operators per forward, baseline and ShortV (`TorchDispatchMode`), and so per dense and per frozen layer,
  with the views apart (host time only; nearly every other operator is a kernel launch on a GPU);
* the forward's host time (`shortv.benchmark.time_prefill`, interleaved, median), and the extra host time per
  frozen layer.

    python benchmarks/bench_host_overhead.py --shape llava-1.5-7b --threads 1 \\
        --out benchmarks/results/host_overhead_llava-1.5-7b_1thread.md
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shortv import apply_shortv, remove_shortv
from shortv.benchmark import BenchInputs, causal_lm_inputs, machine_info, shape_shortv_config, time_prefill
from shortv.benchmark.timing import variant_context
from shortv.benchmark.shapes import build_shape_model, miniature
from shortv.flops import get_shape


class CountOps(TorchDispatchMode):
    """Counts the aten operators dispatched while active; views (no kernel, but host time) are marked ``view:``."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[("view:" if func.is_view else "") + str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def kernels(counts: Counter[str]) -> int:
    """Operators that are not views (nearly all of them launch a kernel on a GPU)."""
    return sum(count for op, count in counts.items() if not op.startswith("view:"))


def count_ops(model: torch.nn.Module, inputs: BenchInputs, variant: str) -> Counter[str]:
    with variant_context(model, inputs, variant), torch.inference_mode(), CountOps() as counter:
        model(**inputs.kwargs, use_cache=True, logits_to_keep=1)
    return counter.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llava-1.5-7b")
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--visual-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the report (markdown) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    full = get_shape(args.shape)
    shape = miniature(full, num_layers=full.dims.num_layers, visual_tokens=args.visual_tokens)
    config, note = shape_shortv_config(args.shape)
    model = build_shape_model(shape, dtype=torch.float32)
    inputs = causal_lm_inputs(1, args.text_tokens, shape.visual_tokens, shape.dims.vocab_size)
    apply_shortv(model, config)
    baseline_ops, shortv_ops = count_ops(model, inputs, "baseline"), count_ops(model, inputs, "shortv")
    timing = time_prefill(model, inputs, config, repeats=args.repeats, warmup=3)
    remove_shortv(model)

    layers, frozen = shape.dims.num_layers, len(config.layers)
    base_total, shortv_total = sum(baseline_ops.values()), sum(shortv_ops.values())
    base_kernels, shortv_kernels = kernels(baseline_ops), kernels(shortv_ops)
    base_ms, shortv_ms = timing.baseline_s.median * 1e3, timing.shortv_s.median * 1e3
    extra = Counter({op: shortv_ops[op] - baseline_ops[op] for op in shortv_ops | baseline_ops})
    top = ", ".join(f"{op} {count / frozen:+.1f}" for op, count in extra.most_common(8) if count > 0)
    machine = machine_info(torch.device("cpu"))
    lines = [
        f"# Host cost of a ShortV layer: {args.shape} miniature",
        "",
        f"Command: `python benchmarks/bench_host_overhead.py --shape {args.shape} --threads {args.threads}`. "
        f"A {layers}-layer model of the shape's family and attention layout with hidden size 64, "
        f"{shape.visual_tokens} visual + {args.text_tokens} text tokens, fp32, {frozen} frozen layers ({note}). "
        f"Machine: {machine.get('cpu', '?')}, {args.threads} torch thread(s), load average "
        f"{machine.get('load_average', '?')}; torch {torch.__version__}.",
        "",
        "| | baseline | ShortV | per dense layer | per frozen layer |",
        "|---|---|---|---|---|",
        f"| aten operators per forward | {base_total} | {shortv_total} | {base_total / layers:.1f} | "
        f"{base_total / layers + (shortv_total - base_total) / frozen:.1f} |",
        f"| of them not views | {base_kernels} | {shortv_kernels} | {base_kernels / layers:.1f} | "
        f"{base_kernels / layers + (shortv_kernels - base_kernels) / frozen:.1f} |",
        f"| host time per forward (ms, median of {args.repeats}) | {base_ms:.2f} | {shortv_ms:.2f} | "
        f"{base_ms / layers:.3f} | {base_ms / layers + (shortv_ms - base_ms) / frozen:.3f} |",
        "",
        f"Operators a frozen layer adds, per layer: {top}.",
        "",
        "Per-layer figures spread the embedding, final norm and LM head over the layers; a frozen layer's is the "
        "dense layer's plus (ShortV - baseline) / frozen layers.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
