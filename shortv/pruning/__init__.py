"""Token pruning on stock models: FastV (drop the least attended visual tokens after layer K) and VTW (drop all).

``config``: `TokenPruningConfig` (JSON round trip); ``ranking``: the attention received in layer K - 1;
``columns``: cutting a layer's arguments to the kept columns; ``fastv``: the patch (apply / remove);
``vtw``: VTW's KL rule for K. See docs/pruning.md.
"""

from .config import TokenPruningConfig
from .fastv import (
    apply_fastv,
    apply_token_pruning,
    apply_vtw,
    get_pruning_state,
    kept_columns,
    remove_token_pruning,
)
from .vtw import choose_vtw_layer

__all__ = ["TokenPruningConfig", "apply_fastv", "apply_token_pruning", "apply_vtw", "choose_vtw_layer",
           "get_pruning_state", "kept_columns", "remove_token_pruning"]
