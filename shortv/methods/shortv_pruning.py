"""ShortV composed with token pruning (the paper's ShortV + FastV, and ShortV + VTW): fast ShortV layers freeze all
visual tokens before K and the kept ones from K on (`TokenPruningConfig.shortv_layers`)."""

from .pruning import TokenPruning


class ShortVFastV(TokenPruning):
    name = "shortv+fastv"
    summary = "ShortV layers and FastV in one patch (layers, K, R, rank)"
    kind = "fastv"
    with_shortv = True
    parameters = ("layers", "k", "ratio", "rank")
    required = ("layers",)


class ShortVVTW(TokenPruning):
    name = "shortv+vtw"
    summary = "ShortV layers and VTW in one patch (layers, K)"
    kind = "vtw"
    with_shortv = True
    parameters = ("layers", "k")
    required = ("layers", "k")
