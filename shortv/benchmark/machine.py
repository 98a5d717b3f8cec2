"""Where the numbers were taken: CPU, cores, memory, load, library versions, date, and the GPU on CUDA."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Any

import psutil
import torch


def cpu_model() -> str:
    """The CPU's marketing name (psutil does not report it: /proc/cpuinfo on Linux, else ``platform``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cores() -> int | None:
    try:
        return len(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error):  # macOS has no CPU affinity
        return os.cpu_count()


def threads_for_load(threads: int) -> tuple[int, str | None]:
    """Torch threads for a run that would use ``threads``, given how busy the machine is, and a hint to print.

    With more threads than free cores, every short kernel waits at an OpenMP barrier for a descheduled thread (the
    demo ran 10x slower beside one other job on 2 cores). Free cores are the usable ones less the 1-minute load
    average; when they are fewer than ``threads``, use them (at least 1) and say so.
    """
    cores = _usable_cores()
    try:
        load = psutil.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - no load average on this platform
        return threads, None
    if not cores or cores - load >= threads - 0.5:
        return threads, None
    free = max(1, int(cores - load + 0.5))
    if free >= threads:
        return threads, None
    return free, (f"the machine is busy (load average {load:.1f} on {cores} usable cores): using {free} torch "
                  f"thread{'s' if free > 1 else ''} instead of {threads}; pass --threads N to choose")


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """CPU model, cores, torch threads, memory, load average, library versions, date (and the GPU on CUDA)."""
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": _usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        info["load_average"] = [round(value, 2) for value in psutil.getloadavg()]
    except (AttributeError, OSError):
        pass
    device = torch.device(device)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["gpu"] = properties.name
        info["gpu_memory_bytes"] = properties.total_memory
        info["cuda"] = torch.version.cuda
    return info
