"""`TTTDynamicCache`: transformers 4.43's `DynamicCache` with the TTT layers' states beside the attention KV."""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from ttt_speech.nn import TTTState

logger = logging.getLogger(__name__)

# plain DynamicCaches that `TTTDynamicCache.supply` replaced (generate's default, one per call), by id (they are not
# hashable); weak, so they go with the generate call that made them
_HANDED_OVER: weakref.WeakValueDictionary[int, DynamicCache] = weakref.WeakValueDictionary()


class TTTDynamicCache(DynamicCache):
    """transformers 4.43 `DynamicCache` holding KV for attention layers and a float32 `TTTState` for TTT layers.

    KV is kept only for layers that call `update` (attention layers; in gated_residual mode every layer), in dense
    slots: `key_cache[slot]` of shape [B, kv_heads, S, head_dim] belongs to layer `kv_layers[slot]`. TTT states are in
    `ttt_states[layer_idx]`. `get_seq_length(i)` is the KV length of layer i, or the number of tokens TTT layer i has
    seen, so `generate` derives the right `cache_position` also with a TTT layer at index 0.

    `apply_ttt` puts `supply` in front of the decoder (a forward pre-hook of `model.model`): `generate`'s empty
    `DynamicCache` (or none, in eval with `use_cache`) is handed over to a fresh `TTTDynamicCache`, which the layers
    fill and the forward returns as `past_key_values`, so `generate` carries it on. `reorder_cache` (beam search),
    `batch_select_indices`, `batch_repeat_interleave`, `batch_split` and `from_batch_splits` move TTT rows with the
    KV rows. `crop` cannot rewind fast weights and raises. Legacy tuples (`to_legacy_cache`) carry no TTT state.

    Attributes:
        ttt_states: TTT layer index -> its state, every floating tensor float32.
        token_mask: of shape [B, T] bool or None; when set (by `ConversationSession`), TTT layers feed only the True
            tokens of the next forward into their state. When None they infer it from the attention mask.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ttt_states: dict[int, TTTState] = {}
        self.token_mask: Tensor | None = None
        self._kv_slot: dict[int, int] = {}
        self._ttt_seen: dict[int, int] = {}

    @classmethod
    def supply(cls, past_key_values: Any, *, create: bool) -> TTTDynamicCache | None:
        """The cache a forward of a TTT model runs with, given its `past_key_values` argument.

        A `TTTDynamicCache` is used as it is. An empty plain `DynamicCache` (what `generate` passes to its first
        forward) is replaced by a new `TTTDynamicCache`; the forward returns that one, and the `DynamicCache` stays
        empty, so passing it again is refused. None gives a new cache when `create` (LlamaModel would build a
        `DynamicCache` itself: eval with `use_cache`), else None.

        Raises:
            ValueError: a plain `DynamicCache` or legacy tuples holding tokens (no TTT state to continue from), a
                `DynamicCache` already handed over, or another `Cache` class (static, sliding-window, quantized and
                offloaded caches have no room for TTT states).
        """
        if isinstance(past_key_values, TTTDynamicCache):
            return past_key_values
        if past_key_values is None:
            return cls() if create else None
        if isinstance(past_key_values, (tuple, list)):
            return cls.from_legacy_cache(past_key_values)
        if type(past_key_values) is not DynamicCache:
            raise ValueError(
                f"past_key_values must be a TTTDynamicCache (or generate's empty DynamicCache), got "
                f"{type(past_key_values).__name__}; static, sliding-window, quantized and offloaded caches cannot hold "
                "TTT states (do not set cache_implementation)")
        if _HANDED_OVER.get(id(past_key_values)) is past_key_values:
            raise ValueError(
                "this DynamicCache was handed over to a TTTDynamicCache by an earlier forward and holds nothing; pass "
                "that call's outputs.past_key_values to continue (or past_key_values=TTTDynamicCache() from the "
                "start)")
        seen = past_key_values.get_seq_length()
        if seen or past_key_values.key_cache:
            raise ValueError(
                f"the DynamicCache already holds {seen} tokens but no TTT state; pass the TTTDynamicCache returned by "
                "the previous call (outputs.past_key_values) to continue")
        _HANDED_OVER[id(past_key_values)] = past_key_values
        return cls()

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

    def _rows(self, idx: Tensor) -> tuple[list[Tensor], list[Tensor], dict[int, TTTState]]:
        """Rows `idx` (of shape [B'], int64) of every KV tensor and of every TTT state (`TTTState.select_rows`)."""
        keys = [t.index_select(0, idx.to(t.device)) for t in self.key_cache]
        values = [t.index_select(0, idx.to(t.device)) for t in self.value_cache]
        return keys, values, {i: s.select_rows(idx) for i, s in self.ttt_states.items()}

    def _select_rows(self, idx: Tensor) -> None:
        self.key_cache, self.value_cache, self.ttt_states = self._rows(idx)

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
        out.key_cache, out.value_cache, out.ttt_states = self._rows(idx)
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
        ttt = sum(s.nbytes for s in self.ttt_states.values())
        return {"kv": kv, "ttt": ttt}
