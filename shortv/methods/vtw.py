"""VTW (K): from layer K on, every visual token leaves the sequence (hidden states and KV cache)."""

from .pruning import TokenPruning


class VTW(TokenPruning):
    name = "vtw"
    summary = "from layer K on, withdraw every visual token (K)"
    kind = "vtw"
    parameters = ("k",)
    required = ("k",)  # no K suits every model: VTW's own rule (`shortv.pruning.choose_vtw_layer`) picks one
