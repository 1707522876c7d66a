"""Argument checks and small helpers shared by the TTT ops."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Offset = Tensor | Sequence[int] | None


def shape_str(t: Tensor) -> str:
    return str(list(t.shape))


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32, or fp64 when any input is fp64: the inner loop never runs below fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def param_shapes(kind: str, B: int, H: int, D: int, F: int) -> list[tuple[str, tuple[int, ...]]]:
    """Expected fast-weight names and shapes; ``F`` is the TTT-MLP hidden width."""
    if kind == "linear":
        return [("W1", (B, H, D, D)), ("b1", (B, H, 1, D))]
    return [("W1", (B, H, D, F)), ("b1", (B, H, 1, F)), ("W2", (B, H, F, D)), ("b2", (B, H, 1, D))]


def check_ttt_args(
    kind: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    token_idx: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    params: Sequence[Tensor],
    grads: Sequence[Tensor] | None,
    offset: Offset,
    on_device: bool = False,
) -> list[int] | Tensor:
    """Validate the common op signature; return the per-row offsets as Python ints, or with ``on_device`` as an
    int64 tensor [B] on ``q``'s device. An offset given as a tensor with ``on_device`` is checked for its shape
    and dtype only: its values are not read on the host (no device sync, so the caller can be captured in a CUDA
    graph)."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, D], got {shape_str(q)}")
    B, T, H, D = q.shape
    if T == 0:
        raise ValueError(f"q must be [B, T, H, D] with T >= 1, got {shape_str(q)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must be [{B}, {T}, {H}, {D}], got {shape_str(t)}")
    if eta.shape != (B, T, H):
        raise ValueError(f"eta must be [{B}, {T}, {H}], got {shape_str(eta)}")
    if token_idx.dim() != 1 or token_idx.numel() == 0:
        raise ValueError(f"token_idx must be [mini_batch_size], got {shape_str(token_idx)}")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t.shape != (H, D):
            raise ValueError(f"{name} must be [{H}, {D}], got {shape_str(t)}")
    n_params = 2 if kind == "linear" else 4
    if len(params) != n_params:
        raise ValueError(f"params must hold {n_params} tensors for ttt_{kind}, got {len(params)}")
    F = params[0].shape[-1] if params[0].dim() == 4 else -1
    for (name, shape), t in zip(param_shapes(kind, B, H, D, F), params, strict=True):
        if tuple(t.shape) != shape:
            raise ValueError(f"params {name} must be {list(shape)}, got {shape_str(t)}")
    if grads is not None:
        if len(grads) != n_params:
            raise ValueError(f"grads must hold {n_params} tensors for ttt_{kind}, got {len(grads)}")
        for (name, shape), t in zip(param_shapes(kind, B, H, D, F), grads, strict=True):
            if tuple(t.shape) != shape:
                raise ValueError(f"grads {name} must be {list(shape)}, got {shape_str(t)}")
    b = token_idx.numel()
    if on_device and isinstance(offset, Tensor):
        if offset.shape != (B,) or offset.is_floating_point() or offset.is_complex() or offset.dtype == torch.bool:
            raise ValueError(f"offset must be an integer tensor [{B}], got {shape_str(offset)} {offset.dtype}")
        offset = offset.to(device=q.device, dtype=torch.int64)
        # the values on the device: no host read (an error surfaces at the next sync on CUDA, at once on the CPU)
        torch._assert_async(((offset >= 0) & (offset < b)).all(), f"offset must hold values in [0, {b})")
        return offset
    if offset is None:
        offsets = [0] * B
    else:
        offsets = [int(o) for o in (offset.tolist() if isinstance(offset, Tensor) else offset)]
        if len(offsets) != B or any(o < 0 or o >= b for o in offsets):
            raise ValueError(f"offset must be [{B}] with values in [0, {b}), got {offsets}")
    return torch.tensor(offsets, dtype=torch.int64, device=q.device) if on_device else offsets
