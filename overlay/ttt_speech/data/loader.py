"""The training data stream: a stateful, deterministic, sharded loader of Moshi token batches.

Contract of `build_loader(cfg, rank, world_size)`:

- It is an endless iterator of LongTensor batches of shape [B, 17, T], B = `cfg.batch_size` (per rank) and
  T = round(duration_sec * 12.5). Rows are [text, 8 left/main-speaker codebooks, 8 right/user codebooks].
- Samples. A recording of F frames (F from its manifest duration) holds max(1, F // T) crops of T frames, laid end
  to end from an offset. With `random_crop`, the offset is drawn uniformly in [0, F - crops * T] from
  (seed, epoch, file index), so every epoch sees other windows; otherwise it is 0. The samples of an epoch are
  all crops of all recordings.
- Order and sharding. Each epoch visits all samples in an order drawn from (seed, epoch) (manifest order when
  `shuffle` is off); rank r takes positions r, r + W, r + 2W, ... of that order, so across W ranks every sample is
  read exactly once per epoch. A rank's stream runs epoch after epoch; batches may straddle two epochs.
- Content. A crop is a window of its recording's full streams: the audio codes come from encoding the whole
  recording (`codes.encode_recording`, or shards written by `codes.pre_encode`: the same values), the text row
  from interleaving all of its words (`interleave.interleave_text`). Frames past the end of a recording shorter
  than T are ZERO_TOKEN (-1) in all 17 rows, which moshi's LMModel masks out.
- Resume. `state_dict()` is a dict of ints: samples read so far on this rank, plus what the position depends on
  (seed, rank, world size, sample count, crop length, shuffle, random_crop, and a fingerprint of the manifest's
  content). `load_state_dict` on a fresh loader built from the same config makes it yield exactly the batches the
  uninterrupted loader would have yielded next; a state from another configuration, or another manifest with the
  same sample count, is refused with the differences named.
- Checks. Codes whose length does not match the manifest's duration are refused at construction; a recording
  whose alignments yield no text token (times in milliseconds, past the end, another speaker's label) is warned
  about once (`DataWarning`), naming its alignment file.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ttt_speech.data.audio import FRAME_RATE, num_frames
from ttt_speech.data.codes import CodeStore, encode_recording
from ttt_speech.data.interleave import END_OF_TEXT_PAD, TEXT_PAD, ZERO_TOKEN, interleave_text, tokenize_words
from ttt_speech.data.manifest import MAIN_SPEAKER, ManifestEntry, Word, read_alignments, read_manifest
from ttt_speech.errors import ConfigError, DataError, DataFileNotFound

# word times this far past the end of a recording mean the alignment does not belong to it (or is in ms)
ALIGNMENT_SLACK_SEC = 1.0


class DataWarning(UserWarning):
    """Data that is legal but probably not what was meant (it trains on padding)."""


@dataclasses.dataclass
class DataConfig:
    """What the training stream reads and how.

    Args:
        train_manifest: the jsonl manifest (moshi-finetune's format, see `ttt_speech.data.manifest`).
        duration_sec: crop length in seconds; T = round(duration_sec * 12.5) frames.
        batch_size: crops per batch, per rank.
        seed: drives the epoch orders and crop offsets.
        shuffle: a new sample order each epoch; False keeps manifest order.
        random_crop: crops start at a random offset each epoch; False starts them at 0.
        tokenizer: SentencePiece model file of the text stream.
        mimi: Mimi weights file, or "tiny-random" (see `ttt_speech.integrations.mimi.load_mimi`).
        codes_dir: codes pre-encoded from the same manifest (`pre_encode`); Mimi is then never loaded.
        device: where Mimi encodes.
        main_speaker: only this speaker's words make the text stream; None keeps every speaker's.
        num_codebooks: Mimi codebooks per channel.
        cache_files: recordings whose token streams stay in memory.
        text_card: the language model's text vocabulary; None skips the check that the tokenizer's ids fit in it.
    """

    train_manifest: str = ""
    duration_sec: float = 10.0
    batch_size: int = 1
    seed: int = 0
    shuffle: bool = True
    random_crop: bool = True
    tokenizer: str = ""
    mimi: str = "tiny-random"
    codes_dir: str | None = None
    device: str = "cpu"
    main_speaker: str | None = MAIN_SPEAKER
    num_codebooks: int = 8
    cache_files: int = 64
    text_card: int | None = None

    def __post_init__(self) -> None:
        if not self.train_manifest:
            raise ConfigError("DataConfig.train_manifest must name a jsonl manifest")
        if not self.tokenizer:
            raise ConfigError("DataConfig.tokenizer (data.tokenizer) must name a SentencePiece model file")
        if not self.duration_sec > 0 or self.crop_frames < 1:
            raise ConfigError(f"DataConfig.duration_sec must be at least one frame (0.08 s), got {self.duration_sec}")
        for name in ("batch_size", "num_codebooks", "cache_files"):
            if getattr(self, name) < 1:
                raise ConfigError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"DataConfig.seed must be >= 0, got {self.seed}")

    @property
    def crop_frames(self) -> int:
        return round(self.duration_sec * FRAME_RATE)


class CropSampler:
    """Which crop of which recording each position of a rank's stream holds (see the module docstring).

    Args:
        file_frames: frames of each recording.
        crop_frames: T.
        rank, world_size: this rank's shard.
    """

    def __init__(self, file_frames: Sequence[int], crop_frames: int, seed: int, shuffle: bool, random_crop: bool,
                 rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.file_frames = list(file_frames)
        self.crop_frames = crop_frames
        self.seed, self.shuffle, self.random_crop = seed, shuffle, random_crop
        self.rank, self.world_size = rank, world_size
        self.crops_per_file = [max(1, f // crop_frames) for f in self.file_frames]
        self.first_sample = np.cumsum([0, *self.crops_per_file])
        self.num_samples = int(self.first_sample[-1])
        if self.num_samples < world_size:
            raise ValueError(f"{self.num_samples} samples of {crop_frames} frames cannot feed {world_size} ranks")
        self.shard_size = len(range(rank, self.num_samples, world_size))
        self._order: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All sample ids in the order epoch `epoch` visits them (every rank computes the same)."""
        if self._order is None or self._order[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch, 0]).permutation(self.num_samples) if self.shuffle
                     else np.arange(self.num_samples))
            self._order = (epoch, order)
        return self._order[1]

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's sample ids for `epoch`, in reading order."""
        return self.epoch_order(epoch)[self.rank::self.world_size]

    def crop(self, sample: int, epoch: int) -> tuple[int, int]:
        """(file index, first frame) of `sample` in `epoch`."""
        i = int(np.searchsorted(self.first_sample, sample, side="right")) - 1
        slack = self.file_frames[i] - self.crops_per_file[i] * self.crop_frames
        offset = 0
        if self.random_crop and slack > 0:
            offset = int(np.random.default_rng([self.seed, epoch, 1, i]).integers(0, slack + 1))
        return i, offset + (sample - int(self.first_sample[i])) * self.crop_frames

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, sample id) at `position` of this rank's endless stream."""
        epoch, k = divmod(position, self.shard_size)
        return epoch, int(self.shard(epoch)[k])


