"""From Layer Contribution to a `ShortVConfig`: the N lowest-visual-LC layers, or as many as a FLOPs budget needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ShortVConfig
from .contribution import LCResult
from . import flops as flops_model
from .flops import LayerDims


def select_layers(
    lc: LCResult | str | Path,
    n: int | None = None,
    *,
    flops_ratio: float | None = None,
    dims: LayerDims | Any | None = None,
    text_tokens: int = 64,
    visual_tokens: int = 576,
    formula: str = "exact",
    mode: str = "fast",
) -> ShortVConfig:
    """Freeze the first ``n`` layers of the LC order, or the fewest whose prefill FLOPs ratio is <= the target.

    ``flops_ratio`` needs ``dims`` (a `LayerDims` or a model config) and the token
    counts of a typical input. The returned config records its provenance (LC file, n, ratio).
    """
    lc_path = None
    if not isinstance(lc, LCResult):
        lc_path = str(lc)
        lc = LCResult.load(lc)
    target = flops_ratio
    if (n is None) == (target is None):
        raise ValueError("give exactly one of n= or flops_ratio=")
    order = lc.order
    provenance: dict[str, Any] = {"lc": lc_path, "model_id": lc.model_id, "order": order}
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= lc.num_layers:
            raise ValueError(f"n must be in 0..{lc.num_layers} (the model's decoder layers), got {n!r}")
    else:
        if not 0.0 < float(target) <= 1.0:
            raise ValueError(f"flops_ratio must be in (0, 1], got {target!r}")
        if dims is None:
            raise ValueError("flops_ratio= needs dims= (a LayerDims or the model config) to compute FLOPs")
        if not isinstance(dims, LayerDims):
            dims = LayerDims.from_config(dims)
        if dims.num_layers != lc.num_layers:
            raise ValueError(f"dims describe {dims.num_layers} layers but the LC result has {lc.num_layers}")
        ratios = [
            flops_model.flops_ratio(dims, text_tokens, visual_tokens, order[:count], formula=formula)
            for count in range(lc.num_layers + 1)
        ]
        reachable = [count for count, ratio in enumerate(ratios) if ratio <= target]
        if not reachable:
            raise ValueError(
                f"flops_ratio {target} is below what freezing every layer reaches ({ratios[-1]:.3f}) "
                f"for t={text_tokens}, v={visual_tokens}"
            )
        n = reachable[0]
        provenance.update(flops_ratio_target=float(target), flops_ratio=ratios[n], formula=formula,
                          text_tokens=text_tokens, visual_tokens=visual_tokens)
    provenance["n"] = n
    return ShortVConfig(layers=order[:n], mode=mode, provenance=provenance)
