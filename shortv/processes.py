"""The processes of a distributed launch share the samples of `shortv calibrate` and `shortv eval`, through accelerate.

Without a launcher there is one process and nothing here communicates. Under one (``accelerate launch --multi_gpu``
on GPUs, ``torchrun --nproc_per_node N`` on CPU or GPU), accelerate's `PartialState` joins the process group: NCCL on
GPUs, gloo on a CPU-only machine (``PartialState(cpu=True)``: without it accelerate sees no process group there).
Every process runs the same run-level code and makes the same calls below, in the same order:

* `on_main(fn, ...)`: the main process does the folder work (check the output folder, read its records) and every
  process gets its result, or raises its error, so no process starts work that the main one refused;
* `main_holds(exclusive_output, folder)`: the main process holds the output folder's lock for the whole run (the
  others write only their own records files, `shortv.records`), so a second run on the folder is refused as a whole;
* `share(items, work)`: each process runs ``work`` on its contiguous part of ``items`` (`split_between_processes`);
  every process gets all the results, in item order (`gather_object`). An error in one part is raised on every
  process once each has finished its own part (whose finished work is already recorded), so none waits forever;
* `process_device_map(device_map)`: where this process's copy of the model goes.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

#: The variables a launcher sets to the number of processes (accelerate reads the same ones).
_LAUNCH_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _state() -> Any:
    """accelerate's `PartialState` of a launch with several processes, or None for a single process."""
    if max(int(os.environ.get(variable) or 1) for variable in _LAUNCH_SIZE_VARIABLES) <= 1:
        return None
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state if state.num_processes > 1 else None


def process_count() -> int:
    state = _state()
    return 1 if state is None else state.num_processes


def process_index() -> int:
    """This process's rank: 0 (the main process) to ``process_count() - 1``."""
    state = _state()
    return 0 if state is None else state.process_index


def is_main_process() -> bool:
    return process_index() == 0


def process_device_map(device_map: str | dict | None) -> str | dict | None:
    """The ``device_map`` to load this process's model with: ``device_map`` itself for a single process; with several,
    each loads a whole copy on its own device (accelerate's ``cuda:LOCAL_RANK``; None, the CPU, on a CPU-only run)."""
    state = _state()
    if state is None:
        return device_map
    if device_map is not None:
        raise ValueError(
            f"--device-map spreads one model over all the devices a process sees, but this launch has "
            f"{state.num_processes} processes, each loading its own copy on its own device; drop --device-map, or "
            "run a model that needs several devices as a single process"
        )
    return None if state.device.type == "cpu" else str(state.device)


def _portable(error: Exception) -> Exception:
    """``error`` if it can be sent to the other processes (pickled), else a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any exception type may fail to pickle or unpickle in its own way
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on the main process; every process returns its result or raises its error."""
    state = _state()
    if state is None:
        return fn(*args, **kwargs)
    from accelerate.utils import broadcast_object_list

    outcome: list[Any] = [None]  # the main process's (result, error), sent to every process
    own_error = None
    if state.is_main_process:
        try:
            outcome = [(fn(*args, **kwargs), None)]
        except Exception as error:  # raised below, once the others know
            own_error, outcome = error, [(None, _portable(error))]
    broadcast_object_list(outcome)
    result, error = outcome[0]
    if own_error is not None or error is not None:
        raise own_error or error
    return result


@contextmanager
def main_holds(enter: Callable[..., AbstractContextManager[T]], *args: Any) -> Iterator[T]:
    """The main process enters ``enter(*args)`` for the block, for all processes; every process gets its value, or
    raises its error, before going on."""
    with ExitStack() as stack:
        yield on_main(lambda: stack.enter_context(enter(*args)))


def share(items: Sequence[T], work: Callable[[Sequence[T]], list[R]]) -> list[R]:
    """``work`` on this process's contiguous part of ``items``; returns the results of all parts, in item order.

    ``work`` returns one list per part (any length); the lists are joined in process order, which is item order.
    """
    state = _state()
    if state is None:
        return work(items)
    from accelerate.utils import gather_object

    own_error = None
    with state.split_between_processes(list(items)) as part:
        try:
            outcome = (work(part), None)
        except Exception as error:  # raised below, after every process has finished its part
            own_error = error
            outcome = (None, _portable(error))
    outcomes = gather_object([outcome])  # every process's (results, error), in process order
    errors = [error for _, error in outcomes if error is not None]
    if own_error is not None or errors:
        raise own_error or errors[0]
    return [result for results, _ in outcomes for result in results]
