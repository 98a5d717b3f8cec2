"""shortv: freeze visual tokens in ineffective layers of multimodal LLMs (ShortV, arXiv 2504.00502)."""

from .config import ShortVConfig
from .patch import apply_shortv, disable_shortv, get_shortv_state, remove_shortv, using_visual_mask

__all__ = [
    "ShortVConfig",
    "apply_shortv",
    "disable_shortv",
    "get_shortv_state",
    "remove_shortv",
    "using_visual_mask",
]
__version__ = "0.1.0"
