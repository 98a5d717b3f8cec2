"""`TokenPruningConfig`: FastV (drop a fraction R of the visual tokens after layer K) or VTW (drop all of them)."""

from __future__ import annotations

import json
import math
import numbers
import operator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import layer_list
from ..files import atomic_write_text, read_json

PRUNING_FORMAT_VERSION = 1
METHODS = ("fastv", "vtw")
#: Which queries rank the visual tokens: the last prompt token's (FastV's released code) or the mean of all of them
#: (the FastV paper's wording).
RANKS = ("last", "mean")


def check_cut(k: int, num_layers: int) -> None:
    """K must leave layers ``0..K-1`` unpruned and at least one layer to prune: ``1 <= K <= num_layers - 1``."""
    if not 1 <= k <= num_layers - 1:
        raise ValueError(f"K (the first pruned layer) must be in 1..{num_layers - 1} for a model of {num_layers} "
                         f"decoder layers, got {k}")


@dataclass
class TokenPruningConfig:
    """Layers ``0..k-1`` see every token; layers ``k..`` see the text tokens and the kept visual ones only.

    ``method="fastv"`` keeps ``round((1 - ratio) v)`` of a sample's ``v`` visual tokens, the ones that receive the
    most attention in layer ``k - 1`` (averaged over heads; from the query ``rank`` says). ``method="vtw"`` (visual
    token withdrawal) keeps none: ``ratio`` is 1. ``shortv_layers``: ShortV layers in the same model (fast mode):
    before ``k`` they freeze every visual token, from ``k`` on the kept ones (the paper's ShortV + FastV).
    """

    method: str = "fastv"
    k: int = 2
    ratio: float | None = None
    rank: str = "last"
    shortv_layers: list[int] = field(default_factory=list)
    version: int = PRUNING_FORMAT_VERSION
    #: Where the setting came from, e.g. VTW's rule: ``{"rule": "vtw_kl", "threshold": ..., "kl": [...]}``.
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"token pruning method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.k, bool):
            raise TypeError(f"K (the first pruned layer) must be an integer, got {self.k!r}")
        try:
            self.k = operator.index(self.k)
        except TypeError:
            raise TypeError(f"K (the first pruned layer) must be an integer, got {self.k!r}") from None
        if self.k < 1:
            raise ValueError(f"K (the first pruned layer) must be >= 1: layers 0..K-1 see every token, got {self.k}")
        if self.method == "vtw":
            if self.ratio not in (None, 1, 1.0):
                raise ValueError(f"VTW withdraws every visual token (ratio 1); got ratio={self.ratio}")
            self.ratio = 1.0
        else:
            ratio = 0.5 if self.ratio is None else self.ratio
            if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= ratio < 1:
                raise ValueError(f"R (the fraction of visual tokens pruned) must be in [0, 1), got {ratio!r}")
            self.ratio = float(ratio)
        self.shortv_layers = layer_list(self.shortv_layers)
        if len(set(self.shortv_layers)) != len(self.shortv_layers) or any(i < 0 for i in self.shortv_layers):
            raise ValueError(f"shortv_layers must be distinct decoder layer indices >= 0, got {self.shortv_layers}")
        if self.rank not in RANKS:
            raise ValueError(f"rank must be one of {RANKS}, got {self.rank!r}")
        if not isinstance(self.provenance, dict):
            raise TypeError(f"provenance must be a dict, got {type(self.provenance).__name__}")
        if self.version != PRUNING_FORMAT_VERSION:
            raise ValueError(f"token pruning config version {self.version} is not supported "
                             f"(expected {PRUNING_FORMAT_VERSION})")

    def kept(self, visual: int) -> int:
        """Visual tokens kept of ``visual``: ``round((1 - R) v)``, halves up (as `shortv.flops_pruning`)."""
        return math.floor((1 - self.ratio) * visual + 0.5)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenPruningConfig:
        if not isinstance(data, dict):
            raise TypeError(f"a token pruning config must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"method", "k", "ratio", "rank", "shortv_layers", "version", "provenance"}
        if unknown:
            raise ValueError(f"unknown token pruning config field(s): {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TokenPruningConfig:
        try:
            return cls.from_dict(read_json(path))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a token pruning config: {error}") from None
