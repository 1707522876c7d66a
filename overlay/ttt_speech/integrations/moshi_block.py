"""The gated TTT block in Moshi: attention -> TTT-Linear/MLP -> FFN, in the layer's `ttt_block` slot.

    x = x + tanh(alpha) * TTT(norm(x))        alpha: one learnable gate per channel, initialised at 0.1

so a pretrained model is nearly unchanged at init (ttt-video-dit's gated residual). The TTT layer is
`ttt_speech.nn.TTTLinear` / `TTTMLP`; its state (fast weights at the mini-batch anchor, the partial mini-batch's
gradient sum, position) is float32 and lives in moshi's streaming state, one row per batch element, so a forward
in one call, in pieces, or frame by frame through `LMGen` gives the same outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from moshi.modules.streaming import State, StreamingModule
from moshi.modules.transformer import create_norm_fn
from torch import nn

from ttt_speech.nn import RECALL_OPTIONS, REFERENCE_OPTIONS, TTTConfig, TTTState, build_ttt_layer
from ttt_speech.nn.stats import ttt_layer_stats

# TTTConfig fields that MoshiTTTConfig sets itself (its ttt_* fields, and the model's width)
OWN_BLOCK_FIELDS = {"hidden_size": "the model's dim", "num_heads": "ttt_num_heads", "layer_type": "ttt_layer_type",
               "mini_batch_size": "ttt_mini_batch_size", "ttt_base_lr": "ttt_base_lr", "use_gate": "ttt_use_gate",
               "share_qk": "ttt_share_qk"}

# MoshiTTTConfig's default block: the recall preset (share_qk through ttt_share_qk, one head through ttt_num_heads)
DEFAULT_BLOCK_NUM_HEADS = 1
DEFAULT_BLOCK_OPTIONS: dict[str, Any] = {k: v for k, v in RECALL_OPTIONS.items()
                                         if k not in OWN_BLOCK_FIELDS and v != REFERENCE_OPTIONS[k]}


def check_block_options(options: dict[str, Any], where: str = "ttt.ttt_options", share_qk: bool = False) -> None:
    """Validate `MoshiTTTConfig.ttt_options`: `TTTConfig` field names (not those MoshiTTTConfig sets through its
    `ttt_*` fields) with values of the right type, together with `ttt_share_qk` = `share_qk`; raises ValueError
    naming the key."""
    if not isinstance(options, dict):
        raise ValueError(f"{where} must be a mapping of TTTConfig fields, got {options!r}")
    known = sorted(f.name for f in fields(TTTConfig) if f.name not in OWN_BLOCK_FIELDS)
    for key in options:
        if key in OWN_BLOCK_FIELDS:
            raise ValueError(f"{where}.{key}: set it with {OWN_BLOCK_FIELDS[key]}, not in ttt_options")
        if key not in known:
            raise ValueError(f"{where}: unknown TTTConfig field {key!r}; known: {', '.join(known)}")
    try:
        TTTConfig(hidden_size=2, num_heads=1, **options)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    try:
        TTTConfig(hidden_size=2, num_heads=1, share_qk=share_qk, **options)
    except ValueError as e:
        raise ValueError(f"{where}: {e} (ttt.ttt_share_qk is {share_qk})") from e


@dataclass
class TTTBlockState(State):
    """Streaming state of a `MoshiTTTBlock`: the TTT layer's `TTTState` (float32), and how to reset its rows.

    Steps and resets write into the tensors of `ttt` in place (`TTTState.copy_`), as moshi's own states do, so a
    CUDA graph captured over a step (`LMGen`'s) reads and writes the live state on every replay."""

    ttt: TTTState
    reset_rows: Callable[[TTTState, torch.Tensor], TTTState]

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self.ttt.copy_(self.reset_rows(self.ttt, reset_mask.to(torch.bool)))


class MoshiTTTBlock(StreamingModule[TTTBlockState]):
    """A pre-norm, tanh-gated TTT residual branch for the `ttt_block` slot of a moshi transformer layer.

    Parameters: `norm.*` (the layer's norm type), `ttt.*` (ttt-lm-pytorch names: `q_proj`, ..., `W1`, `b1`, ...),
    `gate_alpha` [D].

    Args:
        dim: the transformer width D.
        ttt_config: the TTT layer (`hidden_size` must equal `dim`).
        norm: moshi norm type of the host layer (e.g. "rms_norm_f32").
        gate_init: initial alpha; tanh(0.1) ~ 0.1 lets the pretrained path dominate at first.
        layer_idx: for error messages.
    """

    record_stats = False  # set by the trainer's monitor: the next training forward fills `self.stats`

    def __init__(self, dim: int, ttt_config: TTTConfig, norm: str = "rms_norm_f32", gate_init: float = 0.1,
                 layer_idx: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if ttt_config.hidden_size != dim:
            raise ValueError(f"TTT block (layer {layer_idx}): ttt hidden_size {ttt_config.hidden_size} != dim {dim}")
        self.layer_idx = layer_idx
        self.gate_init = gate_init
        self.norm = create_norm_fn(norm, dim, device=device, dtype=dtype)
        self.ttt = build_ttt_layer(ttt_config).to(device=device, dtype=dtype)
        self.gate_alpha = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        if not self.gate_alpha.is_meta:
            self.reset_ttt_parameters()

    @torch.no_grad()
    def reset_ttt_parameters(self) -> None:
        """Explicit init of everything the block adds (it adds only new parameters)."""
        self.gate_alpha.fill_(self.gate_init)
        if hasattr(self.norm, "alpha"):  # moshi's RMSNorm
            self.norm.alpha.fill_(1.0)
        else:
            self.norm.reset_parameters()
        self.ttt.reset_parameters()

    def materialize(self, device: torch.device | str) -> None:
        """Allocate meta parameters on `device` and initialise them (a base checkpoint has none of them)."""
        self.to_empty(device=device)
        self.reset_ttt_parameters()

    def _init_streaming_state(self, batch_size: int) -> TTTBlockState:
        device = self.gate_alpha.device
        return TTTBlockState(batch_size, device, ttt=self.ttt.init_state(batch_size, device),
                             reset_rows=self.ttt.reset_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D] in x's dtype.

        With float32 parameters (the trainer's master weights) the block runs in float32 with autocast disabled:
        under bf16 autocast the TTT layer's output `q + LN(z)` and its projections would be rounded to bf16, where
        the part an update of relative size 1e-3 contributes vanishes (29% off at |dW|/|W0| = 3.6e-3, 88% at 1e-3,
        TTT-Linear). bf16 parameters keep the module's dtype."""
        dtype = self.gate_alpha.dtype  # named: autocast's default on CUDA is float16, not the module's bf16
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return self._forward(x).to(x.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.gate_alpha.dtype  # fp32: the whole block, input included
        y = self.norm(x.to(dtype))
        state = self._streaming_state
        if state is None:
            out, final = self.ttt(y.to(dtype))
            if self.record_stats:
                self.stats = {"kind": "block", **ttt_layer_stats(self.ttt, y.to(dtype), final),
                              "gate": torch.tanh(self.gate_alpha.detach().float()).mean().item()}
        else:
            if state.batch_size != x.shape[0]:
                raise ValueError(f"TTT block (layer {self.layer_idx}): streaming state holds {state.batch_size} "
                                 f"rows, input has {x.shape[0]}")
            with torch.no_grad():  # streaming is inference: the state is stored without autograd history
                out, new = self.ttt(y.to(dtype), state.ttt)
                # in place, and only the rows moshi's exec_mask runs (no host branch on the mask: graph capture)
                state.ttt.copy_(new, state.exec_mask)
        return x.to(out.dtype) + torch.tanh(self.gate_alpha).to(out.dtype) * out

