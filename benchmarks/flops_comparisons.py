"""Prefill FLOPs of FastV, VTW, ShortV and ShortV + FastV at the paper shapes, and where the paper's 29% comes from.

Arithmetic only (`shortv.flops_pruning` over `shortv.flops`): no model runs, so the machine does not matter. The
paper (arXiv 2504.00502) reports ShortV + FastV on LLaVA-1.5-7B at 29% of the FLOPs without giving the FastV
setting; its FastV baseline is K = 2, R = 50%. This script prints

1. the methods at LLaVA-1.5-7B's shape (64 text + 576 visual tokens, the paper's formula);
2. ShortV (N = 19, published layers) + FastV over K and R, and the R that reaches 29% at each K;
3. other ways to compose the two counts (product of the ratios, other N, other text lengths);
4. every paper shape, GQA-aware ("exact") count.

Usage::

    python benchmarks/flops_comparisons.py --out benchmarks/results/flops_comparisons.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from markdown_report import emit_report
from shortv.benchmark import shape_shortv_config
from shortv.flops import get_shape, model_flops, shape_names
from shortv.flops_pruning import (
    budget_flops,
    budget_ratio,
    dense_budget,
    fastv_ratio,
    kept_visual_tokens,
    ranking_flops,
    shortv_budget,
    token_budget,
    vtw_ratio,
)

TEXT = 64  # the paper's FLOPs tables assume 64 text tokens
PAPER_COMPOSED = 0.29  # ShortV + FastV on LLaVA-1.5-7B, as the paper reports it
VTW_K = 15  # VTW's released default for LLaVA-1.5-7B (layers 15.. without visual tokens)
RATIOS = (0.5, 0.6, 2 / 3, 0.75, 0.8, 0.9)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def kept_for(dims, v: int, k: int, frozen, target: float) -> int:
    """The largest kept-token count whose ShortV + FastV ratio is at most ``target`` (the ratio grows with it)."""
    dense = budget_flops(dims, TEXT, dense_budget(dims, v), "paper")
    below = [kept for kept in range(v + 1)
             if budget_flops(dims, TEXT, token_budget(dims, v, frozen, cut=k, kept=kept), "paper") <= target * dense]
    return max(below)


def methods_at_llava(lines: list[str]) -> None:
    shape = get_shape("llava-1.5-7b")
    dims, v = shape.dims, shape.visual_tokens
    frozen = shape_shortv_config("llava-1.5-7b")[0].frozen_layers
    dense = model_flops(dims, TEXT, v, (), "paper")
    rows = [
        ("dense", 1.0),
        ("FastV K=2, R=50%", fastv_ratio(dims, TEXT, v, 2, 0.5, formula="paper")),
        (f"VTW K={VTW_K}", vtw_ratio(dims, TEXT, v, VTW_K, formula="paper")),
        ("ShortV N=19", budget_ratio(dims, TEXT, v, shortv_budget(dims, v, frozen), "paper")),
        ("ShortV N=19 + FastV K=2, R=50%", fastv_ratio(dims, TEXT, v, 2, 0.5, frozen, formula="paper")),
    ]
    lines += ["## 1. LLaVA-1.5-7B (64 text + 576 visual tokens, the paper's formula)", "",
              "| method | TFLOPs | ratio |", "|---|---|---|"]
    lines += [f"| {name} | {ratio * dense / 1e12:.2f} | {pct(ratio)} |" for name, ratio in rows]
    last, mean = (ranking_flops(dims, TEXT, v, 2, r) / dense for r in ("last", "mean"))
    lines += ["", f"Ranking FastV's tokens with SDPA (recomputing layer K-1's scores): {last:.1e} of the dense "
              f"prefill for the last token, {mean:.1e} for the mean over all queries; not in the ratios above.", ""]


def composition_grid(lines: list[str]) -> None:
    shape = get_shape("llava-1.5-7b")
    dims, v = shape.dims, shape.visual_tokens
    frozen = shape_shortv_config("llava-1.5-7b")[0].frozen_layers
    shortv = budget_ratio(dims, TEXT, v, shortv_budget(dims, v, frozen), "paper")
    lines += ["## 2. ShortV N=19 + FastV (K, R) on LLaVA-1.5-7B", "",
              "Frozen layers before K hold all 576 visual tokens' keys/values, those from K on the kept ones'. "
              "\"product\" multiplies the two methods' separate ratios instead.", "",
              "| K | R | kept | FastV alone | ShortV + FastV | product |", "|---|---|---|---|---|---|"]
    for k in (2, 3):
        for r in RATIOS:
            fastv = fastv_ratio(dims, TEXT, v, k, r, formula="paper")
            both = fastv_ratio(dims, TEXT, v, k, r, frozen, formula="paper")
            lines.append(f"| {k} | {100 * r:.0f}% | {kept_visual_tokens(v, r)} | {pct(fastv)} | {pct(both)} | "
                         f"{pct(fastv * shortv)} |")
    lines += ["", "Where ShortV + FastV reaches the paper's 29%:", ""]
    for k in (1, 2, 3):
        kept = kept_for(dims, v, k, frozen, PAPER_COMPOSED)
        ratio = budget_ratio(dims, TEXT, v, token_budget(dims, v, frozen, cut=k, kept=kept), "paper")
        lines.append(f"- K={k}: at most {kept} kept visual tokens (R >= {100 * (1 - kept / v):.1f}%) gives "
                     f"{pct(ratio)}")
    lines.append("")


def other_accountings(lines: list[str]) -> None:
    shape = get_shape("llava-1.5-7b")
    dims, v = shape.dims, shape.visual_tokens
    published = sorted(shape_shortv_config("llava-1.5-7b")[0].frozen_layers)
    lines += ["## 3. Other ways to count ShortV + FastV (K=2, R=50%) on LLaVA-1.5-7B", "",
              "| variant | ratio |", "|---|---|"]
    first19 = fastv_ratio(dims, TEXT, v, 2, 0.5, range(19), formula="paper")
    after_cut = [i for i in range(2, 32) if i not in published][:5]
    lines.append(f"| frozen layers 0..18 instead of the published ones | {pct(first19)} |")
    for extra in (1, 3, 4, 5):
        more = published + after_cut[:extra]
        lines.append(f"| N={19 + extra} (the published 19 and {extra} more layers after K) | "
                     f"{pct(fastv_ratio(dims, TEXT, v, 2, 0.5, more, formula='paper'))} |")
    for text in (1, 16, 32, 128):
        lines.append(f"| {text} text tokens instead of 64 | "
                     f"{pct(fastv_ratio(dims, text, v, 2, 0.5, published, formula='paper'))} |")
    text_at_target = max(t for t in range(1, TEXT + 1)
                         if fastv_ratio(dims, t, v, 2, 0.5, published, formula="paper") <= PAPER_COMPOSED)
    lines.append(f"| (the most text tokens at which it is at most 29%: {text_at_target}) | "
                 f"{pct(fastv_ratio(dims, text_at_target, v, 2, 0.5, published, formula='paper'))} |")
    pruned_from_start = model_flops(dims, TEXT, 288, published, "paper") / model_flops(dims, TEXT, v, (), "paper")
    lines.append(f"| the 288 kept tokens in every layer (pruned before layer 0) | {pct(pruned_from_start)} |")
    lines.append("")


def every_shape(lines: list[str]) -> None:
    lines += ["## 4. Every paper shape (64 text tokens, GQA-aware \"exact\" count)", "",
              "ShortV layers as `shape_shortv_config` picks them (the published order where there is one, else the "
              "last N). FastV at K=2, or the first K after a softmax-attention layer (Qwen3.6: full attention every "
              "4th layer); VTW at half the layers.", "",
              "| shape | dense TFLOPs | ShortV (N) | FastV K, R=50% | VTW K | ShortV + FastV |",
              "|---|---|---|---|---|---|"]
    for name in shape_names():
        shape = get_shape(name)
        dims, v = shape.dims, shape.visual_tokens
        frozen = shape_shortv_config(name)[0].frozen_layers
        k = next(i + 1 for i, kind in enumerate(dims.layer_kinds) if i >= 1 and kind == "attention")
        half = dims.num_layers // 2
        dense = model_flops(dims, TEXT, v, (), "exact")
        shortv = budget_ratio(dims, TEXT, v, shortv_budget(dims, v, frozen))
        lines.append(
            f"| {name} | {dense / 1e12:.2f} | {pct(shortv)} ({len(frozen)}) | {pct(fastv_ratio(dims, TEXT, v, k, 0.5))}"
            f" (K={k}) | {pct(vtw_ratio(dims, TEXT, v, half))} (K={half}) | "
            f"{pct(fastv_ratio(dims, TEXT, v, k, 0.5, frozen))} |")
    lines.append("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = parser.parse_args()
    lines = ["# FLOPs of FastV, VTW, ShortV and ShortV + FastV", "",
             "Arithmetic from `shortv.flops_pruning` (`benchmarks/flops_comparisons.py`); decoder stack, prefill, "
             "LM head excluded.", ""]
    methods_at_llava(lines)
    composition_grid(lines)
    other_accountings(lines)
    every_shape(lines)
    emit_report(lines, args.out)


if __name__ == "__main__":
    main()
