"""Where a module computes, including modules that accelerate offloads to CPU or disk (their weights sit on the
``meta`` device between calls, and accelerate's hook moves inputs to its ``execution_device``)."""

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
