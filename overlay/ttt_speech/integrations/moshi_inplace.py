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

Streaming makes no host read of a tensor value (no `.item()`, no branch on a tensor), so a CUDA graph can capture
moshi's step (`LMGen`): each row's chunk position is a device tensor, a frame adds its rank-one share v_s z_s^T to
an accumulator once its target is final, and the end-of-chunk update (with decay / max_delta / clip_tau) runs at
every frame as masked arithmetic that is the identity in rows whose chunk does not complete.

Cast points: `linear_in` (Z) runs in the model's dtype or autocast's, as the base model does. Everything after it
(the target, the update, W0 + dW and the product with Z) runs in float32 with autocast disabled: under bf16, W0 + dW
would round away an update of relative size 1e-3. The fast weight, its buffers and the stored W0 are float32; the
output is cast back to the input's dtype. With `split_product` and a low-precision Z (a bf16 model or bf16
autocast), the product is split instead: Z W0^T exactly as the base model computes it, plus Z (W - W0)^T from the
float32 delta (cast to Z's dtype for the parallel form's products, `ops.inplace_ttt.split_inplace_ttt`; float32 for
a streamed frame); the update itself stays float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moshi.modules.gating import ActivationGating
from moshi.modules.streaming import State, StreamingModule
from torch import nn

