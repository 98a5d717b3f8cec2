"""What a benchmark measured: `Stats` over repetitions, per-variant `VariantMetrics`, and the whole `BenchResult`.

``BenchResult.to_json()`` is the format recorded in ``benchmarks/results/*.json`` (the ``result`` and
``memory_pass`` entries); ``BenchResult.from_dict`` reads those files back, including ones written before a field
with a default was added.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


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

    @classmethod
    def of_optional(cls, values: Sequence[float | None]) -> Stats | None:
        """None if any value is missing (a metric this platform or run could not measure)."""
        return None if any(value is None for value in values) else cls.of(values)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Stats | None:
        return None if data is None else cls(**data)


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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantMetrics:
        return cls(**{key: Stats.from_dict(value) for key, value in data.items()})


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator  # type: ignore[operator]


def median_ratio(numerator: Stats | None, denominator: Stats | None) -> float | None:
    """Ratio of two medians, None when either metric is missing."""
    return ratio(numerator.median if numerator else None, denominator.median if denominator else None)


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
    #: The method measured against the baseline: its record (`shortv.methods.Method.record`; ``{}`` in results
    #: written before methods were recorded, all ShortV). The ``shortv`` metrics are that method's.
    method: dict[str, Any] = field(default_factory=dict)

    @property
    def method_name(self) -> str:
        return self.method.get("method", "shortv")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not data["method"]:  # a result of before methods were recorded reads back as it was written
            del data["method"]
        return data

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> Path:
        """Write the JSON form atomically (a crash never leaves half a file)."""
        from ..files import atomic_write_text

        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchResult:
        """The inverse of `to_dict`; unknown keys (a newer writer) are an error, not silently dropped."""
        unknown = set(data) - {item.name for item in fields(cls)}
        if unknown:
            raise ValueError(f"not a BenchResult of this shortv version: unknown fields {sorted(unknown)}")
        values = dict(data)
        values["baseline"] = VariantMetrics.from_dict(data["baseline"])
        values["shortv"] = VariantMetrics.from_dict(data["shortv"])
        values["prefill_speedup_paired"] = Stats.from_dict(data["prefill_speedup_paired"])
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> BenchResult:
        return cls.from_dict(json.loads(Path(path).read_text()))
