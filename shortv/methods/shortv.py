"""ShortV (`shortv.config.ShortVConfig`): visual tokens frozen in chosen layers, whole layers or one operator."""

from __future__ import annotations

from typing import Any

from ..config import ShortVConfig
from ..flops import Formula, LayerDims, model_flops
from ..patch import apply_shortv, disable_shortv, remove_shortv
from .base import Method, check_layers


class ShortV(Method):
    name = "shortv"
    summary = "freeze the visual tokens in the ShortV layers (layer- or operator-level)"
    parameters = ("layers",)
    required = ("layers",)
    config_type = ShortVConfig

    def build(self, layers: Any = (), **_: Any) -> ShortVConfig:
        return layers if isinstance(layers, ShortVConfig) else ShortVConfig(layers=list(layers))

    def matches(self, config: Any) -> bool:
        return isinstance(config, ShortVConfig)

    def apply(self, model, config: ShortVConfig):  # noqa: ANN001, ANN201 - nn.Module in, nn.Module out
        return apply_shortv(model, config)

    def remove(self, model):  # noqa: ANN001, ANN201
        return remove_shortv(model)

    def unpatched(self, model, config: ShortVConfig):  # noqa: ANN001, ANN201 - switched off, not removed
        return disable_shortv(model)

    def key(self, config: ShortVConfig) -> str:
        return "shortv-operators" if config.operator_level else self.name

    def prefill_flops(self, dims: LayerDims, t: int, v: int, config: ShortVConfig, formula: Formula = "exact") -> int:
        return model_flops(dims, t, v, sorted(config.frozen_layers), formula,
                           attention_layers=config.attention_layers, mlp_layers=config.mlp_layers)

    def record(self, config: ShortVConfig) -> dict[str, Any]:
        return {
            "method": self.name,
            "layers": list(config.layers),  # as given (an LC order, for instance)
            **({"attention_layers": list(config.attention_layers), "mlp_layers": list(config.mlp_layers)}
               if config.operator_level else {}),
            "mode": config.mode,
            "frozen_tokens": config.frozen_tokens,
        }

    def check(self, config: ShortVConfig, num_layers: int) -> None:
        check_layers(sorted(config.frozen_operators), num_layers, "ShortV layers")
