"""Parking conversations: a `ConversationSession` row (TTT fast weights plus the attention KV) to and from one
safetensors file per conversation id, and KV compaction so that reset rows free their memory.

A session keeps KV for all rows in dense [B, kv_heads, S, head_dim] tensors with an attention mask [B, S]; a reset
row or padding leaves masked columns. `compact_kv` moves every row's live columns to the right end and drops the
columns no row uses (attention over the same keys, so the same outputs up to float summation order).

File layout (`save_conversation`): tensors `kv.<layer>.key` / `kv.<layer>.value` of shape [kv_heads, S_r, head_dim]
(the row's live columns only), `ttt.<layer>.params.<name>`, `ttt.<layer>.grads.<name>`, `ttt.<layer>.position`,
`ttt.<layer>.conv_tail`, `ttt.<layer>.input.<name>` (one row of `TTTState`, float32); metadata `format`,
`conversation_id` (JSON), `tokens` (the conversation's length) and `model` (the layout it fits: TTT and KV layers,
shapes), checked on load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ttt_speech.nn import TTTState

FORMAT = "ttt-speech-session-1"
_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]+")


def compact_kv(session) -> int:
    """Right-align every row's live KV columns and drop the columns no row uses; returns the columns freed."""
    cache, mask = session.cache, session.attention_mask  # mask [B, S]
    S = mask.shape[1]
    if S == 0 or not cache.key_cache:
        if S and not bool(mask.any()):  # replace mode without KV layers: only the mask to trim
            session.attention_mask = mask[:, :0]
            return S
        return 0
    live = mask.bool()
    counts = live.sum(1)
    keep = int(counts.max())
    aligned = torch.arange(S, device=mask.device)[None, :] >= (S - counts.to(mask.device))[:, None]  # [B, S]
    if keep == S and torch.equal(live, aligned):
        return 0
    B = mask.shape[0]
    index = torch.zeros(B, keep, dtype=torch.long, device=mask.device)
    new_mask = torch.zeros(B, keep, dtype=mask.dtype, device=mask.device)
    for r in range(B):
        cols = live[r].nonzero().flatten()
        if cols.numel():
            index[r, keep - cols.numel():] = cols
            new_mask[r, keep - cols.numel():] = 1
    for slot in range(len(cache.key_cache)):
        for store in (cache.key_cache, cache.value_cache):
            t = store[slot]  # [B, kv_heads, S, head_dim]
            idx = index.to(t.device)[:, None, :, None].expand(B, t.shape[1], keep, t.shape[3])
            store[slot] = t.gather(2, idx) * new_mask.to(t.device, t.dtype)[:, None, :, None]  # no stale values
    session.attention_mask = new_mask
    _set_length(cache, keep)
    return S - keep


def _set_length(cache, S: int) -> None:
    cache._seen_tokens = S
    for layer in cache.ttt_states:
        cache._ttt_seen[layer] = S


