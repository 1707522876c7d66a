"""Token batches of a llama run: [B, 2, T] int64, row 0 the input ids, row 1 the labels (-100: no loss there).

Sources (`llama.train_data` / `llama.val_data`):
- "synthetic": a fixed random Markov chain over the vocabulary (each token has a few likely successors), for
  plumbing tests and the quickstart;
- `*.jsonl`: `{"input_ids": [...]}` per line, every token trained;
- `*.json`: LLaMA-Omni's instruction data, a list of `{"id", "conversations": [{"from": "human"|"gpt", "value"}]}`;
  turns are tokenized as `"<from>: <value>\\n"`, labels on the `gpt` turns only. A sample may carry `"speech"`
  (a path, or a list of paths, one per `<speech>` placeholder in its non-gpt turns): with a model that has
  LLaMA-Omni's Whisper encoder (a `speech` front end), each placeholder becomes the clip's `positions` speech
  positions (no loss there), whose embeddings the family fills with the clip's encoded features; without one, such a
  sample is refused, naming what to set.

Documents are concatenated into one stream cut into windows of `seq_len` tokens (a window may begin or end inside a
clip: the clip is encoded whole, and the window takes its share of the positions). The loader is stateful (batch
index); batch i of rank r depends only on (seed, rank, i), so a resume continues exactly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ttt_speech.errors import ConfigError, DataError

IGNORE = -100
SPEECH = -200  # a speech position's input id: LLaMA-Omni's SPEECH_TOKEN_INDEX (a test compares them)
SPEECH_PLACEHOLDER = "<speech>"  # LLaMA-Omni's DEFAULT_SPEECH_TOKEN


class SpeechFrontend(Protocol):
    """What the loader needs of a model's speech input (`integrations.llama_train.SpeechFrontend`)."""

    sample_rate: int
    positions: int

    def mel(self, wav: torch.Tensor) -> torch.Tensor: ...


@dataclasses.dataclass
class SpeechBatch:
    """A batch with speech. tokens [B, 3, T] int64: input ids (SPEECH at speech positions), labels (IGNORE there),
    and each speech position's source `s * positions + frame` (-1 on text): frame `frame` of the features of clip
    `s` of `mels` [S, frames, n_mels] float32 (S >= 1: a batch without a clip carries one of silence, so that every
    process runs the speech encoder)."""

    tokens: torch.Tensor
    mels: torch.Tensor

    def to(self, device: torch.device | str) -> SpeechBatch:
        return SpeechBatch(self.tokens.to(device), self.mels.to(device))

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape


@dataclasses.dataclass
class TokenStream:
    """A data file as one stream: ids and labels [N] int64; with speech, `refs` [N] int64 (`clip * positions +
    frame` at speech positions, -1 elsewhere) and the clips' audio files."""

    ids: torch.Tensor
    labels: torch.Tensor
    refs: torch.Tensor | None = None
    clips: list[Path] = dataclasses.field(default_factory=list)


def read_clip(path: Path, sample_rate: int) -> torch.Tensor:
    """An audio file as mono float32 of shape [S] at `sample_rate` (channels averaged, as Whisper's `load_audio`
    downmixes); unreadable, empty or non-finite audio is a `DataError` naming the file."""
    import sphn

    from ttt_speech.data.audio import resample

    try:
        data, rate = sphn.read(str(path))
    except (OSError, ValueError, RuntimeError) as e:
        raise DataError(f"{path}: cannot read the audio ({e})") from e
    if data.ndim != 2 or data.shape[-1] == 0:
        raise DataError(f"{path}: expected audio samples of shape [channels, samples], got {list(data.shape)}")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: {int((~np.isfinite(data)).sum())} NaN or Inf samples; fix or drop the file")
    return resample(data.mean(0, keepdims=True), int(rate), sample_rate)[0]


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
    """(input ids, labels) of the whole file as one stream, each of shape [N] int64 (text only)."""
    stream = read_stream(path, vocab_size, tokenizer)
    return stream.ids, stream.labels


def _speech_paths(sample: dict, where: str, file: Path) -> list[Path]:
    speech = sample.get("speech")
    if speech is None:
        return []
    names = [speech] if isinstance(speech, str) else speech
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        raise ConfigError(f"{where}: 'speech' must be an audio path or a list of them, got {speech!r}")
    paths = []
    for name in names:  # as LLaMA-Omni reads it (from the working directory), else beside the JSON file
        tried = [Path(name), file.parent / name]
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            shown = ", ".join(map(str, dict.fromkeys(tried)))
            raise ConfigError(f"{where}: speech file {name!r} not found (tried {shown})")
        paths.append(found)
    return paths


def _no_speech_front_end(where: str, what: str) -> ConfigError:
    return ConfigError(f"{where}: has {what}; training with speech needs LLaMA-Omni's model with its Whisper "
                       "encoder: model_type omni_speech_llama (or omni_speech2s_llama) and speech_encoder (a Whisper "
                       "checkpoint) in model.lm_kwargs or model.checkpoint's config.json, with LLaMA-Omni applied "
                       "(LLAMA_OMNI_SRC=<checkout> make apply-patches, which also installs openai-whisper); or drop "
                       "the sample's 'speech' and its <speech> placeholder")


