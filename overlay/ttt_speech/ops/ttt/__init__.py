"""TTT-Linear / TTT-MLP inner loop as pure tensor functions.

Naming: ``<mode>_ttt_<inner>`` is a fast path and ``naive_<mode>_ttt_<inner>`` its plain reference, with
``mode`` one of ``chunk`` (dual form over mini-batches: training, prefill) and ``recurrent`` (primal form, one token
at a time: decode, and the ``primal`` scan mode), and ``inner`` one of ``linear`` and ``mlp``. All eight compute
the same function ("anchored mini-batch GD", see ``docs/ttt.md``) and share one signature::

    op(q, k, v, eta, token_idx, ln_weight, ln_bias, params, grads=None, offset=None) -> (o, params, grads)

with ``q, k, v`` of shape [B, T, H, D], ``eta`` [B, T, H], ``token_idx`` [b], ``ln_*`` [H, D]. The recurrent ops
also take ``online``.
"""

from .chunk import chunk_ttt_linear, chunk_ttt_mlp
from .loss import gelu_tanh, gelu_tanh_grad, layer_norm, ln_fused_l2_grad, ln_fused_l2_loss
from .naive import naive_chunk_ttt_linear, naive_chunk_ttt_mlp, naive_recurrent_ttt_linear, naive_recurrent_ttt_mlp
from .recurrent import recurrent_ttt_linear, recurrent_ttt_mlp

__all__ = [
    "chunk_ttt_linear",
    "chunk_ttt_mlp",
    "gelu_tanh",
    "gelu_tanh_grad",
    "layer_norm",
    "ln_fused_l2_grad",
    "ln_fused_l2_loss",
    "naive_chunk_ttt_linear",
    "naive_chunk_ttt_mlp",
    "naive_recurrent_ttt_linear",
    "naive_recurrent_ttt_mlp",
    "recurrent_ttt_linear",
    "recurrent_ttt_mlp",
]
