"""`ShortVConfig`: which decoder layers freeze their visual tokens, and how. JSON round trip, published presets."""

from __future__ import annotations

import json
import operator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .files import atomic_write_text, read_json
from .fingerprint import WeightsFingerprint, recorded_fingerprint

CONFIG_FORMAT_VERSION = 1
MODES = ("fast", "reference")
#: Which tokens a ShortV layer freezes. "visual" is ShortV; "text" is the paper's "which tokens" ablation.
FROZEN_TOKENS = ("visual", "text")
#: The two updates of a decoder layer that operator-level freezing skips separately on visual rows.
OPERATORS = ("attention", "mlp")
#: Config fields listing operator-level layers, by the operator their visual rows skip.
OPERATOR_FIELDS = {"attention": "attention_layers", "mlp": "mlp_layers"}

#: Layer orders published with the paper (ascending visual Layer Contribution); ShortV freezes the first N.
PRESET_LAYER_ORDERS: dict[str, tuple[int, ...]] = {
    "llava-hf/llava-1.5-7b-hf": (31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19),
    "llava-hf/llava-1.5-13b-hf": (
        39, 32, 28, 36, 27, 37, 29, 30, 1, 38, 25, 31, 2, 26, 23, 34, 0, 33, 35, 22, 24, 21, 20, 17,
    ),
    "llava-hf/llava-v1.6-vicuna-7b-hf": (31, 29, 30, 28, 26, 27, 22, 24, 21, 23, 25, 20, 19, 17, 18, 15, 12, 0, 2),
    "llava-hf/llava-v1.6-vicuna-13b-hf": (
        39, 32, 29, 36, 27, 30, 37, 23, 25, 31, 26, 2, 28, 22, 33, 35, 34, 24, 38, 21, 20, 18, 1, 17,
    ),
}  # fmt: skip

#: Short names accepted by `ShortVConfig.from_preset` besides the hub ids.
PRESET_ALIASES = {
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
    "llava-next-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-next-13b": "llava-hf/llava-v1.6-vicuna-13b-hf",
}


def _layer_index(value: Any, name: str = "layers") -> int:
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # int, numpy integers, 0-d integer tensors; numpy's bool refuses too
        except TypeError:
            pass
    raise TypeError(f"ShortVConfig.{name} must contain integers, got {value!r} ({type(value).__name__})")


def layer_list(layers: Any, name: str = "layers") -> list[int]:
    """``layers`` (a list, tuple, range, numpy array or any iterable of integers) as a list of Python ints."""
    if isinstance(layers, (str, bytes, dict)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"ShortVConfig.{name} must be a list of layer indices, got {layers!r}")
    return [_layer_index(value, name) for value in layers]


def _checked_layers(layers: Any, name: str) -> list[int]:
    """A list of distinct non-negative layer indices, or a clear error naming the field."""
    layers = layer_list(layers, name)
    seen: set[int] = set()
    for index in layers:
        if index < 0:
            raise ValueError(f"ShortVConfig.{name} must be >= 0 (decoder layer indices), got {index}")
        if index in seen:
            raise ValueError(f"ShortVConfig.{name} lists layer {index} more than once: {layers}")
        seen.add(index)
    return layers


