"""In-Place TTT (arXiv 2604.06169): the FFN's down projection W_down as a fast weight updated once per chunk.

`chunk_inplace_ttt` is the parallel prefix-sum form used in training and prefill; `naive_chunk_inplace_ttt` is the
sequential chunk-by-chunk reference beside it. `chunk_conv1d` builds the per-chunk convolution of the target;
`chunk_centre` removes each chunk's mean from it (the chunk-centred update). `advance_fast_weight` is one chunk's
step (streaming). `chunk_update_spectrum` measures how many directions a chunk update spans. Every op runs in float32
outside autocast, except `split_inplace_ttt` (the form for a bf16 model: the base product exactly as the model
computes it, plus the TTT term from float32 deltas, added by `split_sum`). `chunk_fast_weights` gives the weight of
every chunk, for callers that pick one per row (streaming a multi-frame call).
"""

from ttt_speech.ops.inplace_ttt.chunk import (
    advance_fast_weight,
    bound_delta,
    check_bounds,
    chunk_centre,
    chunk_conv1d,
    chunk_fast_weights,
    chunk_inplace_ttt,
    clip_update,
    fp32_no_autocast,
    split_inplace_ttt,
    split_sum,
)
from ttt_speech.ops.inplace_ttt.naive import naive_chunk_centre, naive_chunk_conv1d, naive_chunk_inplace_ttt
from ttt_speech.ops.inplace_ttt.spectrum import chunk_update_spectrum, naive_chunk_update_spectrum, spectrum_summary

__all__ = ["advance_fast_weight", "bound_delta", "check_bounds", "chunk_centre", "chunk_conv1d", "chunk_fast_weights",
           "chunk_inplace_ttt", "chunk_update_spectrum", "clip_update", "fp32_no_autocast", "naive_chunk_centre",
           "naive_chunk_conv1d", "naive_chunk_inplace_ttt", "naive_chunk_update_spectrum", "spectrum_summary",
           "split_inplace_ttt", "split_sum"]
