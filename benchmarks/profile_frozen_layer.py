"""Where a ShortV (frozen) decoder layer spends its prefill time, next to a dense one, at a paper model's real dims.

Builds a 2-layer shape model, captures the inputs of layer 1 in an ordinary forward, then times that layer's
dense forward and its fast frozen forward (`shortv.frozen.prenorm`) on the same inputs,
interleaved, and profiles both with torch.profiler. Op time is grouped into:

* projections over all tokens (the K/V projections of a frozen layer; every projection of a dense one),
* projections over text tokens only (q_proj, o_proj, MLP of a frozen layer),
* attention (SDPA),
* ShortV bookkeeping (row gathers/scatters, the text-query mask, the output clone),
* other element-wise work (RMSNorm, RoPE, SiLU, residual adds, dtype casts).

Usage::

    python benchmarks/profile_frozen_layer.py --threads 1 --out benchmarks/results/profile_frozen_layer_1thread.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from markdown_report import emit_report, machine_line
from shortv.benchmark import paper_n
from shortv.flops import LayerDims, get_shape, layer_flops
from shortv.layout import TokenLayout
from shortv.benchmark.shapes import build_shape_model, make_token_layout
from shortv.registry import fast_layer_for

BOOKKEEPING = {
    "aten::index", "aten::index_put_", "aten::_index_put_impl_", "aten::gather", "aten::clone", "aten::zeros",
    "aten::new_zeros", "aten::fill_", "aten::zero_", "aten::nonzero", "aten::arange", "aten::le", "aten::masked_fill",
    "aten::logical_not", "aten::bitwise_not", "aten::expand", "aten::unsqueeze", "aten::item",
    "aten::_local_scalar_dense", "aten::masked_select",
}
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm"}


def capture_layer_inputs(model, input_ids: torch.Tensor, index: int) -> tuple[torch.Tensor, dict]:
    captured: dict = {}
    layer = model.model.layers[index]

    def hook(module, args, kwargs):  # noqa: ANN001, ANN202
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "cache")}

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.inference_mode():
        model(input_ids, logits_to_keep=1, use_cache=False)
    handle.remove()
    return captured["hidden"], captured["kwargs"]


def categorize(prof, seq: int) -> dict[str, float]:
    """Self CPU milliseconds per category, summed over the profiled calls."""
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        ms = event.self_cpu_time_total / 1000
        name = event.key
        if name in MATMUL:
            rows = event.input_shapes[0][0] if event.input_shapes and event.input_shapes[0] else None
            totals["projections, all tokens" if rows == seq else "projections, text tokens only"] += ms
        elif "scaled_dot_product" in name or "flash_attention" in name:
            totals["attention (SDPA)"] += ms
        elif name in BOOKKEEPING:
            totals["ShortV bookkeeping (gather/scatter/mask/clone)"] += ms
        else:
            totals["element-wise (norms, RoPE, SiLU, adds, casts)"] += ms
    return dict(totals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llava-1.5-7b")
    parser.add_argument("--visual-tokens", type=int, default=576)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_shape_model(args.shape, num_layers=2)
    ids, mask = make_token_layout(1, args.text_tokens, args.visual_tokens, vocab_size=model.config.vocab_size)
    hidden, kwargs = capture_layer_inputs(model, ids, 1)
    layer = model.model.layers[1]
    fast = fast_layer_for(model)
    layout = TokenLayout.from_visual_mask(mask)
    dense_forward = type(layer).forward
    seq = ids.shape[1]

    def dense() -> torch.Tensor:
        return dense_forward(layer, hidden, **kwargs)

    def frozen() -> torch.Tensor:
        return fast.fast_frozen_forward(layer, layout, hidden, **dict(kwargs))

    times: dict[str, list[float]] = {"dense": [], "frozen": []}
    with torch.inference_mode():
        dense(), frozen()  # warm-up
        for index in range(args.repeats):
            for name in (("dense", "frozen") if index % 2 == 0 else ("frozen", "dense")):
                start = time.perf_counter()
                (dense if name == "dense" else frozen)()
                times[name].append(time.perf_counter() - start)
        profiles = {}
        for name, function in (("dense", dense), ("frozen", frozen)):
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(3):
                    function()
            profiles[name] = {k: v / 3 for k, v in categorize(prof, seq).items()}

    dims = LayerDims.from_config(model.config)
    t, v = args.text_tokens, args.visual_tokens
    ideal = layer_flops(dims, t, v, False, "exact") / layer_flops(dims, t, v, True, "exact")
    med = {k: statistics.median(x) for k, x in times.items()}
    low = {k: min(x) for k, x in times.items()}
    full, n = get_shape(args.shape).dims.num_layers, paper_n(args.shape)

    def projected(d: float, f: float) -> float:
        return full * d / ((full - n) * d + n * f)

    lines = [
        f"# Frozen vs dense decoder layer: {args.shape}, {v} visual + {t} text tokens, bf16, CPU",
        "",
        machine_line(),
        "",
        "| layer | median ms | min ms | FLOPs (exact) |",
        "|---|---|---|---|",
        f"| dense | {med['dense'] * 1e3:.1f} | {low['dense'] * 1e3:.1f} | {layer_flops(dims, t, v, False, 'exact') / 1e9:.1f} G |",
        f"| ShortV (fast frozen) | {med['frozen'] * 1e3:.1f} | {low['frozen'] * 1e3:.1f} | "
        f"{layer_flops(dims, t, v, True, 'exact') / 1e9:.1f} G |",
        "",
        f"Per-layer speedup: {med['dense'] / med['frozen']:.2f}x (medians), {low['dense'] / low['frozen']:.2f}x (mins); "
        f"FLOPs-ideal {ideal:.2f}x. {args.repeats} interleaved repetitions.",
        f"Whole-model prefill projected from these layer times with N={n} of {full} layers "
        f"frozen (LM head and embeddings ignored): {projected(med['dense'], med['frozen']):.2f}x (medians), "
        f"{projected(low['dense'], low['frozen']):.2f}x (mins).",
        "",
        "Profiled self CPU time per call (ms), by category:",
        "",
        "| category | dense | ShortV |",
        "|---|---|---|",
    ]
    categories = sorted(set(profiles["dense"]) | set(profiles["frozen"]))
    for category in categories:
        lines.append(
            f"| {category} | {profiles['dense'].get(category, 0.0):.1f} | {profiles['frozen'].get(category, 0.0):.1f} |"
        )
    lines.append(
        f"| total | {sum(profiles['dense'].values()):.1f} | {sum(profiles['frozen'].values()):.1f} |"
    )
    emit_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
