"""Every check that depends on the installed transformers version lives here, and only here."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from packaging.version import Version

#: Oldest transformers release the fast frozen layer was verified against. From 5.x on, decoder layers return a
#: plain tensor, processors expand image placeholders to one token per visual feature (so ``input_ids`` and the
#: decoder sequence line up), and Qwen2-VL's rotary module composes the M-RoPE sections itself.
MIN_TRANSFORMERS = Version("5.24.0")
#: First major release we have not tested.
MAX_TRANSFORMERS_EXCLUSIVE = Version("6.0.0")

TRANSFORMERS_VERSION = Version(transformers.__version__)


def check_transformers_version() -> None:
    """Fail early with an actionable message instead of producing wrong numbers on an untested release."""
    if not (MIN_TRANSFORMERS <= TRANSFORMERS_VERSION < MAX_TRANSFORMERS_EXCLUSIVE):
        raise RuntimeError(
            f"shortv supports transformers >={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}; "
            f"found {TRANSFORMERS_VERSION}. Install a supported version: pip install 'transformers>={MIN_TRANSFORMERS},<6'"
        )


def cache_from_kwargs(kwargs: dict[str, Any]) -> Any:
    """The KV cache passed to a model or decoder layer: transformers 5.x renamed ``past_key_values`` to ``cache``."""
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    return cache


def cached_length(cache: Any) -> int:
    """Number of positions already in ``cache`` (0 without a cache), i.e. the absolute offset of the new tokens.

    Read without a device sync where a layer counts in Python: transformers' linear-attention (and static) cache
    layers count on the device, so for a hybrid model layer 0's count is a tensor; its attention layers' counts are
    ints. Only a cache with no such layer is read back from the device."""
    if cache is None:
        return 0
    length = cache.get_seq_length()
    if isinstance(length, torch.Tensor):
        for layer in getattr(cache, "layers", ()):
            if not hasattr(layer, "get_seq_length"):  # a linear-attention layer on transformers 5.24 counts nothing
                continue
            counted = layer.get_seq_length()
            if not isinstance(counted, torch.Tensor) and counted:
                return int(counted)
    return int(length)
