"""Host-side cost of a ShortV layer: operators dispatched per dense and per frozen layer, and host time per forward.

On a GPU a small prefill can be bound by the host launching kernels rather than by the GPU (the H200 run in
`benchmarks/results/gpu/`: an eager LLaVA-1.5-7B prefill of 640 tokens took 20-38 ms for ~13 ms of GPU work, and
eager ShortV was slower there at batch 1). This script measures what decides that case without a GPU: a miniature
of a paper shape (its family and attention layout, full depth, hidden size 64, few tokens), whose arithmetic costs
next to nothing, so its forward time is host time. It reports

* aten operators dispatched inside each decoder layer (`shortv.benchmark.dispatch`, the counter the operator-count
  tests use), dense (ShortV off) and frozen, per layer kind, with the views apart (host time only; nearly every
  other operator is a kernel launch on a GPU); what a forward dispatches once outside the layers (entry: the
  layout; first frozen layer: the text queries' mask and RoPE tables); the whole forward; one decode step;
* host time per prefill forward of the unpatched model (a second copy, never patched), the patched model with
  ShortV switched off, and ShortV: interleaved, the order rotating every round, medians and per-round ratios.

    python benchmarks/bench_host_overhead.py --shape llava-1.5-7b --threads 1 \\
        --out benchmarks/results/host_overhead_llava-1.5-7b_1thread.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from shortv import apply_shortv, disable_shortv, remove_shortv, using_visual_mask
from shortv.benchmark import causal_lm_inputs, machine_info, shape_shortv_config
from shortv.benchmark.dispatch import count_ops, kernels, syncs, total
from shortv.benchmark.shapes import build_shape_model, miniature
from shortv.flops import get_shape
from shortv.registry import find_decoder_layers, layer_types

VARIANTS = ("unpatched", "baseline", "shortv")


def layer_rows(base: dict, fast: dict, kinds: list[str], frozen: list[int]) -> list[tuple[str, float, ...]]:
    """(kind, dense non-view, dense all, frozen non-view, frozen all) per layer kind: the median over the layers of
    that kind (the first frozen layer of a forward also builds the forward's tables; it is counted apart)."""
    rows = []
    for kind in dict.fromkeys(kinds):
        dense = [base[i] for i, k in enumerate(kinds) if k == kind]
        steady = [fast[i] for i in frozen if kinds[i] == kind]
        if not steady:
            continue
        rows.append((kind, statistics.median(map(kernels, dense)), statistics.median(sum(c.values()) for c in dense),
                     statistics.median(map(kernels, steady)), statistics.median(sum(c.values()) for c in steady)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llava-1.5-7b")
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--visual-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the report (markdown) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = machine_info(torch.device("cpu")).get("load_average", "?")

    full = get_shape(args.shape)
    shape = miniature(full, num_layers=full.dims.num_layers, visual_tokens=args.visual_tokens)
    config, note = shape_shortv_config(args.shape)
    model = apply_shortv(build_shape_model(shape, dtype=torch.float32), config)
    inputs = causal_lm_inputs(1, args.text_tokens, shape.visual_tokens, shape.dims.vocab_size)
    layers, frozen = find_decoder_layers(model), sorted(config.layers)
    kinds = layer_types(model) or ["full_attention"] * len(layers)

    def variant(name: str) -> contextlib.ExitStack:
        """The same model object every time: ShortV removed (and re-applied after), switched off, or on."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if name == "unpatched":
            stack.callback(apply_shortv, model, config)
            remove_shortv(model)
        else:
            stack.enter_context(using_visual_mask(model, inputs.visual_mask))
        if name == "baseline":
            stack.enter_context(disable_shortv(model))
        return stack

    def prefill(name: str, count: bool = False) -> Any:
        """One prefill forward: its operators (``count``), or its host time in seconds."""
        with variant(name):
            if count:
                return count_ops(lambda: model(**inputs.kwargs, use_cache=True, logits_to_keep=1), layers)
            start = time.perf_counter()
            model(**inputs.kwargs, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start

    counts = {name: prefill(name, count=True) for name in VARIANTS}
    base, fast = counts["baseline"], counts["shortv"]
    rows = layer_rows(base, fast, kinds, frozen)

    # One decode step after the prompt (as generate's second forward), from copies of the same cache.
    with torch.inference_mode(), using_visual_mask(model, inputs.visual_mask):
        cache = model(**inputs.kwargs, use_cache=True, logits_to_keep=1).past_key_values
    step = {"input_ids": inputs.kwargs["input_ids"][:, -1:],
            "attention_mask": torch.ones(1, inputs.kwargs["input_ids"].shape[1] + 1, dtype=torch.long)}

    def decode(name: str) -> Counter[str]:
        copied = copy.deepcopy(cache)
        with variant(name):
            return total(count_ops(lambda: model(**step, cache=copied, use_cache=True)))

    decode_counts = {name: decode(name) for name in ("unpatched", "shortv")}

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for index in range(3 + args.repeats):
        for name in VARIANTS[index % 3:] + VARIANTS[: index % 3]:
            seconds = prefill(name)
            if index >= 3:
                times[name].append(seconds)
    ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    ratios = [s / u for s, u in zip(times["shortv"], times["unpatched"])]
    quartiles = statistics.quantiles(ratios, n=4)
    load_after = machine_info(torch.device("cpu")).get("load_average", "?")

    totals = {name: total(c) for name, c in counts.items()}
    outside = {name: c.get(None, Counter()) for name, c in counts.items()}
    first, dense = fast[frozen[0]], base[frozen[0]]
    extra = totals["shortv"] - totals["baseline"]
    top = ", ".join(f"{op} {count}" for op, count in extra.most_common(6))
    fewer = ", ".join(f"{op} {count}" for op, count in (totals["baseline"] - totals["shortv"]).most_common(6))
    n_layers, n_frozen = len(layers), len(frozen)
    per_frozen_all = (sum(totals["shortv"].values()) - sum(totals["baseline"].values())) / n_frozen
    per_frozen_kernels = (kernels(totals["shortv"]) - kernels(totals["baseline"])) / n_frozen
    machine = machine_info(torch.device("cpu"))
    lines = [
        f"# Host cost of a ShortV layer: {args.shape} miniature",
        "",
        f"Command: `python benchmarks/bench_host_overhead.py --shape {args.shape} --threads {args.threads}"
        f"{'' if args.repeats == 100 else f' --repeats {args.repeats}'}`. A {n_layers}-layer model of the shape's "
        f"family and attention layout with hidden size 64, batch 1, {shape.visual_tokens} visual + "
        f"{args.text_tokens} text tokens (one image span), fp32, {n_frozen} frozen layers ({note}). "
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cpu_count', '?')} cores shared with other engineers' "
        f"jobs, {args.threads} torch thread(s), load average {load_before} before, {load_after} after; "
        f"torch {torch.__version__}, transformers {machine.get('transformers', '?')}; {machine.get('date', '')}.",
        "",
        "## Operators dispatched (exact)",
        "",
        "| layer | dense: not views | dense: all | frozen: not views | frozen: all | frozen - dense |",
        "|---|---|---|---|---|---|",
        *(f"| {kind} | {dk:g} | {da:g} | {fk:g} | {fa:g} | {fk - dk:+g} / {fa - da:+g} |"
          for kind, dk, da, fk, fa in rows),
        f"| first frozen layer of the forward (layer {frozen[0]}) | {kernels(dense)} | {sum(dense.values())} | "
        f"{kernels(first)} | {sum(first.values())} | {kernels(first) - kernels(dense):+d} / "
        f"{sum(first.values()) - sum(dense.values()):+d} |",
        "",
        "Per kind: the median over the layers of that kind. The first frozen attention layer of a forward also builds "
        "the forward's text-query mask and RoPE tables (one of each per mask and per cos/sin the decoder passes: two "
        "for sliding/global models), which every later frozen layer reads.",
        "",
        "| per forward | unpatched | ShortV off | ShortV |",
        "|---|---|---|---|",
        f"| outside the layers: not views / all | {kernels(outside['unpatched'])} / "
        f"{sum(outside['unpatched'].values())} | {kernels(outside['baseline'])} / {sum(outside['baseline'].values())} "
        f"| {kernels(outside['shortv'])} / {sum(outside['shortv'].values())} |",
        f"| whole prefill: not views / all | {kernels(totals['unpatched'])} / {sum(totals['unpatched'].values())} | "
        f"{kernels(totals['baseline'])} / {sum(totals['baseline'].values())} | {kernels(totals['shortv'])} / "
        f"{sum(totals['shortv'].values())} |",
        f"| device syncs in the prefill | {syncs(totals['unpatched'])} | {syncs(totals['baseline'])} | "
        f"{syncs(totals['shortv'])} |",
        f"| one decode step: not views / all (syncs) | {kernels(decode_counts['unpatched'])} / "
        f"{sum(decode_counts['unpatched'].values())} ({syncs(decode_counts['unpatched'])}) | | "
        f"{kernels(decode_counts['shortv'])} / {sum(decode_counts['shortv'].values())} "
        f"({syncs(decode_counts['shortv'])}) |",
        "",
        f"Everything ShortV adds or removes, spread over its {n_frozen} frozen layers: {per_frozen_kernels:+.1f} "
        f"operators that are not views and {per_frozen_all:+.1f} in all per frozen layer. More than with ShortV "
        f"off: {top or 'nothing'}; fewer: {fewer or 'nothing'}.",
        "",
        f"## Host time per prefill forward ({args.repeats} rounds, order rotating)",
        "",
        "| unpatched | ShortV off | ShortV | ShortV / unpatched, per round: median [quartiles] |",
        "|---|---|---|---|",
        f"| {ms['unpatched']:.2f} ms | {ms['baseline']:.2f} ms | {ms['shortv']:.2f} ms | "
        f"{statistics.median(ratios):.3f} [{quartiles[0]:.3f}, {quartiles[2]:.3f}] |",
        "",
        "All three run on the same model object (ShortV removed and re-applied around each unpatched forward, "
        "outside the timing). The machine is shared (2 cores, other engineers' jobs), so only interleaved medians and "
        "per-round ratios mean anything; a single forward can be off by 10%.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
