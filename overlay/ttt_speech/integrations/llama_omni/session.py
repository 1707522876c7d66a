"""Multi-turn serving: `ConversationSession` (one conversation per batch row, continued from one `TTTDynamicCache`),
KV compaction so that reset rows free their memory, and parking conversations in safetensors files.

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
from torch import Tensor, nn

from ttt_speech.integrations.llama_omni.cache import TTTDynamicCache
from ttt_speech.integrations.llama_omni.layers import LlamaTTTSelfAttention, ttt_modules
from ttt_speech.nn import TTTState

FORMAT = "ttt-speech-session-1"
_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]+")


class ConversationSession:
    """Several conversations, one per batch row, continued turn after turn from one `TTTDynamicCache`.

    Each `step` / `generate` feeds only the new tokens: TTT layers continue from their state and attention layers
    from their KV. Rows may bring different numbers of tokens (0 too); padding is masked out of attention and kept
    out of the TTT states. A new conversation id on a row resets that row: TTT back to W0, its old KV masked out and
    freed (`compact_kv`), its attention positions back to 0. Attention KV (and padding) still grows
    with the turns; TTT states do not. `save_session` / `load_session` park conversations in
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
    model = session.model
    cfg = model.config
    return {"ttt_layers": sorted(ttt_modules(model)), "num_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size, "kv_heads": getattr(cfg, "num_key_value_heads", None),
            "head_dim": cfg.hidden_size // cfg.num_attention_heads}


def _kv_layers(session) -> list[int]:
    ttt = set(_layout(session)["ttt_layers"])
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
        one = state.select_rows(torch.tensor([row]))
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
            position=_need(tensors, prefix + "position", path).to(device),
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
        cache.ttt_states[layer] = state.put_rows(rows, one)
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
