"""Prefill alone, baseline vs ShortV: interleaved forwards of the prompt, eager or ``torch.compile``d.

Where `timing.benchmark` times whole ``generate`` calls, this times just what ``generate`` does first: one forward
over the prompt that fills the KV cache and computes the logits of the last position (``logits_to_keep=1``). On a
GPU each forward is timed with CUDA events, so nothing but the forward is in the number; on CPU with
``time.perf_counter``. Same interleaving (B S, S B, ...) after untimed warm-up rounds, which for a compiled model
also absorb the compilation of both variants (their first calls are timed separately, as ``compile_s``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..config import ShortVConfig
from .devices import Clock, model_device, model_dtype
from .inputs import BenchInputs
from .results import Stats
from .timing import Progress, interleaved, shortv_applied, variant_context


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_prefill(
    model: nn.Module,
    inputs: BenchInputs,
    config: ShortVConfig | Sequence[int],
    *,
    repeats: int = 10,
    warmup: int = 3,
    compile: bool = False,
    compile_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> PrefillTiming:
    """Median prefill time of baseline and ShortV on ``model`` (on its device, in its dtype). With ``compile``, the
    forward runs through ``torch.compile(model, **compile_options)``; ``warmup`` must then be at least 1."""
    if not isinstance(config, ShortVConfig):
        config = ShortVConfig(layers=list(config))
    if compile and warmup < 1:
        raise ValueError("a compiled prefill needs warmup >= 1: the first call of each variant compiles")
    device = model_device(model)
    inputs = inputs.to(device, model_dtype(model))
    model.eval()
    forward = torch.compile(model, **(compile_options or {})) if compile else model
    first_calls: dict[str, float] = {}

    def run(variant: str) -> float:
        clock = Clock(device)
        with variant_context(model, inputs, variant), torch.inference_mode():
            clock.mark()
            forward(**inputs.kwargs, use_cache=True, logits_to_keep=1)
            clock.mark()
        seconds = clock.seconds()[-1]
        first_calls.setdefault(variant, seconds)
        return seconds

    with shortv_applied(model, config):
        runs = interleaved(run, repeats, warmup, lambda seconds: f"prefill {seconds * 1e3:.2f} ms", progress)
    baseline, shortv = Stats.of(runs["baseline"]), Stats.of(runs["shortv"])
    return PrefillTiming(
        compiled=compile,
        baseline_s=baseline,
        shortv_s=shortv,
        speedup=baseline.median / shortv.median,
        speedup_paired=Stats.of([b / s for b, s in zip(runs["baseline"], runs["shortv"])]),
        repeats=repeats,
        warmup=warmup,
        compile_s=first_calls if compile else None,
    )
