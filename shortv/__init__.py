"""shortv: freeze visual tokens in ineffective layers of multimodal LLMs (ShortV, arXiv 2504.00502).

Re-exports only; each name lives in the module that owns it.
"""

from .config import ShortVConfig
from .contribution import CalibrationSample, LCResult, layer_contribution
from .evaluation import evaluate
from .patch import apply_shortv, disable_shortv, get_shortv_state, remove_shortv, using_visual_mask
from .selection import select_layers, select_operators

__all__ = [
    "CalibrationSample",
    "LCResult",
    "ShortVConfig",
    "apply_shortv",
    "disable_shortv",
    "evaluate",
    "get_shortv_state",
    "layer_contribution",
    "remove_shortv",
    "select_layers",
    "select_operators",
    "using_visual_mask",
]
__version__ = "0.1.0"
