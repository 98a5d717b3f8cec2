"""Which methods one harness run compares: ``--method`` specs and config files -> `MethodRun` objects, every check made
before a model loads.

A spec is a method name with optional ``key=value`` parameters: ``fastv``, ``fastv:k=2,ratio=0.5,rank=mean``,
``vtw:k=16``, ``shortv+fastv:n=19,k=2``. ``n`` takes the first N layers of the LC order (``--lc``); without it a
method's ShortV layers are those of ``--lc`` with ``--n``, or of the one ShortV config given. Harness-wide ``k`` /
``ratio`` / ``rank`` fill what a spec leaves out, for the methods that take them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import ShortVConfig
from .base import Method
from .registry import METHODS, coerce_config, get_method, method_of

#: Spec keys and how their values are read; ``n`` becomes the ``layers`` parameter.
SPEC_KEYS: dict[str, Callable[[str], Any]] = {"n": int, "k": int, "ratio": float, "rank": str}


@dataclass
class MethodRun:
    """One method of a run: ``key`` names its answers in records and its row in summaries."""

    key: str
    method: Method
    config: Any

    @property
    def record(self) -> dict[str, Any]:
        return self.method.record(self.config)

    def describe(self) -> str:
        return self.method.describe(self.config)


def parse_spec(text: str) -> tuple[Method, dict[str, Any]]:
    """``name[:key=value,...]`` -> (method, parameters as given); unknown names and keys are refused."""
    name, _, rest = text.strip().partition(":")
    method = get_method(name.strip())
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or key not in SPEC_KEYS:
            raise ValueError(f"--method {text!r}: expected name:key=value,... with keys {', '.join(SPEC_KEYS)}; "
                             f"got {item!r}")
        try:
            values[key] = SPEC_KEYS[key](value.strip())
        except ValueError:
            raise ValueError(f"--method {text!r}: {key} must be {SPEC_KEYS[key].__name__}, got {value!r}") from None
        parameter = "layers" if key == "n" else key
        if parameter not in method.parameters:
            raise ValueError(f"--method {text!r}: {method.name} takes no {key} (it takes "
                             f"{', '.join(_spec_names(method)) or 'nothing'})")
    return method, values


def _spec_names(method: Method) -> list[str]:
    return ["n" if parameter == "layers" else parameter for parameter in method.parameters]


def plan_runs(
    specs: Sequence[str] = (),
    configs: Sequence[Any] = (),
    shortv: ShortVConfig | None = None,
    first_n: Callable[[int], ShortVConfig] | None = None,
    k: int | None = None,
    ratio: float | None = None,
    rank: str | None = None,
) -> list[MethodRun]:
    """The runs of ``configs`` (each one method; config objects or layer lists) and ``specs`` (``--method``), in that
    order, identical ones once.

    ``shortv``: the ShortV layers of ``--lc --n`` (None: none given); when it is None and exactly one of ``configs``
    is a ShortV config, that one. ``first_n(n)``: the first ``n`` layers of the LC order (None: no ``--lc``).
    ``k``/``ratio``/``rank``: defaults for the specs that take them; one no method takes is refused.
    """
    configs = [coerce_config(config) for config in configs]
    if shortv is None:
        shortvs = [config for config in configs if isinstance(config, ShortVConfig)]
        shortv = shortvs[0] if len(shortvs) == 1 else None
    defaults = {key: value for key, value in (("k", k), ("ratio", ratio), ("rank", rank)) if value is not None}
    parsed = [parse_spec(spec) for spec in specs]
    for key in defaults:
        if not any(key in method.parameters for method, _ in parsed):
            takers = [name for name, method in METHODS.items() if key in method.parameters]
            named = ", ".join(method.name for method, _ in parsed)
            raise ValueError(f"--{key} applies to {' / '.join(takers)}; "
                             + (f"{named} takes no {key}" if named else "give --method"))
    runs: list[tuple[Method, Any]] = [(method_of(config), config) for config in configs]
    for spec, (method, values) in zip(specs, parsed):
        parameters = {key: value for key, value in defaults.items() if key in method.parameters}
        parameters.update({key: value for key, value in values.items() if key != "n"})
        if "layers" in method.parameters:
            if "n" in values:
                if first_n is None:
                    raise ValueError(f"--method {spec!r}: n= takes the first N layers of an LC order; add --lc FILE")
                parameters["layers"] = first_n(values["n"])
            elif shortv is not None:
                parameters["layers"] = shortv
        missing = [name for name in method.required if name not in parameters]
        if missing:
            how = {"layers": "ShortV layers (--lc FILE with --n N, n= in the spec, or one ShortV --config)",
                   "k": "K (--k, or k= in the spec)"}
            raise ValueError(f"--method {spec!r} needs {' and '.join(how.get(name, name) for name in missing)}")
        try:
            runs.append((method, method.build(**parameters)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"--method {spec!r}: {error}") from None
    if not runs:
        raise ValueError("give --config FILE, --lc FILE with --n N, or --method")
    return _keyed(runs)


def _keyed(runs: list[tuple[Method, Any]]) -> list[MethodRun]:
    """Identical records once; keys ``name``, ``name_2``, ... in order (``shortv-operators`` for operator-level
    ShortV)."""
    result: list[MethodRun] = []
    seen: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for method, config in runs:
        record = method.record(config)
        if record in seen:
            continue
        seen.append(record)
        name = method.key(config)
        counts[name] = counts.get(name, 0) + 1
        key = name if counts[name] == 1 else f"{name}_{counts[name]}"
        result.append(MethodRun(key, method, config))
    return result


def runs_of(config: Any) -> list[MethodRun]:
    """The runs of a Python caller's ``config``: one config, a list of layer indices, or a list of configs or of
    `MethodRun` objects (taken as they are)."""
    if isinstance(config, (list, tuple)) and config and all(isinstance(item, MethodRun) for item in config):
        return list(config)
    if isinstance(config, (list, tuple)) and config and not all(isinstance(item, int) for item in config):
        return plan_runs(configs=config)
    return plan_runs(configs=[config])
