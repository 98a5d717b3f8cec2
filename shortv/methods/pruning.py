"""What FastV, VTW and their compositions with ShortV share: one `TokenPruningConfig`, one patch
(`shortv.pruning.apply_token_pruning`), one FLOPs model (`shortv.flops_pruning`). Each method module fixes the
pruning kind and whether ShortV layers come with it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from ..config import ShortVConfig
from ..flops import Formula, LayerDims
from ..flops_pruning import budget_flops, fastv_budget, vtw_budget
from ..pruning import TokenPruningConfig, apply_token_pruning, remove_token_pruning
from ..pruning.config import check_cut
from .base import Method, check_layers


class TokenPruning(Method):
    """A `TokenPruningConfig` method: ``kind`` is its ``method`` field; ``with_shortv``: ``shortv_layers`` are set."""

    kind: ClassVar[str]
    with_shortv: ClassVar[bool] = False
    config_type = TokenPruningConfig
    needs_visual_ids = True

    def build(self, layers: Any = (), k: int | None = None, ratio: float | None = None, rank: str | None = None,
              **_: Any) -> TokenPruningConfig:
        shortv = sorted(layers.frozen_layers if isinstance(layers, ShortVConfig) else layers)
        if isinstance(layers, ShortVConfig) and layers.operator_level:
            raise ValueError(f"{self.name} composes with layer-level ShortV layers only; this ShortV config has "
                             "operator-level layers (attention_layers / mlp_layers)")
        options = {key: value for key, value in (("k", k), ("ratio", ratio), ("rank", rank)) if value is not None}
        return TokenPruningConfig(self.kind, shortv_layers=shortv if self.with_shortv else [], **options)

    def matches(self, config: Any) -> bool:
        return (isinstance(config, TokenPruningConfig) and config.method == self.kind
                and bool(config.shortv_layers) == self.with_shortv)

    def apply(self, model, config: TokenPruningConfig):  # noqa: ANN001, ANN201 - nn.Module in, nn.Module out
        return apply_token_pruning(model, config)

    def remove(self, model):  # noqa: ANN001, ANN201
        return remove_token_pruning(model)

    @contextmanager
    def unpatched(self, model, config: TokenPruningConfig) -> Iterator[Any]:  # noqa: ANN001
        """Removed for the block (bit-exact, `remove_token_pruning`), applied again after it."""
        remove_token_pruning(model)
        try:
            yield model
        finally:
            apply_token_pruning(model, config)

    def prefill_flops(self, dims: LayerDims, t: int, v: int, config: TokenPruningConfig,
                      formula: Formula = "exact") -> int:
        if config.method == "vtw":
            budget = vtw_budget(dims, v, config.k, config.shortv_layers)
        else:
            budget = fastv_budget(dims, v, config.k, config.ratio, config.shortv_layers)
        return budget_flops(dims, t, budget, formula)

    def record(self, config: TokenPruningConfig) -> dict[str, Any]:
        record: dict[str, Any] = {"method": self.name}
        if self.with_shortv:
            record["layers"] = list(config.shortv_layers)
        record["k"] = config.k
        if config.method == "fastv":
            record.update(ratio=config.ratio, rank=config.rank)
        return record

    def check(self, config: TokenPruningConfig, num_layers: int) -> None:
        check_cut(config.k, num_layers)
        check_layers(sorted(config.shortv_layers), num_layers, "ShortV layers")
