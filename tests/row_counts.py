"""Counting the rows (tokens) each module is fed in a forward: what the tests of the fast frozen layers assert."""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from torch import nn


def rows_of(module: nn.Module, args: tuple, kwargs: dict) -> int:
    """Tokens in a call's first input: every dim but the last (features); a Conv1d's input is (batch, channels, seq)."""
    first = args[0] if args else next(iter(kwargs.values()))
    if isinstance(module, nn.Conv1d):
        return first.shape[0] * first.shape[-1]
    return first.shape[:-1].numel()


@contextmanager
def rows_fed(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, int]]:
    """While inside, the yielded dict maps the name of each of ``modules`` that ran to the rows its last call was fed
    (as it ran: after any pre-hook of shortv's that narrowed its input)."""
    rows: dict[str, int] = {}
    handles = [module.register_forward_hook(
        lambda module, args, kwargs, output, name=name: rows.__setitem__(name, rows_of(module, args, kwargs)),
        with_kwargs=True) for name, module in modules.items()]
    try:
        yield rows
    finally:
        for handle in handles:
            handle.remove()