from ttt_speech.nn.stats import fast_weight_stats
from ttt_speech.ops.inplace_ttt import (
    advance_fast_weight,
    check_bounds,
    chunk_centre,
    chunk_conv1d,
    chunk_fast_weights,
    chunk_inplace_ttt,
    chunk_update_spectrum,
    spectrum_summary,
    split_inplace_ttt,
    split_sum,
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
        split_product: where Z is bf16/fp16 (a bf16 model or bf16 autocast), compute the output as Z W0^T exactly
            as the base model does (bit-identical to its `linear_out`) plus Z (W - W0)^T from the float32 delta
            (cast to Z's dtype in the parallel form), added in float32 and rounded once to the output's dtype: the
            prefill's fast path on a GPU. False: the whole product in float32 (Z cast up), as trained so far.
            float32 Z: no effect either way.
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
    split_product: bool = False

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"ttt.chunk_size must be >= 1, got {self.chunk_size}")
        if self.centre_update and self.chunk_size == 1:
            raise ValueError("ttt.centre_update needs chunk_size >= 2: a chunk of one token minus its mean is zero, so "
                             "every update would be zero")
        if self.conv not in ("centred", "next"):
            raise ValueError(f"ttt.conv must be 'centred' or 'next', got {self.conv!r}")
        if self.conv_kernel is None:
            self.conv_kernel = 5 if self.conv == "centred" else 2
        if self.conv_kernel < 1:
            raise ValueError(f"ttt.conv_kernel must be >= 1, got {self.conv_kernel}")
        if self.conv == "centred" and self.conv_kernel % 2 == 0:
            raise ValueError(f"ttt.conv_kernel must be odd with a centred conv, got {self.conv_kernel}")
        if self.target not in TARGET_SOURCES:
            raise ValueError(f"ttt.target must be one of {TARGET_SOURCES}, got {self.target!r}")
        if self.clip_tau is not None and self.clip_tau <= 0:
            raise ValueError(f"ttt.clip_tau must be positive or None, got {self.clip_tau}")
        try:
            check_bounds(self.decay, self.max_delta)
        except ValueError as e:  # named as the config key: ttt.decay, ttt.max_delta
            raise ValueError(f"ttt.{e}") from e


@dataclass
class InPlaceTTTState(State):
    """Streaming state, one row per batch element, all float32 but the counters. A step updates every tensor in
    place by masked arithmetic (no host read, no reallocation), as a CUDA graph replaying the step needs.

    Args:
        w: the fast weight W_down at the start of the current chunk, [B, D, H].
        z_buf: Z of the current chunk's tokens so far, [B, C, H]: the first `pos` rows (the rest is stale; reads
            are masked by position).
        x0_buf: X0 of the same tokens, [B, C, D].
        pos: tokens of the current chunk seen so far, [B] (long).
        w0: the initial fast weight rows return to on reset, [D, H].
        chunks: chunk updates applied to each row since its start or reset, [B] (long).
        acc: sum of v_s z_s^T over the current chunk's tokens s whose target is final (its conv window is inside
            the tokens seen: s + right taps < pos), [B, D, H].
        v_sum: sum of those v_s, [B, D]; z_sum: of those z_s, [B, H] (the centred update's mean term).
        frames: frames fed to this stream by calls made on the host; an upper bound on every row's frames since
            its start (replays of a captured CUDA graph do not count: see `graphed`).
        graphed: whether a step ran under CUDA graph capture.
        warned: whether this stream has already warned about running past the training length.
        check: reads the counters for that warning at the stream's end and at a reset, outside the step.
    """

    w: torch.Tensor
    z_buf: torch.Tensor
    x0_buf: torch.Tensor
    pos: torch.Tensor
    w0: torch.Tensor
    chunks: torch.Tensor
    acc: torch.Tensor
    v_sum: torch.Tensor
    z_sum: torch.Tensor
    frames: int = 0
    graphed: bool = False
    warned: bool = False
    check: Callable[[InPlaceTTTState], None] | None = None

    def reset(self, reset_mask: torch.Tensor) -> None:
        if self.check is not None:
            self.check(self)
        super().reset(reset_mask)
        m = reset_mask.to(self.w.device)
        self.w.copy_(torch.where(m[:, None, None], self.w0, self.w))
        for t in (self.z_buf, self.x0_buf, self.acc, self.v_sum, self.z_sum, self.pos, self.chunks):
            t.masked_fill_(m.view(-1, *[1] * (t.dim() - 1)), 0)

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is None and self.check is not None:
            self.check(self)


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
                               chunks=torch.zeros(batch_size, dtype=torch.long, device=w0.device),
                               acc=zeros(batch_size, D, H), v_sum=zeros(batch_size, D), z_sum=zeros(batch_size, H),
                               check=self._check_stream)

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

    def _aligned(self, z: torch.Tensor, x0: torch.Tensor, w: torch.Tensor):
        """Tokens that start at a chunk boundary, from fast weight w: (output, w after the last complete chunk)."""
        cfg = self.config
        v = self.targets(x0[:, : z.shape[1] // cfg.chunk_size * cfg.chunk_size])
        return chunk_inplace_ttt(z, v, w, cfg.lr, cfg.chunk_size, cfg.clip_tau, cfg.decay, cfg.max_delta)

    def forward(self, x: torch.Tensor, token_embeddings: torch.Tensor | None = None,
                input_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D] (the normalised FFN input) -> [B, T, D] in x's dtype. `token_embeddings` and
        `input_embeddings` [B, T, D] come from moshi's `forward_text` (patches 0002 and 0005)."""
        x0 = self._check_x0(x, token_embeddings, input_embeddings)
        h = self.linear_in(x)  # the model's dtype or autocast's, as in the base model
        B, T, _ = h.shape
        h = h.view(B, T, 2, -1)
        z = self.activation(h[..., 0, :]) * h[..., 1, :]  # [B, T, H]
        state, cfg = self._streaming_state, self.config
        if state is None and self._split(z):  # the base term under the caller's autocast, the rest without
            v = self.targets(x0[:, :T // cfg.chunk_size * cfg.chunk_size])
            out, w_last = split_inplace_ttt(z, v, self.linear_out.weight, self.linear_out.weight, cfg.lr,
                                            cfg.chunk_size, cfg.clip_tau, cfg.decay, cfg.max_delta, out_dtype=x.dtype)
            return self._parallel_done(out, z, x0, w_last)
        # split streaming: the base model's own product, in its dtype and autocast; the TTT term added below
        base = F.linear(z, self.linear_out.weight) if self._split(z) else None
        with torch.autocast(x.device.type, enabled=False):  # fp32: W0 + dW rounds the update away in bf16
            if state is None:
                out, w_last = self._aligned(z, x0, self.linear_out.weight.float())
                return self._parallel_done(out, z, x0, w_last).to(x.dtype)
            return self._stream(z, x0, state, base, x.dtype)

    def _parallel_done(self, out: torch.Tensor, z: torch.Tensor, x0: torch.Tensor,
                       w_last: torch.Tensor) -> torch.Tensor:
        """The training-length warning and the monitor's statistics of a parallel forward; returns `out`."""
        if not self.training:
            self._warn_past_training((z.shape[1] - 1) // self.config.chunk_size)  # updates in use
        if self.record_stats:
            self.stats = self._stats(out, z, x0, w_last, self.linear_out.weight.float())
        return out

    def _split(self, z: torch.Tensor) -> bool:
        """Whether the product is split (`config.split_product` with a low-precision Z)."""
        return self.config.split_product and z.dtype in (torch.bfloat16, torch.float16)

    def _check_stream(self, state: InPlaceTTTState) -> None:
        """The training-length warning for a stream, called at its end and before a reset (host points outside
        the step, where one device read is harmless). Skipped while the host's frame count bounds every row below
        the first update past training, unless a CUDA graph replayed steps the host did not count."""
        if self.trained_chunks is None or state.warned:
            return
        if state.graphed or state.frames > (self.trained_chunks + 1) * self.config.chunk_size:
            # updates in use, as the parallel form counts them ((T - 1) // C): a chunk completed on the row's last
            # frame has been applied but no output has read it yet
            in_use = state.chunks - ((state.pos == 0) & (state.chunks > 0)).long()
            self._warn_past_training(int(in_use.max()), state)

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

    def _stream(self, z: torch.Tensor, x0: torch.Tensor, state: InPlaceTTTState, base: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        """Continue each row from its state, with no host read of a tensor value (CUDA-graph capturable).

        One frame (moshi's step) costs the product with the fast weight, the targets of the 1 + right frames whose
        conv window ends at it, a rank-(1 + right) update of the accumulator and the end-of-chunk update as masked
        per-row coefficients; more frames run the parallel form over the chunks they span, aligned per row on the
        device. `base`: the split product's base term (None: the product in float32); the output is in `dtype`.
        """
        B, T, _ = z.shape
        if state.batch_size != B:
            raise ValueError(f"{self.where}: streaming state holds {state.batch_size} rows, input has {B}")
        if z.is_cuda and torch.cuda.is_current_stream_capturing():
            state.graphed = True  # the graph's replays run no Python: `frames` no longer bounds the rows
        state.frames += T
        with torch.no_grad():  # streaming is inference: the state is stored without autograd history
            step = self._stream_frame if T == 1 else self._stream_span
            return step(z, x0.float(), state, base, dtype)

    def _conv_taps(self) -> tuple[int, int]:
        """The conv's taps before and after the output frame: (left, right)."""
        K = self.config.conv_kernel
        left = (K - 1) // 2 if self.config.conv == "centred" else 0
        return left, K - 1 - left

    def _window_targets(self, window: torch.Tensor) -> torch.Tensor:
        """Uncentred targets of the frames whose conv windows lie in `window` [B, K + J - 1, D]: [B, J, D] (the
        conv as K multiply-adds: a conv kernel call costs more than the arithmetic at this size)."""
        taps = window.unfold(1, self.config.conv_kernel, 1)  # [B, J, D, K]
        conv = (taps * self.ttt_conv.weight[:, 0].float()).sum(-1)  # [B, J, D]
        return conv @ self.ttt_target.weight.float().t()

    def _product(self, z: torch.Tensor, state: InPlaceTTTState, base: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor:
        """One frame's output from the fast weight: [B, 1, D] in `dtype`. Split: the TTT term Z (W - W0)^T with the
        delta in float32 (a GEMV is bound by memory, not by the product's dtype), exactly zero where W = W0."""
        if base is None:
            return torch.bmm(z.float(), state.w.transpose(1, 2)).to(dtype)
        return split_sum(base, torch.bmm(z.float(), (state.w - state.w0).transpose(1, 2)), dtype)

    def _stream_frame(self, z: torch.Tensor, x0: torch.Tensor, state: InPlaceTTTState, base: torch.Tensor | None,
                      dtype: torch.dtype) -> torch.Tensor:
        """One frame per row at its chunk position p (a device tensor); rows outside `exec_mask` keep their state.

        Memory traffic per frame in units of one [B, D, H] float32 pass: the product reads W (1), the accumulator
        update reads and writes `acc` (2), the end-of-chunk update W += f lr acc with f = 1 on completing rows and
        0 elsewhere (3), and the accumulator's reset (2); split_product adds 3, decay 3, clip_tau 1, max_delta the
        general `advance_fast_weight` and a select (about 20). Nothing else touches [B, D, H].
        """
        cfg, C = self.config, self.config.chunk_size
        left, right = self._conv_taps()
        B, _, H = z.shape
        D = x0.shape[-1]
        p, run = state.pos, state.exec_mask
        out = self._product(z, state, base, dtype)
        for buf, new in ((state.z_buf, z.float()), (state.x0_buf, x0)):  # the frame into the buffers at p
            at = p.view(B, 1, 1).expand(B, 1, new.shape[-1])
            buf.scatter_(1, at, torch.where(run.view(B, 1, 1), new, buf.gather(1, at)))
        # the frames s = p - right .. p: the first one's target is final; the others read zeros past p, which is
        # their target only if the chunk ends at p
        q = p[:, None] + torch.arange(-(left + right), right + 1, device=p.device)  # [B, K + right] window
        window = state.x0_buf.gather(1, q.clamp(0, C - 1)[..., None].expand(B, -1, D))
        window = window * ((q >= 0) & (q <= p[:, None]))[..., None]
        v = self._window_targets(window)  # [B, 1 + right, D]
        s = q[:, left + right:] - right  # [B, 1 + right]
        z_s = state.z_buf.gather(1, s.clamp(min=0)[..., None].expand(B, -1, H))
        complete = p == C - 1
        done = complete & run
        first = torch.arange(right + 1, device=p.device) == 0
        m = ((s >= 0) & (first | complete[:, None]) & run[:, None]).float()[..., None]  # [B, 1 + right, 1]
        vm = v * m
        state.acc.baddbmm_(vm.transpose(1, 2), z_s)  # rows that do not run add zero
        f = done.float()[:, None, None]  # [B, 1, 1]
        if cfg.centre_update:  # V minus its chunk mean: sum v z^T - (sum v)(sum z)^T / C, on completing rows
            state.v_sum.add_(vm.sum(1))
            state.z_sum.add_((z_s * m).sum(1))
            state.acc.baddbmm_(state.v_sum[:, :, None] * (-f / C), state.z_sum[:, None, :])
        self._finish_chunks(state, done, f)
        state.acc.mul_(1.0 - f)  # a new chunk starts empty (a multiply: masked_fill_ is slower on CPU)
        if cfg.centre_update:
            state.v_sum.mul_(1.0 - f[:, 0])
            state.z_sum.mul_(1.0 - f[:, 0])
        state.pos.copy_(torch.where(run, (p + 1) % C, p))
        state.chunks.add_(done.long())
        return out

    def _finish_chunks(self, state: InPlaceTTTState, done: torch.Tensor, f: torch.Tensor) -> None:
        """W <- W0 + bound(decay (W - W0) + lr clip(acc)) in place on the rows in `done` [B] (f: done as [B, 1, 1]
        float), by per-row coefficients that are the identity elsewhere (no select, no host branch)."""
        cfg = self.config
        if cfg.max_delta is not None:  # non-linear in W: the general step, then a select
            w = advance_fast_weight(state.w, state.w0, state.acc, cfg.lr, cfg.clip_tau, cfg.decay, cfg.max_delta)
            state.w.copy_(torch.where(done[:, None, None], w, state.w))
            return
        step = cfg.lr * f
        if cfg.clip_tau is not None:
            step = step * (cfg.clip_tau / torch.linalg.matrix_norm(state.acc).clamp_min(1e-30)).clamp(max=1.0)[
                :, None, None]
        if cfg.decay is not None:  # W0 + decay (W - W0) = W + (1 - decay) f (W0 - W): one lerp, no temporary
            state.w.lerp_(state.w0.expand_as(state.w), f * (1.0 - cfg.decay))
        state.w.addcmul_(state.acc, step)

    def _stream_span(self, z: torch.Tensor, x0: torch.Tensor, state: InPlaceTTTState, base: torch.Tensor | None,
                     dtype: torch.dtype) -> torch.Tensor:
        """T > 1 frames per row: each row's buffered chunk and the new frames laid out from its chunk start (on
        the device), the parallel form over the n chunks that any position p < C can span, then per row the
        outputs of its frames, the weight after its last complete chunk and its trailing chunk's buffers."""
        cfg, C = self.config, self.config.chunk_size
        _, right = self._conv_taps()
        B, T, H = z.shape
        D = x0.shape[-1]
        p, run = state.pos, state.exec_mask
        n = (C - 1 + T + C - 1) // C  # chunks spanned from the latest start, p = C - 1
        j = torch.arange((n + 1) * C, device=z.device)  # aligned positions, and one spare chunk of zeros
        src = j[None] - p[:, None]  # [B, (n + 1) C]: index into the new frames
        buffered, fresh = (src < 0)[..., None], ((src >= 0) & (src < T))[..., None]

        def align(buf: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            old = buf.gather(1, j.clamp(max=C - 1)[None, :, None].expand(B, -1, new.shape[-1]))
            now = new.gather(1, src.clamp(0, T - 1)[..., None].expand(-1, -1, new.shape[-1]))
            return torch.where(buffered, old, torch.where(fresh, now, 0.0))

        za, xa = align(state.z_buf, z.float()), align(state.x0_buf, x0)  # [B, (n + 1) C, H or D]
        L = n * C
        zc, ws = chunk_fast_weights(za[:, :L], self.targets(xa[:, :L]), state.w, state.w0, cfg.lr, C,
                                    cfg.clip_tau, cfg.decay, cfg.max_delta)  # ws: [B, n + 1, D, H]
        at = (p[:, None] + torch.arange(T, device=z.device))[..., None].expand(-1, -1, D)  # the new frames
        if base is None:
            out = torch.einsum("bnch,bndh->bncd", zc, ws[:, :n]).reshape(B, L, D).gather(1, at).to(dtype)
        else:
            delta = (ws[:, :n] - state.w0).to(base.dtype)
            ttt = torch.einsum("bnch,bndh->bncd", zc.to(base.dtype), delta).reshape(B, L, D).gather(1, at)
            out = split_sum(base, ttt, dtype)
        nf = (p + T) // C  # [B] chunks each row completes, 0 .. n
        rem = p + T - nf * C

        def pick(a: torch.Tensor) -> torch.Tensor:  # chunk nf of each row
            return a.view(B, -1, *a.shape[2:]).gather(1, nf.view(B, 1, 1, 1).expand(-1, 1, *a.shape[2:]))[:, 0]

        w = pick(ws)
        z_tail, x_tail = pick(za.view(B, n + 1, C, H)), pick(xa.view(B, n + 1, C, D))  # zeros from rem on
        v_tail = chunk_conv1d(x_tail, self.ttt_conv.weight[:, 0], C, cfg.conv) @ self.ttt_target.weight.float().t()
        final = (torch.arange(C, device=z.device)[None] < (rem - right)[:, None]).float()[..., None]  # [B, C, 1]
        acc = torch.einsum("bcd,bch->bdh", v_tail * final, z_tail)
        keep = run.view(B, 1, 1)
        for t, value in ((state.w, w), (state.z_buf, z_tail), (state.x0_buf, x_tail), (state.acc, acc),
                         (state.v_sum, (v_tail * final).sum(1)), (state.z_sum, (z_tail * final).sum(1))):
            t.copy_(torch.where(keep.view(B, *[1] * (t.dim() - 1)), value, t))
        state.pos.copy_(torch.where(run, rem, p))
        state.chunks.add_(torch.where(run, nf, 0))
        return out
