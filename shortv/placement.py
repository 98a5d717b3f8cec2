"""Where a module computes, including modules that accelerate offloads to CPU or disk (their weights sit on the
``meta`` device between calls, and accelerate's hook moves inputs to its ``execution_device``); and whether a device
asked for exists in this torch (`available_device`, `check_device_map`: one clear error for every command)."""

from __future__ import annotations

import torch
from torch import nn


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module``'s inputs must be on: accelerate's execution device, else its first real parameter's."""
    for candidate in module.modules():
        hook_device = getattr(getattr(candidate, "_hf_hook", None), "execution_device", None)
        if hook_device is not None:
            return torch.device(hook_device) if not isinstance(hook_device, int) else torch.device("cuda", hook_device)
        for parameter in candidate.parameters(recurse=False):
            if parameter.device.type != "meta":
                return parameter.device
    return torch.device("cpu")


def parameter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating parameter (float32 when it has none)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


#: ``device_map`` values that are placement strategies (accelerate) or places every torch has, not devices to check.
_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential", "cpu", "disk", "meta")


def available_device(device: str | int | torch.device) -> torch.device:
    """``device`` as a torch device, or a ValueError when it is not a device name or this torch build/machine lacks
    it (``cuda`` on a CPU-only torch)."""
    try:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available in this torch build/machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                         "device(s)")
    return device


def check_device_map(device_map: str | dict | None) -> None:
    """Refuse a ``device_map`` naming a device that is not there, before loading starts (``--device-map cuda`` on a
    CPU-only torch): its strategy names and ``cpu``/``disk`` always pass."""
    values = device_map.values() if isinstance(device_map, dict) else [] if device_map is None else [device_map]
    for value in values:
        if not (isinstance(value, str) and value in _STRATEGIES):
            available_device(value)
