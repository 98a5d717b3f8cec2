"""Measure ShortV against the unpatched model: time to first token, decode speed, end-to-end latency, peak memory.

One measured run is one greedy ``model.generate`` call with the KV cache on, producing exactly ``new_tokens``
tokens per sample. A logits processor timestamps every step, so from a single call we get

* **TTFT** (time to first token): from the call until the logits of the first new token exist, i.e. the prefill
  forward (for a multimodal model: the vision encoder too) plus ``generate``'s small setup;
* **decode tokens/s**: ``batch * (new_tokens - 1)`` tokens over the time from the first to the last token;
* **end-to-end latency**: the whole ``generate`` call;
* **peak memory**: how far memory rose above its level at the start of the run (see `PeakMemory`).

Baseline and ShortV always run on the *same* model object: ShortV is applied once and switched off with
`disable_shortv` for the baseline. Runs are interleaved and their order alternates every repetition
(B S, S B, B S, ...), so drift from thermal state or other processes on the machine hits both alike. Every
number is reported as median / min / max over the repetitions, after ``warmup`` untimed rounds of both.

The measured prefill speedup is reported beside the *FLOPs-ideal* speedup, from `shortv.flops` with the
``"exact"`` formula, the model's own decoder dims and the real per-sample token counts (padding counts as text,
as the engine treats it), plus the LM head for the one position ``generate`` computes in prefill. The vision
encoder of a multimodal model is not in the ideal (ShortV does not change it), so for such models the realized
fraction is a lower bound. ``realized = measured / ideal``.

CPU threads: on a machine shared with other processes, give torch only the cores that are actually free
(``threads``). With more threads than free cores, every short element-wise kernel waits at an OpenMP barrier for a
descheduled thread; that inflates both variants, and mostly the per-token work ShortV does not remove.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ShortVConfig
from .flops import LayerDims, get_shape, model_flops
from .patch import apply_shortv, disable_shortv, get_shortv_state, remove_shortv, using_visual_mask
from .registry import find_decoder_layers, visual_token_ids

__all__ = [
    "BenchInputs",
    "BenchResult",
    "PeakMemory",
    "Stats",
    "VariantMetrics",
    "bench_embedded",
    "bench_pretrained",
    "bench_shape",
    "benchmark",
    "default_shortv_config",
    "ideal_prefill_speedup",
    "machine_info",
    "multimodal_inputs",
    "paper_n",
    "shape_shortv_config",
    "summary_rows",
    "to_markdown",
]

Progress = Callable[[str], None]

#: Paper shape -> `ShortVConfig.from_preset` name of the checkpoint whose published layer order it reproduces.
SHAPE_PRESETS = {
    "llava-1.5-7b": "llava-1.5-7b",
    "llava-1.5-13b": "llava-1.5-13b",
    "next-7b": "llava-next-7b",
    "next-13b": "llava-next-13b",
}
#: The paper's N (number of ShortV layers) by model size: about 60% of the layers.
PAPER_N = {"7b": 19, "13b": 24}
#: Fraction of layers the paper freezes (19/32 for 7B), used when a model has no preset and no ``n``.
PAPER_FRACTION = 19 / 32
DEFAULT_PROMPT = "Describe this image in detail. What objects are there, what colors do they have and where are they?"


# ------------------------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Stats:
    """Median / min / max of repeated measurements (``values`` in measurement order)."""

    median: float
    min: float
    max: float
    values: list[float]

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        values = [float(v) for v in values]
        if not values:
            raise ValueError("Stats need at least one value")
        return cls(median=statistics.median(values), min=min(values), max=max(values), values=values)


@dataclass
class VariantMetrics:
    """One variant (baseline or ShortV) over all repetitions. Times in seconds, memory in bytes."""

    ttft_s: Stats
    #: None when ``new_tokens`` is 1 (nothing is decoded after the first token).
    decode_tokens_per_s: Stats | None
    e2e_s: Stats
    #: Rise of memory during the run (see `PeakMemory`); None when it cannot be measured on this platform.
    peak_memory_bytes: Stats | None
    #: Absolute peak during the run: whole-process RSS on CPU (weights included), allocated tensor bytes on CUDA.
    peak_memory_total_bytes: Stats | None = None


@dataclass
class BenchResult:
    """Everything one benchmark measured, with enough context to reproduce it. ``to_json()`` for storage."""

    model: str
    source: str  # "shape", "pretrained", "embedded" or "model" (a model object handed to `benchmark`)
    device: str
    dtype: str
    batch_size: int
    #: Per sample: tokens that ShortV layers update (text and padding) and visual tokens they freeze.
    text_tokens: list[int]
    visual_tokens: list[int]
    new_tokens: int
    repeats: int
    warmup: int
    num_layers: int
    #: Decoder layers of the architecture the model was cut from, when only a prefix runs (shape mode).
    full_num_layers: int | None
    shortv_layers: list[int]
    shortv_mode: str
    layer_selection: str
    baseline: VariantMetrics
    shortv: VariantMetrics
    #: median baseline TTFT / median ShortV TTFT.
    prefill_speedup: float
    #: baseline / ShortV TTFT of each repetition's pair (same repetition, adjacent runs).
    prefill_speedup_paired: Stats
    #: FLOPs-ideal prefill speedup ("exact" formula, decoder + LM head for one position).
    ideal_speedup: float
    #: The same with the paper's closed form (decoder only), for comparison with its tables.
    ideal_speedup_paper: float
    #: prefill_speedup / ideal_speedup.
    realized: float
    #: Share of the ideally saved prefill time that was actually saved: (1 - 1/measured) / (1 - 1/ideal).
    saved_time_realized: float | None
    #: median ShortV decode tokens/s over median baseline decode tokens/s (1.0 = same speed).
    decode_ratio: float | None
    #: median baseline e2e / median ShortV e2e.
    e2e_speedup: float
    #: median ShortV peak memory over median baseline peak memory.
    memory_ratio: float | None
    memory_method: str
    machine: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path


# ------------------------------------------------------------------------------------------------------------------
# machine, memory, timing
# ------------------------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_bytes() -> int | None:
    try:
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """CPU model, cores, torch threads, memory, load average, library versions, date (and the GPU on CUDA)."""
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": _total_memory_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        info["load_average"] = [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        pass
    device = torch.device(device)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 4096


def _rss_bytes() -> int | None:
    """Current resident set size of this process, from /proc (None elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _page_size()
    except (OSError, IndexError, ValueError):
        return None


def _hwm_bytes() -> int | None:
    """Peak resident set size since the last reset (VmHWM), kept by the kernel."""
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs). False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


