"""The methods by name, which method a config belongs to, and one loader for any config file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import ShortVConfig
from ..files import read_json
from ..pruning import TokenPruningConfig
from .base import Method
from .fastv import FastV
from .shortv import ShortV
from .shortv_pruning import ShortVFastV, ShortVVTW
from .vtw import VTW

#: Every method the harness runs, by the name ``--method`` and the records use.
METHODS: dict[str, Method] = {method.name: method for method in (ShortV(), FastV(), VTW(), ShortVFastV(), ShortVVTW())}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def method_of(config: Any) -> Method:
    """The method a config belongs to (a list of layer indices is a ShortV config)."""
    for method in METHODS.values():
        if method.matches(config):
            return method
    raise TypeError(f"not a method config: {type(config).__name__} (expected a ShortVConfig or a TokenPruningConfig)")


def coerce_config(config: Any) -> Any:
    """A method config as is; a list of layer indices as a ShortVConfig."""
    if isinstance(config, (ShortVConfig, TokenPruningConfig)):
        return config
    return ShortVConfig.coerce(config)


def config_from_dict(data: Any) -> ShortVConfig | TokenPruningConfig:
    """A token pruning config when the object has ``"method"``, else a ShortV config (``"layers"``)."""
    if isinstance(data, dict) and "method" in data:
        return TokenPruningConfig.from_dict(data)
    return ShortVConfig.from_dict(data)


def load_config(path: str | Path) -> ShortVConfig | TokenPruningConfig:
    """Read any config file `ShortVConfig.save` or `TokenPruningConfig.save` wrote (its fields say which); every
    problem is one ValueError (or FileNotFoundError) naming the file."""
    data = read_json(path)
    kind = "token pruning" if isinstance(data, dict) and "method" in data else "ShortV"
    try:
        return config_from_dict(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: not a {kind} config: {error}") from None


def applied_config(model: Any) -> ShortVConfig | TokenPruningConfig | None:
    """The config of the method applied to ``model`` (None: none)."""
    from ..patch import get_shortv_state
    from ..pruning import get_pruning_state

    state = get_shortv_state(model) or get_pruning_state(model)
    return None if state is None else state.config


@contextmanager
def without_method(model: Any) -> Iterator[Any]:
    """The model without the method it came with (if any) for the block; that method applied again after it, a ShortV
    that was switched off (`disable_shortv`) switched off again."""
    from ..patch import get_shortv_state

    config = applied_config(model)
    if config is None:
        yield model
        return
    state = get_shortv_state(model)
    enabled = True if state is None else state.enabled
    method = method_of(config)
    method.remove(model)
    try:
        yield model
    finally:
        method.apply(model, config)
        if state is not None:
            get_shortv_state(model).enabled = enabled
