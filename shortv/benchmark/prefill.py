"""Prefill alone, baseline vs ShortV: interleaved forwards of the prompt, eager or ``torch.compile``d.

Where `timing.benchmark` times whole ``generate`` calls, this times just what ``generate`` does first: one forward
over the prompt that fills the KV cache and computes the logits of the last position (``logits_to_keep=1``). On a
GPU each forward is timed with CUDA events, so nothing but the forward is in the number; on CPU with
``time.perf_counter``. Same interleaving (B S, S B, ...) after untimed warm-up rounds, which for a compiled model
also absorb the compilation of both variants (their first calls are timed separately, as ``compile_s``).

With ``cuda_graphs``, the recipe of `shortv.cuda_graphs`: the decoder stack compiled with ``mode="reduce-overhead"``
(CUDA graphs on a GPU) and a static cache allocated once for the prompt, reset before every forward. An all-ones
attention mask is left out, as ``generate`` leaves it out, so that ``generate``'s prefill is the same graph (and
inductor's cache serves it to a later generate cell).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..cuda_graphs import compile_decoder, static_cache, uncompile_decoder
from .devices import Clock, model_device, model_dtype
from .inputs import BenchInputs
from .results import Stats
from .timing import Progress, interleaved, method_applied, variant_context


@dataclass
class PrefillTiming:
    """Prefill seconds per variant over the repetitions, and the speedup of ShortV."""

    compiled: bool
    baseline_s: Stats
    shortv_s: Stats
    #: median baseline / median ShortV.
    speedup: float
    #: baseline / ShortV of each repetition's pair.
    speedup_paired: Stats
    repeats: int
    warmup: int
    #: Compiled only: the first call of each variant (tracing and compiling included), in seconds.
    compile_s: dict[str, float] | None = None
    #: The decoder stack compiled with `shortv.cuda_graphs.compile_decoder` and a static cache (``compiled`` too).
    cuda_graphs: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_prefill(
    model: nn.Module,
    inputs: BenchInputs,
    config: Any,
    *,
    repeats: int = 10,
    warmup: int = 3,
    compile: bool = False,
    compile_options: dict[str, Any] | None = None,
    cuda_graphs: bool = False,
    progress: Progress | None = None,
) -> PrefillTiming:
    """Median prefill time of baseline and the method of ``config`` (ShortV, or any `shortv.methods` config) on
    ``model`` (on its device, in its dtype). With ``compile``, the forward runs through ``torch.compile(model,
    **compile_options)``; with ``cuda_graphs``, through the decoder stack compiled by ``compile_decoder(model,
    **compile_options)`` into a static cache. ``warmup`` must then be
    at least 1 (the first call of each variant compiles; CUDA graph trees record on a later one)."""
    from ..methods import coerce_config

    config = coerce_config(config)  # any method's config (`shortv.methods`); a list of layers is ShortV's
    if compile and cuda_graphs:
        raise ValueError("compile and cuda_graphs are two ways to compile: choose one")
    if (compile or cuda_graphs) and warmup < 1:
        raise ValueError("a compiled prefill needs warmup >= 1: the first call of each variant compiles")
    device = model_device(model)
    inputs = inputs.to(device, model_dtype(model))
    model.eval()
    forward = torch.compile(model, **(compile_options or {})) if compile else model
    kwargs, extra = dict(inputs.kwargs), {}
    if cuda_graphs:
        compile_decoder(model, **(compile_options or {}))
        extra["cache"] = static_cache(model, inputs.batch_size, int(inputs.visual_mask.shape[1]))
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and bool(mask.all()):
            del kwargs["attention_mask"]  # as generate does: then its prefill is this very graph
    first_calls: dict[str, float] = {}

    def run(variant: str) -> float:
        clock = Clock(device)
        if cuda_graphs:
            extra["cache"].reset()
            torch.compiler.cudagraph_mark_step_begin()
        with variant_context(model, inputs, variant), torch.inference_mode():
            clock.mark()
            forward(**kwargs, use_cache=True, logits_to_keep=1, **extra)
            clock.mark()
        seconds = clock.seconds()[-1]
        first_calls.setdefault(variant, seconds)
        return seconds

    try:
        with method_applied(model, config):
            runs = interleaved(run, repeats, warmup, lambda seconds: f"prefill {seconds * 1e3:.2f} ms", progress)
    finally:
        if cuda_graphs:
            uncompile_decoder(model)
    baseline, shortv = Stats.of(runs["baseline"]), Stats.of(runs["shortv"])
    return PrefillTiming(
        compiled=compile or cuda_graphs,
        baseline_s=baseline,
        shortv_s=shortv,
        speedup=baseline.median / shortv.median,
        speedup_paired=Stats.of([b / s for b, s in zip(runs["baseline"], runs["shortv"])]),
        repeats=repeats,
        warmup=warmup,
        compile_s=first_calls if compile or cuda_graphs else None,
        cuda_graphs=cuda_graphs,
    )
