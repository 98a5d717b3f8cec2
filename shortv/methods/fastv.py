"""FastV (K, R): after layer K - 1, each sample keeps the ``1 - R`` of its visual tokens it attends to most."""

from .pruning import TokenPruning


class FastV(TokenPruning):
    name = "fastv"
    summary = "after layer K-1 keep the (1-R) most attended visual tokens (K, R, rank)"
    kind = "fastv"
    parameters = ("k", "ratio", "rank")
