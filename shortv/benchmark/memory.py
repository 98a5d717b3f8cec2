"""Peak memory of one benchmark run: the CUDA allocator's peak, or the process's resident-set peak on CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import re
import threading
from pathlib import Path
from typing import Any

import psutil
import torch

#: glibc tunable: with a fixed threshold, every block at least this large is its own mapping, returned to the OS
#: on free, so RSS follows live tensors instead of what the heap happens to retain.
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"


def _rss_bytes() -> int | None:
    """Current resident set size of this process."""
    try:
        return psutil.Process().memory_info().rss
    except psutil.Error:
        return None


# psutil has no peak RSS with a reset on Linux; the kernel keeps one (VmHWM), resettable through clear_refs.
def _hwm_bytes() -> int | None:
    """Peak resident set size since the last reset (VmHWM), kept by the kernel."""
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs). False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


_LIBC: Any = None


def _malloc_trim() -> None:
    """Give free heap memory back to the OS (glibc), so every run starts from the same floor."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class PeakMemory:
    """How far memory rises above its level at ``start()`` until ``stop()`` (``peak_bytes``), and the absolute
    peak (``peak_total_bytes``: for a CPU run the whole process, weights included).

    * CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at start (tensors only, allocator-exact).
    * CPU: peak *process RSS* minus RSS at start. Before the run, garbage is collected and glibc's free heap is
      trimmed (``malloc_trim``) so each run starts from the same floor; on Linux the peak is the kernel's
      high-water mark (VmHWM, reset through ``/proc/self/clear_refs``), which misses nothing. Where that reset is
      not available, a thread samples RSS (psutil) every millisecond instead (it can miss shorter spikes).
      RSS counts everything the process holds, including heap memory glibc keeps after frees; with its default
      dynamic mmap threshold that slack depends on the order of allocations and moves the delta by a few percent
      from run to run. Start the process with ``MALLOC_MMAP_THRESHOLD_=65536`` to make large blocks separate
      mappings returned on free: the RSS delta then follows live tensors to within a fraction of a MiB (at some
      cost in page faults, so time with the default allocator and measure memory in such a process).
    * Where psutil cannot read the RSS: not measured (``peak_bytes`` is None).
    """

    def __init__(self, device: torch.device | str, sample_interval_s: float = 0.001) -> None:
        self.device = torch.device(device)
        self.sample_interval_s = sample_interval_s
        self.peak_bytes: int | None = None
        self.peak_total_bytes: int | None = None
        self._start: int | None = None
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0
        if self.device.type == "cuda":
            self.method = "cuda max_memory_allocated delta (tensor bytes)"
            return
        if _rss_bytes() is None:
            self.method = "unavailable (psutil cannot read this process's RSS)"
            return
        self._use_hwm = _reset_hwm()
        how = "kernel VmHWM, reset per run" if self._use_hwm else "1 ms sampling thread"
        threshold = os.environ.get(MMAP_THRESHOLD_ENV)
        allocator = (
            f"{MMAP_THRESHOLD_ENV}={threshold}: large blocks returned on free, RSS follows live tensors"
            if threshold
            else "glibc default allocator: includes heap slack, a few % run to run"
        )
        self.method = f"process peak RSS delta ({how}; heap trimmed before; {allocator})"

    @property
    def available(self) -> bool:
        return not self.method.startswith("unavailable")

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return
        if not self.available:
            return
        _malloc_trim()
        if self._use_hwm:
            _reset_hwm()
            self._start = _rss_bytes()
            return
        self._start = self._sampled = _rss_bytes()  # type: ignore[assignment]
        self._stop.clear()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_interval_s):
            rss = _rss_bytes()
            if rss is not None and rss > self._sampled:
                self._sampled = rss

    def stop(self) -> int | None:
        peak: int | None
        if self._start is None:
            peak = None
        elif self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None
            peak = max(self._sampled, _rss_bytes() or 0)
        else:
            peak = _hwm_bytes()
        self.peak_total_bytes = peak
        self.peak_bytes = None if peak is None or self._start is None else max(peak - self._start, 0)
        return self.peak_bytes
