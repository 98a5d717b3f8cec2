"""What prefill speedup to expect from ShortV, two ways, to put beside a measured one.

* **FLOPs-ideal** (`ideal_prefill_speedup`): dense over ShortV prefill FLOPs from `shortv.flops`. Assumes every FLOP
  runs at the same rate.
* **Roofline** (`roofline_prefill_speedup`): each matrix product of the prefill costs
  ``max(FLOPs / peak rate, weight bytes / memory bandwidth)`` on a device with the given `DeviceRates`. A ShortV
  layer's q/o/MLP products over a few text rows still read their whole weight, so on a GPU they are bound by
  bandwidth, not arithmetic: the roofline is what the FLOPs-ideal becomes once that is counted. Whatever else the
  FLOPs model counts (attention, QK-norm, a linear-attention mixer: no weights to read) costs its FLOPs at the peak
  rate; element-wise work it leaves out (norms, RoPE, activations) is left out here too. A batch is one product
  per projection: its rows are summed over the samples, its weight read once.

Both count the decoder layers `shortv.flops.layer_projections` describes, plus the LM head for the one position per
sample that ``generate`` computes in prefill; a new layer kind described there is costed here without changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..flops import LayerDims, layer_flops, layer_projections, model_flops, projection_rows


@dataclass(frozen=True)
class DeviceRates:
    """A device's dense matrix-product rate (FLOP/s, in the benchmark's dtype) and memory bandwidth (bytes/s)."""

    flops_per_s: float
    bytes_per_s: float

    def __post_init__(self) -> None:
        if self.flops_per_s <= 0 or self.bytes_per_s <= 0:
            raise ValueError(f"rates must be positive, got {self}")


def ideal_prefill_speedup(
    dims: LayerDims, token_counts: Sequence[tuple[int, int]], layers: Sequence[int], formula: str = "exact", *,
    attention_layers: Sequence[int] = (), mlp_layers: Sequence[int] = (),
) -> float:
    """Dense over ShortV prefill FLOPs summed over samples ``(t, v)``. "exact" adds the LM head for the one
    position ``generate`` computes in prefill; "paper" is the decoder stack only, as in the paper's tables.
    ``attention_layers`` / ``mlp_layers``: operator-level layers (`shortv.flops.model_flops`)."""
    head = formula == "exact"
    operators = dict(attention_layers=attention_layers, mlp_layers=mlp_layers)
    dense = sum(model_flops(dims, t, v, (), formula, include_lm_head=head) for t, v in token_counts)  # type: ignore[arg-type]
    sparse = sum(model_flops(dims, t, v, layers, formula, include_lm_head=head, **operators)  # type: ignore[arg-type]
                 for t, v in token_counts)
    return dense / sparse


def method_ideal_speedup(dims: LayerDims, token_counts: Sequence[tuple[int, int]], config: object,
                         formula: str = "exact") -> float:
    """`ideal_prefill_speedup` for any method's config (`shortv.methods`: ShortV, FastV, VTW, ShortV + FastV...):
    dense over the method's prefill FLOPs summed over samples ``(t, v)``, with the same LM head term."""
    from ..methods import method_of

    method = method_of(config)
    head = 2 * dims.hidden_size * dims.vocab_size if formula == "exact" else 0
    dense = sum(model_flops(dims, t, v, (), formula) + head for t, v in token_counts)  # type: ignore[arg-type]
    sparse = sum(method.prefill_flops(dims, t, v, config, formula) + head for t, v in token_counts)  # type: ignore[arg-type]
    return dense / sparse


def _product_seconds(rows: int, fan_in: int, fan_out: int, rates: DeviceRates, bytes_per_weight: float) -> float:
    """One ``(rows x fan_in) @ (fan_in x fan_out)`` product on the roofline."""
    compute = 2 * rows * fan_in * fan_out / rates.flops_per_s
    weights = fan_in * fan_out * bytes_per_weight / rates.bytes_per_s
    return max(compute, weights)


def roofline_layer_seconds(
    dims: LayerDims, token_counts: Sequence[tuple[int, int]], frozen: bool, rates: DeviceRates,
    bytes_per_weight: float = 2, layer: int | None = None,
) -> float:
    """One decoder layer (``layer``: which one, where layers differ) over a batch (per sample ``(t, v)``), dense or
    ShortV, on the roofline."""
    seconds, projection_flops = 0.0, 0
    for name, (fan_in, fan_out) in layer_projections(dims, layer).items():
        rows = sum(projection_rows(name, t, v, frozen) for t, v in token_counts)
        seconds += _product_seconds(rows, fan_in, fan_out, rates, bytes_per_weight)
        projection_flops += 2 * rows * fan_in * fan_out
    # Everything else the FLOPs model counts (attention, QK-norm, the linear-attention mixer) at the peak rate, so
    # that with unlimited bandwidth the roofline is exactly the FLOPs-ideal.
    other = sum(layer_flops(dims, t, v, frozen, "exact", layer) for t, v in token_counts) - projection_flops
    return seconds + other / rates.flops_per_s


def roofline_prefill_seconds(
    dims: LayerDims, token_counts: Sequence[tuple[int, int]], layers: Sequence[int], rates: DeviceRates,
    bytes_per_weight: float = 2,
) -> float:
    """The prefill of a batch with ``layers`` frozen (none: the dense model), LM head for one position per sample."""
    frozen = set(layers)
    bad = sorted(layer for layer in frozen if not 0 <= layer < dims.num_layers)
    if bad:
        raise ValueError(f"frozen layer indices {bad} out of range: valid layers are 0..{dims.num_layers - 1}")
    head = _product_seconds(len(token_counts), dims.hidden_size, dims.vocab_size, rates, bytes_per_weight)
    if not dims.uniform:  # layers differ: cost them one by one
        return head + sum(roofline_layer_seconds(dims, token_counts, index in frozen, rates, bytes_per_weight, index)
                          for index in range(dims.num_layers))
    per_layer = {
        flag: roofline_layer_seconds(dims, token_counts, flag, rates, bytes_per_weight) for flag in (False, True)
    }
    return len(frozen) * per_layer[True] + (dims.num_layers - len(frozen)) * per_layer[False] + head


def roofline_prefill_speedup(
    dims: LayerDims, token_counts: Sequence[tuple[int, int]], layers: Sequence[int], rates: DeviceRates,
    bytes_per_weight: float = 2,
) -> float:
    """Dense over ShortV prefill time on the roofline of a device with ``rates``."""
    dense = roofline_prefill_seconds(dims, token_counts, (), rates, bytes_per_weight)
    return dense / roofline_prefill_seconds(dims, token_counts, layers, rates, bytes_per_weight)
