"""The measurements of the GPU check: ``run.sh`` runs this, then ``report.py``.

First the device's bf16 GEMM rate and copy bandwidth (`shortv.benchmark.measure_rates`), for the roofline ideal.
Then, for every shape of ``GPU_SHAPES`` registered in `shortv.flops` (random weights with the real dims, bf16, sdpa,
the paper's N ShortV layers; `shortv.benchmark.shape_shortv_config`), at each batch size:

* ``generate`` cell: `shortv.benchmark.benchmark`, greedy ``generate`` runs, baseline and ShortV interleaved:
  TTFT, decode tokens/s and peak ``torch.cuda.max_memory_allocated`` (a `BenchResult`);
* ``prefill`` cell, eager: `shortv.benchmark.time_prefill`, the prompt forward alone timed with CUDA events,
  median of 10 after 3 warm-up rounds, next to the FLOPs-ideal and the roofline speedups.

Then, in the time left and in the order of `compiled_jobs` (the cells issue #23 sets targets for first), compiled
cells (a cell is skipped when the deadline is too close):

* ``prefill_cuda_graphs``: the same prefill, the decoder stack compiled by `shortv.cuda_graphs.compile_decoder`
  (inductor, ``mode="reduce-overhead"``: CUDA graphs) into a static cache;
* ``prefill_compiled``: the same prefill through ``torch.compile(model, dynamic=False)`` (no CUDA graphs);
* ``generate_cuda_graphs``: the ``generate`` cell with the CUDA-graph recipe (stack compiled, one static cache
  reset before each run): decode tokens/s with CUDA graphs.

Every finished, failed or skipped cell is appended to ``OUTDIR/cells.jsonl`` at once, so a run stopped by its time
limit keeps what it measured.

``--smoke`` runs the same cells on CPU with miniatures of the shapes (same family and attention layout, hidden
size 64, 4 layers, 1/24 of the visual tokens) and 1-2 repetitions; its compiled cells use dynamo's ``eager``
backend (graphs traced, nothing compiled: inductor compiles for minutes on a small CPU), so they check the code
path, not the speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from shortv.benchmark import (
    BenchInputs,
    DeviceRates,
    benchmark,
    causal_lm_inputs,
    ideal_prefill_speedup,
    machine_info,
    measure_rates,
    pruning_beside,
    roofline_prefill_seconds,
    roofline_prefill_speedup,
    shape_shortv_config,
    time_prefill,
)
from shortv.benchmark.ideal import method_ideal_speedup
from shortv.benchmark.shapes import build_shape_model, miniature
from shortv.config import ShortVConfig
from shortv.flops import PAPER_SHAPES, LayerDims, PaperShape

#: The shapes the check runs, in order. A name not (yet) in `shortv.flops.PAPER_SHAPES` is reported as missing:
#: Qwen3-VL-8B runs as soon as its shape (and its family in `shortv.benchmark.shapes.FAMILIES`) is registered.
GPU_SHAPES = ("llava-1.5-7b", "next-7b", "qwen2-vl-7b", "qwen3-vl-8b")
CELLS = "cells.jsonl"
#: Compiled cell kinds, in the order they run for one shape and batch.
COMPILED_KINDS = ("prefill_cuda_graphs", "prefill_compiled", "generate_cuda_graphs")


@dataclass(frozen=True)
class Settings:
    batches: tuple[int, ...] = (1, 8)
    text_tokens: int = 64
    new_tokens: int = 16
    generate_repeats: int = 5
    generate_warmup: int = 1
    prefill_repeats: int = 10
    prefill_warmup: int = 3
    #: Seconds kept free for a compile cell before its first one has been timed (generate: it compiles a prefill
    #: and a decode graph per variant).
    compile_reserve_s: float = 90.0
    generate_compile_reserve_s: float = 150.0
    #: Warm-up runs of a generate cell with CUDA graphs: the first compiles, the second records the prefill graph.
    cuda_graph_generate_warmup: int = 2
    #: torch.compile backend of the compiled cells ("eager" in --smoke: dynamo traces, nothing is compiled).
    compile_backend: str = "inductor"
    #: Run only the first this many compiled cells of `compiled_jobs` (None: all, as the deadline allows).
    compiled_jobs_limit: int | None = None
    rates: dict[str, Any] = field(default_factory=lambda: {"gemm_size": 8192, "copy_bytes": 2**30, "min_run_time": 1.0})


SMOKE = Settings(batches=(1, 2), text_tokens=8, new_tokens=3, generate_repeats=1, generate_warmup=0,
                 prefill_repeats=2, prefill_warmup=1, cuda_graph_generate_warmup=1, compile_backend="eager",
                 # the cells every GPU run starts with: each kind once, the CUDA-graph prefill of every shape
                 compiled_jobs_limit=len(COMPILED_KINDS) + len(GPU_SHAPES) - 1,
                 rates={"gemm_size": 256, "copy_bytes": 2**24, "min_run_time": 0.05})


def compiled_jobs(shapes: list[str], batches: tuple[int, ...]) -> list[tuple[str, int, str]]:
    """``(shape, batch, kind)`` of every compiled cell, most wanted first: the first shape at the first batch (issue
    #23's compiled and CUDA-graph targets are for LLaVA-1.5-7B at batch 1), the CUDA-graph prefill of the other
    shapes at that batch, then the rest shape by shape (consecutive cells of one shape share its model)."""
    if not shapes or not batches:
        return []
    jobs = [(shapes[0], batches[0], kind) for kind in COMPILED_KINDS]
    jobs += [(shape, batches[0], "prefill_cuda_graphs") for shape in shapes[1:]]
    jobs += [(shape, batch, kind) for shape in shapes for batch in batches for kind in COMPILED_KINDS
             if (shape, batch, kind) not in jobs]
    return jobs


class Cells:
    """``OUTDIR/cells.jsonl``: one JSON object per finished, failed or skipped cell, flushed as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last_seconds: dict[str, float] = {}

    def write(self, kind: str, **fields: Any) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"kind": kind, **fields}) + "\n")

    def attempt(self, kind: str, label: dict[str, Any], work: Callable[[], dict[str, Any]], reserve_s: float,
                deadline: float) -> None:
        """Run one cell unless fewer than ``reserve_s`` (or its last duration) seconds are left before ``deadline``;
        a failure is recorded with its traceback and the run goes on."""
        needed = max(reserve_s, self.last_seconds.get(kind, 0.0))
        if time.time() + needed > deadline:
            self.write("skipped", cell=kind, **label, reason=f"time budget: {needed:.0f} s needed, "
                       f"{max(deadline - time.time(), 0):.0f} s left")
            return
        print(f"== {kind} {label}", flush=True)
        started = time.perf_counter()
        try:
            record = work()
        except Exception as error:  # noqa: BLE001 - every failure is a result of the check, recorded, not fatal
            self.write("error", cell=kind, **label, error=f"{type(error).__name__}: {error}"[:2000],
                       traceback=traceback.format_exc()[-6000:])
            print(f"   failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return
        self.last_seconds[kind] = time.perf_counter() - started
        self.write(kind, **label, seconds=self.last_seconds[kind], **record)


def prefill_cell(model: torch.nn.Module, inputs: BenchInputs, config: ShortVConfig, rates: DeviceRates,
                 settings: Settings, mode: str = "eager") -> dict[str, Any]:
    """``mode``: "eager", "compiled" (``torch.compile(model)``) or "cuda_graphs" (`shortv.cuda_graphs` recipe)."""
    backend = {"backend": settings.compile_backend}
    options = {"compiled": {**backend, "dynamic": False}, "cuda_graphs": backend}.get(mode)
    skips = cudagraph_skips()
    timing = time_prefill(
        model, inputs, config, repeats=settings.prefill_repeats, warmup=settings.prefill_warmup,
        compile=mode == "compiled", cuda_graphs=mode == "cuda_graphs", compile_options=options,
        progress=lambda message: print(f"   {message}", flush=True),
    )
    dims, counts, layers = LayerDims.from_config(model.config), inputs.token_counts(), config.layers
    weight_bytes = torch.finfo(next(model.parameters()).dtype).bits / 8
    flops_ideal = ideal_prefill_speedup(dims, counts, layers)
    roofline = roofline_prefill_speedup(dims, counts, layers, rates, weight_bytes)
    return {
        "timing": timing.to_dict(),
        "flops_ideal": flops_ideal,
        "roofline_ideal": roofline,
        "realized_of_flops_ideal": timing.speedup / flops_ideal,
        "realized_of_roofline": timing.speedup / roofline,
        "roofline_seconds": {"baseline": roofline_prefill_seconds(dims, counts, [], rates, weight_bytes),
                             "shortv": roofline_prefill_seconds(dims, counts, layers, rates, weight_bytes)},
        "text_tokens": [t for t, _ in counts],
        "visual_tokens": [v for _, v in counts],
        "shortv_layers": list(layers),
        "cudagraph_skips": cudagraph_skips() - skips,
    }


def method_prefill_cell(model: torch.nn.Module, inputs: BenchInputs, config: Any, settings: Settings) -> dict[str, Any]:
    """Eager prefill of the unpatched model against another method (FastV, VTW, ShortV + FastV: `shortv.methods`),
    beside that method's FLOPs-ideal speedup (issue #24)."""
    from shortv.methods import method_of

    timing = time_prefill(model, inputs, config, repeats=settings.prefill_repeats, warmup=settings.prefill_warmup,
                          progress=lambda message: print(f"   {message}", flush=True))
    counts = inputs.token_counts()
    flops_ideal = method_ideal_speedup(LayerDims.from_config(model.config), counts, config)
    return {"method": method_of(config).record(config), "timing": timing.to_dict(), "flops_ideal": flops_ideal,
            "realized_of_flops_ideal": timing.speedup / flops_ideal, "text_tokens": [t for t, _ in counts],
            "visual_tokens": [v for _, v in counts]}


def cudagraph_skips() -> int:
    """How many graphs inductor has compiled without the CUDA graph asked for (its log says why)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def measure(out: Path, device: torch.device, smoke: bool, deadline: float, shape_names: list[str],
            compile_cells: bool, generate_cells: bool = True, batches: tuple[int, ...] | None = None) -> None:
    started = time.time()
    settings = SMOKE if smoke else Settings()
    if batches:
        settings = replace(settings, batches=tuple(batches))
    cells = Cells(out / CELLS)
    missing = [name for name in shape_names if name not in PAPER_SHAPES]
    shapes = {name: miniature(PAPER_SHAPES[name]) if smoke else PAPER_SHAPES[name]
              for name in shape_names if name in PAPER_SHAPES}
    cells.write("setup", machine=machine_info(device), device=str(device), smoke=smoke, settings=asdict(settings),
                shapes=list(shapes), missing_shapes=missing, dtype="bf16", attention="sdpa")
    rates = measure_rates(device, torch.bfloat16, **settings.rates)
    cells.write("rates", flops_per_s=rates.flops_per_s, bytes_per_s=rates.bytes_per_s, **settings.rates)
    print(f"device rates: {rates.flops_per_s / 1e12:.3g} TFLOP/s bf16 GEMM, {rates.bytes_per_s / 1e12:.3g} TB/s",
          flush=True)

    def generate_cell(model, inputs, config, note, name, cuda_graphs=False) -> dict[str, Any]:
        warmup = settings.cuda_graph_generate_warmup if cuda_graphs else settings.generate_warmup
        skips = cudagraph_skips()
        result = benchmark(
            model, inputs, config, new_tokens=settings.new_tokens, repeats=settings.generate_repeats, warmup=warmup,
            name=name, source="shape", layer_selection=note, cuda_graphs=cuda_graphs,
            compile_options={"backend": settings.compile_backend} if cuda_graphs else None,
        )
        return {"result": result.to_dict(), "cudagraph_skips": cudagraph_skips() - skips}

    def shape_model(name: str, shape: PaperShape) -> tuple[torch.nn.Module, ShortVConfig, str]:
        config, note = (shape_shortv_config(name, num_layers=shape.dims.num_layers, proportional=True) if smoke
                        else shape_shortv_config(name))
        return build_shape_model(shape, dtype=torch.bfloat16, device=device), config, note

    def release() -> None:
        """Free the model the caller dropped its references to (and dynamo's, which hold it too)."""
        gc.collect()
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def inputs_for(shape: PaperShape, batch: int) -> BenchInputs:
        return causal_lm_inputs(batch, settings.text_tokens, shape.visual_tokens, shape.dims.vocab_size)

    for name, shape in shapes.items():  # every eager cell first: they matter most and take the least time
        model, config, note = shape_model(name, shape)
        try:
            for batch in settings.batches:
                inputs, label = inputs_for(shape, batch), {"shape": name, "batch": batch}
                if generate_cells:
                    cells.attempt("generate", label, lambda: generate_cell(model, inputs, config, note, name),
                                  reserve_s=5.0, deadline=deadline)
                cells.attempt("prefill", label, lambda: prefill_cell(model, inputs, config, rates, settings),
                              reserve_s=5.0, deadline=deadline)
            # FastV, VTW and ShortV + FastV on the same model, eager, at batch 1 (the paper's setting)
            inputs, label = inputs_for(shape, settings.batches[0]), {"shape": name, "batch": settings.batches[0]}
            [(t, v)] = inputs.token_counts()[:1]
            pruning = pruning_beside(config, shape.dims.num_layers, PAPER_SHAPES[name].dims.num_layers,
                                     LayerDims.from_config(model.config), t, v)
            for method, method_config in pruning.items():
                cells.attempt("prefill_method", {**label, "method_name": method},
                              lambda: method_prefill_cell(model, inputs, method_config, settings),
                              reserve_s=5.0, deadline=deadline)
        finally:
            model = None
            release()

    if compile_cells:
        current: tuple[str, torch.nn.Module, ShortVConfig, str] | None = None
        for name, batch, kind in compiled_jobs(list(shapes), settings.batches)[:settings.compiled_jobs_limit]:
            if kind == "generate_cuda_graphs" and not generate_cells:
                continue
            if current is None or current[0] != name:
                current = model = None
                release()
                current = (name, *shape_model(name, shapes[name]))
            _, model, config, note = current
            inputs, label = inputs_for(shapes[name], batch), {"shape": name, "batch": batch}
            if kind == "generate_cuda_graphs":
                work = lambda: generate_cell(model, inputs, config, note, name, cuda_graphs=True)  # noqa: E731
                reserve = settings.generate_compile_reserve_s
            else:
                mode = "cuda_graphs" if kind == "prefill_cuda_graphs" else "compiled"
                work = lambda: prefill_cell(model, inputs, config, rates, settings, mode)  # noqa: E731
                reserve = settings.compile_reserve_s
            cells.attempt(kind, label, work, reserve_s=reserve, deadline=deadline)
            torch._dynamo.reset()  # each cell compiles afresh: its compile time is its own
        current = model = None
        release()
    cells.write("done", wall_s=time.time() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (cells.jsonl is appended to)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, miniature shapes, 1-2 repetitions, compiled cells traced but not compiled")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="Unix time by which to stop starting cells")
    parser.add_argument("--shapes", nargs="+", default=list(GPU_SHAPES))
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled and CUDA-graph cells")
    parser.add_argument("--no-generate", action="store_true", help="skip the generate cells (prefill cells only)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default: 1 8)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --smoke, which CI runs on a shared 2-core machine)")
    args = parser.parse_args()
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke on a machine without a GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    measure(args.out, device, args.smoke, args.deadline, args.shapes, compile_cells=not args.no_compile,
            generate_cells=not args.no_generate, batches=args.batches)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