def _layout(session) -> dict[str, Any]:
    from ttt_speech.integrations.llama_omni import ttt_modules

    model = session.model
    cfg = model.config
    return {"ttt_layers": sorted(ttt_modules(model)), "num_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size, "kv_heads": getattr(cfg, "num_key_value_heads", None),
            "head_dim": cfg.hidden_size // cfg.num_attention_heads}


def _kv_layers(session) -> list[int]:
    ttt = set(_layout(session)["ttt_layers"])
    from ttt_speech.integrations.llama_omni import LlamaTTTSelfAttention

    return [i for i, layer in enumerate(session.model.model.layers)
            if not (i in ttt and isinstance(layer.self_attn, LlamaTTTSelfAttention))]


def _file_for(directory: Path, conversation_id: Hashable) -> Path:
    name = str(conversation_id)
    if not _SAFE_ID.fullmatch(name):
        raise ValueError(f"conversation id {conversation_id!r}: only letters, digits, '_', '.', '-' make a file name")
    return directory / f"{name}.safetensors"


def save_conversation(session, row: int, path: str | Path) -> Path:
    """Write row `row` of `session` (its TTT states and live KV columns) to the safetensors file `path`."""
    from safetensors.torch import save_file

    if not 0 <= row < session.batch_size:
        raise ValueError(f"row must be in [0, {session.batch_size}), got {row}")
    cache = session.cache
    live = session.attention_mask[row].bool()
    tensors: dict[str, Tensor] = {}
    for layer in cache.kv_layers:
        k, v = cache[layer]
        tensors[f"kv.{layer}.key"] = k[row][:, live.to(k.device)].contiguous()
        tensors[f"kv.{layer}.value"] = v[row][:, live.to(v.device)].contiguous()
    for layer, state in cache.ttt_states.items():
        one = state.index_select(torch.tensor([row]))
        for group, values in (("params", one.params), ("grads", one.grads), ("input", one.input_state)):
            for name, t in values.items():
                tensors[f"ttt.{layer}.{group}.{name}"] = t[0].contiguous()
        tensors[f"ttt.{layer}.position"] = one.position.clone()
        if one.conv_tail is not None:
            tensors[f"ttt.{layer}.conv_tail"] = one.conv_tail[0].contiguous()
    metadata = {"format": FORMAT, "conversation_id": json.dumps(session.conversation_ids[row]),
                "tokens": str(int(session.positions[row])), "model": json.dumps(_layout(session))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def save_session(session, directory: str | Path) -> list[Path]:
    """One file `<directory>/<conversation id>.safetensors` per row that has a conversation id. Compacts the KV first
    (`compact_kv`), so the live session and one reloaded from these files hold the same layout and continue alike
    bit for bit."""
    directory = Path(directory)
    compact_kv(session)
    return [save_conversation(session, r, _file_for(directory, cid))
            for r, cid in enumerate(session.conversation_ids) if cid is not None]


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved conversation")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_conversation(session, row: int, path: str | Path) -> Hashable:
    """Put the conversation saved in `path` into row `row` of `session` (whatever the row held is dropped); returns
    its conversation id. The next `step` on that row continues it (with the same conversation id)."""
    from ttt_speech.integrations.llama_omni import TTTDynamicCache, ttt_modules

    path = Path(path)
    tensors, meta = _read(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    saved, here = json.loads(meta["model"]), _layout(session)
    if saved != here:
        diff = {k: (saved.get(k), here.get(k)) for k in here if saved.get(k) != here.get(k)}
        raise ValueError(f"{path}: saved from another model layout: {diff} (saved, this model)")
    if not 0 <= row < session.batch_size:
        raise ValueError(f"row must be in [0, {session.batch_size}), got {row}")
    B, device = session.batch_size, session.device
    rows = torch.tensor([row])
    session.reset(torch.arange(B) == row)  # masks the row's old KV and compacts
    if not isinstance(session.cache, TTTDynamicCache):
        raise RuntimeError("session.cache is not a TTTDynamicCache")
    cache = session.cache
    # TTT states
    for layer, ttt in ttt_modules(session.model).items():
        prefix = f"ttt.{layer}."
        one = TTTState(
            params={k[len(prefix + "params."):]: v[None].to(device) for k, v in tensors.items()
                    if k.startswith(prefix + "params.")},
            grads={k[len(prefix + "grads."):]: v[None].to(device) for k, v in tensors.items()
                   if k.startswith(prefix + "grads.")},
            position=_need(tensors, prefix + "position", path),
            conv_tail=tensors[prefix + "conv_tail"][None].to(device) if prefix + "conv_tail" in tensors else None,
            input_state={k[len(prefix + "input."):]: v[None].to(device) for k, v in tensors.items()
                         if k.startswith(prefix + "input.")},
        )
        state = cache.ttt_states.get(layer)
        if state is None:
            state = ttt.init_state(B, device)
        if set(one.params) != set(state.params):
            raise ValueError(f"{path}: TTT layer {layer} has fast weights {sorted(one.params)}, the model "
                             f"{sorted(state.params)}")
        cache.ttt_states[layer] = state.index_copy(rows, one)
    # KV: the row's columns right-aligned; the other rows gain masked columns on the left when it is longer
    count = int(next((t.shape[1] for k, t in tensors.items() if k.startswith("kv.")), 0))
    S = session.attention_mask.shape[1]
    grow = max(0, count - S)
    for layer in _kv_layers(session):
        key, value = _need(tensors, f"kv.{layer}.key", path), _need(tensors, f"kv.{layer}.value", path)
        slot = cache._kv_slot.get(layer)
        if slot is None:  # a fresh cache: slots in layer order, as the first forward would make them
            slot = cache._kv_slot[layer] = len(cache.key_cache)
            cache.key_cache.append(key.new_zeros(B, key.shape[0], S, key.shape[2]).to(device))
            cache.value_cache.append(value.new_zeros(B, value.shape[0], S, value.shape[2]).to(device))
        for store, t in ((cache.key_cache, key), (cache.value_cache, value)):
            old = store[slot]
            if grow:
                old = torch.cat([old.new_zeros(B, old.shape[1], grow, old.shape[3]), old], dim=2)
            old = old.clone()
            old[row, :, old.shape[2] - count:] = t.to(old.device, old.dtype)
            store[slot] = old
    mask = session.attention_mask
    if grow:
        mask = torch.cat([mask.new_zeros(B, grow), mask], dim=1)
    mask = mask.clone()
    mask[row, mask.shape[1] - count:] = 1
    session.attention_mask = mask
    _set_length(cache, mask.shape[1])
    conversation_id = json.loads(meta["conversation_id"])
    session.positions[row] = int(meta["tokens"])
    session.conversation_ids[row] = conversation_id
    return conversation_id


def load_session(session, directory: str | Path, conversation_ids: Sequence[Hashable]) -> None:
    """Rows 0..n-1 of `session` continue the conversations `conversation_ids` saved by `save_session`."""
    if len(conversation_ids) > session.batch_size:
        raise ValueError(f"{len(conversation_ids)} conversations for a session of {session.batch_size} rows")
    for r, cid in enumerate(conversation_ids):
        load_conversation(session, r, _file_for(Path(directory), cid))


def _need(tensors: dict[str, Tensor], key: str, path: Path) -> Tensor:
    if key not in tensors:
        raise ValueError(f"{path}: no tensor {key!r}; the file does not fit this model")
    return tensors[key]
