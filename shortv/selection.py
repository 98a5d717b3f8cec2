"""From Layer Contribution to a `ShortVConfig`: the N lowest-visual-LC layers, or as many as a FLOPs budget needs.

`check_matches_model` checks an LC file or a config against the model it is about to be used with.
"""

from __future__ import annotations

import numbers
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
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n <= lc.num_layers:
            raise ValueError(f"n must be in 0..{lc.num_layers} (the model's decoder layers), got {n!r}")
        n = int(n)
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


def _same_model(recorded: str, model_id: str) -> bool:
    """Same id, or the same name (a hub id ``owner/name`` and a local download ``.../name`` are one model)."""
    return recorded == model_id or Path(recorded.rstrip("/")).name == Path(model_id.rstrip("/")).name


def check_matches_model(
    source: LCResult | ShortVConfig, num_layers: int, model_id: str | None, where: str, allow_other_model: bool = False
) -> None:
    """Refuse an LC result or config made for another model: a different layer count always (its layer indices
    would mean other layers), a different model id unless ``allow_other_model``. ``where`` names the file."""
    if isinstance(source, LCResult):
        recorded_layers, recorded_id = source.num_layers, source.model_id
    else:
        order = source.provenance.get("order")
        recorded_layers = len(order) if isinstance(order, list) else None
        recorded_id = source.provenance.get("model_id") or source.provenance.get("preset")
        too_deep = [layer for layer in source.layers if layer >= num_layers]
        if too_deep:
            raise ValueError(f"{where}: layer(s) {too_deep} do not exist in {model_id} ({num_layers} decoder layers, "
                             f"0..{num_layers - 1}); was it made for another model?")
    if recorded_layers is not None and recorded_layers != num_layers:
        raise ValueError(f"{where} was made for a model with {recorded_layers} decoder layers ({recorded_id}), but "
                         f"{model_id} has {num_layers}; calibrate this model (shortv calibrate)")
    if recorded_id and model_id and not allow_other_model and not _same_model(str(recorded_id), str(model_id)):
        raise ValueError(f"{where} was made for {recorded_id}, not {model_id}; calibrate this model, or pass "
                         "--allow-other-model (allow_other_model=True) if the two are the same model")
