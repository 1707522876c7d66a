"""In-Place TTT (arXiv 2604.06169): the FFN's down projection W_down as a fast weight updated once per chunk.

`chunk_inplace_ttt` is the parallel prefix-sum form used in training and prefill; `naive_chunk_inplace_ttt` is the
sequential chunk-by-chunk reference beside it. `chunk_conv1d` builds the per-chunk convolution of the target.
"""

from ttt_speech.ops.inplace_ttt.chunk import chunk_conv1d, chunk_inplace_ttt, clip_update
from ttt_speech.ops.inplace_ttt.naive import naive_chunk_conv1d, naive_chunk_inplace_ttt

__all__ = ["chunk_conv1d", "chunk_inplace_ttt", "clip_update", "naive_chunk_conv1d", "naive_chunk_inplace_ttt"]
