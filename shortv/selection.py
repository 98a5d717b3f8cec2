"""From Layer Contribution to a `ShortVConfig`: the N lowest-visual-LC layers, or as many as a FLOPs budget needs;
`select_operators` chooses attention and MLP updates one by one, by per-operator LC per FLOP saved.

`check_matches_model` checks an LC file or a config against the model it is about to be used with.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from .config import ShortVConfig
from .contribution import OPERATOR_TOKEN_TYPES, LCResult
from . import flops as flops_model
from .fingerprint import WeightsFingerprint, describe_difference, warn
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
    if lc.weights is not None:
        provenance["weights"] = lc.weights.to_dict()
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


def operator_order(
    lc: LCResult, dims: LayerDims, text_tokens: int = 64, visual_tokens: int = 576, formula: str = "exact"
) -> list[tuple[int, str, float, int]]:
    """(layer, operator, mean LC, FLOPs saved) of every operator that saves FLOPs, by ascending LC per FLOP saved
    (ties: lower layer, then attention before MLP)."""
    missing = [token_type for token_type in OPERATOR_TOKEN_TYPES if token_type not in lc.per_sample]
    if missing:
        raise ValueError(f"this LC result has no per-operator LC ({', '.join(missing)}); calibrate with "
                         "`shortv calibrate --operators` (token_types including visual_attention, visual_mlp)")
    if dims.num_layers != lc.num_layers:
        raise ValueError(f"dims describe {dims.num_layers} layers but the LC result has {lc.num_layers}")
    means = lc.mean
    candidates = []
    for token_type, operator in OPERATOR_TOKEN_TYPES.items():
        for layer in range(lc.num_layers):
            saving = flops_model.operator_saving(dims, text_tokens, visual_tokens, layer, operator, formula)
            if saving > 0:
                candidates.append((layer, operator, means[token_type][layer], saving))
    rank = {operator: index for index, operator in enumerate(flops_model.OPERATORS)}
    return sorted(candidates, key=lambda c: (c[2] / c[3], c[0], rank[c[1]]))


def operator_config_fields(chosen: list[tuple[int, str]]) -> dict[str, list[int]]:
    """``layers`` (both updates chosen), ``attention_layers`` and ``mlp_layers`` of a set of (layer, operator)."""
    by_layer: dict[int, set[str]] = {}
    for layer, operator in chosen:
        by_layer.setdefault(layer, set()).add(operator)
    fields: dict[str, list[int]] = {"layers": [], "attention_layers": [], "mlp_layers": []}
    for layer, operators in by_layer.items():  # first-chosen order, like an LC order
        key = "layers" if len(operators) == 2 else f"{next(iter(operators))}_layers"
        fields[key].append(layer)
    return fields


def select_operators(
    lc: LCResult | str | Path,
    n: int | None = None,
    *,
    flops_ratio: float | None = None,
    dims: LayerDims | Any,
    text_tokens: int = 64,
    visual_tokens: int = 576,
    formula: str = "exact",
    mode: str = "fast",
) -> ShortVConfig:
    """Operator-level selection: the first ``n`` operators of `operator_order`, or greedily as many as bring the
    prefill FLOPs ratio to ``flops_ratio`` or below (it overshoots the target by less than the last operator's
    saving). Needs per-operator LC and ``dims`` (a `LayerDims` or a model config); a layer whose two updates are
    both chosen becomes a ShortV layer."""
    lc_path = None
    if not isinstance(lc, LCResult):
        lc_path = str(lc)
        lc = LCResult.load(lc)
    if (n is None) == (flops_ratio is None):
        raise ValueError("give exactly one of n= or flops_ratio=")
    if not isinstance(dims, LayerDims):
        dims = LayerDims.from_config(dims)
    order = operator_order(lc, dims, text_tokens, visual_tokens, formula)

    def ratio(count: int) -> float:
        fields = operator_config_fields([(layer, operator) for layer, operator, _, _ in order[:count]])
        return flops_model.flops_ratio(dims, text_tokens, visual_tokens, fields["layers"], formula,
                                       attention_layers=fields["attention_layers"], mlp_layers=fields["mlp_layers"])

    if n is not None:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n <= len(order):
            raise ValueError(f"n must be in 0..{len(order)} (the model's operators), got {n!r}")
        count = int(n)
    else:
        if not 0.0 < float(flops_ratio) <= 1.0:
            raise ValueError(f"flops_ratio must be in (0, 1], got {flops_ratio!r}")
        count = next((count for count in range(len(order) + 1) if ratio(count) <= flops_ratio), None)
        if count is None:
            raise ValueError(f"flops_ratio {flops_ratio} is below what freezing every operator reaches "
                             f"({ratio(len(order)):.3f}) for t={text_tokens}, v={visual_tokens}")
    chosen = [(layer, operator) for layer, operator, _, _ in order[:count]]
    provenance: dict[str, Any] = {
        "lc": lc_path, "model_id": lc.model_id, "order": lc.order, "selection": "operators",
        "operator_order": [[layer, operator] for layer, operator, _, _ in order], "n_operators": count,
        "flops_ratio": ratio(count), "formula": formula, "text_tokens": text_tokens, "visual_tokens": visual_tokens,
    }
    if flops_ratio is not None:
        provenance["flops_ratio_target"] = float(flops_ratio)
    if lc.weights is not None:
        provenance["weights"] = lc.weights.to_dict()
    return ShortVConfig(mode=mode, provenance=provenance, **operator_config_fields(chosen))


def _same_name(recorded: str, model_id: str) -> bool:
    """Same id, or the same last name (a preset's hub id ``owner/name`` and a local download ``.../name``)."""
    return recorded == model_id or Path(recorded.rstrip("/")).name == Path(model_id.rstrip("/")).name


def check_matches_model(
    source: LCResult | ShortVConfig, num_layers: int, model_id: str | None, where: str, allow_other_model: bool = False,
    weights: WeightsFingerprint | None = None,
) -> None:
    """Refuse an LC result or config made for another model. A different layer count always (its layer indices
    would mean other layers). Other weights (`shortv.fingerprint`, against the model's ``weights``) unless
    ``allow_other_model``, which warns with both identities. A file without a fingerprint: a preset is matched by
    its hub name; a file of an older shortv by its recorded model id (its last name), with one warning that its
    weights cannot be checked; a hand-written config (no model recorded) is taken as it is. Fingerprints of
    different kinds (hub, files, memory) cannot be compared: one warning. ``where`` names the file."""
    if isinstance(source, LCResult):
        recorded_layers, recorded_id, preset = source.num_layers, source.model_id, None
        recorded_weights = source.weights
    else:
        order = source.provenance.get("order")
        recorded_layers = len(order) if isinstance(order, list) else None
        preset = source.provenance.get("preset")
        recorded_id, recorded_weights = source.provenance.get("model_id") or preset, source.weights
        too_deep = [layer for layer in source.frozen_operators if layer >= num_layers]  # layers first, in order
        if too_deep:
            raise ValueError(f"{where}: layer(s) {too_deep} do not exist in {model_id} ({num_layers} decoder layers, "
                             f"0..{num_layers - 1}); was it made for another model?")
    if recorded_layers is not None and recorded_layers != num_layers:
        raise ValueError(f"{where} was made for a model with {recorded_layers} decoder layers ({recorded_id}), but "
                         f"{model_id} has {num_layers}; calibrate this model (shortv calibrate)")
    if recorded_weights is not None and weights is not None:
        if recorded_weights.digest == weights.digest:
            return
        identities = (f"made for {recorded_id} ({recorded_weights.label()}), used with {model_id} "
                      f"({weights.label()})")
        if recorded_weights.kind != weights.kind:
            warn(f"{where}: {identities}: cannot check that these are the same weights")
        elif allow_other_model:
            warn(f"{where}: {identities}, other weights accepted by --allow-other-model "
                 f"({describe_difference(recorded_weights, weights)})")
        else:
            raise ValueError(f"{where} was made for other weights: {identities} "
                             f"({describe_difference(recorded_weights, weights)}); calibrate this model, or pass "
                             "--allow-other-model (allow_other_model=True) to use it anyway")
        return
    if recorded_id and model_id and not allow_other_model and not _same_name(str(recorded_id), str(model_id)):
        raise ValueError(f"{where} was made for {recorded_id}, not {model_id}; calibrate this model, or pass "
                         "--allow-other-model (allow_other_model=True) if the two are the same model")
    if recorded_id and recorded_weights is None and preset is None and weights is not None:
        warn(f"{where} records no weights fingerprint (written by an older shortv): cannot check that it was made "
             f"for the weights of {model_id}")
