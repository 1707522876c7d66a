"""In-Place TTT in Moshi: `InPlaceTTTGating`, a drop-in for moshi's `ActivationGating` whose W_down is a fast weight.

    Z      = silu(x W_gate^T) * (x W_up^T)                  slow weights: `linear_in` (W_gate and W_up stacked)
    V      = Conv1D_chunk(X0) W_target^T                    X0: the target source (`target`, see below)
    dW_i   = V_i^T Z_i,   W^(i) = W0 + lr * sum_{j<i} dW_j  W0: `linear_out.weight`, the pretrained W_down
    O_i    = Z_i W^(i)^T

X0 is, by `target`: "input_embeddings", the full per-frame input embedding Moshi sums (text plus every audio
codebook; the official code's `input_embed`); "token_embeddings", the text-token embedding alone (the paper's
X0; on Moshi mostly padding, and constant on untranscribed audio); "layer_input", the FFN's normalised input.

One semantics everywhere: the training forward, a prefill in pieces, and moshi streaming one frame at a time give
the same outputs. In streaming the tokens of the current, incomplete chunk are buffered (Z and X0) and the update
is applied when the chunk completes, exactly as in the parallel form.

Cast points: `linear_in` (Z) runs in the model's dtype or autocast's, as the base model does. Everything after it
(the target, the update, W0 + dW and the product with Z) runs in float32 with autocast disabled: under bf16, W0 + dW
would round away an update of relative size 1e-3. The fast weight, its buffers and the stored W0 are float32; the
output is cast back to the input's dtype.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from moshi.modules.gating import ActivationGating
from moshi.modules.streaming import State, StreamingModule
from torch import nn

from ttt_speech.nn.stats import fast_weight_stats
from ttt_speech.ops.inplace_ttt import (
    advance_fast_weight,
    check_bounds,
    chunk_centre,
    chunk_conv1d,
    chunk_inplace_ttt,
    chunk_update_spectrum,
    spectrum_summary,
)

TARGET_SOURCES = ("input_embeddings", "token_embeddings", "layer_input")


@dataclass
class InPlaceTTTConfig:
    """In-Place TTT knobs for one gating module.

    Args:
        chunk_size: tokens (frames) per update; the paper's ablation finds 512-1024 best, 256 worse.
        lr: eta, the step size of every chunk update.
        conv: "centred" (depthwise kernel 5 centred, the official code) or "next" (kernel 2 right-padded: token t
            and t+1, the next-token form).
        conv_kernel: kernel size; default 5 for "centred", 2 for "next".
        target: the source X0 of the target. "input_embeddings": the full per-frame input embedding (text plus
            every audio codebook), threaded from `forward_text` by moshi patch 0005; "token_embeddings": the
            text-token embedding (patch 0002), which has no content on untranscribed audio; "layer_input": the
            FFN's normalised input, as the paper's continual-training variant.
        clip_tau: optional bound on each chunk update's Frobenius norm (the paper's inference-time clipping).
        target_init_std: W_target starts diagonal with N(0, std^2) entries; the conv starts at zero, so the model
            starts out exactly as the base model.
        decay: optional factor on W - W0 at every chunk, in (0, 1]: the fast weight forgets geometrically. None:
            no decay (the paper).
        max_delta: optional bound on ||W - W0||_F relative to ||W0||_F, applied after every chunk update. None:
            unbounded (the paper).
        centre_update: remove each chunk's mean from its targets V_i before the update V_i^T Z_i, which then
            carries no rank-one chunk-mean term C mean(V_i) mean(Z_i)^T (the same update as centring Z_i, or both;
            `ops.inplace_ttt.chunk_centre`). False: the paper's update.
    """

    chunk_size: int = 512
    lr: float = 0.3
    conv: str = "centred"
    conv_kernel: int | None = None
    target: str = "input_embeddings"
    clip_tau: float | None = None
    target_init_std: float = 0.02
    decay: float | None = None
    max_delta: float | None = None
    centre_update: bool = False

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.centre_update and self.chunk_size == 1:
            raise ValueError("centre_update needs chunk_size >= 2: a chunk of one token minus its mean is zero, so "
                             "every update would be zero")
        if self.conv not in ("centred", "next"):
            raise ValueError(f"conv must be 'centred' or 'next', got {self.conv!r}")
        if self.conv_kernel is None:
            self.conv_kernel = 5 if self.conv == "centred" else 2
        if self.conv == "centred" and self.conv_kernel % 2 == 0:
            raise ValueError(f"a centred conv needs an odd conv_kernel, got {self.conv_kernel}")
        if self.target not in TARGET_SOURCES:
            raise ValueError(f"target must be one of {TARGET_SOURCES}, got {self.target!r}")
        if self.clip_tau is not None and self.clip_tau <= 0:
            raise ValueError(f"clip_tau must be positive or None, got {self.clip_tau}")
        check_bounds(self.decay, self.max_delta)


@dataclass
class InPlaceTTTState(State):
    """Streaming state, one row per batch element, all float32.

    Args:
        w: the fast weight W_down at the start of the current chunk, [B, D, H].
        z_buf: Z of the current chunk's tokens so far, [B, C, H] (the first `pos` rows are valid).
        x0_buf: X0 of the same tokens, [B, C, D].
        pos: tokens of the current chunk seen so far, [B] (long).
        w0: the initial fast weight rows return to on reset, [D, H].
        chunks: chunk updates applied to each row since its start or reset, [B] (long).
        warned: whether this stream has already warned about running past the training length.
    """

    w: torch.Tensor
    z_buf: torch.Tensor
    x0_buf: torch.Tensor
    pos: torch.Tensor
    w0: torch.Tensor
    chunks: torch.Tensor
    warned: bool = False

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        m = reset_mask.to(self.w.device)
        self.w[m] = self.w0
        self.z_buf[m] = 0.0
        self.x0_buf[m] = 0.0
        self.pos[m] = 0
        self.chunks[m] = 0


class InPlaceTTTGating(StreamingModule[InPlaceTTTState]):
    """Moshi's SiLU gating with W_down (`linear_out`) as an In-Place TTT fast weight.

    Parameter names follow `ActivationGating` (`linear_in`, `linear_out`) so the base model's keys
    `transformer.layers.N.gating.linear_{in,out}.weight` load unchanged; the new ones are `ttt_conv.weight`
    [D, 1, K] and `ttt_target.weight` [D, D] (V = conv(X0) @ ttt_target.weight^T).

    W0 is `linear_out.weight` itself, read at every forward (training: gradients reach it) and, as a float32
    copy refreshed whenever the parameter changes, at every streaming start and reset. So W0 is always the loaded
    weight, also for a model built on the meta device and loaded with `load_state_dict(assign=True)`.

    Args:
        linear_in: the slow gate/up projection, Linear(D, 2H).
        linear_out: W_down, Linear(H, D); its weight is W0.
        activation: the gate's activation (moshi: SiLU).
        config: `InPlaceTTTConfig`.
        layer_idx: for error messages.
    """

    takes_token_embeddings = True  # moshi patches 0002/0005: the layer passes token_ and input_embeddings
    record_stats = False  # set by the trainer's monitor: the next training forward fills `self.stats`
    # set by `load_ttt_lm` from the checkpoint's training record: the most chunk updates a training crop held; an
    # inference sequence or stream that passes it warns once (fast weights may drift past the training length)
    trained_chunks: int | None = None

    def __init__(self, linear_in: nn.Linear, linear_out: nn.Linear, activation, config: InPlaceTTTConfig,
                 layer_idx: int | None = None) -> None:
        super().__init__()
        self.linear_in = linear_in
        self.linear_out = linear_out
        self.activation = activation
        self.config = config
        self.layer_idx = layer_idx
        dim = linear_out.out_features
        factory = {"device": linear_out.weight.device, "dtype": linear_out.weight.dtype}
        self.ttt_conv = nn.Conv1d(dim, dim, config.conv_kernel, groups=dim, bias=False, **factory)
        self.ttt_target = nn.Linear(dim, dim, bias=False, **factory)
        self._w0_cache: tuple[tuple, torch.Tensor] | None = None
        if not self.ttt_conv.weight.is_meta:
            self.reset_ttt_parameters()

    @classmethod
    def from_gating(cls, gating: ActivationGating, config: InPlaceTTTConfig,
                    layer_idx: int | None = None) -> InPlaceTTTGating:
        """Wrap an existing `ActivationGating`, reusing its (possibly loaded) `linear_in`/`linear_out` modules."""
        if not isinstance(gating, ActivationGating):
            raise TypeError(f"layer {layer_idx}: expected moshi's ActivationGating, got {type(gating).__name__}")
        if not isinstance(gating.linear_in, nn.Linear) or not isinstance(gating.linear_out, nn.Linear):
            raise TypeError(f"layer {layer_idx}: In-Place TTT needs plain nn.Linear projections (a quantized or "
                            f"LoRA-fused gating cannot host a fast weight), got {type(gating.linear_out).__name__}")
        return cls(gating.linear_in, gating.linear_out, gating.activation, config, layer_idx)

    @torch.no_grad()
    def reset_ttt_parameters(self) -> None:
        """Explicit init of the new parameters: conv zero, W_target diagonal N(0, target_init_std^2)."""
        self.ttt_conv.weight.zero_()
        self.ttt_target.weight.zero_()
        dim = self.ttt_target.weight.shape[0]
        diag = torch.randn(dim, device=self.ttt_target.weight.device, dtype=torch.float32)
        self.ttt_target.weight.diagonal().copy_(diag * self.config.target_init_std)

    def materialize(self, device: torch.device | str) -> None:
        """Allocate the new (meta) parameters on `device` and initialise them; linear_in/out are left alone."""
        for module in (self.ttt_conv, self.ttt_target):
            module.to_empty(device=device)
        self.reset_ttt_parameters()

    @property
    def where(self) -> str:
        return f"InPlaceTTTGating (layer {self.layer_idx})"

    def initial_fast_weight(self) -> torch.Tensor:
        """A float32 copy of W0 = `linear_out.weight`, [D, H], refreshed when the parameter changes."""
        weight = self.linear_out.weight
        if weight.is_meta:
            raise RuntimeError(f"{self.where}: linear_out.weight is on the meta device; load the checkpoint first")
        key = (weight.data_ptr(), weight.device, weight.dtype, weight._version)
        if self._w0_cache is None or self._w0_cache[0] != key:
            self._w0_cache = (key, weight.detach().float().clone())
        return self._w0_cache[1]

    def _init_streaming_state(self, batch_size: int) -> InPlaceTTTState:
        w0 = self.initial_fast_weight()
        D, H = w0.shape
        C = self.config.chunk_size
        zeros = lambda *s: torch.zeros(*s, device=w0.device, dtype=torch.float32)  # noqa: E731
        return InPlaceTTTState(batch_size, w0.device, w=w0.expand(batch_size, D, H).clone(),
                               z_buf=zeros(batch_size, C, H), x0_buf=zeros(batch_size, C, D),
                               pos=torch.zeros(batch_size, dtype=torch.long, device=w0.device), w0=w0,
                               chunks=torch.zeros(batch_size, dtype=torch.long, device=w0.device))

    def targets(self, x0: torch.Tensor, conv_weight: torch.Tensor | None = None) -> torch.Tensor:
        """V for whole chunks: X0 of shape [B, n*C, D] -> [B, n*C, D] float32 (outside autocast), each chunk
        centred with `centre_update`. `conv_weight` [D, K] replaces the conv's weight (the monitor's probe)."""
        with torch.autocast(x0.device.type, enabled=False):
            weight = self.ttt_conv.weight[:, 0] if conv_weight is None else conv_weight
            conv = chunk_conv1d(x0, weight, self.config.chunk_size, self.config.conv)
            v = conv @ self.ttt_target.weight.float().t()
            return chunk_centre(v, self.config.chunk_size) if self.config.centre_update else v

    def _check_x0(self, x: torch.Tensor, token_embeddings: torch.Tensor | None,
                  input_embeddings: torch.Tensor | None) -> torch.Tensor:
        target = self.config.target
        if target == "layer_input":
            return x
        x0 = token_embeddings if target == "token_embeddings" else input_embeddings
        B, T, D = x.shape
        if x0 is None:
            patch = "0002" if target == "token_embeddings" else "0005"
            raise ValueError(f"{self.where}: needs {target} [B, T, {D}] (target={target!r}), got None. They come "
                             f"from LMModel.forward_text through our moshi patch {patch}; is moshi patched (make "
                             "apply-patches), and is this layer in the main transformer?")
        if x0.shape != (B, T, D):
            raise ValueError(f"{self.where}: {target} must be [{B}, {T}, {D}], got {list(x0.shape)}")
        if x0.device != x.device:
            raise ValueError(f"{self.where}: {target} on {x0.device}, activations on {x.device}")
        return x0

    def _aligned(self, z: torch.Tensor, x0: torch.Tensor, w: torch.Tensor, w_ref: torch.Tensor | None = None):
        """Tokens that start at a chunk boundary, from fast weight w (reference W0 `w_ref`, default w): (output, w
        after the last complete chunk, Z and X0 of the trailing incomplete chunk)."""
        cfg = self.config
        n_full = z.shape[1] // cfg.chunk_size * cfg.chunk_size
        v = self.targets(x0[:, :n_full])
        out, w_next = chunk_inplace_ttt(z, v, w, cfg.lr, cfg.chunk_size, cfg.clip_tau, cfg.decay, cfg.max_delta,
                                        w_ref=w_ref)
        return out, w_next, z[:, n_full:].float(), x0[:, n_full:].float()

    def forward(self, x: torch.Tensor, token_embeddings: torch.Tensor | None = None,
                input_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D] (the normalised FFN input) -> [B, T, D] in x's dtype. `token_embeddings` and
        `input_embeddings` [B, T, D] come from moshi's `forward_text` (patches 0002 and 0005)."""
        x0 = self._check_x0(x, token_embeddings, input_embeddings)
        h = self.linear_in(x)  # the model's dtype or autocast's, as in the base model
        B, T, _ = h.shape
        h = h.view(B, T, 2, -1)
        z = self.activation(h[..., 0, :]) * h[..., 1, :]  # [B, T, H]
        state = self._streaming_state
        with torch.autocast(x.device.type, enabled=False):  # fp32: W0 + dW rounds the update away in bf16
            if state is None:
                w0 = self.linear_out.weight.float()
                out, w_last, _, _ = self._aligned(z, x0, w0)
                if not self.training:
                    self._warn_past_training((T - 1) // self.config.chunk_size)  # updates in use
                if self.record_stats:
                    self.stats = self._stats(out, z, x0, w_last, w0)
                return out.to(x.dtype)
            return self._stream(z, x0, state).to(x.dtype)

    def _warn_past_training(self, chunks: int, state: InPlaceTTTState | None = None) -> None:
        if self.trained_chunks is None or chunks <= self.trained_chunks or (state is not None and state.warned):
            return
        if state is not None:
            state.warned = True
        warnings.warn(f"{self.where}: this {'stream' if state is not None else 'sequence'} runs past the "
                      f"{self.trained_chunks} chunk updates of {self.config.chunk_size} frames seen in training; "
                      "fast weights may drift there (see docs/moshi_ttt.md, bounded fast weights)", stacklevel=3)

    @torch.no_grad()
    def _stats(self, out: torch.Tensor, z: torch.Tensor, x0: torch.Tensor, w_last: torch.Tensor,
               w0: torch.Tensor) -> dict:
        """Fast-weight statistics, the inner loss, and the spectrum of the chunk updates: top-direction energy share
        and effective rank, averaged over chunks and rows (`ops.inplace_ttt.spectrum`).

        While the conv is still zero (step 0: every update is zero) a probe measures whether the target source has
        content: the update a unit conv tap would make from X0 minus its chunk mean, V = (X0 - mean) W_target^T.
        A source constant over the chunk (an all-padding text stream) has none: share 1, effective rank 1. (The
        chunk mean itself, e.g. a silent user stream's embeddings, is a constant direction the conv learns to
        remove; it is left out of the probe.)"""
        C = self.config.chunk_size
        n_full = x0.shape[1] // C * C
        stats = {"kind": "inplace", **fast_weight_stats(w_last, w0), "eta_mean": self.config.lr,
                 "eta_max": self.config.lr, "inner_loss": 0.0}
        if not n_full:
            return stats
        v = self.targets(x0[:, :n_full])
        stats["inner_loss"] = -(out[:, :n_full] * v).sum(-1).mean().item()
        probe = not bool(v.abs().amax() > 0)
        no_content = None
        if probe:
            B, _, D = x0.shape
            chunks = x0[:, :n_full].float().reshape(B, n_full // C, C, D)
            centred = chunks - chunks.mean(2, keepdim=True)
            no_content = centred.square().sum((2, 3)) <= 1e-10 * chunks.square().sum((2, 3))  # [B, n]
            unit = torch.zeros_like(self.ttt_conv.weight[:, 0], dtype=torch.float32)
            unit[:, (unit.shape[1] - 1) // 2 if self.config.conv == "centred" else 0] = 1.0
            v = self.targets(centred.reshape(B, n_full, D), conv_weight=unit)
        share, rank = spectrum_summary(chunk_update_spectrum(v, z[:, :n_full], C))  # [B, n]
        if no_content is not None:
            share = torch.where(no_content, torch.ones_like(share), share)
            rank = torch.where(no_content, torch.ones_like(rank), rank)
        stats.update(update_top_share=share.nanmean().item(), update_eff_rank=rank.nanmean().item(),
                     update_probe=float(probe))
        return stats

    def _stream(self, z: torch.Tensor, x0: torch.Tensor, state: InPlaceTTTState) -> torch.Tensor:
        """Continue each row from its state: finish its current chunk (buffered), then whole chunks, then buffer.

        Per frame, a token that does not complete a chunk costs one [H] x [H, D] product and a buffer write; the
        update (V^T Z over the chunk) runs once, on the frame that completes the chunk.
        """
        if z.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{self.where}: In-Place TTT streaming decides on the host when a chunk completes "
                               "and cannot run inside a CUDA graph; run LMGen with NO_CUDA_GRAPH=1")
        B, T, _ = z.shape
        if state.batch_size != B:
            raise ValueError(f"{self.where}: streaming state holds {state.batch_size} rows, input has {B}")
        C, cfg = self.config.chunk_size, self.config
        out = torch.empty(B, T, state.w.shape[1], dtype=torch.float32, device=z.device)
        positions = state.pos.tolist()
        with torch.no_grad():  # streaming is inference: the state is stored without autograd history
            groups = sorted(set(positions))
            for p in groups:
                if len(groups) == 1 and bool(state.exec_mask.all()):  # the usual case: views, no copies
                    rows = keep = upd = slice(None)
                else:
                    rows = torch.tensor([i for i, q in enumerate(positions) if q == p], device=z.device)
                    keep = state.exec_mask[rows]  # rows whose state advances (moshi's exec_mask)
                    upd = rows[keep]
                zr, xr, w = z[rows].float(), x0[rows].float(), state.w[rows]
                k = min(T, C - p)
                out[rows, :k] = torch.bmm(zr[:, :k], w.transpose(1, 2))
                if p + k < C:
                    state.z_buf[upd, p:p + k] = zr[keep, :k]
                    state.x0_buf[upd, p:p + k] = xr[keep, :k]
                    state.pos[upd] = p + k
                    continue
                z_chunk = torch.cat([state.z_buf[rows, :p], zr[:, :k]], dim=1)  # [b, C, H]
                v = self.targets(torch.cat([state.x0_buf[rows, :p], xr[:, :k]], dim=1))
                dw = torch.einsum("bcd,bch->bdh", v, z_chunk)
                w = advance_fast_weight(w, state.w0, dw, cfg.lr, cfg.clip_tau, cfg.decay, cfg.max_delta)
                o, w, z_rest, x0_rest = self._aligned(zr[:, k:], xr[:, k:], w, state.w0)
                out[rows, k:] = o
                rest = z_rest.shape[1]
                state.w[upd] = w[keep]
                state.z_buf[upd, :rest] = z_rest[keep]
                state.x0_buf[upd, :rest] = x0_rest[keep]
                state.pos[upd] = rest
                state.chunks[upd] += 1 + (T - k) // C  # the chunk completed at frame k, then whole chunks
            if self.trained_chunks is not None:
                self._warn_past_training(int(state.chunks.max()), state)
        return out