_LIBC: Any = None


def _malloc_trim() -> None:
    """Give free heap memory back to the OS (glibc), so every run starts from the same floor."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


#: glibc tunable: with a fixed threshold, every block at least this large is its own mapping, returned to the OS
#: on free, so RSS follows live tensors instead of what the heap happens to retain.
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"


class PeakMemory:
    """How far memory rises above its level at ``start()`` until ``stop()`` (``peak_bytes``), and the absolute
    peak (``peak_total_bytes``: for a CPU run the whole process, weights included).

    * CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at start (tensors only, allocator-exact).
    * CPU (Linux): peak *process RSS* minus RSS at start. Before the run, garbage is collected and glibc's free
      heap is trimmed (``malloc_trim``) so each run starts from the same floor; the peak is the kernel's high-water
      mark (VmHWM, reset through ``/proc/self/clear_refs``), which misses nothing. Where that reset is not
      permitted, a thread samples RSS every millisecond instead (it can miss spikes shorter than that).
      RSS counts everything the process holds, including heap memory glibc keeps after frees; with its default
      dynamic mmap threshold that slack depends on the order of allocations and moves the delta by a few percent
      from run to run. Start the process with ``MALLOC_MMAP_THRESHOLD_=65536`` to make large blocks separate
      mappings returned on free: the RSS delta then follows live tensors to within a fraction of a MiB (at some
      cost in page faults, so time with the default allocator and measure memory in such a process).
    * Elsewhere: not measured (``peak_bytes`` is None).
    """

    def __init__(self, device: torch.device | str, sample_interval_s: float = 0.001) -> None:
        self.device = torch.device(device)
        self.sample_interval_s = sample_interval_s
        self.peak_bytes: int | None = None
        self.peak_total_bytes: int | None = None
        self._start: int | None = None
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0
        if self.device.type == "cuda":
            self.method = "cuda max_memory_allocated delta (tensor bytes)"
            return
        if _rss_bytes() is None:
            self.method = "unavailable (no /proc on this platform)"
            return
        self._use_hwm = _reset_hwm()
        how = "kernel VmHWM, reset per run" if self._use_hwm else "1 ms sampling thread"
        threshold = os.environ.get(MMAP_THRESHOLD_ENV)
        allocator = (
            f"{MMAP_THRESHOLD_ENV}={threshold}: large blocks returned on free, RSS follows live tensors"
            if threshold
            else "glibc default allocator: includes heap slack, a few % run to run"
        )
        self.method = f"process peak RSS delta ({how}; heap trimmed before; {allocator})"

    @property
    def available(self) -> bool:
        return not self.method.startswith("unavailable")

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return
        if not self.available:
            return
        _malloc_trim()
        if self._use_hwm:
            _reset_hwm()
            self._start = _rss_bytes()
            return
        self._start = self._sampled = _rss_bytes()  # type: ignore[assignment]
        self._stop.clear()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_interval_s):
            rss = _rss_bytes()
            if rss is not None and rss > self._sampled:
                self._sampled = rss

    def stop(self) -> int | None:
        peak: int | None
        if self._start is None:
            peak = None
        elif self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None
            peak = max(self._sampled, _rss_bytes() or 0)
        else:
            peak = _hwm_bytes()
        self.peak_total_bytes = peak
        self.peak_bytes = None if peak is None or self._start is None else max(peak - self._start, 0)
        return self.peak_bytes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock:
    """A logits processor that timestamps each generation step (called once per new token, after its forward)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


