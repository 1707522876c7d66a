"""Token batches of a llama run: [B, 2, T] int64, row 0 the input ids, row 1 the labels (-100: no loss there).

Sources (`llama.train_data` / `llama.val_data`):
- "synthetic": a fixed random Markov chain over the vocabulary (each token has a few likely successors), for
  plumbing tests and the quickstart;
- `*.jsonl`: `{"input_ids": [...]}` per line, every token trained;
- `*.json`: LLaMA-Omni's instruction data, a list of `{"id", "conversations": [{"from": "human"|"gpt", "value"}]}`;
  turns are tokenized as `"<from>: <value>\\n"`, labels on the `gpt` turns only. Text-only: a sample with a `speech`
  path is refused (no Whisper encoder is wired into training).

Documents are concatenated into one stream cut into windows of `seq_len` tokens. The loader is stateful (batch
index); batch i of rank r depends only on (seed, rank, i), so a resume continues exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ttt_speech.errors import ConfigError

IGNORE = -100


class SyntheticTokens:
    """Random walks on a fixed sparse transition table (4 successors per token, drawn from `seed`)."""

    def __init__(self, *, batch_size: int, seq_len: int, vocab_size: int, seed: int, rank: int,
                 stream: int = 0) -> None:
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, vocab_size
        self.seed, self.rank, self.stream = seed, rank, stream
        g = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(1, vocab_size, (vocab_size, 4), generator=g)  # token 0 is padding
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((self.seed, self.stream, self.rank, self.index)) & 0x7FFFFFFF)
        self.index += 1
        B, T = self.batch_size, self.seq_len
        choice = torch.randint(0, 4, (B, T), generator=g)
        ids = torch.empty(B, T, dtype=torch.long)
        ids[:, 0] = torch.randint(1, self.vocab_size, (B,), generator=g)
        for t in range(1, T):
            ids[:, t] = self.successors[ids[:, t - 1], choice[:, t]]
        return torch.stack([ids, ids], dim=1)

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


def read_tokens(path: str, vocab_size: int, tokenizer: Callable[[str], list[int]] | None) -> tuple[torch.Tensor,
                                                                                                      torch.Tensor]:
    """(input ids, labels) of the whole file as one stream, each of shape [N] int64."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: no such data file")
    ids: list[int] = []
    labels: list[int] = []
    if file.suffix == ".jsonl":
        for lineno, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                tokens = row["input_ids"]
                if not (isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)):
                    raise ValueError("input_ids must be a list of ints")
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}:{lineno}: expected {{\"input_ids\": [int, ...]}}, got {line[:80]!r} "
                                  f"({e})") from e
            _check_ids(tokens, vocab_size, f"{path}:{lineno}")
            ids += tokens
            labels += tokens
    elif file.suffix == ".json":
        try:
            samples = json.loads(file.read_text())
        except ValueError as e:
            raise ConfigError(f"{path}: not JSON ({e})") from e
        if not isinstance(samples, list):
            raise ConfigError(f"{path}: expected a list of {{\"conversations\": [...]}} samples (LLaMA-Omni's "
                              f"instruction format), got {type(samples).__name__}")
        if tokenizer is None:
            raise ConfigError(f"{path}: instruction JSON is text; set llama.tokenizer (a SentencePiece .model or a "
                              "transformers tokenizer folder)")
        for i, sample in enumerate(samples):
            where = f"{path}: sample {i} (id {sample.get('id')!r})" if isinstance(sample, dict) else f"{path}: {i}"
            if not isinstance(sample, dict) or not isinstance(sample.get("conversations"), list):
                raise ConfigError(f"{where}: expected a mapping with a 'conversations' list")
            if sample.get("speech"):
                raise ConfigError(f"{where}: has speech {sample['speech']!r}; training is text-only here (no "
                                  "Whisper encoder is wired into the trainer): drop the sample's 'speech' key and "
                                  "its <speech> placeholder, or leave the sample out")
            for j, turn in enumerate(sample["conversations"]):
                if not (isinstance(turn, dict) and isinstance(turn.get("value"), str) and "from" in turn):
                    raise ConfigError(f"{where}: conversations[{j}] must be {{\"from\", \"value\": str}}, got {turn!r}")
                tokens = tokenizer(f"{turn['from']}: {turn['value']}\n")
                _check_ids(tokens, vocab_size, f"{where}: conversations[{j}]")
                ids += tokens
                labels += tokens if turn["from"] in ("gpt", "assistant") else [IGNORE] * len(tokens)
    else:
        raise ConfigError(f"{path}: expected a .jsonl of token ids or LLaMA-Omni's instruction .json, or "
                          "'synthetic'")
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def _check_ids(tokens: list[int], vocab_size: int, where: str) -> None:
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ConfigError(f"{where}: token id {bad[0]} outside the model's vocabulary [0, {vocab_size})")


class TokenWindows:
    """Windows of `seq_len` tokens of a stream, in a seeded order per epoch (or in order), `batch_size` per batch;
    rank r takes every world-th batch slot."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seq_len: int, seed: int,
                 rank: int, world_size: int, shuffle: bool, where: str) -> None:
        self.windows = ids.numel() // seq_len
        if self.windows < batch_size * world_size:
            raise ConfigError(f"{where}: {ids.numel()} tokens make {self.windows} window(s) of {seq_len}, fewer than "
                              f"one batch ({batch_size} x {world_size} processes)")
        n = self.windows * seq_len
        self.ids, self.labels = ids[:n].view(-1, seq_len), labels[:n].view(-1, seq_len)
        self.batch_size, self.seed, self.rank, self.world, self.shuffle = batch_size, seed, rank, world_size, shuffle
        self.index = 0
        self._epoch, self._order = -1, torch.arange(self.windows)

    def _window(self, g: int) -> int:
        epoch, pos = divmod(g, self.windows)
        if self.shuffle and epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(self.windows, generator=torch.Generator().manual_seed(self.seed * 1000003
                                                                                               + epoch))
        return int(self._order[pos])

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        first = (self.index * self.world + self.rank) * self.batch_size
        self.index += 1
        rows = [self._window(first + b) for b in range(self.batch_size)]
        return torch.stack([self.ids[rows], self.labels[rows]], dim=1)

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


def build_llama_loader(source: str, *, seq_len: int, batch_size: int, vocab_size: int, seed: int, rank: int,
                       world_size: int, tokenizer: Callable[[str], list[int]] | None, shuffle: bool = True,
                       stream: int = 0):
    """The stateful loader of `source` ("synthetic" or a file); `stream` tells held-out synthetic data apart."""
    if source == "synthetic":
        return SyntheticTokens(batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size, seed=seed, rank=rank,
                               stream=stream)
    ids, labels = read_tokens(source, vocab_size, tokenizer)
    return TokenWindows(ids, labels, batch_size=batch_size, seq_len=seq_len, seed=seed, rank=rank,
                        world_size=world_size, shuffle=shuffle, where=source)
