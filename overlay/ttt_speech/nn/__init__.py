"""TTT modules and their streaming state."""

from .ttt import TTTMLP, TTTBase, TTTConfig, TTTLinear, TTTPreConv, TTTState, build_ttt_layer

__all__ = ["TTTBase", "TTTConfig", "TTTLinear", "TTTMLP", "TTTPreConv", "TTTState", "build_ttt_layer"]