# ------------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class BenchInputs:
    """Ready ``generate`` inputs plus the prompt positions ShortV freezes.

    ``visual_mask`` (bool, batch x seq) is the ground truth used for the FLOPs count. With ``explicit_mask`` it is
    also handed to the model (bare ``*ForCausalLM``); otherwise the model derives it from its visual token ids.
    """

    kwargs: dict[str, Any]
    visual_mask: torch.Tensor
    explicit_mask: bool

    @classmethod
    def for_causal_lm(cls, input_ids: torch.Tensor, visual_mask: torch.Tensor) -> BenchInputs:
        if input_ids.shape != visual_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and visual_mask {tuple(visual_mask.shape)} differ")
        kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        return cls(kwargs=kwargs, visual_mask=visual_mask.bool(), explicit_mask=True)

    @classmethod
    def from_model_inputs(
        cls, model: nn.Module, inputs: dict[str, Any], visual_mask: torch.Tensor | None = None
    ) -> BenchInputs:
        """Inputs of a multimodal model (e.g. a processor's output). The mask comes from its visual token ids."""
        kwargs = dict(inputs)
        input_ids = kwargs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError("benchmark inputs need `input_ids`")
        if visual_mask is not None:
            return cls(kwargs=kwargs, visual_mask=visual_mask.bool(), explicit_mask=True)
        ids = visual_token_ids(model)
        if not ids:
            raise ValueError(
                f"{type(model).__name__} has no visual token ids in its config: pass `visual_mask=` explicitly"
            )
        mask = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
        return cls(kwargs=kwargs, visual_mask=mask, explicit_mask=False)

    @property
    def batch_size(self) -> int:
        return int(self.visual_mask.shape[0])

    def token_counts(self) -> list[tuple[int, int]]:
        """Per sample ``(t, v)``: updated tokens (text and padding) and frozen visual tokens of the prompt."""
        seq = int(self.visual_mask.shape[1])
        visual = self.visual_mask.sum(dim=1).tolist()
        return [(seq - int(v), int(v)) for v in visual]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> BenchInputs:
        """Tensors moved to ``device``; floating tensors (pixels) cast to ``dtype`` when given."""
        moved = {}
        for key, value in self.kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
            moved[key] = value
        return BenchInputs(kwargs=moved, visual_mask=self.visual_mask.to(device), explicit_mask=self.explicit_mask)


def _synthetic_image(size: tuple[int, int], seed: int = 0) -> Any:
    """A deterministic RGB noise image (timing does not depend on content)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[0], size[1], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), mode="RGB")


def _processor_image_size(processor: Any) -> tuple[int, int]:
    image_processor = getattr(processor, "image_processor", None)
    for attribute in ("crop_size", "size"):
        size = getattr(image_processor, attribute, None)
        if size is None:
            continue
        if isinstance(size, int):
            return size, size
        get = size.get if isinstance(size, dict) else lambda key, _s=size: getattr(_s, key, None)
        height, width = get("height"), get("width")
        if height and width:
            return int(height), int(width)
        shortest = get("shortest_edge")
        if shortest:
            return int(shortest), int(shortest)
    return 336, 336


def _prompt_text(processor: Any, prompt: str) -> str:
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", None) or "<image>"
    return f"{image_token}\n{prompt}"


def multimodal_inputs(
    model: nn.Module, processor: Any, batch_size: int = 1, prompt: str = DEFAULT_PROMPT, seed: int = 0
) -> BenchInputs:
    """One synthetic image and ``prompt`` per sample, through the model's own processor (chat template if any)."""
    size = _processor_image_size(processor)
    images = [_synthetic_image(size, seed + i) for i in range(batch_size)]
    texts = [_prompt_text(processor, prompt)] * batch_size
    encoded = processor(images=images, text=texts, return_tensors="pt", padding=True)
    return BenchInputs.from_model_inputs(model, dict(encoded))


# ------------------------------------------------------------------------------------------------------------------
# layer selection
# ------------------------------------------------------------------------------------------------------------------
def paper_n(name: str) -> int:
    """The paper's N for a shape: 19 for 7B, 24 for 13B (else about 60% of the layers)."""
    for size, n in PAPER_N.items():
        if name.endswith(size):
            return n
    return round(PAPER_FRACTION * get_shape(name).dims.num_layers)


