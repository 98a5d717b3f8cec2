"""The device's dense matrix-product rate and memory bandwidth, measured, for the roofline (`ideal.py`).

Both are timed with ``torch.utils.benchmark.Timer``, which synchronizes CUDA around its timing loop, picks the
number of runs itself (``blocked_autorange``) and reports the median over blocks: all that a hand-written loop
would do, for a statement that is timed on its own.
"""

from __future__ import annotations

import torch
from torch.utils import benchmark as torch_benchmark

from .ideal import DeviceRates


def _median_seconds(stmt: str, values: dict[str, torch.Tensor], min_run_time: float) -> float:
    timer = torch_benchmark.Timer(stmt=stmt, globals=values, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def gemm_flops_per_s(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, size: int = 8192, min_run_time: float = 1.0
) -> float:
    """FLOP/s of a ``size x size x size`` matrix product on random data (2 size^3 FLOPs)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator, device=device).to(dtype) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = _median_seconds("torch.mm(a, b, out=out)", {"torch": torch, "a": a, "b": b, "out": out}, min_run_time)
    return 2 * size**3 / seconds


def copy_bytes_per_s(device: torch.device | str, nbytes: int = 2**30, min_run_time: float = 1.0) -> float:
    """Memory bandwidth of a device-to-device copy of ``nbytes``, counting the bytes read and the bytes written."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    seconds = _median_seconds("target.copy_(source)", {"source": source, "target": target}, min_run_time)
    return 2 * nbytes / seconds


def measure_rates(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, gemm_size: int = 8192, copy_bytes: int = 2**30,
    min_run_time: float = 1.0,
) -> DeviceRates:
    """`DeviceRates` of ``device``: the defaults suit a datacenter GPU (a few seconds); pass smaller sizes on CPU."""
    return DeviceRates(
        flops_per_s=gemm_flops_per_s(device, dtype, gemm_size, min_run_time),
        bytes_per_s=copy_bytes_per_s(device, copy_bytes, min_run_time),
    )