class StatefulLoader:
    """Endless iterator of LongTensor [B, 17, T]; see the module docstring for the contract.

    Args:
        cfg: the data config.
        rank, world_size: this process's shard.
        mimi: an already loaded Mimi to encode with (else loaded from `cfg.mimi` when first needed).
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, mimi: Any = None):
        import sentencepiece

        self.cfg = cfg
        self.entries: list[ManifestEntry] = read_manifest(cfg.train_manifest)
        self.manifest_hash = int(hashlib.sha256(Path(cfg.train_manifest).read_bytes()).hexdigest()[:15], 16)
        if not Path(cfg.tokenizer).is_file():
            raise DataFileNotFound(f"DataConfig.tokenizer: SentencePiece model not found: {cfg.tokenizer}")
        try:
            self.tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(cfg.tokenizer))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{cfg.tokenizer}: not a SentencePiece model ({' '.join(str(e).split())})") from e
        if cfg.text_card is not None and self.tokenizer.vocab_size() > cfg.text_card:
            raise DataError(f"{cfg.tokenizer}: {self.tokenizer.vocab_size()} pieces, but the model's text vocabulary "
                            f"(text_card) has {cfg.text_card}: ids past it cannot be embedded; use the model's "
                            "tokenizer")
        self.sampler = CropSampler([num_frames(e.duration) for e in self.entries], cfg.crop_frames, cfg.seed,
                                   cfg.shuffle, cfg.random_crop, rank, world_size)
        self.store = CodeStore(cfg.codes_dir, cfg.mimi, cfg.num_codebooks) if cfg.codes_dir else None
        if self.store is not None:
            missing = [e for e in self.entries if e.path not in self.store]
            if missing:
                raise DataError(f"{missing[0].where}: {missing[0].path} is not in {cfg.codes_dir} ({len(missing)} "
                                f"of {len(self.entries)} recordings missing); pre-encode this manifest")
            for entry in self.entries:
                self.store.check_length(entry)
        self._mimi = mimi
        self._cache: collections.OrderedDict[int, torch.Tensor] = collections.OrderedDict()
        self._warned: set[int] = set()
        self.samples_seen = 0

    @property
    def epoch(self) -> int:
        """The epoch the next sample belongs to."""
        return self.samples_seen // self.sampler.shard_size

    def _fingerprint(self) -> dict[str, int]:
        s = self.sampler
        return {"seed": s.seed, "rank": s.rank, "world_size": s.world_size, "num_samples": s.num_samples,
                "crop_frames": s.crop_frames, "shuffle": int(s.shuffle), "random_crop": int(s.random_crop),
                "manifest_sha256": self.manifest_hash}

    def state_dict(self) -> dict[str, int]:
        return {"samples_seen": self.samples_seen, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (ints, or 0-d integer tensors as a checkpoint may return them)."""
        state = {k: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for k, v in state.items()}
        expected = self._fingerprint()
        diffs = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in expected.items() if state.get(k) != v]
        if diffs:
            if "manifest_sha256" in "".join(diffs):
                diffs.append(f"{self.cfg.train_manifest} is not the manifest this run started with")
            raise DataError("data loader state does not match this loader (" + "; ".join(diffs) + ")")
        seen = state.get("samples_seen")
        if not isinstance(seen, int) or seen < 0:
            raise DataError(f"data loader state: samples_seen must be an int >= 0, got {seen!r}")
        self.samples_seen = seen

    def __iter__(self) -> StatefulLoader:
        return self

    def __next__(self) -> torch.Tensor:
        position = self.samples_seen
        rows = []
        for _ in range(self.cfg.batch_size):
            epoch, sample = self.sampler.locate(position)
            rows.append(self.sample(sample, epoch))
            position += 1
        self.samples_seen = position
        return torch.stack(rows)

    def sample(self, sample: int, epoch: int) -> torch.Tensor:
        """Sample `sample` as drawn in `epoch`, a LongTensor [17, T]."""
        index, first = self.sampler.crop(sample, epoch)
        window = self.recording_stream(index)[:, first:first + self.cfg.crop_frames].long()
        return torch.nn.functional.pad(window, (0, self.cfg.crop_frames - window.shape[-1]), value=ZERO_TOKEN)

    def recording_stream(self, index: int) -> torch.Tensor:
        """The full token streams of recording `index`, of shape [17, F] (int32): text, then the codes."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        entry = self.entries[index]
        codes = self.store.get(entry) if self.store is not None else encode_recording(self._get_mimi(), entry)
        if codes.shape[0] != 2 * self.cfg.num_codebooks:
            raise DataError(f"{entry.where}: codes have {codes.shape[0]} rows, expected {2 * self.cfg.num_codebooks}")
        if self.store is not None:
            self.store.check_length(entry, codes.shape[-1])
        aligned = read_alignments(entry.alignment_path)
        words = tokenize_words(self.tokenizer, aligned, self.cfg.main_speaker)
        text = interleave_text(words, codes.shape[-1], FRAME_RATE)
        if index not in self._warned:
            self._warned.add(index)
            self._check_text(entry, aligned, text, codes.shape[-1] / FRAME_RATE)
        text = torch.tensor(text, dtype=codes.dtype)
        stream = torch.cat([text[None], codes]).to(torch.int32)
        self._cache[index] = stream
        if len(self._cache) > self.cfg.cache_files:
            self._cache.popitem(last=False)
        return stream

    def _check_text(self, entry: ManifestEntry, words: list[Word], text: list[int], seconds: float) -> None:
        """Warn when a recording with aligned words gets no text token, or its word times overrun it."""
        if not words:
            return
        where = entry.alignment_path
        problems = []
        last = max(w.end for w in words)
        if last > seconds + ALIGNMENT_SLACK_SEC:
            unit = "; are the times in milliseconds?" if last > 100 * seconds else ""
            problems.append(f"word times reach {last:g} s but the recording lasts {seconds:.2f} s{unit}")
        main = self.cfg.main_speaker
        speakers = sorted({w.speaker for w in words})
        if main is not None and main not in speakers:
            problems.append(f"no word is spoken by {main!r} (speakers: {', '.join(speakers[:5])}); only the main "
                            "speaker's words make the text stream")
        if all(t in (TEXT_PAD, END_OF_TEXT_PAD) for t in text):
            problems.append(f"its {len(words)} aligned words give no text token: the text stream is all padding")
        if problems:
            warnings.warn(f"{where}: " + "; ".join(problems), DataWarning, stacklevel=4)

    def _get_mimi(self) -> Any:
        if self._mimi is None:
            from ttt_speech.integrations.mimi import load_mimi

            self._mimi = load_mimi(self.cfg.mimi, device=self.cfg.device, num_codebooks=self.cfg.num_codebooks)
        return self._mimi


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, mimi: Any = None) -> StatefulLoader:
    """The training stream of `rank` among `world_size`; see the module docstring."""
    return StatefulLoader(cfg, rank, world_size, mimi=mimi)