@dataclass
class ShortVConfig:
    """Which decoder layers are ShortV layers (visual tokens frozen) and which implementation runs them.

    ``layers`` keeps the order it was given (an LC ranking, for instance); only the set matters for inference.
    ``mode="fast"`` skips the frozen tokens' compute; ``mode="reference"`` runs the layer and restores them
    (slow, architecture-agnostic, the oracle). ``frozen_tokens="text"`` freezes the *text* tokens instead, the
    paper's "which tokens" ablation (reference mode only: it saves no compute). ``provenance`` records where the
    layers came from (LC file, model id, and the weights' fingerprint: `weights`).
    """

    layers: list[int] = field(default_factory=list)
    mode: str = "fast"
    frozen_tokens: str = "visual"
    version: int = CONFIG_FORMAT_VERSION
    provenance: dict[str, Any] = field(default_factory=dict)
    attention_layers: list[int] = field(default_factory=list)
    mlp_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layers = _checked_layers(self.layers, "layers")
        self.attention_layers = _checked_layers(self.attention_layers, "attention_layers")
        self.mlp_layers = _checked_layers(self.mlp_layers, "mlp_layers")
        owner: dict[int, str] = {}
        for name in ("layers", "attention_layers", "mlp_layers"):
            for index in getattr(self, name):
                if index in owner:
                    both = " (list it in `layers` to skip both updates)" if "layers" not in (owner[index], name) else ""
                    raise ValueError(f"ShortVConfig: layer {index} is in both {owner[index]} and {name}{both}")
                owner[index] = name
        if self.mode not in MODES:
            raise ValueError(f"ShortVConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.frozen_tokens not in FROZEN_TOKENS:
            raise ValueError(f"ShortVConfig.frozen_tokens must be one of {FROZEN_TOKENS}, got {self.frozen_tokens!r}")
        if self.frozen_tokens == "text" and self.mode != "reference":
            raise ValueError(
                "ShortVConfig(frozen_tokens='text') is an ablation that saves no compute; it runs with mode='reference'"
            )
        if self.operator_level and self.frozen_tokens != "visual":
            raise ValueError("ShortVConfig: operator-level freezing (attention_layers / mlp_layers) freezes visual "
                             "tokens only (frozen_tokens='visual')")
        if self.version != CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"ShortVConfig format version {self.version} is not supported by this shortv "
                f"(expected {CONFIG_FORMAT_VERSION})"
            )
        if not isinstance(self.provenance, dict):
            raise TypeError(f"ShortVConfig.provenance must be a dict, got {type(self.provenance).__name__}")
        weights = self.weights  # a malformed fingerprint is refused when the config is made, not when it is used
        if weights is not None:  # a config records the compact form (`shortv.fingerprint`): a few hundred bytes
            self.provenance = {**self.provenance, "weights": weights.compact().to_dict()}

    @property
    def frozen_layers(self) -> frozenset[int]:
        """The ShortV layers (both updates skipped); see `frozen_operators` for operator-level layers too."""
        return frozenset(self.layers)

    @property
    def operator_level(self) -> bool:
        """Whether some layer skips only one of its two updates."""
        return bool(self.attention_layers or self.mlp_layers)

    @property
    def frozen_operators(self) -> dict[int, frozenset[str]]:
        """Every layer with a frozen update -> the operators its visual rows skip (both for a ShortV layer)."""
        frozen = {index: frozenset(OPERATORS) for index in self.layers}
        for name, field_name in OPERATOR_FIELDS.items():
            frozen.update((index, frozenset({name})) for index in getattr(self, field_name))
        return frozen

    @property
    def weights(self) -> WeightsFingerprint | None:
        """The weights the layers were chosen on (``provenance["weights"]``, from the LC file); None when unknown
        (a preset, a hand-written config, or one written by an older shortv)."""
        return recorded_fingerprint(self.provenance.get("weights"), 'provenance["weights"]')

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; a layer-level config leaves out the empty operator lists (the format older shortv reads)."""
        data = asdict(self)
        for name in OPERATOR_FIELDS.values():
            if not data[name]:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShortVConfig:
        """From the JSON form; ``layers`` is required (``[]`` for a config that freezes nothing)."""
        if not isinstance(data, dict):
            raise TypeError(f"a ShortV config must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"layers", "mode", "frozen_tokens", "version", "provenance", *OPERATOR_FIELDS.values()}
        if unknown:
            raise ValueError(f"unknown ShortV config field(s): {sorted(unknown)}")
        if "layers" not in data:
            raise ValueError('a ShortV config needs "layers" (the decoder layers to freeze, [] for none)')
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        """Write the JSON form atomically (a crash never leaves half a file)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ShortVConfig:
        """Read a saved config; every problem is a ValueError (or FileNotFoundError) naming the file."""
        data = read_json(path)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a ShortV config: {error}") from None

    @classmethod
    def coerce(cls, config_or_layers: Any) -> ShortVConfig:
        """A ShortVConfig as is; a list (tuple, range, numpy array...) of layer indices as ``ShortVConfig(layers)``."""
        return config_or_layers if isinstance(config_or_layers, cls) else cls(layers=config_or_layers)

    @classmethod
    def from_preset(cls, name: str, n: int | None = None, mode: str = "fast") -> ShortVConfig:
        """The first ``n`` layers of a published order (all of them when ``n`` is None)."""
        hub_id = PRESET_ALIASES.get(name, name)
        if hub_id not in PRESET_LAYER_ORDERS:
            known = sorted(PRESET_LAYER_ORDERS) + sorted(PRESET_ALIASES)
            raise ValueError(f"unknown ShortV preset {name!r}; known presets: {', '.join(known)}")
        order = PRESET_LAYER_ORDERS[hub_id]
        if n is None:
            n = len(order)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(order):
            raise ValueError(f"preset {hub_id!r} publishes {len(order)} layers; n must be in 0..{len(order)}, got {n!r}")
        return cls(layers=list(order[:n]), mode=mode, provenance={"preset": hub_id, "n": n})