def shape_shortv_config(
    name: str, num_layers: int | None = None, n: int | None = None, proportional: bool = False
) -> tuple[ShortVConfig, str]:
    """ShortV layers for a paper shape, run as its first ``num_layers`` layers; returns (config, explanation).

    Default: the paper's published order (first ``n`` entries; ``n`` defaults to 19 for 7B, 24 for 13B),
    restricted to the layers of the prefix. Shapes without a published order (Qwen2-VL) freeze the last ``n``
    layers of the full model (the paper finds the late layers least effective), also restricted to the prefix.

    ``proportional=True`` (with a prefix): freeze ``round(num_layers * n / L)`` layers so the prefix has the same
    share of ShortV layers as the full model; which ones does not matter for speed in shape mode (every layer has
    the same shape and the weights are random), so it takes the last ones of the prefix.
    """
    shape = get_shape(name)
    total = shape.dims.num_layers
    prefix = total if num_layers is None else num_layers
    if not 1 <= prefix <= total:
        raise ValueError(f"num_layers for {name!r} must be in 1..{total}, got {prefix}")
    if n is None:
        n = paper_n(name)
    if not 0 <= n <= total:
        raise ValueError(f"n for {name!r} must be in 0..{total}, got {n}")
    preset = SHAPE_PRESETS.get(name)
    if proportional and prefix < total:
        count = round(prefix * n / total)
        layers = list(range(prefix - count, prefix))
        note = (
            f"proportional: {count} of the first {prefix} layers frozen (the last ones), the share of N={n} in "
            f"{total} layers ({n / total:.0%}); all layers have the same shape, so which ones does not matter for speed"
        )
        provenance = {"shape": name, "n": n, "prefix": prefix, "policy": "proportional"}
        return ShortVConfig(layers=layers, provenance=provenance), note
    if preset is not None:
        full = ShortVConfig.from_preset(preset, n)
        order, source = full.layers, f"the paper's published order for {name} (preset {full.provenance['preset']})"
    else:
        order = list(range(total - 1, total - 1 - n, -1))
        source = f"no published order for {name}: the last N layers ({total - n}..{total - 1})"
    layers = [layer for layer in order if layer < prefix]
    note = f"N={n}, {source}"
    if prefix < total:
        note += f"; {len(layers)} of them fall in the first {prefix} layers"
    provenance = {"shape": name, "n": n, "prefix": prefix, "policy": "preset" if preset else "last-n"}
    return ShortVConfig(layers=layers, provenance=provenance), note


def default_shortv_config(model: nn.Module, n: int | None = None) -> tuple[ShortVConfig, str]:
    """ShortV layers for a model without a calibrated config: its published preset if its name has one, else the
    last ``n`` layers (default: the paper's share, 19/32 of the layers). Returns (config, explanation)."""
    from .config import PRESET_ALIASES, PRESET_LAYER_ORDERS

    total = len(find_decoder_layers(model))
    name = str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", ""))
    hub_ids = {**{hub: hub for hub in PRESET_LAYER_ORDERS}, **PRESET_ALIASES}
    for key, hub_id in hub_ids.items():
        if name.rstrip("/").endswith(key) and all(layer < total for layer in PRESET_LAYER_ORDERS[hub_id]):
            config = ShortVConfig.from_preset(hub_id, n)
            return config, f"published preset {hub_id} (N={len(config.layers)})"
    if n is None:
        n = max(1, round(PAPER_FRACTION * total))
    if not 0 <= n <= total:
        raise ValueError(f"n must be in 0..{total} for a model with {total} decoder layers, got {n}")
    layers = list(range(total - n, total))
    note = (
        f"no calibrated config: froze the last N={n} of {total} layers ({layers[0] if layers else '-'}..{total - 1}); "
        "pass a calibrated config for real use"
    )
    return ShortVConfig(layers=layers, provenance={"policy": "last-n", "n": n}), note


# ------------------------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------------------------
def ideal_prefill_speedup(
    dims: LayerDims, token_counts: Sequence[tuple[int, int]], layers: Sequence[int], formula: str = "exact"
) -> float:
    """Dense over ShortV prefill FLOPs summed over samples ``(t, v)``. "exact" adds the LM head for the one
    position ``generate`` computes in prefill; "paper" is the decoder stack only, as in the paper's tables."""
    head = formula == "exact"
    dense = sum(model_flops(dims, t, v, (), formula, include_lm_head=head) for t, v in token_counts)  # type: ignore[arg-type]
    sparse = sum(model_flops(dims, t, v, layers, formula, include_lm_head=head) for t, v in token_counts)  # type: ignore[arg-type]
    return dense / sparse


# ------------------------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------------------------
def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    parameter = next(model.parameters(), None)
    return parameter.dtype if parameter is not None else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _pad_token_id(model: nn.Module) -> int:
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


