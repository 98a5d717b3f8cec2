"""lmms-eval model arguments -> the method config they ask for (``shortv_config``, ``n``/``lc``/``preset``,
``shortv_mode``, ``method``/``k``/``ratio``/``rank``). Plain functions, importable without lmms-eval; the model
classes in `shortv.integrations.lmms_eval` call them. See that module's docstring for the arguments."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import MODES, PRESET_ALIASES, PRESET_LAYER_ORDERS, ShortVConfig
from ..methods import load_config, plan_runs

_NONE_VALUES = ("", "none", "null", "baseline")


def is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_VALUES)


def resolve_shortv_config(
    pretrained: str | None = None,
    shortv_config: str | Path | ShortVConfig | None = None,
    n: int | None = None,
    lc: str | Path | None = None,
    preset: str | None = None,
    shortv_mode: str | None = None,
) -> ShortVConfig | None:
    """The ShortV config the model arguments ask for, or None for the unmodified model (see the module docstring)."""
    shortv_config = None if is_none(shortv_config) else shortv_config
    lc = None if is_none(lc) else lc
    preset = None if is_none(preset) else preset
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be a non-negative integer (number of layers to freeze), got {n!r}")
    if shortv_config is not None and (n is not None or lc is not None or preset is not None):
        raise ValueError("give either shortv_config= or n= with lc= / preset=, not both")
    if lc is not None and preset is not None:
        raise ValueError("give either lc= (your Layer Contribution file) or preset= (a published order), not both")

    config: Any
    if shortv_config is not None:  # a config file of any method (`shortv.methods.load_config`)
        config = shortv_config if not isinstance(shortv_config, (str, Path)) else load_config(shortv_config)
    elif lc is not None:
        if n is None:
            raise ValueError("lc= needs n= (how many of the lowest-LC layers to freeze), e.g. n=19,lc=lc.json")
        from ..selection import select_layers

        config = select_layers(lc, n=n)
    elif n is not None or preset is not None:
        name = preset if preset is not None else (None if pretrained is None else str(pretrained))
        hub_id = PRESET_ALIASES.get(name, name) if name is not None else None
        if hub_id in PRESET_LAYER_ORDERS:
            config = ShortVConfig.from_preset(hub_id, n=n)
        elif n == 0:
            config = ShortVConfig(layers=[], provenance={"n": 0})
        else:
            known = ", ".join(sorted(PRESET_LAYER_ORDERS) + sorted(PRESET_ALIASES))
            raise ValueError(
                f"n={n} needs lc= (a Layer Contribution file from `shortv calibrate`) or a published preset; "
                f"{name!r} is not one (presets: {known}). Or give shortv_config= (from `shortv select`)."
            )
    else:
        config = None

    if not is_none(shortv_mode):
        if shortv_mode not in MODES:
            raise ValueError(f"shortv_mode must be one of {MODES}, got {shortv_mode!r}")
        if config is not None and not isinstance(config, ShortVConfig):
            raise ValueError("shortv_mode applies to a ShortV config; this shortv_config is a token pruning config")
        if config is not None:
            config = replace(config, mode=shortv_mode)
    return config


def resolve_method_config(
    config: Any, method: str | None = None, k: int | None = None, ratio: float | None = None, rank: str | None = None,
) -> Any:
    """The config of ``method`` (``fastv``, ``vtw``, ``shortv+fastv``...: `shortv.methods`) with ``k``/``ratio``/
    ``rank``, whose ShortV part is ``config`` (from `resolve_shortv_config`); ``config`` itself without a method."""
    method = None if is_none(method) else str(method)
    if method is None and (k, ratio, rank) == (None, None, None):
        return config
    if config is not None and not isinstance(config, ShortVConfig):
        raise ValueError("give either method= or a token pruning shortv_config=, not both")
    run = plan_runs([method] if method is not None else [], shortv=config, k=k, ratio=ratio, rank=rank)[0]
    if config is not None and "layers" not in run.method.parameters:
        raise ValueError(f"method={run.method.name} takes no ShortV layers; drop shortv_config / n / lc / preset, or "
                         f"use method=shortv+{run.method.name}")
    return run.config
