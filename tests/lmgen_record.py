"""`record_main(lm_gen)`: inside `lm_gen.streaming(B)`, wrap moshi's main-transformer step so that every call's input
frame and text logits are kept (cloned), to compare a stream with the parallel forward over the same frames. Import
it as `from lmgen_record import record_main` (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def record_main(lm_gen, around: Callable[[], contextlib.AbstractContextManager] | None = None,
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The lists (frames fed, text logits) that the wrapped step appends to, one entry per step; `around()` is
    entered around each call of the step when given."""
    main = lm_gen._streaming_state.graphed_main
    fed, logits = [], []

    def recorded(input_, *rest):
        with around() if around is not None else contextlib.nullcontext():
            out = main(input_, *rest)
        fed.append(input_.clone())
        logits.append(out[1].clone())
        return out

    lm_gen._streaming_state.graphed_main = recorded
    return fed, logits
