"""TTT-Linear and TTT-MLP layers (Sun et al. 2024, arXiv 2407.04620) with an explicit, fp32, per-row state.

Parameter names, shapes and init follow ``test-time-training/ttt-lm-pytorch`` (``TTTLinear`` / ``TTTMLP``), so
its layer state_dicts load with ``strict=True`` (with the default options; ``pre_conv`` and ``conv_size`` add keys of
their own). The fast weights are per-sequence state (:class:`TTTState`); the parameters ``W1, b1 (, W2, b2)`` are
only the learned initial state W0. The options beyond the reference (``qk_norm``, ``conv_size``, ``use_rope``,
``eta_schedule``, ``centre``) act on the layer's input side, before the inner-loop op; ``TTTConfig.reference`` and
``TTTConfig.recall`` are the two presets (the integrations default to ``recall``). Semantics: ``docs/ttt.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.ttt import (
    chunk_ttt_linear,
    chunk_ttt_mlp,
    gelu_tanh,
    recurrent_ttt_linear,
    recurrent_ttt_mlp,
)

LAYER_TYPES = ("linear", "mlp")
SCAN_MODES = ("dual", "primal")
DECODE_MODES = ("anchored", "online")
QK_NORMS = ("none", "l2")
ETA_SCHEDULES = ("mean", "sum")

# The option presets (TTTConfig fields). REFERENCE_OPTIONS are ttt-lm-pytorch's (TTTConfig's own defaults);
# RECALL_OPTIONS won the block ablation on the fair recall benchmark (docs/eval.md, "TTT-Linear/MLP block
# ablation"), used there with one head; the integrations' block and LLaMA-Omni layers default to them.
REFERENCE_OPTIONS: dict[str, object] = {"share_qk": False, "pre_conv": False, "qk_norm": "none", "conv_size": 0,
                                        "use_rope": True, "eta_schedule": "mean", "centre": False}
RECALL_OPTIONS: dict[str, object] = {"share_qk": True, "pre_conv": False, "qk_norm": "l2", "conv_size": 0,
                                     "use_rope": False, "eta_schedule": "sum", "centre": True}


@dataclass
class TTTConfig:
    """Configuration of one TTT layer.

    Args:
        hidden_size: model width ``C``.
        num_heads: number of heads ``H``; ``head_dim = C // H`` must be even (RoPE).
        layer_type: ``"linear"`` (TTT-Linear) or ``"mlp"`` (TTT-MLP, inner hidden width ``4 * head_dim``).
        mini_batch_size: inner-loop mini-batch ``b``; also the RoPE period and the length of ``learnable_token_idx``.
        ttt_base_lr: scale of the learnable inner learning rate ``eta``.
        rope_theta: RoPE base; positions restart at 0 in every mini-batch.
        use_gate: multiply the output by ``gelu_tanh(g_proj(x))`` before ``o_proj``.
        share_qk: no ``k_proj``; ``q`` and ``k`` are two causal depthwise convs (``conv_q``, ``conv_k``) over
            ``q_proj(x)``, with their input tail kept in the state.
        pre_conv: the reference's block-level conv (:class:`TTTPreConv`: RMSNorm, causal depthwise conv), applied
            by the layer to its own input as a residual, ``x + pre_conv(x)``, before everything else; its input
            tail is kept in the state. Keys ``pre_conv.norm.weight``, ``pre_conv.conv.{weight,bias}`` (the
            reference's block keys ``conv.*`` under ``pre_conv.``).
        conv_kernel: kernel size of ``conv_q`` / ``conv_k`` and of :class:`TTTPreConv`.
        qk_norm: ``"none"`` (reference) or ``"l2"``: q and k divided by their L2 norm per head (DeltaNet / fla's
            ``qk_norm='l2'``), after centring and before RoPE.
        conv_size: 0 (off, reference) or the kernel of short causal depthwise convs ``q_conv``, ``k_conv``,
            ``v_conv`` (no bias) on the q/k/v projections (DeltaNet / fla's ``conv_size``, 4). Initialised to the
            identity (last tap 1), so the layer starts as without them; their input tail is kept in the state.
            Not with ``share_qk`` (which has its own q/k convs).
        use_rope: rotate q and k by their position in the mini-batch (reference). False: no RoPE in the layer.
        eta_schedule: ``"mean"`` (reference): ``token_idx = 1 / (i + 1) + learnable_token_idx``, so each token
            reads the running mean of the mini-batch's gradients and a commit steps by their mean; ``"sum"``:
            ``token_idx = 1 + learnable_token_idx``, every gradient counts in full (the delta rule's step size).
        centre: subtract from q, k and v their causal running mean per channel (the mean over every token of the
            sequence so far, this one included; after the short convs), so that keys and targets ``v - k`` lose
            their common component. The running sum and count are kept in the state.
        scan_mode: ``"dual"`` (fast, default) or ``"primal"`` (token by token, the reference) for multi-token calls.
        decode_mode: ``"anchored"`` (default; single-token calls equal the full forward) or ``"online"`` (explicit
            opt-in: a single-token call commits its update at once; a different function, see docs/ttt.md).
        initializer_range: std of the q/k/v/o/g projection init (the reference's ``initializer_range``).
        rms_norm_eps: eps of the RMSNorm in :class:`TTTPreConv`.
        check_finite: raise on non-finite ``hidden_states`` (one device sync per multi-token call; single-token
            decode steps are not checked, so that they never sync with the host).
    """

    hidden_size: int
    num_heads: int
    layer_type: str = "linear"
    mini_batch_size: int = 16
    ttt_base_lr: float = 1.0
    rope_theta: float = 10000.0
    use_gate: bool = False
    share_qk: bool = False
    pre_conv: bool = False
    conv_kernel: int = 4
    qk_norm: str = "none"
    conv_size: int = 0
    use_rope: bool = True
    eta_schedule: str = "mean"
    centre: bool = False
    scan_mode: str = "dual"
    decode_mode: str = "anchored"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    check_finite: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want = {"int": int, "float": (int, float), "bool": bool, "str": str}[str(f.type)]
            if isinstance(value, bool) and f.type != "bool" or not isinstance(value, want):
                raise ValueError(f"TTTConfig.{f.name} must be {f.type}, got {value!r}")
        for name in ("hidden_size", "num_heads", "mini_batch_size", "conv_kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"TTTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"TTTConfig.hidden_size ({self.hidden_size}) must be num_heads ({self.num_heads}) times an even "
                "head_dim"
            )
        if self.conv_size < 0:
            raise ValueError(f"TTTConfig.conv_size must be 0 (off) or >= 1, got {self.conv_size}")
        if self.conv_size and self.share_qk:
            raise ValueError("TTTConfig.conv_size needs share_qk=False: share_qk already runs q and k through its own "
                             "causal convs (conv_q, conv_k)")
        for name, allowed in (("layer_type", LAYER_TYPES), ("scan_mode", SCAN_MODES), ("decode_mode", DECODE_MODES),
                              ("qk_norm", QK_NORMS), ("eta_schedule", ETA_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TTTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("ttt_base_lr", "initializer_range", "rms_norm_eps"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"TTTConfig.{name} must be finite and >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"TTTConfig.rope_theta must be finite and > 0, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def reference(cls, hidden_size: int, num_heads: int, **kwargs) -> TTTConfig:
        """ttt-lm-pytorch's layer (:data:`REFERENCE_OPTIONS`, the field defaults): its state_dicts load strictly;
        ``kwargs`` set any other field (``share_qk=True`` is the reference's ``share_qk`` layout)."""
        return cls(hidden_size=hidden_size, num_heads=num_heads, **{**REFERENCE_OPTIONS, **kwargs})

    @classmethod
    def recall(cls, hidden_size: int, num_heads: int = 1, **kwargs) -> TTTConfig:
        """The block ablation's winner (:data:`RECALL_OPTIONS`: ``share_qk``, ``qk_norm="l2"``, ``centre``,
        ``use_rope=False``, ``eta_schedule="sum"``; one head by default). It adds no parameter to the reference's
        ``share_qk`` layout, whose state_dicts load strictly. ``kwargs`` override any field."""
        return cls(hidden_size=hidden_size, num_heads=num_heads, **{**RECALL_OPTIONS, **kwargs})

    def options(self) -> dict[str, object]:
        """This config's values of the preset fields (the keys of :data:`REFERENCE_OPTIONS`)."""
        return {name: getattr(self, name) for name in REFERENCE_OPTIONS}


@dataclass
class TTTState:
    """Streaming state of one TTT layer; every row is an independent sequence.

    All floating tensors are float32 whatever the model dtype, and every tensor lives on one device (the position
    too), so a decode step reads none of it on the host (CUDA-graph capture, see :meth:`TTTBase.forward`).

    Args:
        params: fast weights at the current mini-batch anchor: ``W1`` [B, H, D, F], ``b1`` [B, H, 1, F] and, for
            TTT-MLP, ``W2`` [B, H, F, D], ``b2`` [B, H, 1, D] (``F = D`` for TTT-Linear, ``4 * D`` for TTT-MLP).
        grads: ``sum_j eta_j * grad_j`` over the tokens already seen in the current (uncommitted) mini-batch,
            same keys and shapes as ``params``; zero right after a commit.
        position: of shape [B], int64, on the state's device: tokens each row has seen in its current mini-batch,
            in ``[0, mini_batch_size)``. Per row, so that a reset row restarts at position 0.
        conv_tail: of shape [B, C, conv_kernel - 1], the last ``q_proj`` outputs feeding ``conv_q`` / ``conv_k``
            (``share_qk`` only, else None).
        input_state: the state of the layer's optional input transforms, by name, batch first: ``"pre_conv"``
            [B, C, conv_kernel - 1] (``pre_conv``: the last inputs of its conv), ``"qkv_conv"``
            [B, 3C, conv_size - 1] (``conv_size``: the last q/k/v projections), ``"centre_sum"`` [B, 3C] and
            ``"centre_count"`` [B, 1] (``centre``: running sum of q/k/v and number of tokens). Empty by default.

    The row operations (:meth:`select_rows`, :meth:`where`, :meth:`cat`, :meth:`put_rows`, :meth:`copy_`) act on
    every tensor alike; indices and masks may be on any device (each tensor takes them to its own).
    """

    params: dict[str, Tensor]
    grads: dict[str, Tensor]
    position: Tensor
    conv_tail: Tensor | None = None
    input_state: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.position.shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def _map(self, fn, *others: TTTState) -> TTTState:
        """A state whose every tensor is ``fn(tensor of self, the same tensor of each of others)``."""
        def each(get):
            return fn(get(self), *[get(o) for o in others])

        return TTTState(
            params={n: each(lambda s, n=n: s.params[n]) for n in self.params},
            grads={n: each(lambda s, n=n: s.grads[n]) for n in self.grads},
            position=each(lambda s: s.position),
            conv_tail=None if self.conv_tail is None else each(lambda s: s.conv_tail),
            input_state={n: each(lambda s, n=n: s.input_state[n]) for n in self.input_state},
        )

    def tensors(self) -> list[Tensor]:
        """Every tensor of the state (e.g. to count its bytes)."""
        extra = [] if self.conv_tail is None else [self.conv_tail]
        return [*self.params.values(), *self.grads.values(), self.position, *extra, *self.input_state.values()]

    def detach(self) -> TTTState:
        """The same values cut from the autograd graph (e.g. between truncated-BPTT segments)."""
        return self._map(Tensor.detach)

    def select_rows(self, idx: Tensor) -> TTTState:
        """Rows ``idx`` (of shape [B'], int64) in that order, e.g. to reorder beams; the result owns its memory."""
        return self._map(lambda t: t.index_select(0, idx.to(t.device)))

    index_select = reorder = select_rows

    def _check_rows(self, what: str, other: TTTState, mask: Tensor | None) -> None:
        """Shapes only (no value is read): ``other`` has this state's batch size, ``mask`` is bool of shape [B]."""
        B = self.batch_size
        if other.batch_size != B:
            raise ValueError(f"TTTState.{what}: the other state has batch size {other.batch_size}, this one {B} "
                             "(no broadcasting of rows)")
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (B,)):
            raise ValueError(f"TTTState.{what}: mask must be bool of shape [{B}], got {mask.dtype} "
                             f"{list(mask.shape)}")

    def where(self, mask: Tensor, other: TTTState) -> TTTState:
        """Rows of ``self`` where ``mask`` (of shape [B], bool) is True, else of ``other`` (same batch size)."""
        self._check_rows("where", other, mask)
        return self._map(lambda a, b: torch.where(_rows(mask, a), a, b.to(a.device)), other)

    def put_rows(self, rows: Tensor, part: TTTState) -> TTTState:
        """``self`` with rows ``rows`` (of shape [b], int64) replaced by the rows of ``part`` (batch b, any
        device)."""
        return self._map(lambda a, p: a.index_copy(0, rows.to(a.device), p.to(device=a.device, dtype=a.dtype)), part)

    index_copy = put_rows

    @staticmethod
    def cat(states: Sequence[TTTState]) -> TTTState:
        """The rows of ``states`` one after the other."""
        if not states:
            raise ValueError("TTTState.cat needs at least one state")
        return states[0]._map(lambda *ts: torch.cat(ts), *states[1:])

    def copy_(self, src: TTTState, mask: Tensor | None = None) -> TTTState:
        """In place: every tensor of ``self`` takes the values of ``src`` (same shapes), only in the rows where
        ``mask`` (of shape [B], bool) is True when given. The tensors keep their storage, so a captured CUDA graph
        that reads them sees the new values. Returns ``self``."""
        self._check_rows("copy_", src, mask)

        def put(a: Tensor, s: Tensor) -> Tensor:
            s = s.to(a.device)
            if mask is None:
                return a.copy_(s)
            if torch.is_grad_enabled() and (a.requires_grad or s.requires_grad):
                return a.copy_(torch.where(_rows(mask, a), s, a))
            return torch.where(_rows(mask, a), s, a, out=a)  # one pass (streaming runs without grad)

        self._map(put, src)
        return self


def _rows(mask: Tensor, t: Tensor) -> Tensor:
    """``mask`` [B] on ``t``'s device, shaped to broadcast over the rows of ``t`` [B, ...]."""
    return mask.to(t.device).view(mask.shape[0], *[1] * (t.dim() - 1))


class TTTBase(nn.Module):
    """Multi-head TTT layer; :class:`TTTLinear` and :class:`TTTMLP` choose the inner model.

    Args:
        config: the layer's :class:`TTTConfig`.
    """

    fast_weight_names: tuple[str, ...] = ()
    layer_type: str = ""

    def __init__(self, config: TTTConfig):
        super().__init__()
        if config.layer_type != self.layer_type:
            raise ValueError(
                f"{type(self).__name__} needs TTTConfig.layer_type={self.layer_type!r}, got {config.layer_type!r}"
            )
        self.config = config
        C, H, D, b, K = (
            config.hidden_size,
            config.num_heads,
            config.head_dim,
            config.mini_batch_size,
            config.conv_kernel,
        )
        self.hidden_size, self.num_heads, self.head_dim, self.mini_batch_size = C, H, D, b

        self.q_proj = nn.Linear(C, C, bias=False)
        if not config.share_qk:
            self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)
        if config.share_qk:
            self.conv_q = nn.Conv1d(C, C, K, groups=C, bias=True, padding=K - 1)
            self.conv_k = nn.Conv1d(C, C, K, groups=C, bias=True, padding=K - 1)
        if config.conv_size:
            S = config.conv_size
            self.q_conv = nn.Conv1d(C, C, S, groups=C, bias=False, padding=S - 1)
            self.k_conv = nn.Conv1d(C, C, S, groups=C, bias=False, padding=S - 1)
            self.v_conv = nn.Conv1d(C, C, S, groups=C, bias=False, padding=S - 1)
        if config.pre_conv:
            self.pre_conv = TTTPreConv(config)
        self.learnable_ttt_lr_weight = nn.Parameter(torch.empty(H, 1, C))
        self.learnable_ttt_lr_bias = nn.Parameter(torch.empty(H, 1))
        self.learnable_token_idx = nn.Parameter(torch.empty(b))
        self.ttt_norm_weight = nn.Parameter(torch.empty(H, D))
        self.ttt_norm_bias = nn.Parameter(torch.empty(H, D))
        if config.use_gate:
            self.g_proj = nn.Linear(C, C, bias=False)
        self.post_norm = nn.LayerNorm(C, eps=1e-6)
        for name, shape in self._fast_weight_shapes():
            setattr(self, name, nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    def _fast_weight_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        raise NotImplementedError

    def _ops(self):
        """``(chunk_op, recurrent_op)`` of the inner model."""
        raise NotImplementedError

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise every parameter as ttt-lm-pytorch does, with in-place tensor ops.

        Safe to call again after ``from_pretrained`` / ``no_init_weights`` / ``disable_torch_init``, which turn the
        ``torch.nn.init`` functions and ``nn.Linear.reset_parameters`` into no-ops.
        """
        std = self.config.initializer_range
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj"):
            if hasattr(self, name):
                getattr(self, name).weight.normal_(0.0, std)
        for name in ("conv_q", "conv_k"):
            if hasattr(self, name):
                # PyTorch's Conv1d default, which the reference keeps: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                bound = 1.0 / math.sqrt(self.config.conv_kernel)
                getattr(self, name).weight.uniform_(-bound, bound)
                getattr(self, name).bias.uniform_(-bound, bound)
        for name in ("q_conv", "k_conv", "v_conv"):
            if hasattr(self, name):  # the identity: the layer starts as without the short convs
                getattr(self, name).weight.zero_()[..., -1] = 1.0
        if self.config.pre_conv:
            self.pre_conv.reset_parameters()
        self.learnable_ttt_lr_weight.normal_(0.0, 0.02)
        self.learnable_ttt_lr_bias.zero_()
        self.learnable_token_idx.zero_()
        self.ttt_norm_weight.fill_(1.0)
        self.ttt_norm_bias.zero_()
        self.post_norm.weight.fill_(1.0)
        self.post_norm.bias.zero_()
        for name, _ in self._fast_weight_shapes():
            if name.startswith("W"):
                getattr(self, name).normal_(0.0, 0.02)
            else:
                getattr(self, name).zero_()

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> TTTState:
        """A fresh state: W0 cloned per row (float32, own storage, differentiable w.r.t. W0), zero accumulators,
        position 0, zero conv tails and running sums."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = torch.device(device) if device is not None else self.W1.device
        params = {}
        for name, _ in self._fast_weight_shapes():
            w0 = getattr(self, name).to(device=device, dtype=torch.float32)
            params[name] = w0.unsqueeze(0).expand(batch_size, *w0.shape).clone()
        return TTTState(
            params=params,
            grads={n: torch.zeros(t.shape, dtype=torch.float32, device=device) for n, t in params.items()},
            position=torch.zeros(batch_size, dtype=torch.int64, device=device),
            conv_tail=self._zero_conv_tail(batch_size, device),
            input_state={n: torch.zeros(shape, device=device) for n, shape in self._input_state_shapes(batch_size)},
        )

    def _zero_conv_tail(self, batch_size: int, device: torch.device) -> Tensor | None:
        if not self.config.share_qk:
            return None
        return torch.zeros(batch_size, self.hidden_size, self.config.conv_kernel - 1, device=device)

    def _input_state_shapes(self, batch_size: int) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of ``TTTState.input_state`` for this config."""
        B, C, cfg = batch_size, self.hidden_size, self.config
        shapes = []
        if cfg.pre_conv:
            shapes.append(("pre_conv", (B, C, cfg.conv_kernel - 1)))
        if cfg.conv_size:
            shapes.append(("qkv_conv", (B, 3 * C, cfg.conv_size - 1)))
        if cfg.centre:
            shapes += [("centre_sum", (B, 3 * C)), ("centre_count", (B, 1))]
        return shapes

    def reset_state(self, state: TTTState, mask: Tensor) -> TTTState:
        """Return ``state`` with the rows where ``mask`` (of shape [B], bool) is True back at W0, position 0,
        zero accumulators, conv tails and running sums; the other rows are bit-identical."""
        B = state.batch_size
        if mask.shape != (B,) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be [{B}] bool, got {list(mask.shape)} {mask.dtype}")
        self._check_state(state, B, state.device)
        return self.init_state(B, state.device).where(mask, state)

    def forward(self, hidden_states: Tensor, state: TTTState | None = None) -> tuple[Tensor, TTTState]:
        """Run the layer on ``hidden_states`` (of shape [B, T, C]) from ``state`` (None: :meth:`init_state`).

        Returns ``(output [B, T, C], new_state)``. Any ``T >= 1``; a partial mini-batch at the end stays
        uncommitted in ``new_state``. Cast points: q/k/v and the output projections run in the module / autocast
        dtype; ``eta``, ``token_idx``, RoPE angles, the inner loop and the state are float32; the inner-loop output
        is cast back to the ``q`` dtype before ``post_norm``.

        A single-token call (``T == 1``, a decode step) reads no tensor value on the host: the chunk completion is
        selected on the device (:mod:`ttt_speech.ops.ttt.recurrent`), and the checks that would read values
        (``check_finite``, the range of ``state.position``) are skipped, so the step can be captured in a CUDA
        graph. Its shapes, dtypes and devices are still checked; a NaN input shows in its output. Multi-token calls
        check values (one device sync each).
        """
        x = hidden_states
        step = isinstance(x, Tensor) and x.dim() == 3 and x.shape[1] == 1
        self._check_input(x, values=not step)
        B, T, C = x.shape
        H, D, b = self.num_heads, self.head_dim, self.mini_batch_size
        if state is None:
            state = self.init_state(B, x.device)
        else:
            self._check_state(state, B, x.device, values=not step)

        input_state = dict(state.input_state)
        if self.config.pre_conv:
            y, input_state["pre_conv"] = self.pre_conv(x, state.input_state["pre_conv"])
            x = x + y
        xq, xk, xv, conv_tail = self._qkv(x, state.conv_tail)
        if self.config.conv_size:
            xq, xk, xv, input_state["qkv_conv"] = self._short_conv(xq, xk, xv, state.input_state["qkv_conv"])
        if self.config.centre:
            xq, xk, xv, input_state["centre_sum"], input_state["centre_count"] = self._centre(
                xq, xk, xv, state.input_state["centre_sum"], state.input_state["centre_count"])
        xq, xk, xv = xq.view(B, T, H, D), xk.view(B, T, H, D), xv.view(B, T, H, D)
        if self.config.qk_norm == "l2":
            xq, xk = _l2_norm(xq), _l2_norm(xk)
        if self.config.use_rope:
            pos = (state.position.to(x.device)[:, None] + torch.arange(T, device=x.device)) % b  # [B, T]
            xq, xk = self._rope(xq, pos), self._rope(xk, pos)
        eta, token_idx = self._eta(x)

        chunk_op, recurrent_op = self._ops()
        names = self.fast_weight_names
        args = (xq, xk, xv, eta, token_idx, self.ttt_norm_weight, self.ttt_norm_bias)
        kwargs = dict(
            params=[state.params[n] for n in names], grads=[state.grads[n] for n in names], offset=state.position
        )
        if T == 1:
            # a decode step: the primal form is the same function as the dual one, and cheaper for one token
            o, params, grads = recurrent_op(*args, **kwargs, online=self.config.decode_mode == "online")
        elif self.config.scan_mode == "dual":
            o, params, grads = chunk_op(*args, **kwargs)
        else:
            o, params, grads = recurrent_op(*args, **kwargs)

        o = self.post_norm(o.reshape(B, T, C))
        if self.config.use_gate:
            o = gelu_tanh(self.g_proj(x)) * o
        new_state = TTTState(
            params={n: t.float() for n, t in zip(names, params, strict=True)},
            grads={n: t.float() for n, t in zip(names, grads, strict=True)},
            position=(state.position + T) % b,
            conv_tail=conv_tail,
            input_state=input_state,
        )
        return self.o_proj(o), new_state

    def _qkv(self, x: Tensor, conv_tail: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        if not self.config.share_qk:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x), None
        xqk = self.q_proj(x).mT  # [B, C, T]
        full = torch.cat([conv_tail.to(xqk.dtype), xqk], dim=-1)  # [B, C, K - 1 + T]
        xq = F.conv1d(full, self.conv_q.weight, self.conv_q.bias, groups=self.hidden_size).mT
        xk = F.conv1d(full, self.conv_k.weight, self.conv_k.bias, groups=self.hidden_size).mT
        tail = full[..., full.shape[-1] - conv_tail.shape[-1] :].float()
        return xq, xk, self.v_proj(x), tail

    def _short_conv(self, xq: Tensor, xk: Tensor, xv: Tensor, tail: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``q_conv``, ``k_conv``, ``v_conv`` (causal, depthwise) over q, k, v of shape [B, T, C], continuing from
        ``tail`` [B, 3C, conv_size - 1]; returns the convolved q, k, v and the new tail."""
        C = self.hidden_size
        x = torch.cat([xq, xk, xv], dim=-1).mT  # [B, 3C, T]
        full = torch.cat([tail.to(x.dtype), x], dim=-1)  # [B, 3C, S - 1 + T]
        w = torch.cat([self.q_conv.weight, self.k_conv.weight, self.v_conv.weight], dim=0)  # [3C, 1, S]
        y = F.conv1d(full, w.to(x.dtype), groups=3 * C).mT  # [B, T, 3C]
        new_tail = full[..., full.shape[-1] - tail.shape[-1] :].float()
        return y[..., :C], y[..., C : 2 * C], y[..., 2 * C :], new_tail

    def _centre(self, xq: Tensor, xk: Tensor, xv: Tensor, total: Tensor,
                count: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Subtract from q, k, v (of shape [B, T, C]) their running mean per channel over every token so far, this
        one included, continuing from the running ``total`` [B, 3C] and ``count`` [B, 1] (float32)."""
        C, T = self.hidden_size, xq.shape[1]
        with torch.autocast(xq.device.type, enabled=False):
            x = torch.cat([xq, xk, xv], dim=-1).float()  # [B, T, 3C]
            sums = total[:, None, :] + x.cumsum(dim=1)
            counts = count[:, None, :] + torch.arange(1, T + 1, device=x.device, dtype=torch.float32)[:, None]
            y = (x - sums / counts).to(xq.dtype)
        return y[..., :C], y[..., C : 2 * C], y[..., 2 * C :], sums[:, -1], counts[:, -1]

    def _rope(self, x: Tensor, pos: Tensor) -> Tensor:
        """Rotate the interleaved pairs ``(x[2i], x[2i + 1])`` of ``x`` [B, T, H, D] by ``pos`` [B, T] (fp32 angles;
        the reference's permute_qk / rotate_half / undo_permute_qk, written directly)."""
        D = self.head_dim
        with torch.autocast(x.device.type, enabled=False):
            inv_freq = self.config.rope_theta ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
            ang = pos[..., None, None].float() * inv_freq  # [B, T, 1, D / 2]
            if x.dtype in (torch.float32, torch.float64):
                # one complex multiply instead of six strided passes and a stack (same products, ~1 ulp apart)
                pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], D // 2, 2).contiguous())
                return torch.view_as_real(pairs * torch.polar(torch.ones_like(ang), ang).to(pairs.dtype)).flatten(-2)
            cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
            x0, x1 = x[..., 0::2], x[..., 1::2]
            return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)

    def _eta(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token inner learning rate ``ttt_base_lr * sigmoid(x . w_h + b_h) / head_dim`` of shape [B, T, H]
        and the clamped ``token_idx = 1 / (i + 1) + learnable_token_idx`` (``eta_schedule="sum"``: ``1 +
        learnable_token_idx``) of shape [b], both float32."""
        b = self.mini_batch_size
        with torch.autocast(x.device.type, enabled=False):
            w = self.learnable_ttt_lr_weight.float()[:, 0]  # [H, C]
            lr = torch.einsum("btc,hc->bth", x.float(), w) + self.learnable_ttt_lr_bias.float()[:, 0]
            eta = self.config.ttt_base_lr * torch.sigmoid(lr) / self.head_dim
            if self.config.eta_schedule == "mean":
                base = 1.0 / torch.arange(1, b + 1, device=x.device, dtype=torch.float32)
            else:
                base = torch.ones(b, device=x.device, dtype=torch.float32)
            token_idx = torch.clamp_min(base + self.learnable_token_idx.float(), 0.0)
        return eta, token_idx

    def _check_input(self, x: Tensor, values: bool = True) -> None:
        C = self.hidden_size
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != C or not x.is_floating_point():
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"hidden_states must be a floating [B, T, {C}] tensor, got {got}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"hidden_states must be [B, T, {C}] with B, T >= 1, got {list(x.shape)}")
        # one reduction: a finite sum means finite values; else (inf/NaN, or overflow) the exact check decides
        if values and self.config.check_finite and not bool(torch.isfinite(x.sum())) \
                and not bool(torch.isfinite(x).all()):
            raise ValueError(f"hidden_states [B, T, {C}] = {list(x.shape)} holds NaN or inf values")

    def _check_state(self, state: TTTState, batch_size: int, device: torch.device, values: bool = True) -> None:
        if not isinstance(state, TTTState):
            raise ValueError(f"state must be a TTTState, got {type(state).__name__}")
        B = batch_size
        expected = {name: (B, *shape) for name, shape in self._fast_weight_shapes()}
        for field_name in ("params", "grads"):
            tensors = getattr(state, field_name)
            if set(tensors) != set(expected):
                raise ValueError(f"state.{field_name} must hold {sorted(expected)}, got {sorted(tensors)}")
            for name, shape in expected.items():
                _check_tensor(f"state.{field_name}[{name!r}]", tensors[name], shape, torch.float32, device)
        _check_tensor("state.position", state.position, (B,), torch.int64, device)
        if values and bool((state.position < 0).any() or (state.position >= self.mini_batch_size).any()):
            raise ValueError(f"state.position must be in [0, {self.mini_batch_size}), got {state.position.tolist()}")
        if self.config.share_qk:
            if state.conv_tail is None:
                raise ValueError(f"state.conv_tail must be [{B}, {self.hidden_size}, {self.config.conv_kernel - 1}]")
            tail_shape = (B, self.hidden_size, self.config.conv_kernel - 1)
            _check_tensor("state.conv_tail", state.conv_tail, tail_shape, torch.float32, device)
        elif state.conv_tail is not None:
            raise ValueError("state.conv_tail must be None without share_qk")
        expected = dict(self._input_state_shapes(B))
        if set(state.input_state) != set(expected):
            raise ValueError(f"state.input_state must hold {sorted(expected)} for this config, got "
                             f"{sorted(state.input_state)}")
        for name, shape in expected.items():
            _check_tensor(f"state.input_state[{name!r}]", state.input_state[name], shape, torch.float32, device)


def _l2_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, in float32 (autocast off), back in ``x.dtype``."""
    with torch.autocast(x.device.type, enabled=False):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_tensor(name: str, t: Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor of shape {list(shape)}, got {type(t).__name__}")
    if tuple(t.shape) != shape or t.dtype != dtype or not _same_device(t.device, device):
        want = f"{list(shape)} {str(dtype).removeprefix('torch.')} on {device}"
        got = f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"
        raise ValueError(f"{name} must be {want}, got {got}")


class TTTLinear(TTTBase):
    """TTT-Linear: the inner model is ``x @ W1 + b1`` per head, W1 of shape [H, D, D], b1 [H, 1, D]."""

    fast_weight_names = ("W1", "b1")
    layer_type = "linear"

    def _fast_weight_shapes(self):
        H, D = self.num_heads, self.head_dim
        return [("W1", (H, D, D)), ("b1", (H, 1, D))]

    def _ops(self):
        return chunk_ttt_linear, recurrent_ttt_linear


class TTTMLP(TTTBase):
    """TTT-MLP: the inner model is ``gelu_tanh(x @ W1 + b1) @ W2 + b2`` per head, hidden width ``4 * D``."""

    fast_weight_names = ("W1", "b1", "W2", "b2")
    layer_type = "mlp"

    def _fast_weight_shapes(self):
        H, D = self.num_heads, self.head_dim
        return [("W1", (H, D, 4 * D)), ("b1", (H, 1, 4 * D)), ("W2", (H, 4 * D, D)), ("b2", (H, 1, D))]

    def _ops(self):
        return chunk_ttt_mlp, recurrent_ttt_mlp


def build_ttt_layer(config: TTTConfig) -> TTTBase:
    """:class:`TTTLinear` or :class:`TTTMLP`, as ``config.layer_type`` says."""
    return {"linear": TTTLinear, "mlp": TTTMLP}[config.layer_type](config)


class TTTPreConv(nn.Module):
    """The reference's block-level pre-conv (``Block.conv``): RMSNorm, then a causal depthwise conv.

    Keys ``norm.weight`` [C], ``conv.weight`` [C, 1, K], ``conv.bias`` [C] as in ttt-lm-pytorch's ``Conv``. The
    block adds the residual: ``x = x + pre_conv(x)[0]``.

    Args:
        config: uses ``hidden_size``, ``conv_kernel`` and ``rms_norm_eps``.
    """

    def __init__(self, config: TTTConfig):
        super().__init__()
        C, K = config.hidden_size, config.conv_kernel
        self.hidden_size, self.kernel_size, self.eps = C, K, config.rms_norm_eps
        self.norm = _RMSNormWeight(C)
        self.conv = nn.Conv1d(C, C, K, groups=C, bias=True, padding=K - 1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.kernel_size)
        self.norm.weight.fill_(1.0)
        self.conv.weight.uniform_(-bound, bound)
        self.conv.bias.uniform_(-bound, bound)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """A zero input tail of shape [B, C, K - 1], float32."""
        return torch.zeros(batch_size, self.hidden_size, self.kernel_size - 1, device=device or self.conv.weight.device)

    def forward(self, x: Tensor, tail: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x`` of shape [B, T, C] and an optional tail [B, C, K - 1] -> (``conv(rms_norm(x))`` [B, T, C], new
        tail)."""
        C, K = self.hidden_size, self.kernel_size
        if x.dim() != 3 or x.shape[-1] != C or x.shape[1] == 0:
            raise ValueError(f"x must be [B, T, {C}] with T >= 1, got {list(x.shape)}")
        if tail is None:
            tail = self.init_state(x.shape[0], x.device)
        _check_tensor("tail", tail, (x.shape[0], C, K - 1), torch.float32, x.device)
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        h = (self.norm.weight * h).mT  # [B, C, T]
        full = torch.cat([tail.to(h.dtype), h], dim=-1)
        y = F.conv1d(full, self.conv.weight, self.conv.bias, groups=C).mT
        return y, full[..., full.shape[-1] - (K - 1) :].float()


class _RMSNormWeight(nn.Module):
    """Holds the RMSNorm ``weight`` under the reference's key name; the norm itself is in :class:`TTTPreConv`."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