def read_stream(path: str, vocab_size: int, tokenizer: Callable[[str], list[int]] | None,
                speech: SpeechFrontend | None = None) -> TokenStream:
    """The whole file as one `TokenStream`; speech samples need a `speech` front end."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: no such data file")
    ids: list[int] = []
    labels: list[int] = []
    refs: list[int] = []
    clips: list[Path] = []
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
            refs += [-1] * len(tokens)
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
            turns = sample["conversations"]
            for j, turn in enumerate(turns):
                if not (isinstance(turn, dict) and isinstance(turn.get("value"), str) and "from" in turn):
                    raise ConfigError(f"{where}: conversations[{j}] must be {{\"from\", \"value\": str}}, got {turn!r}")
            placeholders = sum(t["value"].count(SPEECH_PLACEHOLDER) for t in turns)
            if sample.get("speech") is not None and speech is None:
                raise _no_speech_front_end(where, f"speech {sample['speech']!r}")
            paths = _speech_paths(sample, where, file)
            if placeholders != len(paths):
                raise ConfigError(f"{where}: {placeholders} {SPEECH_PLACEHOLDER} placeholder(s) in its turns but "
                                  f"{len(paths)} 'speech' path(s); LLaMA-Omni puts one clip at each placeholder")
            sample_clips = iter(paths)
            for j, turn in enumerate(turns):
                answer = turn["from"] in ("gpt", "assistant")
                parts = f"{turn['from']}: {turn['value']}\n".split(SPEECH_PLACEHOLDER)
                if answer and len(parts) > 1:
                    raise ConfigError(f"{where}: conversations[{j}] ({turn['from']}) has a {SPEECH_PLACEHOLDER} "
                                      "placeholder; speech goes in the user's turns")
                for k, part in enumerate(parts):
                    tokens = tokenizer(part) if part else []
                    _check_ids(tokens, vocab_size, f"{where}: conversations[{j}]")
                    ids += tokens
                    labels += tokens if answer else [IGNORE] * len(tokens)
                    refs += [-1] * len(tokens)
                    if k < len(parts) - 1:  # a clip: its positions, taking no loss
                        n = speech.positions
                        ids += [SPEECH] * n
                        labels += [IGNORE] * n
                        refs += range(len(clips) * n, (len(clips) + 1) * n)
                        clips.append(next(sample_clips))
    else:
        raise ConfigError(f"{path}: expected a .jsonl of token ids or LLaMA-Omni's instruction .json, or "
                          "'synthetic'")
    return TokenStream(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                       torch.tensor(refs, dtype=torch.long) if clips else None, clips)


def _check_ids(tokens: list[int], vocab_size: int, where: str) -> None:
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ConfigError(f"{where}: token id {bad[0]} outside the model's vocabulary [0, {vocab_size})")


class TokenWindows:
    """Windows of `seq_len` tokens of a stream, in a seeded order per epoch (or in order), `batch_size` per batch;
    rank r takes every world-th batch slot. With `speech` (a `TokenStream` with clips and the model's front end)
    batches are `SpeechBatch`es holding the features of the clips their windows touch."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seq_len: int, seed: int,
                 rank: int, world_size: int, shuffle: bool, where: str,
                 speech: tuple[TokenStream, SpeechFrontend] | None = None) -> None:
        self.windows = ids.numel() // seq_len
        if self.windows < batch_size * world_size:
            raise ConfigError(f"{where}: {ids.numel()} tokens make {self.windows} window(s) of {seq_len}, fewer than "
                              f"one batch ({batch_size} x {world_size} processes)")
        n = self.windows * seq_len
        self.ids, self.labels = ids[:n].view(-1, seq_len), labels[:n].view(-1, seq_len)
        self.refs = self.clips = self.frontend = None
        if speech is not None:
            stream, self.frontend = speech
            self.refs, self.clips = stream.refs[:n].view(-1, seq_len), stream.clips
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
        if self.refs is None:
            return torch.stack([self.ids[rows], self.labels[rows]], dim=1)
        refs = self.refs[rows]  # [B, T]
        n = self.frontend.positions
        clips = sorted(set((refs[refs >= 0] // n).tolist()))
        local = torch.full((int(refs.max()) // n + 1 if clips else 1,), -1, dtype=torch.long)
        local[clips] = torch.arange(len(clips))
        refs = torch.where(refs >= 0, local[(refs // n).clamp_min(0)] * n + refs % n, -1)
        audio = [read_clip(self.clips[c], self.frontend.sample_rate) for c in clips] or [torch.zeros(0)]
        mels = torch.stack([self.frontend.mel(wav) for wav in audio])  # [S, frames, n_mels]
        return SpeechBatch(torch.stack([self.ids[rows], self.labels[rows], refs], dim=1), mels)

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


def build_llama_loader(source: str, *, seq_len: int, batch_size: int, vocab_size: int, seed: int, rank: int,
                       world_size: int, tokenizer: Callable[[str], list[int]] | None, shuffle: bool = True,
                       stream: int = 0, speech: SpeechFrontend | None = None):
    """The stateful loader of `source` ("synthetic" or a file); `stream` tells held-out synthetic data apart;
    `speech`: the model's speech front end (None: speech samples are refused)."""
    if source == "synthetic":
        return SyntheticTokens(batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size, seed=seed, rank=rank,
                               stream=stream)
    data = read_stream(source, vocab_size, tokenizer, speech)
    return TokenWindows(data.ids, data.labels, batch_size=batch_size, seq_len=seq_len, seed=seed, rank=rank,
                        world_size=world_size, shuffle=shuffle, where=source,
                        speech=(data, speech) if data.clips else None)
