"""torch.compile and ShortV at a paper shape: graph breaks, recompiles over new prompt layouts, and compiled vs eager
prefill of the baseline and of ShortV.

    python benchmarks/bench_compile.py                                  # llava-1.5-7b, first 5 layers, 3 of them frozen
    python benchmarks/bench_compile.py --shape qwen2-vl-7b --layers 5 --threads 2 --out benchmarks/results/compile.json

Four measurements, all on one random-weight prefix of the shape (``--dtype``, 576 visual + 64 text tokens, batch 1):

1. ``torch._dynamo.explain`` of the unpatched and the patched model: graphs and graph-break reasons.
2. Recompiles: ``--prompts`` prompts whose text/visual split and length all differ, through one compiled patched
   model (``backend="eager"``, which compiles nothing but dynamo's graphs, so only guards and graphs are counted).
3. Graphs of the CUDA-graph recipe (`shortv.cuda_graphs`, docs/cuda_graphs.md): ``--prompts`` prompts with the
   shape's visual tokens, their text length (up to ``--text-tokens``) and image position all differ, left-padded
   to one bucket, prefilled into a static cache by the compiled decoder stack (a graph-counting backend): one graph.
4. Prefill time, interleaved baseline/ShortV (`shortv.benchmark.time_prefill`), eager and with the default
   ``torch.compile`` backend (inductor); compile time is the first call of each variant.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from shortv import apply_shortv, remove_shortv
from shortv.benchmark import causal_lm_inputs, machine_info, shape_shortv_config, time_prefill
from shortv.benchmark.shapes import build_shape_model, make_token_layout
from shortv.cuda_graphs import compile_decoder, pad_to_bucket, static_cache, uncompile_decoder


def explain(model: torch.nn.Module, kwargs: dict) -> dict:
    torch._dynamo.reset()
    with torch.inference_mode():
        result = torch._dynamo.explain(model)(**kwargs)
    reasons = sorted({f"{b.reason.splitlines()[0][:120]} ({b.user_stack[-1].filename.split('/')[-1]}:"
                      f"{b.user_stack[-1].lineno})" if b.user_stack else b.reason.splitlines()[0][:120]
                      for b in result.break_reasons})
    return {"graphs": result.graph_count, "graph_breaks": result.graph_break_count, "reasons": reasons}


def count_recompiles(model: torch.nn.Module, config, prompts: int, text_tokens: int, visual_tokens: int) -> dict:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    apply_shortv(model, config)
    compiled = torch.compile(model, backend="eager")
    graphs = []
    for index in range(prompts):
        inputs = causal_lm_inputs(1, text_tokens + 3 * index, visual_tokens - 5 * index, model.config.vocab_size, index)
        with torch.inference_mode():
            compiled(**inputs.kwargs, visual_mask=inputs.visual_mask, use_cache=False, logits_to_keep=1)
        graphs.append(int(counters["stats"]["unique_graphs"]))
    remove_shortv(model)
    return {"prompts": prompts, "unique_graphs_after_each_prompt": graphs,
            "recompiles_after_second_prompt": graphs[-1] - graphs[1]}


def count_bucket_graphs(model: torch.nn.Module, config, prompts: int, text_tokens: int, visual_tokens: int) -> dict:
    graphs: list = []
    torch._dynamo.reset()
    apply_shortv(model, config)
    bucket = text_tokens + visual_tokens
    compile_decoder(model, backend=lambda graph, example_inputs: graphs.append(graph) or graph.forward)
    cache = static_cache(model, 1, bucket)
    after_each = []
    try:
        for index in range(prompts):
            text = text_tokens - index * max(1, text_tokens // (2 * prompts))  # shorter prompts, then padded
            layout = make_token_layout(1, text, visual_tokens, image_position=(index * 7) % (text + 1),
                                       vocab_size=model.config.vocab_size, seed=index)
            padded = pad_to_bucket(bucket, layout.input_ids, visual_mask=layout.visual_mask)
            cache.reset()
            with torch.inference_mode():
                model(**padded, cache=cache, use_cache=True, logits_to_keep=1)
            after_each.append(len(graphs))
    finally:
        uncompile_decoder(model)
        remove_shortv(model)
    return {"prompts": prompts, "bucket": bucket, "graphs_after_each_prompt": after_each}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llava-1.5-7b")
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--visual-tokens", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                        help="fp32 on CPUs without native bf16 GEMMs (no AMX / avx512_bf16)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config, selection = shape_shortv_config(args.shape, args.layers, proportional=True)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_shape_model(args.shape, num_layers=args.layers, dtype=dtype).eval()
    inputs = causal_lm_inputs(1, args.text_tokens, args.visual_tokens, model.config.vocab_size)
    kwargs = {**inputs.kwargs, "use_cache": False, "logits_to_keep": 1}
    report = {"shape": args.shape, "layers": args.layers, "dtype": args.dtype, "shortv_layers": sorted(config.layers),
              "selection": selection, "machine": machine_info("cpu")}

    report["explain_unpatched"] = explain(model, kwargs)
    apply_shortv(model, config)
    report["explain_shortv"] = explain(model, {**kwargs, "visual_mask": inputs.visual_mask})
    remove_shortv(model)
    print(json.dumps({key: report[key] for key in ("explain_unpatched", "explain_shortv")}, indent=1), flush=True)

    report["recompiles"] = count_recompiles(model, config, args.prompts, args.text_tokens, args.visual_tokens)
    print(json.dumps(report["recompiles"]), flush=True)
    report["cuda_graph_bucket"] = count_bucket_graphs(model, config, args.prompts, args.text_tokens,
                                                      args.visual_tokens)
    print(json.dumps(report["cuda_graph_bucket"]), flush=True)

    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        started = time.perf_counter()
        timing = time_prefill(model, inputs, config, repeats=args.repeats, warmup=1, compile=mode == "compiled",
                              progress=lambda message: print(f"  {mode}: {message}", flush=True))
        report[f"prefill_{mode}"] = {**timing.to_dict(), "wall_s": time.perf_counter() - started}
        print(f"{mode}: baseline {timing.baseline_s.median * 1e3:.1f} ms, ShortV {timing.shortv_s.median * 1e3:.1f} "
              f"ms, speedup {timing.speedup:.2f}x", flush=True)
    eager, compiled = report["prefill_eager"], report["prefill_compiled"]
    report["compiled_over_eager"] = {
        variant: eager[f"{variant}_s"]["median"] / compiled[f"{variant}_s"]["median"] for variant in ("baseline", "shortv")
    }
    print(json.dumps(report["compiled_over_eager"]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
