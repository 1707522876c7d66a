"""TTT modules and their streaming state."""

from .ttt import (
    RECALL_OPTIONS,
    REFERENCE_OPTIONS,
    TTTMLP,
    TTTBase,
    TTTConfig,
    TTTLinear,
    TTTPreConv,
    TTTState,
    build_ttt_layer,
)

__all__ = ["RECALL_OPTIONS", "REFERENCE_OPTIONS", "TTTBase", "TTTConfig", "TTTLinear", "TTTMLP", "TTTPreConv",
           "TTTState", "build_ttt_layer"]
