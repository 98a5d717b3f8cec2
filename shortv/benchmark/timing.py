"""The harness: baseline vs ShortV on the same model, interleaved, each run one greedy ``generate`` call.

One measured run produces exactly ``new_tokens`` tokens per sample with the KV cache on. A logits processor marks
every step on a `Clock` (CUDA events on a GPU), so from a single call we get

* **TTFT** (time to first token): from the call until the logits of the first new token exist, i.e. the prefill
  forward (for a multimodal model: the vision encoder too) plus ``generate``'s small setup;
* **decode tokens/s**: ``batch * (new_tokens - 1)`` tokens over the time from the first to the last token;
* **end-to-end latency**: the whole ``generate`` call;
* **peak memory**: how far memory rose above its level at the start of the run (`PeakMemory`).

Baseline and the method (ShortV, or any of `shortv.methods`) always run on the *same* model object: the method is
applied once, and the baseline runs under its `Method.unpatched` (ShortV switched off with `disable_shortv`; FastV /
VTW removed, bit-exact, and applied again after the run, outside the timed call). Runs are interleaved and their
order alternates every repetition (B S, S B, B S, ...), so drift from thermal state or other processes on the
machine hits both alike. Every number is reported as median / min / max over the repetitions, after ``warmup``
untimed rounds of both.

The measured prefill speedup is reported beside the FLOPs-ideal one (`ideal.py`) for the model's own decoder dims
and the real per-sample token counts (padding counts as text, as the engine treats it). The vision encoder of a
multimodal model is not in the ideal (ShortV does not change it), so for such models the realized fraction is a
lower bound. ``realized = measured / ideal``.

Why not ``torch.utils.benchmark.Timer``: it times one statement at a time (so no timestamps inside a ``generate``
call), warms up again inside every ``timeit`` call (a multi-second run would be repeated three times to be timed
once, which breaks the B S / S B interleaving) and sets its own thread count. It is used where it fits, for the
device rates (`rates.py`).

CPU threads: on a machine shared with other processes, give torch only the cores that are actually free
(``threads``). With more threads than free cores, every short element-wise kernel waits at an OpenMP barrier for a
descheduled thread; that inflates both variants, and mostly the per-token work ShortV does not remove.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ..config import ShortVConfig
from ..cuda_graphs import compile_decoder, static_cache, uncompile_decoder
from ..flops import LayerDims
from ..methods import applied_config, coerce_config, method_of, without_method
from ..patch import using_visual_mask
from .devices import Clock, dtype_name, model_device, model_dtype, torch_threads
from .ideal import method_ideal_speedup
from .inputs import BenchInputs
from .machine import machine_info
from .memory import PeakMemory
from .results import BenchResult, Stats, VariantMetrics, median_ratio

Progress = Callable[[str], None]
VARIANTS = ("baseline", "shortv")
T = TypeVar("T")


def interleaved(
    run: Callable[[str], T], repeats: int, warmup: int, describe: Callable[[T], str], progress: Progress | None = None
) -> dict[str, list[T]]:
    """``run("baseline")`` and ``run("shortv")`` ``warmup`` times untimed, then ``repeats`` times each in the order
    B S, S B, B S, ...; returns the measured results per variant, index ``i`` of both from repetition ``i``."""
    for label, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if value < low:
            raise ValueError(f"{label} must be >= {low}, got {value}")
    say = progress or (lambda message: None)
    for index in range(warmup):
        for variant in VARIANTS:
            say(f"warm-up {index + 1}/{warmup} {variant}: {describe(run(variant))}")
    runs: dict[str, list[T]] = {variant: [] for variant in VARIANTS}
    for index in range(repeats):
        for variant in VARIANTS if index % 2 == 0 else VARIANTS[::-1]:
            runs[variant].append(result := run(variant))
            say(f"repeat {index + 1}/{repeats} {variant}: {describe(result)}")
    return runs


@contextmanager
def method_applied(model: nn.Module, config: Any) -> Iterator[None]:
    """Apply ``config`` (any method's, `shortv.methods`) for the block, then put back whatever method the model had
    before (a ShortV one switched off stays off)."""
    method = method_of(config)
    with without_method(model):
        method.apply(model, config)
        try:
            yield
        finally:
            method.remove(model)


def variant_context(model: nn.Module, inputs: BenchInputs, variant: str) -> ExitStack:
    """Inside `method_applied`: the unpatched model for the baseline (`shortv.methods.Method.unpatched`), else the
    method with the explicit visual mask if the inputs carry one."""
    stack = ExitStack()
    config = applied_config(model)
    if variant == "baseline":
        stack.enter_context(method_of(config).unpatched(model, config))
    elif inputs.explicit_mask:
        stack.enter_context(using_visual_mask(model, inputs.visual_mask))
    return stack


class _StepClock:
    """A logits processor that marks each generation step (called once per new token, after its forward)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.clock.mark()
        return scores


def pad_token_id(model: nn.Module) -> int:
    for config in (getattr(model, "generation_config", None), model.config, model.config.get_text_config()):
        for attribute in ("pad_token_id", "eos_token_id"):
            value = getattr(config, attribute, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return 0


@dataclass
class _Run:
    ttft_s: float
    decode_tokens_per_s: float | None
    e2e_s: float
    peak_memory_bytes: int | None
    peak_memory_total_bytes: int | None

    def describe(self) -> str:
        return f"TTFT {self.ttft_s:.3f}s, e2e {self.e2e_s:.3f}s"


def _run_once(model: nn.Module, inputs: BenchInputs, new_tokens: int, device: torch.device, cache=None) -> _Run:
    """One timed ``generate`` call; with ``cache`` (a static cache, reset first) instead of a fresh one."""
    from transformers import LogitsProcessorList

    extra = {}
    if cache is not None:
        cache.reset()
        extra["cache"] = cache
    clock = Clock(device)
    kwargs = dict(
        inputs.kwargs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # random or untrained weights must not stop early on EOS
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad_token_id(model),
        logits_processor=LogitsProcessorList([_StepClock(clock)]),
        **extra,
    )
    meter = PeakMemory(device)
    meter.start()
    clock.mark()
    with torch.inference_mode():
        output = model.generate(**kwargs)
    clock.mark()
    times = clock.seconds()  # [start, step 1, ..., step new_tokens, end]
    peak = meter.stop()
    generated = output.shape[1] - inputs.kwargs["input_ids"].shape[1]
    if len(times) != new_tokens + 2 or generated != new_tokens:
        raise RuntimeError(f"expected {new_tokens} generation steps, got {len(times) - 2} ({generated} tokens)")
    steps = times[1:-1]
    decode = inputs.batch_size * (new_tokens - 1) / (steps[-1] - steps[0]) if new_tokens > 1 else None
    return _Run(
        ttft_s=steps[0], decode_tokens_per_s=decode, e2e_s=times[-1], peak_memory_bytes=peak,
        peak_memory_total_bytes=meter.peak_total_bytes,
    )


def _variant_metrics(runs: list[_Run]) -> VariantMetrics:
    return VariantMetrics(
        ttft_s=Stats.of([run.ttft_s for run in runs]),
        decode_tokens_per_s=Stats.of_optional([run.decode_tokens_per_s for run in runs]),
        e2e_s=Stats.of([run.e2e_s for run in runs]),
        peak_memory_bytes=Stats.of_optional([run.peak_memory_bytes for run in runs]),
        peak_memory_total_bytes=Stats.of_optional([run.peak_memory_total_bytes for run in runs]),
    )


def benchmark(
    model: nn.Module,
    inputs: BenchInputs,
    config: Any,
    *,
    new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    name: str | None = None,
    source: str = "model",
    full_num_layers: int | None = None,
    layer_selection: str = "given",
    notes: Sequence[str] = (),
    threads: int | None = None,
    progress: Progress | None = None,
    cuda_graphs: bool = False,
    compile_options: dict | None = None,
) -> BenchResult:
    """Baseline vs a method on ``model`` (already on its device and in its dtype) with ready ``inputs``.

    ``config``: any method's config (`shortv.methods`: ShortV, FastV, VTW, ShortV + FastV...; a list of layers is
    ShortV); the result's ``shortv`` metrics are that method's, its ``method`` the method's record. The method is
    applied for the duration of the call and the model's previous method restored afterwards.
    ``threads`` sets torch's intra-op CPU threads for the call (default: leave as is). With ``cuda_graphs``, every
    ``generate`` runs the recipe of `shortv.cuda_graphs`: the decoder stack compiled by ``compile_decoder(model,
    **compile_options)`` and one static cache for prompt and new tokens, reset before each run (``warmup`` must
    then be at least 1: the first runs compile).
    """
    config = coerce_config(config)
    method = method_of(config)
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if cuda_graphs and warmup < 1:
        raise ValueError("generate with CUDA graphs needs warmup >= 1: the first run of each variant compiles")
    if cuda_graphs and method.name != "shortv":
        raise ValueError(f"the CUDA-graph benchmark runs ShortV only, not {method.name}")
    with torch_threads(threads):
        load_before = machine_info().get("load_average")
        device = model_device(model)
        inputs = inputs.to(device, model_dtype(model))
        model.eval()

        cache = None
        if cuda_graphs:
            compile_decoder(model, **(compile_options or {}))
            cache = static_cache(model, inputs.batch_size, int(inputs.visual_mask.shape[1]) + new_tokens)

        def run(variant: str) -> _Run:
            with variant_context(model, inputs, variant):
                return _run_once(model, inputs, new_tokens, device, cache)

        try:
            with method_applied(model, config):
                runs = interleaved(run, repeats, warmup, _Run.describe, progress)
        finally:
            if cuda_graphs:
                uncompile_decoder(model)
        machine = {**machine_info(device), "load_average_before": load_before}

    counts = inputs.token_counts()
    notes = list(notes)
    if cuda_graphs:
        notes.append(f"CUDA graphs: decoder stack compiled ({compile_options or 'mode=reduce-overhead'}), static cache")
    shortv = config if isinstance(config, ShortVConfig) else ShortVConfig(layers=config.shortv_layers)
    if shortv is config and not config.frozen_operators:
        notes.append("no ShortV layers: both variants compute the same thing")
    if shortv is config and config.operator_level:
        notes.append(f"operator-level: visual tokens skip only the attention in layers {config.attention_layers}, "
                     f"only the MLP in layers {config.mlp_layers}")
    if not any(v for _, v in counts):
        notes.append(f"the prompt has no visual tokens: {method.name} has nothing to freeze or prune")
    baseline, patched = _variant_metrics(runs["baseline"]), _variant_metrics(runs["shortv"])
    dims = LayerDims.from_config(model.config)
    measured = baseline.ttft_s.median / patched.ttft_s.median
    ideal = method_ideal_speedup(dims, counts, config, "exact")
    paired = [b.ttft_s / s.ttft_s for b, s in zip(runs["baseline"], runs["shortv"])]
    return BenchResult(
        model=name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        source=source,
        device=str(device),
        dtype=dtype_name(model_dtype(model)),
        batch_size=inputs.batch_size,
        text_tokens=[t for t, _ in counts],
        visual_tokens=[v for _, v in counts],
        new_tokens=new_tokens,
        repeats=repeats,
        warmup=warmup,
        num_layers=dims.num_layers,
        full_num_layers=full_num_layers,
        shortv_layers=list(shortv.layers),
        shortv_mode=shortv.mode,
        layer_selection=layer_selection,
        baseline=baseline,
        shortv=patched,
        prefill_speedup=measured,
        prefill_speedup_paired=Stats.of(paired),
        ideal_speedup=ideal,
        ideal_speedup_paper=method_ideal_speedup(dims, counts, config, "paper"),
        realized=measured / ideal,
        saved_time_realized=None if ideal <= 1.0 else (1 - 1 / measured) / (1 - 1 / ideal),
        decode_ratio=median_ratio(patched.decode_tokens_per_s, baseline.decode_tokens_per_s),
        e2e_speedup=baseline.e2e_s.median / patched.e2e_s.median,
        memory_ratio=median_ratio(patched.peak_memory_bytes, baseline.peak_memory_bytes),
        memory_method=PeakMemory(device).method,
        machine=machine,
        notes=notes,
        method=method.record(config),
    )