def _run_once(model: nn.Module, inputs: BenchInputs, new_tokens: int, device: torch.device) -> _Run:
    from transformers import LogitsProcessorList

    clock = _StepClock(device)
    kwargs = dict(
        inputs.kwargs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # random or untrained weights must not stop early on EOS
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=_pad_token_id(model),
        logits_processor=LogitsProcessorList([clock]),
    )
    meter = PeakMemory(device)
    meter.start()
    _synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**kwargs)
    _synchronize(device)
    end = time.perf_counter()
    peak = meter.stop()
    generated = output.shape[1] - inputs.kwargs["input_ids"].shape[1]
    if len(clock.times) != new_tokens or generated != new_tokens:
        raise RuntimeError(f"expected {new_tokens} generation steps, got {len(clock.times)} ({generated} tokens)")
    decode = None
    if new_tokens > 1:
        decode = inputs.batch_size * (new_tokens - 1) / (clock.times[-1] - clock.times[0])
    return _Run(
        ttft_s=clock.times[0] - start, decode_tokens_per_s=decode, e2e_s=end - start, peak_memory_bytes=peak,
        peak_memory_total_bytes=meter.peak_total_bytes,
    )


def _variant_metrics(runs: list[_Run]) -> VariantMetrics:
    decode = [run.decode_tokens_per_s for run in runs]
    memory = [run.peak_memory_bytes for run in runs]
    total = [run.peak_memory_total_bytes for run in runs]
    return VariantMetrics(
        ttft_s=Stats.of([run.ttft_s for run in runs]),
        decode_tokens_per_s=None if any(d is None for d in decode) else Stats.of(decode),  # type: ignore[arg-type]
        e2e_s=Stats.of([run.e2e_s for run in runs]),
        peak_memory_bytes=None if any(m is None for m in memory) else Stats.of(memory),  # type: ignore[arg-type]
        peak_memory_total_bytes=None if any(m is None for m in total) else Stats.of(total),  # type: ignore[arg-type]
    )


@contextmanager
def _shortv_applied(model: nn.Module, config: ShortVConfig) -> Iterator[None]:
    """Apply ``config`` for the block, then put back whatever ShortV state the model had before."""
    state = get_shortv_state(model)
    previous = (state.config, state.enabled) if state is not None else None
    apply_shortv(model, config)
    try:
        yield
    finally:
        remove_shortv(model)
        if previous is not None:
            apply_shortv(model, previous[0])
            get_shortv_state(model).enabled = previous[1]  # type: ignore[union-attr]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator  # type: ignore[operator]


