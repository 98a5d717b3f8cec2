"""Reference ShortV layer: run the original layer, then put the visual hidden states back as they entered.

Architecture-agnostic and obviously correct, so it is the oracle for the fast path and the definition used by
Layer Contribution calibration ("remove layer l's updates to X-tokens").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def restore_positions(layer_output: Any, layer_input: torch.Tensor, frozen: torch.Tensor) -> Any:
    """``layer_output`` with the positions where ``frozen`` (batch x seq) is True taken from ``layer_input``."""
    if isinstance(layer_output, tuple):
        return (restore_positions(layer_output[0], layer_input, frozen), *layer_output[1:])
    return torch.where(frozen.unsqueeze(-1), layer_input, layer_output)


def reference_frozen_forward(
    original_forward: Callable[..., Any], frozen: torch.Tensor, hidden_states: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    return restore_positions(original_forward(hidden_states, *args, **kwargs), hidden_states, frozen)
