"""LLaMA-Omni / Llama (transformers 4.43): TTT layers in the decoder, a cache for `generate`, multi-turn sessions.

`patches/llama-omni/0001-*.patch` makes `OmniSpeechLlamaForCausalLM.__init__` call `apply_ttt(self, config)` before
`post_init()` when `config.use_ttt` is set; `LlamaTTTForCausalLM` does the same for a plain Llama checkpoint, and
`apply_ttt` also works on any constructed `LlamaForCausalLM`. What goes where (docs/llama_omni.md):

- `replace`: `layer.self_attn` becomes `LlamaTTTSelfAttention`; keys `model.layers.{i}.self_attn.ttt.*`.
- `gated_residual`: the attention stays, gets a child `ttt` and a parameter `ttt_gate` [C], and a forward hook adds
  `tanh(ttt_gate) * ttt(x)` to its output; keys `...self_attn.ttt.*`, `...self_attn.ttt_gate`.

The TTT state (float32 fast weights, `ttt_speech.nn.TTTState`) lives in `TTTDynamicCache` next to the KV of the
attention layers. Only the instances in `model.model.layers` are touched (LLaMA-Omni's CTC unit generator builds
its own `LlamaDecoderLayer`s).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers import DynamicCache, LlamaForCausalLM

from ttt_speech.nn import TTTBase, TTTConfig, TTTState, build_ttt_layer

logger = logging.getLogger(__name__)

# the cache and the decoder-layer call signature are those of transformers 4.43 (LLaMA-Omni's pin); transformers 5
# rewrote DynamicCache
if not transformers.__version__.startswith("4."):
    raise ImportError(f"ttt_speech.integrations.llama_omni needs transformers 4.43 (LLaMA-Omni's pin), found "
                      f"{transformers.__version__}")
if not transformers.__version__.startswith("4.43."):
    logger.warning("ttt_speech.integrations.llama_omni is tested with transformers 4.43.4, found %s",
                   transformers.__version__)

MODES = ("replace", "gated_residual")
NON_LORA_FILE = "non_lora_trainables.bin"
_TTT_KEY = re.compile(r"(^|\.)layers\.(\d+)\.self_attn\.(ttt\.|ttt_gate$)")


def _is_ttt_key(key: str) -> bool:
    """A state-dict key of a TTT parameter (LoRA adapters on TTT projections belong to the adapter, not to TTT)."""
    return bool(_TTT_KEY.search(key)) and ".lora_" not in key


# config.json as LlamaTTTConfig.write_to saved it before the layer options existed: every field of that time, none
# of the option fields. Such a config meant ttt-lm-pytorch's layer, whatever the option defaults are now.
_SAVED_BEFORE_OPTIONS = {"use_ttt", "ttt_layers", "ttt_layer_type", "ttt_mode", "ttt_mini_batch_size", "ttt_base_lr",
                         "ttt_num_heads", "ttt_use_gate", "ttt_share_qk", "ttt_rope_theta", "ttt_gate_init",
                         "ttt_initializer_range", "ttt_check_finite"}
_OPTIONS_BEFORE = {"ttt_pre_conv": False, "ttt_conv_kernel": 4, "ttt_qk_norm": "none", "ttt_conv_size": 0,
                   "ttt_use_rope": True, "ttt_eta_schedule": "mean", "ttt_centre": False}
_OPTION_FIELDS = set(_OPTIONS_BEFORE)


@dataclasses.dataclass
class LlamaTTTConfig:
    """The TTT fields of a Llama / LLaMA-Omni config (saved in config.json under these names).

    Args:
        use_ttt: install TTT layers when the model is constructed.
        ttt_layers: decoder layer indices; None means the top quarter (24-31 for Llama-3.1-8B's 32 layers).
        ttt_layer_type: "linear" (TTT-Linear) or "mlp" (TTT-MLP).
        ttt_mode: "replace" (TTT instead of attention) or "gated_residual" (attention + tanh-gated TTT).
        ttt_mini_batch_size: inner-loop mini-batch; also the period of the TTT layers' RoPE positions.
        ttt_base_lr: scale of the learnable inner learning rate.
        ttt_num_heads: TTT heads; None means the model's `num_attention_heads`. Default 1 (the recall preset).
        ttt_use_gate: the TTT layer's own output gate `gelu(g_proj(x))` (not the residual gate).
        ttt_share_qk: q and k from one projection through two causal convs (default: on, the recall preset).
        ttt_rope_theta: RoPE base of the TTT layers (positions restart every mini-batch).
        ttt_pre_conv, ttt_conv_kernel, ttt_qk_norm, ttt_conv_size, ttt_use_rope, ttt_eta_schedule, ttt_centre: the
            TTT layer's input options, `TTTConfig`'s fields of the same names without `ttt_` (docs/ttt.md,
            "Options"). The defaults (with `ttt_share_qk` and one head) are the recall preset, `TTTConfig.recall`:
            `ttt_qk_norm="l2"`, `ttt_use_rope=False`, `ttt_eta_schedule="sum"`, `ttt_centre=True`, the block
            ablation's winner (docs/eval.md). ttt-lm-pytorch's layer: `ttt_share_qk=False`, `ttt_qk_norm="none"`,
            `ttt_use_rope=True`, `ttt_eta_schedule="mean"`, `ttt_centre=False`, `ttt_num_heads=None`.
        ttt_gate_init: initial `ttt_gate` (gated_residual); tanh(0.1) ~ 0.1 keeps the model near the pretrained one.
        ttt_initializer_range: std of the TTT projections at init; None means the model's `initializer_range`.
        ttt_check_finite: the TTT layers raise on NaN/inf input (one device sync per layer and call).
    """

    use_ttt: bool = False
    ttt_layers: list[int] | None = None
    ttt_layer_type: str = "linear"
    ttt_mode: str = "replace"
    ttt_mini_batch_size: int = 64
    ttt_base_lr: float = 1.0
    ttt_num_heads: int | None = 1
    ttt_use_gate: bool = False
    ttt_share_qk: bool = True
    ttt_rope_theta: float = 10000.0
    ttt_pre_conv: bool = False
    ttt_conv_kernel: int = 4
    ttt_qk_norm: str = "l2"
    ttt_conv_size: int = 0
    ttt_use_rope: bool = False
    ttt_eta_schedule: str = "sum"
    ttt_centre: bool = True
    ttt_gate_init: float = 0.1
    ttt_initializer_range: float | None = None
    ttt_check_finite: bool = True

    def __post_init__(self) -> None:
        if self.ttt_mode not in MODES:
            raise ValueError(f"config.ttt_mode must be one of {MODES}, got {self.ttt_mode!r}")
        if not isinstance(self.use_ttt, bool):
            raise ValueError(f"config.use_ttt must be a bool, got {self.use_ttt!r}")
        if isinstance(self.ttt_gate_init, bool) or not isinstance(self.ttt_gate_init, (int, float)):
            raise ValueError(f"config.ttt_gate_init must be a number, got {self.ttt_gate_init!r}")
        if self.ttt_layers is not None:
            if not isinstance(self.ttt_layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.ttt_layers
            ):
                raise ValueError(f"config.ttt_layers must be a list of ints or None, got {self.ttt_layers!r}")
            self.ttt_layers = list(self.ttt_layers)

    @classmethod
    def from_config(cls, config: Any) -> LlamaTTTConfig:
        """Read `use_ttt` and the `ttt_*` attributes of a transformers config; an unknown `ttt_*` attribute (a typo)
        is an error. A config saved before the layer options existed (it lists every field of that time and none of
        the options) keeps its meaning: ttt-lm-pytorch's layer options, not the recall preset's defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in vars(config) if k.startswith("ttt_") and k not in names)
        if unknown:
            raise ValueError(f"unknown TTT config keys {unknown}; known: {sorted(names)}")
        values = {n: getattr(config, n) for n in names if hasattr(config, n)}
        if _SAVED_BEFORE_OPTIONS <= values.keys() and not _OPTION_FIELDS & values.keys():
            values.update(_OPTIONS_BEFORE)
        return cls(**values)

    def write_to(self, config: Any) -> None:
        """Set every field on `config`, so config.json records the resolved values."""
        for f in dataclasses.fields(self):
            setattr(config, f.name, getattr(self, f.name))

    def layer_indices(self, num_layers: int) -> list[int]:
        layers = list(range(num_layers - max(1, num_layers // 4), num_layers)) if self.ttt_layers is None \
            else list(self.ttt_layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad or len(set(layers)) != len(layers) or not layers:
            raise ValueError(f"config.ttt_layers must be distinct indices in [0, {num_layers}), got {layers}")
        return sorted(layers)

    def ttt_config(self, hidden_size: int, num_heads: int, initializer_range: float) -> TTTConfig:
        return TTTConfig(
            hidden_size=hidden_size,
            num_heads=self.ttt_num_heads or num_heads,
            layer_type=self.ttt_layer_type,
            mini_batch_size=self.ttt_mini_batch_size,
            ttt_base_lr=float(self.ttt_base_lr),
            rope_theta=float(self.ttt_rope_theta),
            use_gate=self.ttt_use_gate,
            share_qk=self.ttt_share_qk,
            pre_conv=self.ttt_pre_conv,
            conv_kernel=self.ttt_conv_kernel,
            qk_norm=self.ttt_qk_norm,
            conv_size=self.ttt_conv_size,
            use_rope=self.ttt_use_rope,
            eta_schedule=self.ttt_eta_schedule,
            centre=self.ttt_centre,
            initializer_range=float(
                initializer_range if self.ttt_initializer_range is None else self.ttt_initializer_range
            ),
            check_finite=self.ttt_check_finite,
        )


class TTTDynamicCache(DynamicCache):
    """transformers 4.43 `DynamicCache` holding KV for attention layers and a float32 `TTTState` for TTT layers.

    KV is kept only for layers that call `update` (attention layers; in gated_residual mode every layer), in dense
    slots: `key_cache[slot]` of shape [B, kv_heads, S, head_dim] belongs to layer `kv_layers[slot]`. TTT states are in
    `ttt_states[layer_idx]`. `get_seq_length(i)` is the KV length of layer i, or the number of tokens TTT layer i has
    seen, so `generate` derives the right `cache_position` also with a TTT layer at index 0.

    `generate` builds a plain `DynamicCache`; the first TTT layer that sees it turns it into a `TTTDynamicCache` in
    place (the same object, which `LlamaModel` and `generate` keep). `reorder_cache` (beam search),
    `batch_select_indices`, `batch_repeat_interleave`, `batch_split` and `from_batch_splits` move TTT rows with the
    KV rows. `crop` cannot rewind fast weights and raises. Legacy tuples (`to_legacy_cache`) carry no TTT state.

    Attributes:
        ttt_states: TTT layer index -> its state, every floating tensor float32.
        token_mask: of shape [B, T] bool or None; when set (by `ConversationSession`), TTT layers feed only the True
            tokens of the next forward into their state. When None they infer it from the attention mask.
    """

    def __init__(self) -> None:
        super().__init__()
        self._init_ttt()

    def _init_ttt(self, kv_layers: Sequence[int] = ()) -> None:
        self.ttt_states: dict[int, TTTState] = {}
        self.token_mask: Tensor | None = None
        self._kv_slot: dict[int, int] = {layer: slot for slot, layer in enumerate(kv_layers)}
        self._ttt_seen: dict[int, int] = {}

    @classmethod
    def adopt(cls, cache: Any, layer_idx: int, cache_position: Tensor | None) -> TTTDynamicCache:
        """`cache` as a `TTTDynamicCache`: itself, or a plain `DynamicCache` of this forward, turned in place."""
        if isinstance(cache, TTTDynamicCache):
            return cache
        if type(cache) is not DynamicCache:
            raise ValueError(
                f"TTT layer {layer_idx}: past_key_values must be a DynamicCache (generate's default) or a "
                f"TTTDynamicCache, got {type(cache).__name__}; static, sliding-window, quantized and offloaded caches "
                "cannot hold TTT states (do not set cache_implementation)")
        start = int(cache_position[0]) if cache_position is not None and cache_position.numel() else 0
        if start:
            raise ValueError(
                f"TTT layer {layer_idx}: the DynamicCache already holds {start} tokens but no TTT state (a cache "
                "rebuilt from legacy tuples?); pass the TTTDynamicCache returned by the previous call "
                "(outputs.past_key_values) to continue")
        # a plain DynamicCache appends KV in call order, so before the first TTT layer slot i is layer i
        cache.__class__ = cls
        cache._init_ttt(kv_layers=range(len(cache.key_cache)))
        return cache

    @property
    def kv_layers(self) -> list[int]:
        """Layer indices holding KV, in slot order."""
        return sorted(self._kv_slot, key=self._kv_slot.get)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
        slot = self._kv_slot.get(layer_idx)
        if layer_idx == 0:
            self._seen_tokens += key_states.shape[-2]
        if slot is None:
            self._kv_slot[layer_idx] = len(self.key_cache)
            self.key_cache.append(key_states)
            self.value_cache.append(value_states)
            return key_states, value_states
        self.key_cache[slot] = torch.cat([self.key_cache[slot], key_states], dim=-2)
        self.value_cache[slot] = torch.cat([self.value_cache[slot], value_states], dim=-2)
        return self.key_cache[slot], self.value_cache[slot]

    def update_ttt(self, layer_idx: int, state: TTTState, num_tokens: int) -> None:
        """Store the state of TTT layer `layer_idx` after a forward over `num_tokens` cache positions."""
        self.ttt_states[layer_idx] = state
        self._ttt_seen[layer_idx] = self._ttt_seen.get(layer_idx, 0) + num_tokens
        if layer_idx == 0 and 0 not in self._kv_slot:
            self._seen_tokens += num_tokens

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        layer_idx = 0 if layer_idx is None else layer_idx
        slot = self._kv_slot.get(layer_idx)
        if slot is not None:
            return self.key_cache[slot].shape[-2]
        return self._ttt_seen.get(layer_idx, 0)

    def __len__(self) -> int:
        """Number of layers holding state (KV or TTT); 0 for an empty cache."""
        return len(set(self._kv_slot) | set(self.ttt_states))

    def __getitem__(self, layer_idx: int) -> tuple[Tensor, Tensor]:
        slot = self._kv_slot.get(layer_idx)
        if slot is None:
            where = "is a TTT layer: its state is cache.ttt_states[i]" if layer_idx in self.ttt_states \
                else "holds nothing"
            raise KeyError(f"layer {layer_idx} {where}; KV layers: {self.kv_layers}")
        return self.key_cache[slot], self.value_cache[slot]

    def __iter__(self):
        """(key, value) of the attention layers, in layer order."""
        for layer in sorted(self._kv_slot):
            yield self[layer]

    def to_legacy_cache(self) -> tuple[tuple[Tensor, Tensor], ...]:
        if self.ttt_states:
            logger.warning_once(
                "TTTDynamicCache.to_legacy_cache drops the TTT states; pass past_key_values=TTTDynamicCache() to "
                "keep them")
        return tuple(self)

    @classmethod
    def from_legacy_cache(cls, past_key_values: Any = None) -> TTTDynamicCache:
        if past_key_values:
            raise ValueError("legacy KV tuples hold no TTT state; a TTT model continues only from a TTTDynamicCache")
        return cls()

    def crop(self, max_length: int) -> None:
        length = self.get_seq_length()
        if max_length < 0:
            max_length = length + max_length
        if length <= max_length:
            return
        raise ValueError(
            f"cannot crop a TTT cache from {length} to {max_length} tokens: fast weights cannot be rewound "
            "(assisted decoding and contrastive search are not supported with TTT layers)")

    def _select_rows(self, idx: Tensor) -> None:
        for slot in range(len(self.key_cache)):
            device = self.key_cache[slot].device
            self.key_cache[slot] = self.key_cache[slot].index_select(0, idx.to(device))
            self.value_cache[slot] = self.value_cache[slot].index_select(0, idx.to(device))
        self.ttt_states = {i: s.index_select(idx) for i, s in self.ttt_states.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder KV and TTT rows for beam search: row r becomes old row `beam_idx[r]`."""
        self._select_rows(beam_idx.long())

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select_rows(torch.as_tensor(indices).long().flatten())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(torch.arange(self.batch_size).repeat_interleave(repeats))

    @property
    def batch_size(self) -> int:
        if self.key_cache:
            return self.key_cache[0].shape[0]
        if self.ttt_states:
            return next(iter(self.ttt_states.values())).batch_size
        raise ValueError("an empty TTTDynamicCache has no batch size")

    def _copy_rows(self, idx: Tensor) -> TTTDynamicCache:
        out = type(self)()
        out._kv_slot, out._ttt_seen, out._seen_tokens = dict(self._kv_slot), dict(self._ttt_seen), self._seen_tokens
        out.key_cache = [t.index_select(0, idx.to(t.device)) for t in self.key_cache]
        out.value_cache = [t.index_select(0, idx.to(t.device)) for t in self.value_cache]
        out.ttt_states = {i: s.index_select(idx) for i, s in self.ttt_states.items()}
        return out

    def batch_split(self, full_batch_size: int, split_size: int) -> list[TTTDynamicCache]:
        return [self._copy_rows(torch.arange(i, min(i + split_size, full_batch_size)))
                for i in range(0, full_batch_size, split_size)]

    @classmethod
    def from_batch_splits(cls, splits: list[TTTDynamicCache]) -> TTTDynamicCache:
        first = splits[0]
        out = cls()
        out._kv_slot, out._ttt_seen, out._seen_tokens = dict(first._kv_slot), dict(first._ttt_seen), first._seen_tokens
        out.key_cache = [torch.cat([s.key_cache[j] for s in splits]) for j in range(len(first.key_cache))]
        out.value_cache = [torch.cat([s.value_cache[j] for s in splits]) for j in range(len(first.value_cache))]
        out.ttt_states = {i: TTTState.cat([s.ttt_states[i] for s in splits]) for i in first.ttt_states}
        return out

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: `kv` (attention layers) and `ttt` (fast weights, accumulators, positions, conv tails)."""
        kv = sum(t.numel() * t.element_size() for t in (*self.key_cache, *self.value_cache))
        ttt = sum(t.numel() * t.element_size() for s in self.ttt_states.values() for t in s.tensors())
        return {"kv": kv, "ttt": ttt}


def _valid_tokens(attention_mask: Tensor | None, cache_position: Tensor | None, B: int, T: int) -> Tensor | None:
    """Which of this call's T tokens are real (not padding), of shape [B, T] bool, read from the mask the decoder
    layers receive; None when there is no mask (no padding).

    4D (eager/sdpa, additive, 0 = attend): the last query's row; its own token is real in generate (left padding)
    and in training (right padding keeps a real token before it), so its row is never one SDPA un-masks. 2D
    (flash-attention): the mask itself.
    """
    if attention_mask is None:
        return None
    S = attention_mask.shape[-1]
    pos = cache_position if cache_position is not None else torch.arange(S - T, S, device=attention_mask.device)
    if attention_mask.dim() == 4:
        valid = attention_mask[:, 0, -1, :].index_select(-1, pos) == 0
    elif attention_mask.dim() == 2:
        valid = attention_mask.index_select(-1, pos).bool()
    else:
        raise ValueError(f"attention_mask must be 2D or 4D, got {list(attention_mask.shape)}")
    return valid.expand(B, T)


def _masked_ttt(ttt: TTTBase, x: Tensor, state: TTTState | None, valid: Tensor | None) -> tuple[Tensor, TTTState]:
    """`ttt(x, state)` where only the True tokens of `valid` [B, T] enter the state; outputs at the other positions
    are 0. Rows sharing a pattern of real tokens run as one call; a row without real tokens keeps its state."""
    if valid is not None:
        valid = valid.to("cpu", torch.bool)
    if valid is None or bool(valid.all()):
        return ttt(x, state)
    B, T, C = x.shape
    if state is None:
        state = ttt.init_state(B, x.device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for r in range(B):
        cols = tuple(valid[r].nonzero().flatten().tolist())
        if cols:
            groups.setdefault(cols, []).append(r)
    pieces = []
    for cols, rows in groups.items():
        r_idx, c_idx = torch.tensor(rows), torch.tensor(cols)
        r_dev, c_dev = r_idx.to(x.device), c_idx.to(x.device)
        y, part = ttt(x.index_select(0, r_dev).index_select(1, c_dev), state.index_select(r_idx))
        pieces.append((r_dev, c_dev, y))
        state = state.index_copy(r_idx, part)
    dtype = pieces[0][2].dtype if pieces else x.dtype
    out = x.new_zeros(B, T, C, dtype=dtype)
    for r_dev, c_dev, y in pieces:
        out = out.index_put((r_dev[:, None], c_dev[None, :]), y)
    return out, state


def ttt_forward(ttt: TTTBase, layer_idx: int, hidden_states: Tensor, attention_mask: Tensor | None = None,
                past_key_value: Any = None, cache_position: Tensor | None = None) -> Tensor:
    """Run TTT layer `layer_idx` on `hidden_states` [B, T, C] from (and into) its state in `past_key_value`.

    Padding (per `cache.token_mask`, else the attention mask) is skipped: it neither enters the state nor gets an
    output (0). Without a cache the layer starts from W0 and keeps nothing.
    """
    B, T = hidden_states.shape[:2]
    cache, state, valid = None, None, None
    if past_key_value is not None:
        cache = TTTDynamicCache.adopt(past_key_value, layer_idx, cache_position)
        state = cache.ttt_states.get(layer_idx)
        valid = cache.token_mask
        if valid is not None and tuple(valid.shape) != (B, T):
            raise ValueError(f"TTT layer {layer_idx}: cache.token_mask must be [{B}, {T}] bool, "
                             f"got {list(valid.shape)}")
    if valid is None:
        valid = _valid_tokens(attention_mask, cache_position, B, T)
    out, new_state = _masked_ttt(ttt, hidden_states, state, valid)
    if cache is not None:
        cache.update_ttt(layer_idx, new_state, T)
    return out


class LlamaTTTSelfAttention(nn.Module):
    """Stands in for `LlamaDecoderLayer.self_attn` in `replace` mode: the TTT layer, with attention's call
    signature and return value `(output, None, past_key_value)` (the incoming cache object, as `LlamaModel` needs).

    Args:
        config: the TTT layer's config.
        layer_idx: the decoder layer index (the key of its state in `TTTDynamicCache.ttt_states`).
    """

    def __init__(self, config: TTTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.ttt = build_ttt_layer(config)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_value: Any = None, output_attentions: bool = False, use_cache: bool = False,
                cache_position: Tensor | None = None, position_embeddings: Any = None,
                **kwargs: Any) -> tuple[Tensor, None, Any]:
        # position_ids / position_embeddings are the attention layers' global positions; TTT restarts its RoPE
        # positions every mini-batch from the position in its state
        out = ttt_forward(self.ttt, self.layer_idx, hidden_states, attention_mask, past_key_value, cache_position)
        return out, None, past_key_value


def _gated_residual_hook(attn: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
    """Forward hook of an attention module in `gated_residual` mode: add `tanh(ttt_gate) * ttt(x)`; nothing while
    `attn.ttt_bypass` (the distillation teacher, `llama_train.ttt_bypassed`)."""
    if getattr(attn, "ttt_bypass", False):
        return output
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    y = ttt_forward(attn.ttt, attn.layer_idx, x, kwargs.get("attention_mask"), kwargs.get("past_key_value"),
                    kwargs.get("cache_position"))
    return (output[0] + torch.tanh(attn.ttt_gate).to(y.dtype) * y, *output[1:])


def _init_weights_with_ttt(base_init: Any, module: nn.Module) -> None:
    """The model's `_init_weights`, then TTT's own init for TTT modules (post-order: after their children).

    transformers calls it from `post_init` (LLaMA-Omni's speech-to-speech class calls that twice) and, in
    `from_pretrained`, for modules whose keys the checkpoint lacks (with `low_cpu_mem_usage` their memory is then
    uninitialised); Llama's own `_init_weights` would leave the TTT norms, W0 and the gate untouched or re-draw the
    projections with the model's std.
    """
    base_init(module)
    if isinstance(module, TTTBase):
        module.reset_parameters()
    gate = module._parameters.get("ttt_gate")
    if gate is not None:
        with torch.no_grad():
            gate.fill_(module.ttt_gate_init)


def _check_ttt_load(module: nn.Module, incompatible: Any) -> None:
    """`load_state_dict` post-hook: a load that brings some TTT keys must bring all, and TTT keys the model has no
    place for are an error (LLaMA-Omni's builder loads `non_lora_trainables.bin` with strict=False)."""
    ttt_keys = set(ttt_parameter_names(module))
    missing = [k for k in incompatible.missing_keys if any(k == t or k.endswith("." + t) for t in ttt_keys)]
    unexpected = [k for k in incompatible.unexpected_keys if _is_ttt_key(k)]
    if unexpected or 0 < len(missing) < len(ttt_keys):
        raise ValueError(
            f"TTT weights do not fit the model (TTT in layers {sorted(ttt_modules(module))}): "
            f"missing TTT keys {sorted(missing) if len(missing) < len(ttt_keys) else []}, "
            f"unexpected TTT keys {sorted(unexpected)}")


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"apply_ttt needs a Llama causal LM with model.model.layers, got {type(model).__name__}")
    return layers


def ttt_modules(model: nn.Module) -> dict[int, TTTBase]:
    """The TTT layers installed in `model.model.layers`, by layer index."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    found = {}
    for idx, layer in enumerate(layers if isinstance(layers, nn.ModuleList) else []):
        ttt = getattr(getattr(layer, "self_attn", None), "ttt", None)
        if isinstance(ttt, TTTBase):
            found[idx] = ttt
    return found


def ttt_parameter_names(model: nn.Module) -> list[str]:
    """State-dict keys of everything TTT added to `model` (`...self_attn.ttt.*`, `...self_attn.ttt_gate`)."""
    return [k for k in model.state_dict() if _is_ttt_key(k)]


def ttt_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the TTT parameters of `model`, e.g. to save beside a LoRA adapter."""
    return {k: v for k, v in model.state_dict().items() if _is_ttt_key(k)}


def apply_ttt(model: nn.Module, config: Any = None) -> nn.Module:
    """Install TTT layers into `model.model.layers` (in place) as `config` (default `model.config`) asks.

    Called by the patched `OmniSpeechLlamaForCausalLM.__init__` before `post_init()`; works on any transformers
    4.43 Llama causal LM. New modules take the dtype and device of their layer; the resolved TTT fields are written
    back to `config` (so `save_pretrained` records them); `model._init_weights` is wrapped so that transformers'
    init re-runs the TTT modules' own init; `load_state_dict` checks TTT keys by name; `generate` refuses
    `cache_implementation="static"` / `"quantized"` (they have no room for the TTT state).

    Raises:
        ValueError: `use_ttt` is not set, TTT is already installed, or a field is invalid.
    """
    config = model.config if config is None else config
    cfg = LlamaTTTConfig.from_config(config)
    if not cfg.use_ttt:
        raise ValueError("apply_ttt: config.use_ttt is not set")
    layers = _decoder_layers(model)
    if ttt_modules(model):
        raise ValueError(f"TTT is already installed in layers {sorted(ttt_modules(model))}")
    indices = cfg.layer_indices(len(layers))
    ttt_cfg = cfg.ttt_config(config.hidden_size, config.num_attention_heads, config.initializer_range)
    for idx in indices:
        layer = layers[idx]
        ref = next(layer.parameters())
        if cfg.ttt_mode == "replace":
            layer.self_attn = LlamaTTTSelfAttention(ttt_cfg, idx).to(device=ref.device, dtype=ref.dtype)
            continue
        attn = layer.self_attn
        if getattr(attn, "layer_idx", None) != idx:
            raise ValueError(f"layer {idx}: self_attn.layer_idx is {getattr(attn, 'layer_idx', None)}, expected {idx}")
        attn.ttt = build_ttt_layer(ttt_cfg).to(device=ref.device, dtype=ref.dtype)
        attn.ttt_gate_init = float(cfg.ttt_gate_init)
        attn.ttt_gate = nn.Parameter(torch.full((config.hidden_size,), float(cfg.ttt_gate_init), device=ref.device,
                                                dtype=ref.dtype))
        attn.register_forward_hook(_gated_residual_hook, with_kwargs=True)
    cfg.ttt_layers = indices
    cfg.write_to(config)
    if config is not model.config:
        cfg.write_to(model.config)
    model.ttt_config = cfg
    # the TTT state lives in TTTDynamicCache: transformers refuses its static and quantized caches up front
    model._supports_static_cache = False
    model._supports_quantized_cache = False
    model._init_weights = functools.partial(_init_weights_with_ttt, type(model)._init_weights.__get__(model))
    model.register_load_state_dict_post_hook(_check_ttt_load)
    return model


class LlamaTTTForCausalLM(LlamaForCausalLM):
    """`LlamaForCausalLM` that installs TTT when `config.use_ttt` is set, as the patched LLaMA-Omni class does, so
    `from_pretrained` / `save_pretrained` carry the TTT fields and weights for a plain Llama checkpoint."""

    def __init__(self, config: Any):
        super().__init__(config)
        if getattr(config, "use_ttt", False):
            apply_ttt(self, config)
            self.post_init()


@dataclasses.dataclass
class TTTLoadReport:
    """What a load did with the TTT keys.

    Args:
        loaded: TTT keys taken from the checkpoint.
        initialised: TTT keys the checkpoint lacked, left at their init (W0 of TTT-Linear/MLP, `ttt_gate_init`).
        dropped: checkpoint keys the model has no place for: the attention weights of layers that `replace` mode
            turned into TTT.
    """

    loaded: list[str]
    initialised: list[str]
    dropped: list[str]


def _replaced_attention_key(key: str, model: nn.Module) -> bool:
    m = re.search(r"(^|\.)layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj|rotary_emb)\.", key)
    return bool(m) and isinstance(model.model.layers[int(m.group(2))].self_attn, LlamaTTTSelfAttention)


def _report(model: nn.Module, missing: list[str], unexpected: list[str], require_ttt: bool,
            where: str) -> TTTLoadReport:
    ttt_keys = ttt_parameter_names(model)
    initialised = sorted(k for k in ttt_keys if k in set(missing))
    wrong = sorted(k for k in unexpected if not _replaced_attention_key(k, model))
    other_missing = sorted(set(missing) - set(ttt_keys))
    problems = []
    if wrong:
        problems.append(f"unexpected keys {wrong}")
    if other_missing:
        problems.append(f"missing non-TTT keys {other_missing}")
    if initialised and (require_ttt or len(initialised) < len(ttt_keys)):
        problems.append(f"missing TTT keys {initialised}" + ("" if require_ttt else " (some TTT keys are present)"))
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    report = TTTLoadReport(loaded=sorted(set(ttt_keys) - set(initialised)), initialised=initialised,
                           dropped=sorted(unexpected))
    if initialised:
        logger.warning("%s: %d TTT parameters are not in the checkpoint and keep their init: %s", where,
                       len(initialised), initialised)
    if report.dropped:
        logger.info("%s: attention weights of replaced layers not used: %s", where, report.dropped)
    return report


def _checkpoint_keys(path: str | Path) -> set[str] | None:
    """The tensor names of a local transformers checkpoint (sharded or not), without loading tensors; None when
    `path` is not a local directory holding one."""
    path = Path(path)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            return set(json.loads((path / index).read_text())["weight_map"])
    if (path / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return set(f.keys())
    if (path / "pytorch_model.bin").is_file():
        return set(torch.load(path / "pytorch_model.bin", map_location="meta", weights_only=True, mmap=True))
    return None


def _materialise_meta_ttt(model: nn.Module) -> list[str]:
    """Allocate and initialise TTT parameters left on the meta device; returns their keys.

    transformers 4.43 with `low_cpu_mem_usage` (or a `device_map`) counts meta tensors of equal size as tied, drops
    such new parameters from its missing keys and never allocates them."""
    left = []
    for idx, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        names = [f"model.layers.{idx}.self_attn.{n}" for n, p in attn.named_parameters() if p.is_meta]
        names = [n for n in names if _is_ttt_key(n)]
        if not names:
            continue
        left += names
        ref = next(p for p in layer.parameters() if not p.is_meta)
        attn.ttt.to_empty(device=ref.device)
        attn.ttt.reset_parameters()
        if "ttt_gate" in attn._parameters and attn.ttt_gate.is_meta:
            attn.ttt_gate = nn.Parameter(torch.full(attn.ttt_gate.shape, attn.ttt_gate_init, device=ref.device,
                                                    dtype=attn.ttt_gate.dtype))
    return left


def from_pretrained_ttt(cls: type, path: str | Path, *, require_ttt: bool = True,
                        **kwargs: Any) -> tuple[nn.Module, TTTLoadReport]:
    """`cls.from_pretrained(path, **kwargs)` with the TTT keys checked by name.

    `cls` is `LlamaTTTForCausalLM` or a patched LLaMA-Omni class; the config (from `path` or `config=`) must set
    `use_ttt`. With `require_ttt=False` a base checkpoint without TTT keys is accepted (they keep their init and are
    listed in the report); a partial set of TTT keys, TTT keys for other layers, or any other unexpected or missing
    key is an error naming them. In `replace` mode the base attention weights of the TTT layers are `dropped`.
    For a local directory the keys are read from the checkpoint itself.
    """
    model, info = cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    if not ttt_modules(model):
        raise ValueError(f"{path}: the model has no TTT layers; set use_ttt in its config (or pass config=)")
    if info.get("mismatched_keys"):
        raise ValueError(f"{path}: keys with mismatched shapes {info['mismatched_keys']}")
    left_on_meta = _materialise_meta_ttt(model)
    ckpt = _checkpoint_keys(path)
    expected = set(model.state_dict())
    if ckpt is None:
        missing, unexpected = set(info["missing_keys"]) | set(left_on_meta), set(info["unexpected_keys"])
    else:
        if not ckpt & expected and {f"model.{k}" for k in ckpt} & expected:  # saved from the bare LlamaModel
            ckpt = {f"model.{k}" for k in ckpt}
        buffers = {n for n, _ in model.named_buffers()}
        missing, unexpected = expected - ckpt, ckpt - expected - buffers
        if model.config.tie_word_embeddings:
            missing.discard("lm_head.weight")
    report = _report(model, sorted(missing), sorted(unexpected), require_ttt, str(path))
    return model, report


def _normalise_key(key: str) -> str:
    # PEFT's names (`base_model.model.` + the causal LM's) and LLaMA-Omni's builder's `model.model.` variant
    key = key.removeprefix("base_model.model.")
    return key[len("model."):] if key.startswith("model.model.") else key


def load_ttt_state_dict(model: nn.Module, state_dict: dict[str, Tensor], *, require_ttt: bool = True,
                        where: str = "state_dict") -> TTTLoadReport:
    """Load a partial state dict (TTT weights and other non-LoRA trainables) into `model`, keys checked by name.

    Keys may carry PEFT's `base_model.model.` prefix. Every key must exist in the model; with `require_ttt` every
    TTT key of the model must be present. Values are cast to the parameters' dtype.
    """
    state = {_normalise_key(k): v for k, v in state_dict.items()}
    expected = set(model.state_dict())
    unexpected = sorted(set(state) - expected)
    ttt_keys = ttt_parameter_names(model)
    missing_ttt = [k for k in ttt_keys if k not in state]
    report = _report(model, missing_ttt, unexpected, require_ttt, where)
    result = model.load_state_dict(state, strict=False)  # partial by design: keys were checked by name above
    if result.unexpected_keys:
        raise ValueError(f"{where}: unexpected keys {sorted(result.unexpected_keys)}")
    return report


def load_non_lora_trainables(model: nn.Module, path: str | Path, *, require_ttt: bool = True) -> TTTLoadReport:
    """LLaMA-Omni's LoRA path: load `non_lora_trainables.bin` (a file, or a directory holding it) into `model`
    (built from the base model with the TTT config), with TTT keys checked by name; then apply the LoRA adapter."""
    path = Path(path)
    if path.is_dir():
        path = path / NON_LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {NON_LORA_FILE} at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return load_ttt_state_dict(model, state, require_ttt=require_ttt, where=str(path))


class ConversationSession:
    """Several conversations, one per batch row, continued turn after turn from one `TTTDynamicCache`.

    Each `step` / `generate` feeds only the new tokens: TTT layers continue from their state and attention layers
    from their KV. Rows may bring different numbers of tokens (0 too); padding is masked out of attention and kept
    out of the TTT states. A new conversation id on a row resets that row: TTT back to W0, its old KV masked out and
    freed (`llama_session.compact_kv`), its attention positions back to 0. Attention KV (and padding) still grows
    with the turns; TTT states do not. `llama_session.save_session` / `load_session` park conversations in
    safetensors files, one per conversation id.

    Args:
        model: a Llama / LLaMA-Omni causal LM with TTT installed, in eval mode.
        batch_size: number of conversations served together.
    """

    def __init__(self, model: nn.Module, batch_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.conversation_ids: list[Hashable | None] = [None] * batch_size
        self.device = next(model.parameters()).device
        self.reset()

    def reset(self, mask: Tensor | None = None) -> None:
        """Start new conversations in the rows where `mask` (of shape [B] bool) is True; all rows when None."""
        B = self.batch_size
        if mask is not None and (tuple(mask.shape) != (B,) or mask.dtype != torch.bool):
            raise ValueError(f"mask must be [{B}] bool, got {list(mask.shape)} {mask.dtype}")
        if mask is None or bool(mask.all()):
            self.cache = TTTDynamicCache()
            self.attention_mask = torch.zeros(B, 0, dtype=torch.long, device=self.device)  # [B, S]
            self.positions = torch.zeros(B, dtype=torch.long)  # tokens of each row's conversation so far
            self.last_lengths = torch.zeros(B, dtype=torch.long)  # tokens each row brought to the last step
            return
        for idx, ttt in ttt_modules(self.model).items():
            if idx in self.cache.ttt_states:
                self.cache.ttt_states[idx] = ttt.reset_state(self.cache.ttt_states[idx], mask.cpu())
        self.attention_mask = self.attention_mask.masked_fill(mask.to(self.device)[:, None], 0)
        self.positions = self.positions.masked_fill(mask.cpu(), 0)
        from ttt_speech.integrations.llama_session import compact_kv

        compact_kv(self)  # reset rows free their KV columns

    def _switch(self, conversation_ids: Sequence[Hashable] | None) -> None:
        if conversation_ids is None:
            return
        if len(conversation_ids) != self.batch_size:
            raise ValueError(f"conversation_ids must have {self.batch_size} entries, got {len(conversation_ids)}")
        changed = torch.tensor([a != b for a, b in zip(conversation_ids, self.conversation_ids, strict=True)])
        if bool(changed.any()):
            self.reset(changed)
        self.conversation_ids = list(conversation_ids)

    def _rows(self, input_ids: Any, inputs_embeds: Any) -> list[Tensor]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        rows = list(input_ids if input_ids is not None else inputs_embeds)
        if len(rows) != self.batch_size:
            raise ValueError(f"expected {self.batch_size} rows, got {len(rows)}")
        C = self.model.config.hidden_size
        embed = self.model.get_input_embeddings()
        out = []
        for r, row in enumerate(rows):
            row = torch.as_tensor(row, device=self.device)
            if input_ids is not None:
                if row.dim() != 1:
                    raise ValueError(f"input_ids[{r}] must be [T], got {list(row.shape)}")
                row = embed(row.long())
            elif row.dim() != 2 or row.shape[-1] != C:
                raise ValueError(f"inputs_embeds[{r}] must be [T, {C}], got {list(row.shape)}")
            out.append(row)
        return out

    @torch.no_grad()
    def step(self, input_ids: Tensor | Sequence[Tensor] | None = None,
             inputs_embeds: Tensor | Sequence[Tensor] | None = None,
             conversation_ids: Sequence[Hashable] | None = None, **kwargs: Any) -> Any:
        """Feed the next tokens of every row and return the model output (`logits` of shape [B, T, V]).

        Args:
            input_ids: [B, T] or B tensors of shape [T_r] (T_r may be 0).
            inputs_embeds: [B, T, C] or B tensors [T_r, C] (e.g. LLaMA-Omni's speech + text embeddings).
            conversation_ids: one id per row; a row whose id changed is reset first.
            kwargs: passed to the model (e.g. `output_hidden_states=True` for LLaMA-Omni's unit generator).

        Row r's outputs at positions >= T_r are padding. Returns None when no row brings a token.
        """
        if self.model.training:
            raise ValueError("ConversationSession needs the model in eval mode (model.eval())")
        self._switch(conversation_ids)
        rows = self._rows(input_ids, inputs_embeds)
        lengths = torch.tensor([r.shape[0] for r in rows])
        B, T = self.batch_size, int(lengths.max())
        if T == 0:
            return None
        dtype = next(self.model.parameters()).dtype
        x = torch.zeros(B, T, self.model.config.hidden_size, dtype=dtype, device=self.device)
        for r, row in enumerate(rows):
            x[r, : row.shape[0]] = row.to(dtype)
        valid = torch.arange(T)[None, :] < lengths[:, None]  # [B, T]
        S = self.attention_mask.shape[1]
        attention_mask = torch.cat([self.attention_mask, valid.long().to(self.device)], dim=1)
        position_ids = (self.positions[:, None] + torch.arange(T)[None, :]).to(self.device)
        self.cache.token_mask = valid.to(self.device)
        try:
            out = self.model(inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=self.cache, use_cache=True,
                             cache_position=torch.arange(S, S + T, device=self.device), **kwargs)
        finally:
            self.cache.token_mask = None
        if out.past_key_values is not self.cache:
            raise RuntimeError(f"{type(self.model).__name__} did not return the session's cache")
        self.attention_mask = attention_mask
        self.positions = self.positions + lengths
        self.last_lengths = lengths
        return out

    @torch.no_grad()
    def generate(self, input_ids: Tensor | Sequence[Tensor] | None = None,
                 inputs_embeds: Tensor | Sequence[Tensor] | None = None,
                 conversation_ids: Sequence[Hashable] | None = None, *, max_new_tokens: int = 64,
                 eos_token_id: int | Sequence[int] | None = None, do_sample: bool = False, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> list[Tensor]:
        """One turn: feed the prompt of every row, then decode greedily (or by sampling) until EOS or
        `max_new_tokens`. Every generated token, the last one included, is fed, so the next turn continues after it.

        Returns B tensors of generated ids (empty for a row without a prompt). Rows decode in lock step; a
        finished row feeds nothing more.
        """
        out = self.step(input_ids=input_ids, inputs_embeds=inputs_embeds, conversation_ids=conversation_ids)
        B = self.batch_size
        if out is None:
            return [torch.zeros(0, dtype=torch.long) for _ in range(B)]
        lengths = self.last_lengths
        active = lengths > 0
        last = (lengths - 1).clamp_min(0).to(self.device)
        logits = out.logits[torch.arange(B, device=self.device), last]  # [B, V]
        eos = torch.tensor([] if eos_token_id is None else
                           [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), dtype=torch.long)
        generated: list[list[int]] = [[] for _ in range(B)]
        for _ in range(max_new_tokens):
            if do_sample:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                tokens = torch.multinomial(probs, 1, generator=generator)[:, 0].cpu()
            else:
                tokens = logits.argmax(-1).cpu()
            for r in range(B):
                if active[r]:
                    generated[r].append(int(tokens[r]))
            feed = [tokens[r : r + 1] if active[r] else tokens[:0] for r in range(B)]
            out = self.step(input_ids=feed)
            active = active & ~torch.isin(tokens, eos)
            if not bool(active.any()):
                break
            logits = out.logits[:, -1]
        return [torch.tensor(g, dtype=torch.long) for g in generated]