def benchmark(
    model: nn.Module,
    inputs: BenchInputs,
    config: ShortVConfig | Sequence[int],
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
) -> BenchResult:
    """Baseline vs ShortV on ``model`` (already on its device and in its dtype) with ready ``inputs``.

    ShortV is applied for the duration of the call and the model's previous ShortV state restored afterwards.
    ``threads`` sets torch's intra-op CPU threads for the call (default: leave as is).
    """
    with _torch_threads(threads):
        return _benchmark(
            model, inputs, config, new_tokens=new_tokens, repeats=repeats, warmup=warmup, name=name, source=source,
            full_num_layers=full_num_layers, layer_selection=layer_selection, notes=notes, progress=progress,
        )


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _benchmark(
    model: nn.Module,
    inputs: BenchInputs,
    config: ShortVConfig | Sequence[int],
    *,
    new_tokens: int,
    repeats: int,
    warmup: int,
    name: str | None,
    source: str,
    full_num_layers: int | None,
    layer_selection: str,
    notes: Sequence[str],
    progress: Progress | None,
) -> BenchResult:
    if not isinstance(config, ShortVConfig):
        config = ShortVConfig(layers=list(config))
    for label, value, low in (("new_tokens", new_tokens, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if value < low:
            raise ValueError(f"{label} must be >= {low}, got {value}")
    say = progress or (lambda message: None)
    load_before = machine_info().get("load_average")
    device = _model_device(model)
    inputs = inputs.to(device, _model_dtype(model))
    model.eval()
    counts = inputs.token_counts()
    dims = LayerDims.from_config(model.config)
    notes = list(notes)
    if not config.layers:
        notes.append("no ShortV layers: both variants compute the same thing")
    if not any(v for _, v in counts):
        notes.append("the prompt has no visual tokens: ShortV layers have nothing to freeze")

    runs: dict[str, list[_Run]] = {"baseline": [], "shortv": []}
    paired: list[float] = []
    with _shortv_applied(model, config):

        def run(variant: str) -> _Run:
            mask: AbstractContextManager[Any] = (
                using_visual_mask(model, inputs.visual_mask) if inputs.explicit_mask else nullcontext()
            )
            switch: AbstractContextManager[Any] = disable_shortv(model) if variant == "baseline" else nullcontext()
            with mask, switch:
                return _run_once(model, inputs, new_tokens, device)

        for index in range(warmup):
            for variant in ("baseline", "shortv"):
                result = run(variant)
                say(f"warm-up {index + 1}/{warmup} {variant}: TTFT {result.ttft_s:.3f}s, e2e {result.e2e_s:.3f}s")
        for index in range(repeats):
            order = ("baseline", "shortv") if index % 2 == 0 else ("shortv", "baseline")
            pair = {}
            for variant in order:
                pair[variant] = result = run(variant)
                runs[variant].append(result)
                say(f"repeat {index + 1}/{repeats} {variant}: TTFT {result.ttft_s:.3f}s, e2e {result.e2e_s:.3f}s")
            paired.append(pair["baseline"].ttft_s / pair["shortv"].ttft_s)

    baseline, shortv = _variant_metrics(runs["baseline"]), _variant_metrics(runs["shortv"])
    measured = baseline.ttft_s.median / shortv.ttft_s.median
    ideal = ideal_prefill_speedup(dims, counts, config.layers, "exact")
    ideal_paper = ideal_prefill_speedup(dims, counts, config.layers, "paper")
    saved = None if ideal <= 1.0 else (1 - 1 / measured) / (1 - 1 / ideal)
    decode_ratio = _ratio(
        shortv.decode_tokens_per_s.median if shortv.decode_tokens_per_s else None,
        baseline.decode_tokens_per_s.median if baseline.decode_tokens_per_s else None,
    )
    memory_ratio = _ratio(
        shortv.peak_memory_bytes.median if shortv.peak_memory_bytes else None,
        baseline.peak_memory_bytes.median if baseline.peak_memory_bytes else None,
    )
    return BenchResult(
        model=name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        source=source,
        device=str(device),
        dtype=_dtype_name(_model_dtype(model)),
        batch_size=inputs.batch_size,
        text_tokens=[t for t, _ in counts],
        visual_tokens=[v for _, v in counts],
        new_tokens=new_tokens,
        repeats=repeats,
        warmup=warmup,
        num_layers=dims.num_layers,
        full_num_layers=full_num_layers,
        shortv_layers=list(config.layers),
        shortv_mode=config.mode,
        layer_selection=layer_selection,
        baseline=baseline,
        shortv=shortv,
        prefill_speedup=measured,
        prefill_speedup_paired=Stats.of(paired),
        ideal_speedup=ideal,
        ideal_speedup_paper=ideal_paper,
        realized=measured / ideal,
        saved_time_realized=saved,
        decode_ratio=decode_ratio,
        e2e_speedup=baseline.e2e_s.median / shortv.e2e_s.median,
        memory_ratio=memory_ratio,
        memory_method=PeakMemory(device).method,
        machine={**machine_info(device), "load_average_before": load_before},
        notes=notes,
    )


# ------------------------------------------------------------------------------------------------------------------
# entry points: shape mode, a checkpoint folder, the embedded tiny model
# ------------------------------------------------------------------------------------------------------------------
def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}
    try:
        return table[dtype.lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of bf16, fp32, fp16; got {dtype!r}") from None


def _resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available in this torch build/machine")
    return device


def _given(config: ShortVConfig) -> str:
    return "given config" + (f" ({config.provenance})" if config.provenance else "")


def _choose_config(
    model: nn.Module, config: ShortVConfig | None, n: int | None, folder: Path | None
) -> tuple[ShortVConfig, str]:
    """The given config; else ``shortv_config.json`` next to the checkpoint (when ``n`` is not given); else
    `default_shortv_config`."""
    if config is not None:
        return config, _given(config)
    saved = folder / "shortv_config.json" if folder is not None else None
    if n is None and saved is not None and saved.is_file():
        config = ShortVConfig.load(saved)
        return config, f"{saved} (N={len(config.layers)})"
    return default_shortv_config(model, n)


def bench_shape(
    name: str,
    *,
    num_layers: int | None = None,
    n: int | None = None,
    config: ShortVConfig | None = None,
    proportional: bool = False,
    visual_tokens: int | None = None,
    text_tokens: int = 64,
    batch_size: int = 1,
    new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "cpu",
    seed: int = 0,
    threads: int | None = None,
    progress: Progress | None = None,
) -> BenchResult:
    """Shape mode: a random-weight causal LM with a paper model's real dims (its first ``num_layers`` layers),
    ``batch_size`` prompts of ``text_tokens`` text tokens around one block of ``visual_tokens`` image tokens, and
    an explicit visual mask. ``visual_tokens`` defaults to the shape's own count (576 for LLaVA-1.5 and the
    Qwen2-VL shape, 2880 for LLaVA-NeXT's AnyRes grid). ``config`` overrides the layer selection of
    `shape_shortv_config`."""
    from .shapes import build_shape_model, make_token_layout

    if visual_tokens is None:
        visual_tokens = get_shape(name).visual_tokens

    torch_dtype, torch_device = _resolve_dtype(dtype), _resolve_device(device)
    full = get_shape(name).dims.num_layers
    if config is None:
        config, selection = shape_shortv_config(name, num_layers, n, proportional)
    else:
        selection = _given(config)
    say = progress or (lambda message: None)
    say(f"building {name} shape model ({num_layers or full} of {full} layers, {_dtype_name(torch_dtype)})")
    model = build_shape_model(name, num_layers=num_layers, dtype=torch_dtype, seed=seed).to(torch_device)
    layout = make_token_layout(batch_size, text_tokens, visual_tokens, vocab_size=model.config.vocab_size, seed=seed)
    inputs = BenchInputs.for_causal_lm(layout.input_ids, layout.visual_mask)
    label = f"{name} (shape{'' if num_layers in (None, full) else f', first {num_layers} layers'})"
    return benchmark(
        model, inputs, config, new_tokens=new_tokens, repeats=repeats, warmup=warmup, name=label, source="shape",
        full_num_layers=full, layer_selection=selection, threads=threads, progress=progress,
    )


def _is_multimodal_config(config: Any) -> bool:
    from transformers import AutoModelForImageTextToText

    mapping = getattr(AutoModelForImageTextToText, "_model_mapping", None)
    try:
        return mapping is not None and type(config) in mapping
    except Exception:  # noqa: BLE001 - lazy mapping lookups can raise for unknown configs
        return False


def bench_pretrained(
    path: str | Path,
    *,
    config: ShortVConfig | None = None,
    n: int | None = None,
    visual_tokens: int | None = None,
    text_tokens: int = 64,
    batch_size: int = 1,
    new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "cpu",
    prompt: str = DEFAULT_PROMPT,
    threads: int | None = None,
    progress: Progress | None = None,
) -> BenchResult:
    """A local checkpoint folder. Multimodal models (``AutoModelForImageTextToText``) get a synthetic image and
    ``prompt`` through their processor, which sets the token counts; a bare causal LM gets ``text_tokens`` random
    text ids around a block of ``visual_tokens`` (default 576) ids declared visual with an explicit mask."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    from .shapes import make_token_layout

    torch_dtype, torch_device = _resolve_dtype(dtype), _resolve_device(device)
    path = str(path)
    hf_config = AutoConfig.from_pretrained(path)
    if _is_multimodal_config(hf_config):
        if visual_tokens is not None:
            raise ValueError(
                f"{path} is a multimodal model: its processor decides how many visual tokens an image becomes, so "
                "visual_tokens (--visual-tokens) applies only to a bare causal LM or to shape mode"
            )
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype)
        try:
            processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"{path} holds a multimodal model but no usable processor: {error}") from error
        inputs = multimodal_inputs(model, processor, batch_size, prompt)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        vocab = model.config.get_text_config().vocab_size
        visual_tokens = 576 if visual_tokens is None else visual_tokens
        layout = make_token_layout(batch_size, text_tokens, visual_tokens, vocab_size=vocab)
        inputs = BenchInputs.for_causal_lm(layout.input_ids, layout.visual_mask)
    model = model.to(torch_device).eval()
    config, selection = _choose_config(model, config, n, Path(path))
    return benchmark(
        model, inputs, config, new_tokens=new_tokens, repeats=repeats, warmup=warmup, name=path,
        source="pretrained", layer_selection=selection, threads=threads, progress=progress,
    )


def load_embedded_model() -> tuple[nn.Module, Any]:
    """The embedded tiny LLaVA and its processor (`shortv.tiny.load_embedded`), with a clear error if missing."""
    try:
        from .tiny import load_embedded
    except ImportError as error:
        raise RuntimeError(
            f"the embedded tiny model (shortv.tiny.load_embedded) is not available in this install: {error}. "
            "Pass --model PATH or --shape NAME instead."
        ) from error
    try:
        return load_embedded()
    except (OSError, FileNotFoundError) as error:
        raise RuntimeError(
            f"the embedded tiny model could not be loaded: {error}. Pass --model PATH or --shape NAME instead."
        ) from error


def bench_embedded(
    *,
    config: ShortVConfig | None = None,
    n: int | None = None,
    batch_size: int = 1,
    new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    prompt: str = DEFAULT_PROMPT,
    threads: int | None = None,
    progress: Progress | None = None,
) -> BenchResult:
    """The embedded tiny LLaVA with a synthetic image."""
    torch_dtype, torch_device = _resolve_dtype(dtype), _resolve_device(device)
    model, processor = load_embedded_model()
    model = model.to(device=torch_device, dtype=torch_dtype).eval()
    inputs = multimodal_inputs(model, processor, batch_size, prompt)
    from .tiny import embedded_model_path

    config, selection = _choose_config(model, config, n, embedded_model_path())
    return benchmark(
        model, inputs, config, new_tokens=new_tokens, repeats=repeats, warmup=warmup, name="embedded tiny LLaVA",
        source="embedded", layer_selection=selection, threads=threads, progress=progress,
    )


# ------------------------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------------------------
def _fmt_stats(stats: Stats | None, scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
    if stats is None:
        return "n/a"
    return (
        f"{stats.median * scale:.{digits}f}{unit} "
        f"[{stats.min * scale:.{digits}f}-{stats.max * scale:.{digits}f}]"
    )


def _fmt_ratio(value: float | None, suffix: str = "x") -> str:
    return "n/a" if value is None else f"{value:.3f}{suffix}"


def summary_rows(result: BenchResult) -> list[tuple[str, str, str, str]]:
    """(metric, baseline, ShortV, ShortV vs baseline) rows, values as ``median [min-max]``."""
    mib = 1 / 2**20
    return [
        ("TTFT / prefill (s)", _fmt_stats(result.baseline.ttft_s), _fmt_stats(result.shortv.ttft_s),
         f"speedup {result.prefill_speedup:.3f}x"),
        ("decode (tokens/s)", _fmt_stats(result.baseline.decode_tokens_per_s, digits=2),
         _fmt_stats(result.shortv.decode_tokens_per_s, digits=2), f"{_fmt_ratio(result.decode_ratio)} of baseline"),
        ("end-to-end (s)", _fmt_stats(result.baseline.e2e_s), _fmt_stats(result.shortv.e2e_s),
         f"speedup {result.e2e_speedup:.3f}x"),
        ("peak memory rise (MiB)", _fmt_stats(result.baseline.peak_memory_bytes, mib, 1),
         _fmt_stats(result.shortv.peak_memory_bytes, mib, 1), f"{_fmt_ratio(result.memory_ratio)} of baseline"),
        ("peak memory total (MiB)", _fmt_stats(result.baseline.peak_memory_total_bytes, mib, 1),
         _fmt_stats(result.shortv.peak_memory_total_bytes, mib, 1), _fmt_ratio(_ratio(
             result.shortv.peak_memory_total_bytes.median if result.shortv.peak_memory_total_bytes else None,
             result.baseline.peak_memory_total_bytes.median if result.baseline.peak_memory_total_bytes else None,
         ), "x of baseline")),
    ]


def speedup_lines(result: BenchResult) -> list[str]:
    paired = result.prefill_speedup_paired
    saved = "n/a" if result.saved_time_realized is None else f"{result.saved_time_realized:.1%}"
    return [
        f"prefill speedup (measured, ratio of medians): {result.prefill_speedup:.3f}x "
        f"(per-repetition pairs: median {paired.median:.3f}x, {paired.min:.3f}-{paired.max:.3f})",
        f"FLOPs-ideal speedup (exact formula, model dims, t={_fmt_counts(result.text_tokens)}, "
        f"v={_fmt_counts(result.visual_tokens)}): {result.ideal_speedup:.3f}x "
        f"(paper formula: {result.ideal_speedup_paper:.3f}x)",
        f"realized: {result.realized:.1%} of the ideal speedup ({saved} of the ideally saved time)",
    ]


def _fmt_counts(counts: Sequence[int]) -> str:
    unique = sorted(set(counts))
    return str(unique[0]) if len(unique) == 1 else "/".join(map(str, counts))


def layers_line(result: BenchResult) -> str:
    prefix = (
        f"first {result.num_layers} of {result.full_num_layers} layers"
        if result.full_num_layers and result.full_num_layers != result.num_layers
        else f"{result.num_layers} layers"
    )
    return (
        f"{prefix}; ShortV layers ({len(result.shortv_layers)}, mode {result.shortv_mode}): "
        f"{sorted(result.shortv_layers)} - {result.layer_selection}"
    )


def to_markdown(result: BenchResult, title: str | None = None) -> str:
    """A self-contained markdown report: setup, machine, results table, speedup vs FLOPs-ideal."""
    machine = result.machine
    memory = machine.get("memory_total_bytes")
    lines = [f"## {title or result.model}", ""]
    lines += [
        f"- model: {result.model} ({result.source}), {result.dtype}, device {result.device}",
        f"- layers: {layers_line(result)}",
        f"- tokens per sample: {_fmt_counts(result.visual_tokens)} visual + {_fmt_counts(result.text_tokens)} text, "
        f"batch {result.batch_size}, {result.new_tokens} new tokens (greedy, KV cache)",
        f"- repetitions: {result.repeats} (after {result.warmup} warm-up), baseline/ShortV interleaved, "
        "order alternating; values are median [min-max]",
        f"- machine: {machine.get('cpu', '?')}, {machine.get('cpu_usable', '?')} usable cores "
        f"({machine.get('torch_threads', '?')} torch threads)"
        + (f", {memory / 2**30:.1f} GiB RAM" if memory else "")
        + (f", GPU {machine['gpu']}" if "gpu" in machine else "")
        + f"; torch {machine.get('torch', '?')}, transformers {machine.get('transformers', '?')}; "
        f"{machine.get('date', '?')}",
        f"- peak memory: {result.memory_method}",
        "",
        "| metric | baseline | ShortV | ShortV vs baseline |",
        "|---|---|---|---|",
    ]
    lines += [f"| {metric} | {base} | {short} | {ratio} |" for metric, base, short, ratio in summary_rows(result)]
    lines += [""] + [f"- {line}" for line in speedup_lines(result)]
    lines += [f"- note: {note}" for note in result.notes]
    return "\n".join(lines) + "\n"
