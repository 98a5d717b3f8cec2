"""Measure ShortV against the unpatched model: time to first token, decode speed, latency, peak memory, and the
speedup to expect. One job per module, in the order data flows:

==============  ====================================================================================================
``shapes``      random-weight causal LMs with a paper model's real dimensions, and their token layouts
``inputs``      `BenchInputs`: ready ``generate`` inputs plus the positions ShortV freezes
``layers``      which layers to freeze without a calibrated config (paper order, presets, last N)
``devices``     dtype/device names, CPU threads, a `Clock` (CUDA events on a GPU)
``memory``      `PeakMemory`: the CUDA allocator's peak, or the process's resident-set peak on CPU
``machine``     `machine_info`: where the numbers were taken
``timing``      the harness: interleaved baseline/ShortV ``generate`` runs, timed per step -> `BenchResult`
``prefill``     interleaved prefill forwards alone: eager, ``torch.compile``\\ d or CUDA graphs -> `PrefillTiming`
``ideal``       FLOPs-ideal and roofline speedups; ``rates`` measures a device's GEMM rate and bandwidth
``results``     `Stats`, `VariantMetrics`, `BenchResult` and their JSON
``report``      a result as terminal rows and markdown
``run``         entry points: `bench_shape`, `bench_pretrained`, `bench_embedded` (``shortv bench``)
==============  ====================================================================================================
"""

from .ideal import DeviceRates, ideal_prefill_speedup, roofline_prefill_seconds, roofline_prefill_speedup
from .inputs import DEFAULT_PROMPT, BenchInputs, causal_lm_inputs, multimodal_inputs
from .layers import default_shortv_config, paper_n, pruning_beside, shape_shortv_config
from .machine import machine_info
from .memory import MMAP_THRESHOLD_ENV, PeakMemory
from .prefill import PrefillTiming, time_prefill
from .rates import measure_rates
from .report import layers_line, speedup_lines, summary_rows, to_markdown
from .results import BenchResult, Stats, VariantMetrics
from .run import bench_embedded, bench_pretrained, bench_shape
from .timing import benchmark

__all__ = [
    "DEFAULT_PROMPT",
    "MMAP_THRESHOLD_ENV",
    "BenchInputs",
    "BenchResult",
    "DeviceRates",
    "PeakMemory",
    "PrefillTiming",
    "Stats",
    "VariantMetrics",
    "bench_embedded",
    "bench_pretrained",
    "bench_shape",
    "benchmark",
    "causal_lm_inputs",
    "default_shortv_config",
    "ideal_prefill_speedup",
    "layers_line",
    "machine_info",
    "measure_rates",
    "multimodal_inputs",
    "paper_n",
    "roofline_prefill_seconds",
    "roofline_prefill_speedup",
    "pruning_beside",
    "shape_shortv_config",
    "speedup_lines",
    "summary_rows",
    "time_prefill",
    "to_markdown",
]
