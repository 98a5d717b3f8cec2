"""`Method`: what the harness (``shortv eval``, ``shortv bench``, the lmms-eval plugin, `shortv.evaluate`) needs to
know about one way of making a model cheaper, over the shared patch machinery.

A method owns one config type and says how a config is built from the harness's parameters, how it is applied and
removed, how the unpatched baseline runs on the *same* model object (bit-exact), what it costs in prefill FLOPs for
given token counts (`shortv.flops`, `shortv.flops_pruning`), and the plain dict recorded in every output. Generic
code asks `shortv.methods.method_of(config)` and never names a method itself.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, ClassVar

from torch import nn

from ..flops import Formula, LayerDims, model_flops

#: The parameters a method may take from the harness (CLI options, ``--method name:key=value``, model_args).
PARAMETERS = ("layers", "k", "ratio", "rank")


class Method:
    """One method; subclasses set the class attributes and implement the five operations."""

    #: Registry key and the name recorded in outputs (``"fastv"``, ``"shortv+fastv"``...).
    name: ClassVar[str]
    #: One line for ``--help`` and docs.
    summary: ClassVar[str]
    #: Which of `PARAMETERS` it takes (``layers``: the ShortV part, from ``--n/--lc/--config``).
    parameters: ClassVar[tuple[str, ...]]
    #: The parameters it cannot run without.
    required: ClassVar[tuple[str, ...]] = ()
    config_type: ClassVar[type]
    #: Whether the harness refuses a model that declares no visual token ids (the method would do nothing there
    #: without an explicit mask).
    needs_visual_ids: ClassVar[bool] = False

    def build(self, **parameters: Any) -> Any:
        """The config from harness parameters (only those in `parameters`; the caller checked the names)."""
        raise NotImplementedError

    def matches(self, config: Any) -> bool:
        """Whether ``config`` is this method's (each config belongs to exactly one method)."""
        raise NotImplementedError

    def apply(self, model: nn.Module, config: Any) -> nn.Module:
        raise NotImplementedError

    def remove(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def unpatched(self, model: nn.Module, config: Any) -> AbstractContextManager:
        """A block in which ``model`` (with ``config`` applied) computes exactly the unpatched model; afterwards the
        method is in force again."""
        raise NotImplementedError

    def prefill_flops(self, dims: LayerDims, t: int, v: int, config: Any, formula: Formula = "exact") -> int:
        """Prefill FLOPs of the decoder stack (no LM head) for one sample of ``t`` text and ``v`` visual tokens."""
        raise NotImplementedError

    def record(self, config: Any) -> dict[str, Any]:
        """``{"method": name, <every parameter>}``: JSON, written in run files, summaries, bench results, logs."""
        raise NotImplementedError

    def check(self, config: Any, num_layers: int) -> None:
        """Refuse, with one line, a config that cannot run on a model of ``num_layers`` decoder layers (before the
        model loads: K out of range, layers past the last one)."""

    def flops_ratio(self, dims: LayerDims, t: int, v: int, config: Any, formula: Formula = "exact") -> float:
        """`prefill_flops` over the unpatched model's."""
        return self.prefill_flops(dims, t, v, config, formula) / model_flops(dims, t, v, (), formula)

    def key(self, config: Any) -> str:
        """The name of a config's row and answers in a run (``fastv``; ShortV tells operator-level apart)."""
        return self.name

    def describe(self, config: Any) -> str:
        """The record as one short line: ``fastv k=2 ratio=0.5 rank=last``."""
        return describe_record(self.record(config))


def describe_record(record: dict[str, Any]) -> str:
    """A method record as one line: ``fastv k=2 ratio=0.5 rank=last``."""
    def short(value: Any) -> str:
        return "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)

    return " ".join([str(record.get("method")), *(f"{key}={short(value)}" for key, value in record.items()
                                                  if key != "method")])


def check_layers(layers: list[int], num_layers: int, what: str) -> None:
    bad = [index for index in layers if not 0 <= index < num_layers]
    if bad:
        raise ValueError(f"{what} {bad} out of range: the model has {num_layers} decoder layers (0..{num_layers - 1})")
