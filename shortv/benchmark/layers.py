"""Which layers a benchmark freezes when no calibrated config is given: the paper's published order for a paper
shape, a model's published preset, or the last N layers; each choice comes with a sentence saying what was done."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..config import PRESET_ALIASES, PRESET_LAYER_ORDERS, ShortVConfig
from ..flops import get_shape
from ..registry import find_decoder_layers

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


def paper_n(name: str) -> int:
    """The paper's N for a shape: 19 for 7B, 24 for 13B (else about 60% of the layers)."""
    for size, n in PAPER_N.items():
        if name.rsplit("-", 1)[-1] == size:  # "qwen3.6-27b" is not a 7B model
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
    the same shape and the weights are random), so it takes the last ones of the prefix. Where layers differ in
    kind (linear/full attention), the frozen layers are shared out among the kinds in proportion to their counts in
    the prefix (largest remainder, ties to the kind with fewer frozen), the last ones of each kind.
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
        kinds = shape.dims.layer_kinds[:prefix]
        if len(set(kinds)) == 1:
            layers = list(range(prefix - count, prefix))
            note = (f"proportional: {count} of the first {prefix} layers frozen (the last ones), the share of N={n} "
                    f"in {total} layers ({n / total:.0%}); all layers have the same shape, so which ones does not "
                    "matter for speed")
        else:
            layers = _apportioned(kinds, count)
            mix = ", ".join(f"{sum(kinds[i] == kind for i in layers)} {kind}" for kind in sorted(set(kinds)))
            note = (f"proportional: {count} of the first {prefix} layers frozen, the share of N={n} in {total} layers "
                    f"({n / total:.0%}), shared out by layer kind ({mix}; the last ones of each kind)")
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


def _apportioned(kinds: Sequence[str], count: int) -> list[int]:
    """``count`` layer indices, split among the kinds of ``kinds`` in proportion to how many layers each has."""
    members = {kind: [i for i, k in enumerate(kinds) if k == kind] for kind in dict.fromkeys(kinds)}
    quota = {kind: len(indices) * count / len(kinds) for kind, indices in members.items()}
    share = {kind: int(q) for kind, q in quota.items()}
    for _ in range(count - sum(share.values())):
        kind = max(members, key=lambda k: (quota[k] - share[k], -share[k]))
        share[kind] += 1
    return sorted(i for kind, indices in members.items() for i in indices[len(indices) - share[kind]:])


def default_shortv_config(model: nn.Module, n: int | None = None) -> tuple[ShortVConfig, str]:
    """ShortV layers for a model without a calibrated config: its published preset if its name has one, else the
    last ``n`` layers (default: the paper's share, 19/32 of the layers). Returns (config, explanation)."""
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


def with_method(
    config: Any, selection: str, num_layers: int, method: str | None = None, k: int | None = None,
    ratio: float | None = None, rank: str | None = None, given: bool = False,
) -> tuple[Any, str]:
    """The config a benchmark measures: ``config`` (chosen above, or ``given`` by the caller: any method's) when no
    ``method`` spec is given, else the spec's (``fastv``, ``fastv:k=2,ratio=0.5``, ``shortv+fastv``...:
    `shortv.methods.plan`), whose ShortV part, if any, is ``config``'s layers. Every parameter is checked against
    ``num_layers`` decoder layers."""
    from ..methods import method_of, plan_runs

    if method is None and (k, ratio, rank) == (None, None, None):
        method_of(config).check(config, num_layers)
        return config, selection
    if not isinstance(config, ShortVConfig):
        raise ValueError("give either --method or a token pruning --config, not both")
    run = plan_runs([method] if method is not None else [], shortv=config, k=k, ratio=ratio, rank=rank)[0]
    run.method.check(run.config, num_layers)
    if given and "layers" not in run.method.parameters:
        raise ValueError(f"{run.method.name} takes no ShortV layers, but a ShortV config was given; drop it, or "
                         f"measure shortv+{run.method.name}")
    if "layers" in run.method.parameters:
        return run.config, f"{run.describe()}; ShortV layers: {selection}"
    return run.config, run.describe()


def pruning_beside(shortv: ShortVConfig, num_layers: int, full_layers: int, dims: Any, t: int, v: int,
                   ratio: float = 0.5) -> dict[str, Any]:
    """FastV, VTW and ShortV + FastV configs to time beside ``shortv`` on a shape model run as ``num_layers`` of its
    ``full_layers`` decoder layers: a prefix keeps the cost per layer, so what matters is the share of layers each
    method touches. FastV: K = ``max(1, round(num_layers * 2 / full_layers))`` (the paper's K = 2 of 32), R =
    ``ratio``; VTW: the K whose prefill FLOPs (`shortv.flops_pruning.vtw_ratio`, at ``t`` text and ``v`` visual
    tokens of ``dims``) are nearest ShortV's; ShortV + FastV: ``shortv``'s layers with FastV's K and R."""
    from ..flops_pruning import vtw_ratio
    from ..methods import get_method

    k = max(1, round(num_layers * 2 / full_layers))
    target = get_method("shortv").flops_ratio(dims, t, v, shortv)
    vtw_k = min(range(1, num_layers), key=lambda kk: abs(vtw_ratio(dims, t, v, kk) - target))
    return {
        "fastv": get_method("fastv").build(k=k, ratio=ratio),
        "vtw": get_method("vtw").build(k=vtw_k),
        "shortv+fastv": get_method("shortv+fastv").build(layers=shortv, k=k, ratio=ratio),
    }


def given_note(config: ShortVConfig) -> str:
    """How a config handed in by the caller is described in results."""
    return "given config" + (f" ({config.provenance})" if config.provenance else "")


def choose_config(
    model: nn.Module, config: ShortVConfig | None, n: int | None, folder: Path | None
) -> tuple[ShortVConfig, str]:
    """The given config; else ``shortv_config.json`` next to the checkpoint (when ``n`` is not given); else
    `default_shortv_config`."""
    if config is not None:
        return config, given_note(config)
    saved = folder / "shortv_config.json" if folder is not None else None
    if n is None and saved is not None and saved.is_file():
        config = ShortVConfig.load(saved)
        return config, f"{saved} (N={len(config.layers)})"
    return default_shortv_config(model, n)
